"""The harness produces what verl 0.9.1 really writes, and its references are right.

Every checkpoint here is one the other test files use too (shared per session),
so this file adds no torchrun job of its own except the tiny failing one.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torch.distributed.tensor  # noqa: F401  (weights_only needs DTensor registered)
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor, Replicate, Shard

from ckpt_bridge.testing.harness import (
    TorchrunError,
    free_port,
    load_extra_state,
    load_rank_file,
    reference_dir,
    run_torchrun,
)


def _ranks(actor, W, kind="model"):
    return [load_rank_file(actor / f"{kind}_world_size_{W}_rank_{r}.pt") for r in range(W)]


def _reassemble(ranks, fsdp_size):
    """Concatenate the local shards of the first replica (ranks 0..fsdp_size-1) along their Shard dim."""
    out = {}
    for k, v in ranks[0].items():
        dim = v.placements[-1].dim
        out[k] = torch.cat([ranks[r][k].to_local() for r in range(fsdp_size)], dim=dim)
    return out


def test_file_names_world_size_2(verl_ckpt):
    actor = verl_ckpt("llama", "2")
    names = {p.name for p in actor.iterdir()}
    assert names == {
        "model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt",
        "optim_world_size_2_rank_0.pt", "optim_world_size_2_rank_1.pt",
        "extra_state_world_size_2_rank_0.pt", "extra_state_world_size_2_rank_1.pt",
        "fsdp_config.json", "huggingface",
    }
    assert {p.name for p in (actor / "huggingface").iterdir()} == {
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert json.loads((actor / "fsdp_config.json").read_text()) == {"FSDP_version": 2, "world_size": 2}
    root = actor.parent.parent
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert (actor.parent / "data.pt").is_file()  # the trainer's dataloader state, next to actor/
    cfg = json.loads((actor / "huggingface" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "float32" and "torch_dtype" not in cfg


def test_rank_files_hold_fsdp_dtensors_that_reassemble_to_the_reference(verl_ckpt):
    actor = verl_ckpt("llama", "2")
    ref_dir = reference_dir(actor)
    keys = json.loads((ref_dir / "keys.json").read_text())
    ranks = _ranks(actor, 2)
    for sd in ranks:
        assert list(sd) == keys
        for k, v in sd.items():
            assert isinstance(v, DTensor), k
            assert v.placements == (Shard(0),) and v.device_mesh.mesh_dim_names == ("fsdp",), k
    ref = load_file(ref_dir / "model.safetensors")
    full = _reassemble(ranks, 2)
    assert all(torch.equal(full[k], ref[k]) for k in keys)
    # uneven last shard: the local view is narrower than the (padded) storage torch.save wrote
    emb = ranks[1]["model.embed_tokens.weight"].to_local()
    assert tuple(emb.shape) == (125, 64)
    assert emb.untyped_storage().nbytes() == 126 * 64 * 4
    # training really moved the weights away from the base model
    base = load_file(actor.parent.parent / "base_model" / "model.safetensors")
    assert not torch.equal(base["model.layers.0.self_attn.q_proj.bias"], ref["model.layers.0.self_attn.q_proj.bias"])


def test_hsdp_placements(verl_ckpt):
    actor = verl_ckpt("olmo2", "2x2")
    ranks = _ranks(actor, 4)
    for sd in ranks:
        for k, v in sd.items():
            assert v.placements == (Replicate(), Shard(0)), k
            assert v.device_mesh.mesh_dim_names == ("ddp", "fsdp"), k
    for k in ranks[0]:  # replicas along 'ddp' hold identical shards
        assert torch.equal(ranks[0][k].to_local(), ranks[2][k].to_local()), k
        assert torch.equal(ranks[1][k].to_local(), ranks[3][k].to_local()), k
    ref = load_file(reference_dir(actor) / "model.safetensors")
    full = _reassemble(ranks, 2)
    assert set(full) == set(ref) and all(torch.equal(full[k], ref[k]) for k in ref)


def test_shard_dim_1(verl_ckpt):
    actor = verl_ckpt("llama", "2", shard_dim=1)
    ranks = _ranks(actor, 2)
    got = {k: v.placements for k, v in ranks[0].items()}
    assert got["model.embed_tokens.weight"] == (Shard(1),)
    assert got["lm_head.weight"] == (Shard(1),)
    assert got["model.layers.0.self_attn.q_proj.weight"] == (Shard(1),)
    assert got["model.layers.0.mlp.gate_proj.weight"] == (Shard(1),)
    # FSDP2 refuses uneven sharding on dim 1 (173 % 2): that param keeps Shard(0)
    assert got["model.layers.0.mlp.down_proj.weight"] == (Shard(0),)
    assert got["model.layers.0.self_attn.q_proj.bias"] == (Shard(0),)
    assert ranks[0]["model.embed_tokens.weight"].to_local().shape == (251, 32)
    ref = load_file(reference_dir(actor) / "model.safetensors")
    full = _reassemble(ranks, 2)
    assert all(torch.equal(full[k], ref[k]) for k in ref)


def test_extra_state_has_scheduler_and_per_rank_rng(verl_ckpt):
    actor = verl_ckpt("llama", "3")
    path = actor / "extra_state_world_size_3_rank_0.pt"
    with pytest.raises(pickle.UnpicklingError, match="numpy"):
        torch.load(path, weights_only=True)
    cpu_states = []
    for r in range(3):
        extra = load_extra_state(actor / f"extra_state_world_size_3_rank_{r}.pt")
        assert set(extra) == {"lr_scheduler", "rng"}
        assert set(extra["rng"]) == {"cpu", "numpy", "random"}  # no accelerator state on CPU
        live = torch.load(reference_dir(actor) / f"rank{r}_state.pt", weights_only=False)
        assert torch.equal(extra["rng"]["cpu"], live["rng_cpu"])
        assert extra["lr_scheduler"] == live["lr_scheduler"]
        assert extra["lr_scheduler"]["last_epoch"] == 1 and extra["lr_scheduler"]["lr_lambdas"] == [None]
        assert extra["rng"]["numpy"][0] == "MT19937" and (extra["rng"]["numpy"][1] == live["rng_numpy"][1]).all()
        assert extra["rng"]["random"] == live["rng_random"]
        cpu_states.append(bytes(extra["rng"]["cpu"].numpy()))
    assert len(set(cpu_states)) == 3  # ranks are seeded apart


def test_optimizer_files_hold_sharded_adam_state(verl_ckpt):
    actor = verl_ckpt("llama", "2")
    optim = load_rank_file(actor / "optim_world_size_2_rank_0.pt")
    assert set(optim) == {"state", "param_groups"}
    state0 = optim["state"][0]
    assert isinstance(state0["exp_avg"], DTensor) and state0["exp_avg"].placements == (Shard(0),)
    assert not isinstance(state0["step"], DTensor) and float(state0["step"]) == 1.0
    assert len(optim["param_groups"][0]["params"]) == 29


def test_tied_lm_head_is_in_the_rank_files(verl_ckpt):
    actor = verl_ckpt("llama_tied", "2")
    sd = load_rank_file(actor / "model_world_size_2_rank_0.pt")
    assert "lm_head.weight" in sd and "model.embed_tokens.weight" in sd
    lm, emb = sd["lm_head.weight"].to_local(), sd["model.embed_tokens.weight"].to_local()
    assert lm.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr()
    keys = json.loads((reference_dir(actor) / "keys.json").read_text())
    assert "lm_head.weight" in keys
    ref = load_file(reference_dir(actor) / "model.safetensors")
    assert torch.equal(ref["lm_head.weight"], ref["model.embed_tokens.weight"])


def test_bf16_checkpoint(verl_ckpt):
    actor = verl_ckpt("olmo2", "2", dtype="bf16")
    sd = load_rank_file(actor / "model_world_size_2_rank_1.pt")
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    cfg = json.loads((actor / "huggingface" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["architectures"] == ["Olmo2ForCausalLM"]


def test_reference_logits_match_the_reference_weights(verl_ckpt):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    actor = verl_ckpt("olmo2", "2")
    ref_dir = reference_dir(actor)
    config = AutoConfig.from_pretrained(actor / "huggingface")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(load_file(ref_dir / "model.safetensors"), strict=True)
    tokens = torch.load(ref_dir / "tokens.pt", weights_only=True)
    with torch.no_grad():
        logits = model.eval()(tokens).logits
    torch.testing.assert_close(logits, torch.load(ref_dir / "logits.pt", weights_only=True), atol=1e-5, rtol=0)
    tok = AutoTokenizer.from_pretrained(actor / "huggingface")
    assert tok("hello world")["input_ids"] and len(tok) <= config.vocab_size


def test_tiny_hf_dir_loads(tiny_hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert len(list(tiny_hf_dir.glob("*.safetensors"))) > 1
    assert (tiny_hf_dir / "model.safetensors.index.json").is_file()
    model, info = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, output_loading_info=True)
    assert not any(info.values()), info
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    assert tok.decode(tok("hello world")["input_ids"]) == "hello world"


def test_run_torchrun_reports_failures():
    assert 1024 <= free_port() < 65536
    with pytest.raises(TorchrunError, match="exit code"):
        run_torchrun(["json.tool", "--no-such-flag"], nproc=1, timeout=120)
