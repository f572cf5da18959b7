"""Save-time exports for verl: the HFExportCallback (verl 0.9.1's checkpoint_callback_class hook) and
`ckpt-bridge watch`, on real FSDPCheckpointManager saves of two steps on 2 CPU ranks."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_bridge.cli import main as cli
from ckpt_bridge.testing.harness import make_verl_checkpoint, reference_dir
from ckpt_bridge.commands.watch import watch


@pytest.fixture(scope="module")
def two_saves(tmp_path_factory):
    """A verl run that saved global_step_1 and global_step_2 (llama, 2 ranks); treat as read-only."""
    root = tmp_path_factory.mktemp("verl-two-saves") / "run"
    make_verl_checkpoint(root, model="llama", mesh="2", steps=2, save_steps=[1, 2])
    return root


@pytest.fixture
def run_copy(two_saves, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(two_saves, dst, ignore=shutil.ignore_patterns("reference"))
    return dst


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_export_equals_step(export: Path, two_saves: Path, step: int) -> None:
    ref = load_file(reference_dir(two_saves / f"global_step_{step}" / "actor", step) / "model.safetensors")
    got = load_file(export / "model.safetensors")
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert json.loads((export / "trainer_state.json").read_text())["global_step"] == step
    assert (export / "extra_state_merged.pt").is_file() and (export / "lr_scheduler_state.json").is_file()


def test_callback_is_built_by_verl_and_exports_each_save(two_saves, run_copy):
    from omegaconf import OmegaConf
    from verl.trainer.ppo.checkpoint_callback import build_checkpoint_callback

    from ckpt_bridge.integrations.verl import HFExportCallback

    cfg = OmegaConf.create({"trainer": {"checkpoint_callback_class": "ckpt_bridge.integrations.verl.HFExportCallback"}})
    cb = build_checkpoint_callback(cfg)  # verl's own loader
    assert isinstance(cb, HFExportCallback)
    before = digest(run_copy)
    for step in (1, 2):
        cb.on_save(trainer=None, global_step=step, checkpoint_dir=str(run_copy / f"global_step_{step}"))
    outcomes = cb.wait()
    assert [(o["step"], o["ok"]) for o in outcomes] == [(1, True), (2, True)], outcomes
    for step in (1, 2):
        assert_export_equals_step(run_copy / f"global_step_{step}" / "actor_hf", two_saves, step)
    after = digest(run_copy)
    assert {k: v for k, v in after.items() if "actor_hf" not in k} == before  # the checkpoint is untouched


def test_failing_export_never_raises_and_leaves_the_checkpoint(run_copy, tmp_path, caplog):
    from ckpt_bridge.integrations.verl import HFExportCallback

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the export root should be: every write under it fails")
    cb = HFExportCallback(out_root=blocker / "exports")
    before = digest(run_copy)
    with caplog.at_level(logging.ERROR, logger="ckpt_bridge"):
        cb.on_save(trainer=None, global_step=2, checkpoint_dir=str(run_copy / "global_step_2"))
        outcomes = cb.wait()
    assert [o["ok"] for o in outcomes] == [False]
    assert "export of step 2 actor failed (training continues" in caplog.text
    assert digest(run_copy) == before


def test_missing_rank_file_is_reported_not_exported(run_copy, caplog):
    from ckpt_bridge.integrations.verl import HFExportCallback

    (run_copy / "global_step_2" / "actor" / "model_world_size_2_rank_1.pt").unlink()
    cb = HFExportCallback()
    with caplog.at_level(logging.ERROR, logger="ckpt_bridge"):
        cb.on_save(trainer=None, global_step=2, checkpoint_dir=str(run_copy / "global_step_2"))
    assert cb.running == [] and cb.finished[0]["ok"] is False
    assert "rank_1" in caplog.text and "shared storage" in caplog.text
    assert not (run_copy / "global_step_2" / "actor_hf").exists()


def test_watch_is_idempotent_and_redoes_interrupted_exports(two_saves, run_copy, capsys):
    events = watch(run_copy, once=True)  # latest_checkpointed_iteration.txt says 2
    assert [(e.step, e.status) for e in events] == [(2, "exported")]
    assert_export_equals_step(run_copy / "global_step_2" / "actor_hf", two_saves, 2)
    assert [(e.step, e.status) for e in watch(run_copy, once=True)] == [(2, "skipped")]

    # an export killed halfway: its .partial dir (dead pid) is removed and the step redone
    stale = run_copy / "global_step_1" / ".actor_hf.partial-999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert cli(["watch", str(run_copy), "--once", "--all"]) == 0
    out = capsys.readouterr().out
    assert "step 1: exported" in out and "step 2: skipped" in out
    assert not stale.exists()
    assert_export_equals_step(run_copy / "global_step_1" / "actor_hf", two_saves, 1)

    # rotation of the exports themselves, newest kept
    watch(run_copy, once=True, every_step=True, keep=1)
    assert not (run_copy / "global_step_1" / "actor_hf").exists()
    assert (run_copy / "global_step_2" / "actor_hf").is_dir()
