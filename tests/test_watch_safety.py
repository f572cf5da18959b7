"""watch / the verl callback / the torchtitan hook never write onto, and rotation never deletes, a source
checkpoint: export locations on or around a source are refused before anything runs, and rotation deletes only
directories carrying our own export marker.  Real verl saves; every source file hashed before and after."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from ckpt_bridge.cli import main
from ckpt_bridge.errors import OutputError
from ckpt_bridge.commands.watch import rotate, watch


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def root(verl_ckpt, tmp_path) -> Path:
    """A verl run dir with two saved steps (real FSDPCheckpointManager files) and latest = 2."""
    src = verl_ckpt("llama", "2").parent.parent
    r = tmp_path / "run"
    shutil.copytree(src, r, ignore=shutil.ignore_patterns("reference", "base_model"))
    shutil.copytree(r / "global_step_1", r / "global_step_2")
    (r / "latest_checkpointed_iteration.txt").write_text("2")
    return r


@pytest.mark.parametrize("where", ["root", "inside-actor", "step"])
def test_watch_refuses_an_out_root_on_or_around_the_sources(root, capsys, where):
    out_root = {"root": root, "inside-actor": root / "global_step_1" / "actor" / "x",
                "step": root / "global_step_1" / ".."}[where]
    before = digest(root)
    code = main(["watch", str(root), "--out-root", str(out_root), "--keep", "1", "--once", "--all"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "lies inside the source checkpoint" in err
    assert digest(root) == before


def test_rotate_deletes_only_our_marked_exports(root):
    before = digest(root)
    assert rotate(root, "actor", 1, out_root=root) == []  # the exports would be the sources: nothing deleted
    foreign = root / "global_step_1" / "actor_hf"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for step in (1, 2):  # a source carrying a marker that names itself: still never deleted
        forged = root / f"global_step_{step}" / "forged"
        shutil.copytree(root / "global_step_1" / "actor", forged)
        (forged / "ckpt_bridge_export.json").write_text(json.dumps({"tool": "ckpt-bridge", "source": str(forged)}))
    with_forged = digest(root)
    assert rotate(root, "actor", 1) == [] and rotate(root, "forged", 1, out_root=root) == []
    assert digest(root) == with_forged
    assert rotate(root, "actor", 1, out_root=root / "global_step_1" / "..") == []

    events = watch(root, once=True, every_step=True, keep=1)
    assert [(e.step, e.status) for e in events] == [(1, "failed"), (2, "exported")]
    assert "not a ckpt-bridge export" in events[0].message
    assert (foreign / "notes.txt").read_text() == "mine"  # neither overwritten nor rotated away
    assert (root / "global_step_1" / "forged").is_dir()
    assert {k: v for k, v in digest(root).items() if k in before} == before

    shutil.rmtree(foreign)  # now both exports are ours: rotation removes the older one only
    watch(root, once=True, every_step=True)
    assert rotate(root, "actor", 1) == [foreign]
    assert (root / "global_step_2" / "actor_hf" / "model.safetensors").is_file()
    assert {k: v for k, v in digest(root).items() if k in before} == before


@pytest.mark.parametrize("where", ["root", "inside-actor"])
def test_verl_callback_refuses_an_export_root_on_the_sources(root, caplog, where):
    from ckpt_bridge.integrations.verl import HFExportCallback

    out_root = root if where == "root" else root / "global_step_2" / "actor" / "exports"
    before = digest(root)
    cb = HFExportCallback(out_root=out_root, keep=1)
    with caplog.at_level(logging.ERROR, logger="ckpt_bridge"):
        for step in (1, 2):
            cb.on_save(trainer=None, global_step=step, checkpoint_dir=str(root / f"global_step_{step}"))
        results = cb.wait()
    assert not cb.running and [r["ok"] for r in results] == [False, False]  # nothing was started
    assert "lies inside the source checkpoint" in results[0]["message"]
    assert "not exporting step 1 actor" in caplog.text
    assert digest(root) == before


@pytest.mark.parametrize("name", ["step-{step}", "step-{step}/hf", "step-{step}-hf", "x/../step-{step}", ".", "..",
                                  "../.."])
def test_torchtitan_hook_refuses_export_names_on_checkpoints(tiny_hf_factory, tmp_path, name):
    from torchtitan.components.checkpoint import CheckpointManager

    from ckpt_bridge.integrations.torchtitan import HFExport, attach

    mgr = CheckpointManager(CheckpointManager.Config(enable=True), dataloader=None,
                            model_parts=[torch.nn.Linear(2, 2)], optimizers=None, lr_schedulers=None, states={},
                            sd_adapter=None, base_folder=str(tmp_path))
    try:
        with pytest.raises(OutputError, match="HFExport.name"):
            attach(mgr, HFExport(hf_config=tiny_hf_factory("olmo2"), name=name))
        assert "save" not in vars(mgr)  # not attached
    finally:
        mgr.close()
