"""Every bad-input path: one-line message naming the file/key/rank, exit code 2,
and no output directory (nor a temporary one) left behind.

Each test damages a copy of a real verl checkpoint the way users' copies get
damaged (a rank file missing or truncated, stale files from another world
size, files renamed, a shard saved without its placements, ...).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import ckpt_bridge
from ckpt_bridge import safeload
from ckpt_bridge.cli import main


@pytest.fixture
def damaged(verl_ckpt, tmp_path):
    """A fresh copy of a 3-rank llama checkpoint (global_step_1/actor) to break."""
    actor = verl_ckpt("llama", "3")
    dst = tmp_path / "ckpts" / "global_step_1"
    shutil.copytree(actor.parent, dst, ignore=shutil.ignore_patterns("optim_*"))
    return dst / "actor"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_refused(capsys, out: Path, *argv, match: str):
    code, _, err = run_cli(capsys, "to-hf", *argv, "--out", out, "--quiet")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]
    return lines[0]


def test_missing_rank_file(damaged, tmp_path, capsys):
    (damaged / "model_world_size_3_rank_1.pt").unlink()
    msg = assert_refused(capsys, tmp_path / "out", damaged, match="model_world_size_3_rank_1.pt")
    assert "2 of 3 present" in msg
    code, report, _ = run_cli(capsys, "inspect", damaged)
    assert code == 2 and "missing rank file" in report  # inspect exits 2 when it lists problems


def test_truncated_rank_file(damaged, tmp_path, capsys):
    f = damaged / "model_world_size_3_rank_2.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_refused(capsys, tmp_path / "out", damaged, match="model_world_size_3_rank_2.pt: cannot be read")


def test_mixed_world_sizes(damaged, tmp_path, capsys):
    shutil.copy(damaged / "model_world_size_3_rank_0.pt", damaged / "model_world_size_2_rank_0.pt")
    assert_refused(capsys, tmp_path / "out", damaged, match="more than one world size")


def test_swapped_rank_files(damaged, tmp_path, capsys):
    a, b = damaged / "model_world_size_3_rank_0.pt", damaged / "model_world_size_3_rank_2.pt"
    tmp = damaged / "swap.tmp"
    a.rename(tmp), b.rename(a), tmp.rename(b)
    assert_refused(capsys, tmp_path / "out", damaged, match="renamed or swapped")


def test_placements_disagree_across_ranks(damaged, tmp_path, capsys):
    # rank 1 saved one weight as its bare local shard (no DTensor): what a
    # hand-edited or mis-converted file looks like
    f = damaged / "model_world_size_3_rank_1.pt"
    sd = safeload.load(f, mmap=False)
    key = next(k for k, v in sd.items() if v.dim() == 2)
    sd[key] = sd[key]._local_tensor.clone()
    torch.save(sd, f)
    msg = assert_refused(capsys, tmp_path / "out", damaged, match=key)
    assert "rank 1" in msg


def test_plain_tensor_that_differs_between_ranks(tmp_path, capsys):
    # world size 2, plain tensors, different values: a shard without metadata
    actor = tmp_path / "global_step_3" / "actor"
    actor.mkdir(parents=True)
    for r in range(2):
        torch.save({"w": torch.full((2, 2), float(r))}, actor / f"model_world_size_2_rank_{r}.pt")
    (actor / "config.json").write_text("{}")
    with pytest.raises(ckpt_bridge.CheckpointFormatError, match=r"rank_1.pt: key 'w' .*differs from rank 0"):
        from ckpt_bridge.formats.verl_fsdp import VerlFSDPReader

        VerlFSDPReader(actor).read("w")


def test_untied_model_with_missing_head(damaged, tmp_path, capsys):
    for f in damaged.glob("model_world_size_3_rank_*.pt"):
        sd = safeload.load(f, mmap=False)
        del sd["lm_head.weight"]
        torch.save(sd, f)
    assert_refused(capsys, tmp_path / "out", damaged, match="lm_head.weight")


def test_unsafe_pickle_is_refused_unless_trusted(damaged, tmp_path, capsys):
    f = damaged / "extra_state_world_size_3_rank_0.pt"
    st = safeload.load(f, mmap=False, allow_numpy=True)
    st["note"] = Path("/etc")  # any non-allowlisted global
    torch.save(st, f)
    assert_refused(capsys, tmp_path / "out", damaged, match="--trust-pickle")
    code, _, err = run_cli(capsys, "to-hf", damaged, "--out", tmp_path / "trusted", "--trust-pickle", "--quiet")
    assert code == 0, err


def test_existing_output_and_overwrite(damaged, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run_cli(capsys, "to-hf", damaged, "--out", out, "--quiet")
    assert code == 2 and "already exists; pass --overwrite" in err
    assert (out / "keep.txt").exists()
    code, _, err = run_cli(capsys, "to-hf", damaged, "--out", out, "--overwrite", "--quiet")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_output_inside_source_is_refused(damaged, capsys):
    before = sorted(p.name for p in damaged.parent.rglob("*"))
    code, _, err = run_cli(capsys, "to-hf", damaged.parent, "--out", damaged.parent / "hf", "--quiet")
    assert code == 2 and "inside (or contain) the source" in err
    assert sorted(p.name for p in damaged.parent.rglob("*")) == before


def test_no_config_anywhere(damaged, tmp_path, capsys):
    shutil.rmtree(damaged / "huggingface")
    assert_refused(capsys, tmp_path / "out", damaged, match="--config")
    # and --config fixes it
    code, _, err = run_cli(capsys, "to-hf", damaged, "--out", tmp_path / "ok", "--quiet",
                           "--config", _config_of(damaged))
    assert code == 0, err


def _config_of(damaged: Path) -> Path:
    import json

    from ckpt_bridge.testing.tiny_models import build_config

    p = damaged.parent.parent / "cfg" / "config.json"
    p.parent.mkdir()
    p.write_text(json.dumps(build_config("llama").to_dict()))
    return p


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hi")
    code, _, err = run_cli(capsys, "inspect", tmp_path / "x")
    assert code == 2 and "not a recognised checkpoint" in err and "notes.txt" in err


def test_verify_exit_codes(verl_ckpt, tmp_path, capsys):
    actor = verl_ckpt("llama", "2")
    out = tmp_path / "hf"
    assert run_cli(capsys, "to-hf", actor, "--out", out, "--quiet")[0] == 0
    assert run_cli(capsys, "verify", actor, out)[0] == 0
    # change one weight: verify must say which and exit 1
    from safetensors.torch import load_file, save_file

    t = load_file(out / "model.safetensors")
    t["model.norm.weight"][3] += 1e-3
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    code, report, _ = run_cli(capsys, "verify", actor, out)
    assert code == 1 and "model.norm.weight" in report and "DIFFERENT" in report
    assert run_cli(capsys, "verify", actor, out, "--atol", "1e-2")[0] == 0
    assert run_cli(capsys, "verify", actor, tmp_path / "nope")[0] == 2
