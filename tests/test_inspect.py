"""inspect: format detection with evidence, counts and problems, from metadata only."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

import ckpt_bridge
from ckpt_bridge.cli import main


def _tiny_state():
    g = torch.Generator().manual_seed(0)
    return {"model.embed_tokens.weight": torch.randn(11, 4, generator=g), "lm_head.weight": torch.randn(11, 4, generator=g),
            "model.norm.weight": torch.ones(4, dtype=torch.bfloat16)}


def _dcp_save(state, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path), no_dist=True)


def test_hf_dir_sharded(tiny_hf_dir):
    r = ckpt_bridge.inspect(tiny_hf_dir)
    assert r["format"] == "hf" and not r["problems"]
    assert "config.json" in r["evidence"]["files"]
    from safetensors import safe_open

    n = 0
    for f in tiny_hf_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            n += len(list(st.keys()))
    assert r["tensors"] == n > 0


def test_dcp_flat_nested_and_full_state(tmp_path):
    state = _tiny_state()
    _dcp_save(state, tmp_path / "flat")
    _dcp_save({"model": state}, tmp_path / "nested")
    _dcp_save({**state, "optimizer": {"state": {"lm_head.weight": {"exp_avg": torch.zeros(11, 4)}}},
               "lr_scheduler": {"last_epoch": 5}, "train_state": {"step": 5}}, tmp_path / "full")
    flat, nested, full = (ckpt_bridge.inspect(tmp_path / n) for n in ("flat", "nested", "full"))
    assert flat["format"] == nested["format"] == full["format"] == "dcp"
    assert ".metadata" in flat["evidence"]["files"]
    assert flat["details"]["layout"] == "flat" and flat["details"]["model_only"]
    assert nested["details"]["layout"] == "nested"
    assert full["details"]["layout"] == "flat" and not full["details"]["model_only"]
    assert set(full["details"]["sections"]) >= {"optimizer", "lr_scheduler", "train_state"}
    assert flat["tensors"] == 3 and flat["dtypes"] == {"float32": 2, "bfloat16": 1}
    assert flat["bytes"] == 2 * 11 * 4 * 4 + 4 * 2


def test_dcp_without_metadata_is_a_problem(tmp_path):
    _dcp_save(_tiny_state(), tmp_path / "step-5")
    (tmp_path / "step-5" / ".metadata").unlink()
    r = ckpt_bridge.inspect(tmp_path / "step-5")
    assert r["format"] == "dcp" and any("no .metadata" in p for p in r["problems"])


def test_torch_file(tmp_path):
    torch.save({"model": _tiny_state()}, tmp_path / "x.pt")
    r = ckpt_bridge.inspect(tmp_path / "x.pt")
    assert r["format"] == "torch-file" and r["tensors"] == 3


@pytest.mark.parametrize("mesh,expect", [("2", "('Shard(0)',) on ('fsdp',)"),
                                         ("2x2", "('Replicate()', 'Shard(0)') on ('ddp', 'fsdp')")])
def test_verl_actor_report(verl_ckpt, mesh, expect, capsys):
    actor = verl_ckpt("olmo2", mesh)
    assert main(["inspect", str(actor.parent), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    W = 4 if mesh == "2x2" else 2
    assert r["format"] == "verl-fsdp" and r["resolved_path"] == str(actor)
    assert r["details"]["world_size"] == W and r["details"]["ranks_present"] == list(range(W))
    assert r["details"]["extra_state_ranks"] == W and r["details"]["global_step"] == 1
    assert r["details"]["fsdp_config"]["world_size"] == W
    assert expect in r["placements"] and not r["problems"]
    assert r["config"].endswith("huggingface/config.json")
    assert main(["inspect", str(actor)]) == 0
    assert "verl-fsdp" in capsys.readouterr().out


def test_verify_across_formats(tiny_hf_dir, tmp_path):
    # the same weights as an HF dir and as a flat DCP folder compare equal
    from ckpt_bridge.formats.hf import HFReader

    with HFReader(tiny_hf_dir) as r:
        state = {k: r.read(k) for k in r.tensors()}
    _dcp_save(state, tmp_path / "dcp")
    assert ckpt_bridge.verify(tiny_hf_dir, tmp_path / "dcp").ok
    state["model.norm.weight"] = state["model.norm.weight"] + 1
    _dcp_save(state, tmp_path / "dcp2")
    res = ckpt_bridge.verify(tiny_hf_dir, tmp_path / "dcp2")
    assert not res.ok and [k for k, _ in res.value_diffs] == ["model.norm.weight"]
