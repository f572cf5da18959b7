"""NaN, Inf, -0.0 and subnormals survive every path bit for bit, and every comparison treats them right:
exact = same bits (NaN equals the same NaN, -0.0 differs from 0.0); with a tolerance, matching NaN/Inf
positions are equal and unmatched ones are reported.  Real verl saves (rewritten with torch's own
save/load), to-dcp output read back with DCP's own loader."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from ckpt_bridge import safeload
from ckpt_bridge.cli import main as cli
from ckpt_bridge.compare import bits_equal, deep_equal, diff
from ckpt_bridge.formats.hf import weight_files
from ckpt_bridge.formats.verl_fsdp import VerlFSDPReader

SPECIAL = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 1e-45, -1e-40, 1.5e-39, 0.0])


def with_specials(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    flat = t.view(-1)
    flat[: len(SPECIAL)] = SPECIAL.to(t.dtype)
    return t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:  # independent of ckpt_bridge.compare
    return a.dtype == b.dtype and a.shape == b.shape and \
        a.contiguous().view(torch.int32 if a.element_size() == 4 else torch.int16).equal(
            b.contiguous().view(torch.int32 if b.element_size() == 4 else torch.int16))


def _load(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, weights_only=False, map_location="cpu")  # our own test copy


def _save_rewritten(path: Path, mutate) -> None:
    obj = _load(path)
    mutate(obj)
    torch.save(obj, path)


def run(capsys, args):
    capsys.readouterr()
    code = cli(args)
    c = capsys.readouterr()
    return code, c.out, c.err


@pytest.fixture(scope="module")
def special_verl(verl_ckpt, tmp_path_factory):
    """A real verl save whose embed shards on both ranks hold NaN/Inf/-0/subnormals, and whose lr_scheduler
    holds _last_lr=[nan] on both ranks.  Returns (actor dir, expected full embed tensor)."""
    actor = tmp_path_factory.mktemp("special-verl") / "global_step_1" / "actor"
    shutil.copytree(verl_ckpt("llama", "2"), actor)
    key = "model.embed_tokens.weight"
    shards = []
    for r in range(2):
        def mutate(sd, r=r):
            local = sd[key]._local_tensor
            local.copy_(with_specials(local))
            shards.append(local.clone())
        _save_rewritten(actor / f"model_world_size_2_rank_{r}.pt", mutate)
        _save_rewritten(actor / f"extra_state_world_size_2_rank_{r}.pt",
                        lambda st: st["lr_scheduler"].__setitem__("_last_lr", [float("nan")]))
    return actor, torch.cat(shards, 0)  # Shard(0) on a 2-rank mesh: rank 0's rows, then rank 1's


def test_verl_to_hf_keeps_specials_and_nan_lr(special_verl, tmp_path, capsys):
    actor, expected = special_verl
    code, out, err = run(capsys, ["to-hf", str(actor), "--out", str(tmp_path / "hf"), "--quiet"])
    assert code == 0, err
    got = {}
    for f in weight_files(tmp_path / "hf")[1]:
        got.update(load_file(f))
    assert same_bits(got["model.embed_tokens.weight"], expected)
    extra = safeload.load_plain(tmp_path / "hf" / "extra_state_merged.pt")
    assert str(extra["lr_scheduler"]["_last_lr"]) == "[nan]"
    # exact verify of the export against the source: equal (NaN == the same NaN)
    code, out, err = run(capsys, ["verify", str(actor), str(tmp_path / "hf")])
    assert code == 0 and "result: EQUAL" in out, out + err

    # -0.0 flipped to 0.0 in the export: exact verify says different (bits), a tolerance says equal
    flipped = tmp_path / "flipped"
    shutil.copytree(tmp_path / "hf", flipped)
    for f in weight_files(flipped)[1]:
        sd = load_file(f)
        if "model.embed_tokens.weight" in sd:
            sd["model.embed_tokens.weight"].view(-1)[3] = 0.0
            save_file(sd, f, metadata={"format": "pt"})
    code, out, _ = run(capsys, ["verify", str(tmp_path / "hf"), str(flipped)])
    assert code == 1 and "bits differ" in out
    code, out, _ = run(capsys, ["verify", str(tmp_path / "hf"), str(flipped), "--atol", "1e-6"])
    assert code == 0, out


def test_verl_cross_rank_checks_compare_bits(special_verl, tmp_path):
    actor, _ = special_verl
    ws = tmp_path / "global_step_1" / "actor"
    shutil.copytree(actor, ws)
    buf = torch.tensor([float("nan"), -0.0, float("inf"), 1e-45])
    for r in range(2):  # a plain buffer, the same NaN on every rank
        _save_rewritten(ws / f"model_world_size_2_rank_{r}.pt", lambda sd: sd.__setitem__("special_buffer", buf))
    with VerlFSDPReader(ws) as reader:
        assert same_bits(reader.read("special_buffer"), buf)
        assert str(reader.extra_state()["lr_scheduler"]["_last_lr"]) == "[nan]"
    # -0.0 on rank 0, 0.0 on rank 1: not a copy
    _save_rewritten(ws / "model_world_size_2_rank_1.pt",
                    lambda sd: sd.__setitem__("special_buffer", torch.tensor([float("nan"), 0.0, float("inf"), 1e-45])))
    with VerlFSDPReader(ws) as reader, pytest.raises(Exception, match="differs from rank 0"):
        reader.read("special_buffer")


@pytest.fixture(scope="module")
def special_hf(tiny_hf_factory, tmp_path_factory):
    d = tmp_path_factory.mktemp("special-hf") / "hf"
    shutil.copytree(tiny_hf_factory("llama"), d)
    for f in weight_files(d)[1]:
        sd = load_file(f)
        sd = {k: with_specials(v) if v.dtype.is_floating_point and v.numel() >= len(SPECIAL) else v
              for k, v in sd.items()}
        save_file(sd, f, metadata={"format": "pt"})
    return d


def test_to_dcp_and_back_keep_specials(special_hf, tmp_path, capsys):
    src = {}
    for f in weight_files(special_hf)[1]:
        src.update(load_file(f))
    d = tmp_path / "dcp"
    code, _, err = run(capsys, ["to-dcp", str(special_hf), "--out", str(d), "--dtype", "keep", "--quiet"])
    assert code == 0, err
    # read back with DCP's own loader (every source key the trainer requests: here all of them)
    state = {k: torch.empty_like(v) for k, v in src.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(d), no_dist=True)
    assert state and all(same_bits(state[k], src[k]) for k in state)

    code, out, err = run(capsys, ["verify", str(d), "--against", str(special_hf)])
    assert code == 0 and "result: OK" in out, out + err
    code, out, err = run(capsys, ["verify", str(d), str(special_hf)])
    assert code == 0, out + err

    code, _, err = run(capsys, ["to-hf", str(d), "--out", str(tmp_path / "back"), "--quiet"])
    assert code == 0, err
    back = {}
    for f in weight_files(tmp_path / "back")[1]:
        back.update(load_file(f))
    assert set(back) <= set(src) and all(same_bits(back[k], src[k]) for k in back)


def test_tolerance_reports_unmatched_nan_and_inf(special_hf, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(special_hf, other)
    f = weight_files(other)[1][0]
    sd = load_file(f)
    k = next(k for k, v in sd.items() if v.dtype.is_floating_point and v.numel() > 20)
    sd[k].view(-1)[0] = 1.0  # was NaN
    sd[k].view(-1)[10] = float("inf")  # was finite
    save_file(sd, f, metadata={"format": "pt"})
    code, out, _ = run(capsys, ["verify", str(special_hf), str(other), "--atol", "10"])
    assert code == 1 and "NaN/Inf at 2 position(s)" in out, out
    code, out, _ = run(capsys, ["verify", str(special_hf), str(special_hf), "--atol", "1e-3"])
    assert code == 0 and "result: EQUAL" in out and "max abs diff 0" in out and "NaN/Inf" not in out, out


def test_compare_helpers():
    a = with_specials(torch.zeros(12))
    assert bits_equal(a, a.clone()) and not torch.equal(a, a.clone())
    b = a.clone()
    b[3] = 0.0
    assert not bits_equal(a, b) and diff(a, b).within(0.0)
    assert bits_equal(a.bfloat16(), a.bfloat16().clone())
    c = a.clone()
    c[0] = 1.0
    d = diff(a, c)
    assert d.nonfinite_mismatch == 1 and not d.within(1e9)
    assert deep_equal({"_last_lr": [float("nan")]}, {"_last_lr": [float("nan")]})
    assert not deep_equal({"x": [-0.0]}, {"x": [0.0]})
