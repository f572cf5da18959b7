"""The family matrix: real verl 0.9.1 FSDP2 saves (2 CPU ranks) of every tiny family, one torchrun job.

For each family: ``to-hf`` equals ``save_pretrained`` of the live model (key for
key, bit for bit: MoE experts split per expert, Mixtral's ``block_sparse_moe``,
Qwen2.5-VL's ``model.*`` / ``visual.*``, a critic's value head written as
``*ForTokenClassification``); ``from_pretrained`` of the export loads with no
missing or unexpected key and gives the live model's logits; and the
``save_pretrained`` directory goes ``to-dcp`` (the trainer's in-memory keys:
fused experts) and back ``to-hf`` to the same tensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ckpt_bridge.commands.to_dcp import to_dcp
from ckpt_bridge.commands.to_hf import to_hf
from ckpt_bridge.testing.harness import make_verl_family_checkpoints, reference_dir

CORPUS = Path(__file__).resolve().parents[1] / "ckpt_bridge" / "testing" / "data" / "corpus.txt"
FAMILIES = ["qwen2", "qwen2_tied", "qwen3", "qwen3_moe", "mixtral", "gemma2", "gemma3_text", "phi3", "llama3_rope",
            "qwen2_critic", "qwen2_5_vl"]


@pytest.fixture(scope="module")
def family_ckpts(tmp_path_factory) -> dict[str, Path]:
    cache = os.environ.get("CKPT_BRIDGE_TEST_CACHE")
    root = (Path(cache) if cache else tmp_path_factory.mktemp("families")) / "families-mesh2"
    return make_verl_family_checkpoints(root, FAMILIES, mesh="2")


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        if f.name.startswith("aux_modules"):
            continue
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def _assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def _load(d: Path):
    import transformers

    cfg = json.loads((d / "config.json").read_text())
    cls = getattr(transformers, cfg["architectures"][0])
    model, info = cls.from_pretrained(str(d), output_loading_info=True)
    return model.eval(), info


@pytest.mark.parametrize("family", FAMILIES)
def test_to_hf_is_save_pretrained_and_loads_with_the_live_logits(family, family_ckpts, tmp_path):
    actor = family_ckpts[family]
    ref = reference_dir(actor)
    out = tmp_path / "hf"
    to_hf(actor, out, progress=False)
    _assert_same_tensors(_tensors(out), _tensors(ref / "hf"))

    model, info = _load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    if family == "qwen2_critic":  # verl's config says Qwen2ForCausalLM; the weights are a value head
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["architectures"] == ["Qwen2ForTokenClassification"] and model.config.num_labels == 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference ran at 1 thread; CPU MoE grouped matmuls depend on the count
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.load(ref / "tokens.pt")).logits
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(logits, torch.load(ref / "logits.pt"))


_HUB_DCP: dict[str, tuple[Path, Path]] = {}


def _hub_and_dcp(family: str, family_ckpts, tmp_path_factory) -> tuple[Path, Path]:
    """(save_pretrained of the live model + its tokenizer: what a hub download holds, its to-dcp output)."""
    if family not in _HUB_DCP:
        actor = family_ckpts[family]
        d = tmp_path_factory.mktemp(f"hub-{family}")
        hub = d / "hub"
        shutil.copytree(reference_dir(actor) / "hf", hub)
        for tok in (actor.parents[1] / "base_model").glob("tokenizer*"):
            shutil.copy2(tok, hub)
        to_dcp(hub, d / "dcp", dtype="keep", progress=False)
        _HUB_DCP[family] = (hub, d / "dcp")
    return _HUB_DCP[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_hub_format_to_dcp_and_back_gives_the_same_files(family, family_ckpts, tmp_path_factory, tmp_path):
    from ckpt_bridge.formats.dcp import DCPReader
    from ckpt_bridge.checks.verify_dcp import verify_dcp

    hub, dcp_dir = _hub_and_dcp(family, family_ckpts, tmp_path_factory)
    with DCPReader(dcp_dir) as r:  # what the trainer's model requests: transformers' in-memory names
        keys = set(r.tensors())
    if family in ("qwen3_moe", "mixtral"):
        assert "model.layers.0.mlp.experts.gate_up_proj" in keys
        assert not any(".experts.0." in k for k in keys)
    if family == "qwen2_5_vl":
        assert any(k.startswith("model.language_model.") for k in keys)
    # every requested key present, every tensor equal to the hub's seen through the plan
    res = verify_dcp(dcp_dir, hub)
    assert res.keys_ok and res.compared == res.equal == len(keys) and not res.value_diffs
    to_hf(dcp_dir, tmp_path / "back", progress=False)
    _assert_same_tensors(_tensors(tmp_path / "back"), _tensors(hub))


# verify --loss loads both sides as the class config.json names and runs after_load (Gemma's embed_scale,
# the VLM's vision rotary, a critic compared on its values).
@pytest.mark.parametrize("family", list(FAMILIES))
def test_verify_loss_of_the_bootstrapped_dcp_equals_the_hub_model(family, family_ckpts, tmp_path_factory):
    from ckpt_bridge.checks.verify_dcp import verify_dcp

    hub, dcp_dir = _hub_and_dcp(family, family_ckpts, tmp_path_factory)
    res = verify_dcp(dcp_dir, hub, loss_text=CORPUS, loss_tokens=64)
    assert res.ok and res.loss_ok and res.loss_hf == res.loss_dcp


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_5_vl"])
def test_verify_compares_a_trainer_checkpoint_with_its_hub_format_export(family, family_ckpts, tmp_path):
    """verl holds transformers' in-memory names (fused experts); the export holds save_pretrained's.
    verify sees the trainer side through its to-hf plan and compares every tensor."""
    from ckpt_bridge.checks.verify import verify

    actor = family_ckpts[family]
    out = tmp_path / "hf"
    to_hf(actor, out, progress=False)
    res = verify(actor, out)
    assert res.ok and not res.only_in_a and not res.only_in_b
    assert res.compared == res.equal == len(_tensors(out))


def test_verify_reports_aux_modules_kept_apart_as_aux(family_ckpts, tmp_path):
    """An export whose aux heads sit in aux_modules.safetensors against its HF source: every model
    tensor equal, the aux ones listed as aux, not as 'only in B'."""
    from ckpt_bridge.checks.verify import format_result, verify

    hub = reference_dir(family_ckpts["qwen2"]) / "hf"
    to_dcp(hub, tmp_path / "dcp", aux=["future_predictor:mlp"], dtype="keep", progress=False)
    to_hf(tmp_path / "dcp", tmp_path / "hf", progress=False)
    assert (tmp_path / "hf" / "aux_modules.safetensors").is_file()
    res = verify(hub, tmp_path / "hf")
    assert res.ok and not res.only_in_b and res.compared == len(_tensors(hub))
    assert sorted(k.split(".", 1)[0] for k in res.aux_only) == ["future_predictor"] * 4
    assert "aux modules kept apart" in format_result(res)


@pytest.mark.parametrize("direction", ["to_dcp", "dcp_to_hf"])
def test_moe_conversions_stream_one_group_at_a_time(direction, family_ckpts, tmp_path_factory, tmp_path,
                                                    monkeypatch):
    """Fusing per-expert weights (to-dcp) or splitting a fused tensor (to-hf) holds one group: each time
    the next source tensor is read, count the earlier ones whose storage is still alive.  (No gc.collect():
    refcounting frees a storage the moment its last tensor goes; one held in a cycle counts as alive, so
    the check can only err on the strict side.)"""
    from ckpt_bridge.formats.dcp import DCPReader
    from ckpt_bridge.formats.hf import HFReader
    from ckpt_bridge.pipeline import pieces
    from ckpt_bridge.testing.streaming import count_live_reads

    hub, dcp_dir = _hub_and_dcp("qwen3_moe", family_ckpts, tmp_path_factory)
    live = count_live_reads(monkeypatch, HFReader if direction == "to_dcp" else DCPReader)
    if direction == "to_dcp":
        # every renamed tensor read whole, as before row chunks (DCP's writer is fed row pieces now: the pieces'
        # own streaming is checked by tests/test_dcp_chunks.py); this checks the fused groups
        monkeypatch.setattr(pieces, "PIECE_BYTES", 1)
        to_dcp(hub, tmp_path / "out", dtype="keep", progress=False)
        assert live.reads == 45
        # the gate/up inputs of one layer's experts read before the 8th (7), and the tensor DCP's writer still
        # holds from its previous item (a renamed source tensor in the trainer's request order)
        assert live.peak <= 8
    else:
        to_hf(dcp_dir, tmp_path / "out", progress=False)
        # the 4 fused expert tensors are read whole and split; the 21 renamed ones move in row pieces
        # through reused buffers (read_rows, ckpt_bridge.pipeline.pieces), never as whole tensors
        assert live.reads == 4
        assert live.peak <= 2  # the fused tensor being split and written, and the one read ahead
