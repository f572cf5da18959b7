"""verl's other FSDP-family engines (issue 29): the Automodel engine's layout and VeOmni with expert parallelism.

Both saves come from ONE torchrun job (``ckpt_bridge.testing.engine_saves``, 2 gloo ranks): nemo-automodel
0.3.0's own ``Checkpointer`` and veomni 0.1.12's own model build + EP parallelization saved by verl's
``FSDPCheckpointManager``, each library a --no-deps overlay (without a registry the job follows their source
instead; ``<case>/reference/writer.txt`` says which wrote it).  Each case's oracle is ``save_pretrained`` of
the live, unsharded model (``<case>/reference/hf``), which every export must equal bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_bridge.cli import main as cli
from ckpt_bridge.compare import bits_equal
from ckpt_bridge.testing.harness import run_torchrun
from ckpt_bridge.testing.overlays import OverlayError, overlay, overlay_env, overlay_job
from test_failure_table import assert_fails  # tests/ is on sys.path (rootdir conftest)


# The libraries verl 0.9.1's engines call, each a --no-deps overlay (seconds, cached): nemo-automodel's
# Checkpointer (Automodel engine) and veomni (VeOmni engine).  Without a registry, engine_saves follows each
# library's source instead (its docstring says which lines).
ENGINE_LIBS = {"nemo-automodel": "nemo-automodel==0.3.0", "veomni": "veomni==0.1.12"}
OVERLAYS = [overlay_job([spec], name=name) for name, spec in ENGINE_LIBS.items()]  # prefetched (tests/conftest.py)


@pytest.fixture(scope="session")
def engine_saves(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("engine_saves")
    dirs = []
    for name, spec in ENGINE_LIBS.items():
        try:
            dirs.append(str(overlay([spec], name=name)))
        except OverlayError:
            pass
    env = {"PYTHONPATH": os.pathsep.join(dirs + [overlay_env(Path(dirs[-1]))["PYTHONPATH"]])} if dirs else None
    run_torchrun(["ckpt_bridge.testing.engine_saves", "--out", str(root)], nproc=2, timeout=400, env=env)
    assert (root / "COMPLETE").is_file()
    return root


def _weights(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_equals_oracle(out: Path, case: Path) -> None:
    got, want = _weights(out), _weights(case / "reference" / "hf")
    assert sorted(got) == sorted(want)
    bad = [k for k in want if not bits_equal(got[k], want[k])]
    assert not bad, bad[:5]
    assert cli(["verify", str(out), str(case / "reference" / "hf")]) == 0


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------- Automodel

def test_automodel_exports_bit_for_bit_with_and_without_consolidated(engine_saves, tmp_path, capsys):
    case = engine_saves / "automodel"
    step = case / "global_step_1"
    # the engine's own save: shards + consolidated/ (checked complete, then read)
    assert cli(["to-hf", str(step), "--out", str(tmp_path / "a"), "--dtype", "keep"]) == 0
    _assert_equals_oracle(tmp_path / "a", case)
    extra = torch.load(tmp_path / "a" / "extra_state_merged.pt", weights_only=False)
    assert extra["lr_scheduler"] == torch.load(case / "reference" / "sched.pt", weights_only=False)
    assert extra["rng"] == {} and extra["global_step"] == 1 and extra["world_size"] == 2
    state = json.loads((tmp_path / "a" / "trainer_state.json").read_text())
    assert any("no rng" in w for w in state["warnings"])
    # the shards alone (consolidation off: newer Automodel's default), read through their own offsets
    # (nemo-automodel 0.3.0 moved .hf_metadata/ into consolidated/; newer ones keep it beside the shards)
    shards_only = _copy(step, tmp_path / "shards_only" / "global_step_1")
    model_dir = shards_only / "actor" / "model"
    (model_dir / ".hf_metadata").mkdir(exist_ok=True)
    for f in (model_dir / "consolidated").iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, model_dir / ".hf_metadata" / f.name)
    shutil.rmtree(model_dir / "consolidated")
    assert cli(["to-hf", str(shards_only / "actor"), "--out", str(tmp_path / "b"), "--dtype", "keep"]) == 0
    _assert_equals_oracle(tmp_path / "b", case)
    # verify reads the save itself against the HF dir
    assert cli(["verify", str(shards_only), str(case / "reference" / "hf")]) == 0
    capsys.readouterr()
    assert cli(["inspect", str(step)]) == 0
    report = capsys.readouterr().out
    assert "verl-automodel" in report and "Automodel" in report and "no rng" in report


def test_automodel_damaged_copies_are_refused_in_one_line(engine_saves, tmp_path, capsys):
    step = engine_saves / "automodel" / "global_step_1"
    # a consolidated/ that lost a tensor: named, not the generic "not a recognised checkpoint"
    lost = _copy(step, tmp_path / "lost" / "global_step_1")
    cons = lost / "actor" / "model" / "consolidated"
    f = next(cons.glob("model-*.safetensors"))
    tensors = load_file(f)
    victim = "model.layers.1.mlp.down_proj.weight"
    del tensors[victim]
    save_file(tensors, f, metadata={"format": "pt"})
    assert_fails(capsys, ["to-hf", str(lost), "--out", str(tmp_path / "o1")], says=victim, sources=(lost,))
    # a missing rank shard (the last one: torch's own reader would silently shrink every tensor)
    gone = _copy(step, tmp_path / "gone" / "global_step_1")
    shutil.rmtree(gone / "actor" / "model" / "consolidated")
    (gone / "actor" / "model" / "shard-00002-model-00001-of-00001.safetensors").unlink()
    assert_fails(capsys, ["to-hf", str(gone), "--out", str(tmp_path / "o2")], says="shard-00002", sources=(gone,))
    # a missing first shard: a gap in the numbers
    gap = _copy(step, tmp_path / "gap" / "global_step_1")
    (gap / "actor" / "model" / "shard-00001-model-00001-of-00001.safetensors").unlink()
    assert_fails(capsys, ["to-hf", str(gap), "--out", str(tmp_path / "o3")], says="shard file(s) [1]", sources=(gap,))
    # a truncated shard
    cut = _copy(step, tmp_path / "cut" / "global_step_1")
    shutil.rmtree(cut / "actor" / "model" / "consolidated")
    shard = cut / "actor" / "model" / "shard-00002-model-00001-of-00001.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    assert_fails(capsys, ["to-hf", str(cut), "--out", str(tmp_path / "o4")], says="shard-00002", sources=(cut,))
    # inspect reports it too (exit 2)
    capsys.readouterr()
    assert cli(["inspect", str(gone)]) == 2


# ------------------------------------------------------------------------------------------- VeOmni EP

def test_veomni_expert_parallel_exports_experts_in_place(engine_saves, tmp_path, capsys):
    case = engine_saves / "veomni_ep"
    step = case / "global_step_1"
    # each EP rank saved a different block of experts; a merge from the DTensor metadata alone would put
    # rank 1's experts at index 0 (or refuse): equality with the live full model proves their place
    assert cli(["to-hf", str(step), "--out", str(tmp_path / "out"), "--dtype", "keep"]) == 0
    _assert_equals_oracle(tmp_path / "out", case)
    want = _weights(case / "reference" / "hf")
    experts = [k for k in want if ".experts.3." in k]
    assert experts and not bits_equal(want[experts[0]], want[experts[0].replace(".experts.3.", ".experts.1.")])
    assert cli(["verify", str(step), str(case / "reference" / "hf")]) == 0
    capsys.readouterr()
    assert cli(["inspect", str(step)]) == 0
    assert "expert parallelism (VeOmni): EP=2 x ep_fsdp=1" in capsys.readouterr().out
    from ckpt_bridge.checks.inspect import inspect

    assert inspect(step)["parameters"] == sum(t.numel() for t in want.values())  # experts counted at full size


@pytest.mark.parametrize("num_experts, says", [
    (None, "records no num_experts"),  # nothing says where the blocks go
    (6, "not a multiple"),  # the config disagrees with the files (6 / 2 = 3 EP groups on 2 ranks)
])
def test_veomni_expert_parallel_without_evidence_is_refused(engine_saves, tmp_path, capsys, num_experts, says):
    step = _copy(engine_saves / "veomni_ep" / "global_step_1", tmp_path / "global_step_1")
    cfg_file = step / "actor" / "huggingface" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    count = [f for f in ("num_experts", "num_local_experts") if f in cfg]  # transformers 5 writes the latter
    assert count
    for f in count:
        del cfg[f]
    if num_experts is not None:
        cfg[count[0]] = num_experts
    cfg_file.write_text(json.dumps(cfg))
    line = assert_fails(capsys, ["to-hf", str(step), "--out", str(tmp_path / "o")], says=says, sources=(step,))
    assert "expert parallelism" in line and "mlp.experts" in line


# ------------------------------------------------------------------------------------------- watch

def test_watch_and_callback_export_a_completed_automodel_save(engine_saves, tmp_path):
    from ckpt_bridge.commands.watch import watch
    from ckpt_bridge.integrations.verl import HFExportCallback

    run = tmp_path / "run"
    _copy(engine_saves / "automodel" / "global_step_1", run / "global_step_1")
    metadata = run / "global_step_1" / "actor" / "optim" / ".metadata"
    held = metadata.rename(metadata.with_name("held"))
    (run / "latest_checkpointed_iteration.txt").write_text("1")
    # the optimizer's .metadata is what the engine writes last: until then the step waits
    assert [(e.step, e.status) for e in watch(run, once=True)] == [(1, "waiting")]
    held.rename(metadata)
    events = watch(run, once=True)
    assert [(e.step, e.status) for e in events] == [(1, "exported")], events
    _assert_equals_oracle(Path(events[0].out), engine_saves / "automodel")
    assert [(e.step, e.status) for e in watch(run, once=True)] == [(1, "skipped")]
    # the verl callback, on a fresh copy
    run2 = tmp_path / "run2"
    _copy(engine_saves / "automodel" / "global_step_1", run2 / "global_step_1")
    cb = HFExportCallback()
    cb.on_save(trainer=None, global_step=1, checkpoint_dir=str(run2 / "global_step_1"))
    assert [(o["step"], o["ok"]) for o in cb.wait()] == [(1, True)]
    _assert_equals_oracle(run2 / "global_step_1" / "actor_hf", engine_saves / "automodel")
