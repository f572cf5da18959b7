"""Nothing silently incomplete: a torchtitan step missing a rank's rng, a verl step whose extra state came after
its export or is still being written, inspect's exit code and duplicate problems, and a dry run that reads
everything the real run reads.  Real saves throughout (torchrun verl and torchtitan runs)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from ckpt_bridge import safeload
from ckpt_bridge.cli import main
from ckpt_bridge.commands.watch import watch


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def titan_step(titan_two_rank_run, tmp_path) -> tuple[Path, Path]:
    """A copy of step-2 of the real 2-rank torchtitan run (with the hook's rng files) and its HF dir."""
    _, run_dir, hf = titan_two_rank_run
    step = tmp_path / "step-2"
    shutil.copytree(run_dir / "checkpoint" / "step-2", step)
    return step, hf


def test_missing_rank_rng_is_refused_and_world_size_comes_from_the_dcp(titan_step, tmp_path, capsys):
    step, hf = titan_step
    assert sorted(p.name for p in step.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    (step / "ckpt_bridge_rng" / "rank_1.pt").unlink()
    out = tmp_path / "out"
    for extra in ([], ["--dry-run"]):  # the dry run refuses it too: it reads the extra state like the real run
        code, _, err = run_cli(capsys, "to-hf", step, "--out", out, "--config", hf, "--quiet", *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "rank_1.pt missing" in err and "--allow-missing-rng" in err
        assert not out.exists()
    code, report, _ = run_cli(capsys, "inspect", step)
    assert code == 2 and "no rng file for rank(s) [1] of world size 2" in report

    code, _, err = run_cli(capsys, "to-hf", step, "--out", out, "--config", hf, "--quiet", "--allow-missing-rng")
    assert code == 0 and "no rng state for rank(s) [1]" in err
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["rng_saved_for_ranks"] == [0]
    assert "rank(s) [1]" in state["warnings"][0]
    assert sorted(safeload.load_plain(out / "extra_state_merged.pt")["rng"]) == [0]


@pytest.fixture
def verl_root(verl_ckpt, tmp_path) -> Path:
    """A copy of a real verl run (llama, 2 ranks) with latest_checkpointed_iteration.txt = 1."""
    src = verl_ckpt("llama", "2").parent.parent
    root = tmp_path / "run"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("reference", "base_model"))
    return root


def test_export_made_before_extra_state_appeared_is_redone(verl_root, tmp_path):
    actor = verl_root / "global_step_1" / "actor"
    late = tmp_path / "late"
    late.mkdir()
    for f in actor.glob("extra_state_*"):  # the model files are there, the extra state not yet
        shutil.move(f, late / f.name)
    (ev,) = watch(verl_root, once=True)
    assert ev.status == "exported"
    export = verl_root / "global_step_1" / "actor_hf"
    assert not (export / "extra_state_merged.pt").exists()
    assert json.loads((export / "ckpt_bridge_export.json").read_text())["parts"] == ["model"]
    for f in late.iterdir():
        shutil.move(f, actor / f.name)
    (ev,) = watch(verl_root, once=True)
    assert ev.status == "exported" and "lacked extra_state" in ev.message
    assert (export / "extra_state_merged.pt").is_file()
    assert json.loads((export / "trainer_state.json").read_text())["world_size"] == 2
    assert [e.status for e in watch(verl_root, once=True)] == ["skipped"]


def test_step_being_written_waits_until_every_rank_file_is_there_and_stable(verl_root):
    (verl_root / "latest_checkpointed_iteration.txt").unlink()  # no completion signal from verl: poll sizes
    actor = verl_root / "global_step_1" / "actor"
    rank1 = actor / "extra_state_world_size_2_rank_1.pt"
    data = rank1.read_bytes()
    rank1.unlink()
    (ev,) = watch(verl_root, once=True, every_step=True, settle=0.05)
    assert ev.status == "waiting" and "extra_state_world_size_2_rank_1.pt" in ev.message

    stop = threading.Event()

    def still_writing():  # rank 1 is writing its file while we poll
        with open(rank1, "wb") as f:
            for i in range(0, len(data), 256):
                if stop.is_set():
                    break
                f.write(data[i:i + 256])
                f.flush()
                time.sleep(0.01)

    t = threading.Thread(target=still_writing)
    t.start()
    try:
        time.sleep(0.05)
        (ev,) = watch(verl_root, once=True, every_step=True, settle=0.2)
        assert ev.status == "waiting" and "in progress" in ev.message
    finally:
        stop.set()
        t.join()
    rank1.write_bytes(data)
    (ev,) = watch(verl_root, once=True, every_step=True, settle=0.05)
    assert ev.status == "exported"
    assert (verl_root / "global_step_1" / "actor_hf" / "extra_state_merged.pt").is_file()


class NotAllowed:  # a global outside the weights-only allowlist
    pass


def test_inspect_exits_2_and_lists_a_refused_rank_file_once(verl_root, capsys):
    actor = verl_root / "global_step_1" / "actor"
    code, _, _ = run_cli(capsys, "inspect", actor)
    assert code == 0  # a sound checkpoint: no problems, exit 0
    bad = actor / "model_world_size_2_rank_1.pt"
    torch.save({k: NotAllowed() for k in torch.load(bad, weights_only=False, mmap=True)}, bad)
    code, report, _ = run_cli(capsys, "inspect", actor, "--json")
    problems = json.loads(report)["problems"]
    assert code == 2 and len(problems) == 1 and "model_world_size_2_rank_1.pt" in problems[0], problems


def test_dry_run_reads_the_extra_state_the_real_run_reads(verl_root, tmp_path, capsys):
    actor = verl_root / "global_step_1" / "actor"
    f = actor / "extra_state_world_size_2_rank_1.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated: only the extra state is bad
    out = tmp_path / "out"
    dry = run_cli(capsys, "to-hf", actor, "--out", out, "--dry-run")
    real = run_cli(capsys, "to-hf", actor, "--out", out, "--quiet")
    assert dry[0] == real[0] == 2
    assert "extra_state_world_size_2_rank_1.pt" in dry[2] and dry[2] == real[2]
    assert not out.exists()
    # and a dry run checks --out like the real run
    out.mkdir()
    code, _, err = run_cli(capsys, "to-hf", actor, "--out", out, "--dry-run")
    assert code == 2 and "already exists" in err
