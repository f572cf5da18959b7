"""to-hf on real verl FSDP checkpoints: bit-exact against the live model.

Each checkpoint is made by a real torchrun job: a tiny model sharded with FSDP2
``fully_shard`` on CPU/gloo, trained, and saved with verl 0.9.1's
``FSDPCheckpointManager`` (see ``ckpt_bridge.testing.verl_save``).  The
reference is ``get_model_state_dict(full_state_dict=True)`` taken from the live
model at save time, plus its logits on a fixed batch.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckpt_bridge
from ckpt_bridge.testing.harness import reference_dir

CASES = [
    # (model, mesh, shard_dim, dtype)
    ("llama", "1", 0, "fp32"),
    ("llama", "2", 0, "fp32"),
    ("olmo2", "3", 0, "fp32"),
    ("llama", "4", 0, "fp32"),
    ("llama", "11", 0, "fp32"),  # rank_10 sorts before rank_2 as text
    ("llama_tied", "2", 0, "fp32"),
    ("olmo2", "2x2", 0, "fp32"),  # HSDP: (Replicate(), Shard(0)) on ('ddp', 'fsdp')
    ("llama", "2", 1, "fp32"),  # Shard(1)
    ("olmo2", "2", 0, "bf16"),
]


def _ids(case):
    model, mesh, sd, dt = case
    return f"{model}-mesh{mesh}" + (f"-shard{sd}" if sd else "") + ("" if dt == "fp32" else f"-{dt}")


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_to_hf_is_bit_exact_and_loads(case, verl_ckpt, tmp_path):
    model, mesh, shard_dim, dtype = case
    actor = verl_ckpt(model, mesh, shard_dim=shard_dim, dtype=dtype)
    ref_dir = reference_dir(actor)
    ref = load_file(ref_dir / "model.safetensors")
    all_keys = json.loads((ref_dir / "keys.json").read_text())
    out = tmp_path / "hf"

    summary = ckpt_bridge.to_hf(actor.parent, out, progress=False)  # global_step_N -> its actor

    got = load_dir(out)
    config = json.loads((out / "config.json").read_text())
    tied = config.get("tie_word_embeddings", False)
    expected_keys = set(all_keys) - ({"lm_head.weight"} if tied else set())
    assert set(got) == expected_keys
    for k in expected_keys:
        assert got[k].dtype == ref[k].dtype, k
        assert torch.equal(got[k], ref[k]), k
    want_dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    assert config["dtype"] == config["torch_dtype"] == summary.dtype == want_dtype
    assert config["architectures"]

    from transformers import AutoModelForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tokens = torch.load(ref_dir / "tokens.pt", weights_only=True)
    live = torch.load(ref_dir / "logits.pt", weights_only=True)
    with torch.no_grad():
        logits = hf.eval()(tokens).logits
    # Same weights and dtype; only the thread count (reduction order) differs
    # from the torchrun job that computed the live logits.
    atol = 1e-5 if dtype == "fp32" else 2e-2
    torch.testing.assert_close(logits.float(), live.float(), atol=atol, rtol=0)


def test_extra_state_keeps_every_ranks_rng_and_the_scheduler(verl_ckpt, tmp_path):
    actor = verl_ckpt("llama", "3")
    out = tmp_path / "hf"
    summary = ckpt_bridge.to_hf(actor, out, progress=False)
    assert summary.extra_state and summary.global_step == 1
    import torch.serialization

    from ckpt_bridge import safeload

    merged = safeload.load(out / "extra_state_merged.pt", mmap=False, allow_numpy=True)
    ref_dir = reference_dir(actor)
    assert sorted(merged["rng"]) == [0, 1, 2]
    for r in range(3):
        state = torch.load(ref_dir / f"rank{r}_state.pt", weights_only=False)
        assert torch.equal(merged["rng"][r]["cpu"], state["rng_cpu"])
        assert merged["lr_scheduler"] == state["lr_scheduler"]
    # ranks really do carry different rng streams (data-parallel ranks are seeded apart)
    readable = json.loads((out / "lr_scheduler_state.json").read_text())
    assert readable["global_step"] == 1 and readable["ranks_with_rng"] == [0, 1, 2]
    assert readable["lr_scheduler"]["last_epoch"] == merged["lr_scheduler"]["last_epoch"]


def test_dtype_cast_and_sharding(verl_ckpt, tmp_path):
    actor = verl_ckpt("llama", "2")
    ref = load_file(reference_dir(actor) / "model.safetensors")
    out = tmp_path / "hf"
    ckpt_bridge.to_hf(actor, out, dtype="bf16", max_shard_size="40KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got = load_dir(out)
    assert len(set(index["weight_map"].values())) > 2
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    for k, t in got.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, ref[k].to(torch.bfloat16)), k
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # verify agrees: exact after the same cast, different without it
    assert ckpt_bridge.verify(actor, out, cast_to="bf16").ok
    assert not ckpt_bridge.verify(actor, out).ok


def test_tokenizer_and_configs_are_copied(verl_ckpt, tmp_path):
    actor = verl_ckpt("olmo2", "2")
    out = tmp_path / "hf"
    summary = ckpt_bridge.to_hf(actor, out, progress=False)
    assert not summary.warnings
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok("hello world")["input_ids"]
    assert (out / "generation_config.json").is_file()


def test_older_verl_layouts(verl_ckpt, tmp_path):
    """verl 0.4.0: config/tokenizer at the actor root; verl <= 0.3: no fsdp_config.json."""
    import shutil

    actor = verl_ckpt("llama", "2")
    old = tmp_path / "global_step_1" / "actor"
    shutil.copytree(actor, old, ignore=shutil.ignore_patterns("optim_*"))
    for f in (old / "huggingface").iterdir():
        f.rename(old / f.name)
    (old / "huggingface").rmdir()
    (old / "fsdp_config.json").unlink()
    report = ckpt_bridge.inspect(old)
    assert not report["problems"] and report["config"] == str(old / "config.json")
    out = tmp_path / "hf"
    summary = ckpt_bridge.to_hf(old, out, progress=False)
    assert not summary.warnings  # tokenizer found at the actor root
    ref = load_file(reference_dir(actor) / "model.safetensors")
    got = load_dir(out)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got)


def test_zero_initialised_biases_are_not_taken_for_replicas(verl_ckpt, tmp_path):
    """Saved right after init (step 0): zero biases and all-ones norms have identical
    shards on every rank, which an "equal on all ranks means replicated" script
    keeps as one shard.  The placements say Shard(0): the export must be whole."""
    from ckpt_bridge.formats.verl_fsdp import VerlFSDPReader

    actor = verl_ckpt("llama", "2", steps=0)
    with VerlFSDPReader(actor) as r:
        look_alike = [k for k in r.tensors()
                      if torch.equal(r._sd(0)[k]._local_tensor, r._sd(1)[k]._local_tensor)]
    assert any(k.endswith(".bias") for k in look_alike)
    out = tmp_path / "hf"
    ckpt_bridge.to_hf(actor, out, progress=False)
    ref = load_file(reference_dir(actor) / "model.safetensors")
    got = load_dir(out)
    for k in look_alike:
        assert got[k].shape == ref[k].shape and torch.equal(got[k], ref[k]), k


def test_key_plan_expectation_is_cached_per_config(verl_ckpt, tmp_path):
    import os

    from ckpt_bridge.plan.hf_target import _cache_file, expected_model

    actor = verl_ckpt("llama", "2")
    cfg = actor / "huggingface"
    cache = _cache_file(cfg)
    assert cache is not None and str(cache).startswith(os.environ["CKPT_BRIDGE_CACHE"])
    first = expected_model(cfg)
    assert cache.is_file()
    assert expected_model(cfg) == first  # served from the cache
    other = tmp_path / "cfg"
    other.mkdir()
    (other / "config.json").write_text((cfg / "config.json").read_text().replace('"num_hidden_layers": 2',
                                                                                  '"num_hidden_layers": 1'))
    assert _cache_file(other) != cache
    assert len(expected_model(other).shapes) < len(first.shapes)
