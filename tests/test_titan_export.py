"""Save-time HF exports from a real torchtitan 0.3.0 training run (CheckpointManager + the ckpt-bridge hook):
each export equals the live model at that save; its extra state, restored into fresh objects, gives the
next learning rate and the next random draws of the run that continued; a failing export never touches
training or the checkpoint."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_bridge import safeload
from ckpt_bridge.integrations.torchtitan import restore_rng_state
from ckpt_bridge.testing.titan_save import draws, run


def check_export(rec_all: list[dict], dump: Path, hf: Path, step: int, steps: int) -> None:
    from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
    from torchtitan.components.optimizer.optimizer import ParamGroupConfig
    from transformers import AutoModelForCausalLM

    export = dump / "checkpoint" / "hf" / f"step-{step}"
    ref = load_file(dump / "reference" / f"step-{step}.safetensors")
    got = {**load_file(export / "model.safetensors"), **load_file(export / "aux_modules.safetensors")}
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert set(load_file(export / "aux_modules.safetensors")) == {"future_predictor.weight", "future_predictor.bias"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = AutoModelForCausalLM.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    extra = safeload.load_plain(export / "extra_state_merged.pt")
    assert extra["global_step"] == step and sorted(extra["rng"]) == list(range(len(rec_all)))
    assert json.loads((export / "trainer_state.json").read_text())["global_step"] == step
    for rec in rec_all:  # the next draws of every rank, from its saved rng state
        restore_rng_state(extra["rng"][rec["rank"]])
        assert draws() == rec["draws"][str(step + 1)]
    # the next learning rate, from a scheduler rebuilt the same way and restored from the export
    opt = OptimizersContainer(
        OptimizersContainer.Config(implementation="for-loop", param_groups=[
            ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3})]),
        model_parts=[model])  # fmt: skip
    sched = LRSchedulersContainer.Config(warmup_steps=2, decay_type="cosine").build(optimizers=opt,
                                                                                   training_steps=steps + 2)
    sched.load_state_dict(extra["lr_scheduler"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        sched.step()
    assert opt.optimizers[0].param_groups[0]["lr"] == rec_all[0]["lr_after_step"][str(step + 1)]


def test_two_rank_run_exports_every_save(titan_two_rank_run):
    recs, run_dir, hf = titan_two_rank_run
    assert [r["rank"] for r in recs] == [0, 1] and recs[0]["saved"] == [2, 4]
    assert [(e["step"], e["ok"]) for e in recs[0]["exports"]] == [(2, True), (4, True)]
    assert recs[0]["draws"]["3"] != recs[1]["draws"]["3"]  # ranks really have different rng streams
    for step in (2, 4):
        check_export(recs, run_dir, hf, step, 4)
    # torchtitan's own scans still see exactly the two checkpoints (the exports live under hf/)
    assert sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == ["hf", "step-2", "step-4"]


def test_async_save_is_awaited_before_export(gloo1, tiny_hf_factory, tmp_path):
    hf = tiny_hf_factory("olmo2")
    rec = run(str(hf), str(tmp_path / "run"), steps=2, interval=1, async_mode="async")
    rec = json.loads(json.dumps(rec))  # the same key types as the torchrun path
    assert [(e["step"], e["ok"]) for e in rec["exports"]] == [(1, True), (2, True)]
    check_export([rec], tmp_path / "run", hf, 1, 2)


def test_failing_export_leaves_training_and_checkpoint_alone(gloo1, tiny_hf_factory, tmp_path, caplog):
    hf = tiny_hf_factory("olmo2")
    wrong = tiny_hf_factory("llama")  # a config these weights do not fit: the export must fail
    from ckpt_bridge.formats.dcp import DCPReader

    with caplog.at_level("WARNING", logger="ckpt_bridge"):
        rec = run(str(hf), str(tmp_path / "run"), steps=2, interval=1, export_config=str(wrong))
    assert rec["saved"] == [1, 2]  # training went on and saved both steps
    assert [e["ok"] for e in rec["exports"]] == [False, False]
    assert "HF export of step 1 failed (training continues)" in caplog.text
    ck = tmp_path / "run" / "checkpoint"
    for step in (1, 2):
        assert not DCPReader(ck / f"step-{step}").problems()
    hf_dir = ck / "hf"
    assert not hf_dir.exists() or not any(hf_dir.iterdir())  # nothing half-written, under any name


def test_a_step_purged_before_its_export_is_skipped(tiny_hf_factory, tmp_path):
    """keep_latest_k can delete step-N while its export waits in the queue: no export, a clear reason."""
    from torchtitan.components.checkpoint import CheckpointManager

    from ckpt_bridge.integrations.torchtitan import HFExport, attach

    mgr = CheckpointManager(CheckpointManager.Config(enable=True, keep_latest_k=0), dataloader=None,
                            model_parts=[torch.nn.Linear(2, 2)], optimizers=None, lr_schedulers=None, states={},
                            sd_adapter=None, base_folder=str(tmp_path))
    hook = attach(mgr, HFExport(hf_config=tiny_hf_factory("olmo2")))
    gone = tmp_path / "checkpoint" / "step-3"  # never written, as after a purge
    res = hook._run(3, gone, tmp_path / "checkpoint" / "hf" / "step-3", None, 1)
    assert not res.ok and "was purged (keep_latest_k) before it could be exported" in res.message
    assert not (tmp_path / "checkpoint" / "hf").exists()
    hook.close()
    assert "save" not in vars(mgr)  # unwrapped: the class's own save again
    mgr.close()


def test_patch_refuses_untested_torchtitan(monkeypatch, tmp_path):
    import ckpt_bridge.patches.torchtitan_save as patch
    from ckpt_bridge.errors import BridgeError

    monkeypatch.setattr(patch, "torchtitan_version", lambda: "0.4.0")
    with pytest.raises(BridgeError, match="tested with torchtitan 0.3.0, this is 0.4.0"):
        patch.check_version()
    monkeypatch.setenv("CKPT_BRIDGE_ALLOW_UNTESTED_TORCHTITAN", "1")
    assert patch.check_version() == "0.4.0"
