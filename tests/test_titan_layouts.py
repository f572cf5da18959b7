"""The TorchTitan save layouts of issue 29: verl's TorchTitan engine (torchtitan 0.3.0's CheckpointManager with its
folder at ``dirname(local_path)``) and TorchTitan's TorchCheckpointingManager (torch-checkpointing 0.1.1, its
resumable step folders and its HF final save).  ONE torchrun job (``ckpt_bridge.testing.titan_engine_save``, 2
FSDP2 gloo ranks, tiny llama3 and qwen3) makes every save; the reference of each is ``save_pretrained`` of an HF
model holding torchtitan's own ``adapter.to_hf`` of the live state dict (none of our plan code).

torch-checkpointing is a test-only overlay (``--no-deps``, ``-c constraints.txt``).  On a CPU its save needs,
besides the library's own options (a synchronous saver, no pinned memory, ``use_direct_io=False``), one
monkeypatch in the save job only: its metadata all-gather hard-codes ``device="cuda"``
(``metadata_manager.py`` lines 416/422), replaced there by ``dist.all_gather_object`` (see the job's docstring).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_bridge.cli import main as cli
from ckpt_bridge.formats.hf import weight_files
from ckpt_bridge.testing.harness import run_torchrun
from ckpt_bridge.testing.overlays import OverlayError, overlay, overlay_env

import triton  # noqa: F401 - torchtitan 0.3.0's models import it (pinned in requirements.lock)

FAMILIES = ("llama3", "qwen3")
TC = "torch-checkpointing==0.1.1"


@pytest.fixture(scope="session")
def titan_layouts(tmp_path_factory) -> Path:
    """ROOT/<family>/{hf, reference, ppo/global_step_500/{step-500,data.pt}, sft/{step-500,global_step_500},
    tc/checkpoint/{step-500, step-501 (HF final save)}}.  Read-only: copy before damaging."""
    try:
        tc = overlay([TC], name="torch-checkpointing")
    except OverlayError as e:
        pytest.fail(f"cannot build the {TC} overlay: {e}")
    root = tmp_path_factory.mktemp("titan-layouts")
    run_torchrun(["ckpt_bridge.testing.titan_engine_save", "--root", str(root)], nproc=2, timeout=600,
                 env={"PYTHONPATH": overlay_env(tc)["PYTHONPATH"]})
    done = json.loads((root / "result.json").read_text())
    assert all(done[f]["torch_checkpointing"] for f in FAMILIES), done
    return root


def _state(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in weight_files(d)[1]:
        out.update(load_file(f))
    return out


def _assert_export_is_reference(out: Path, ref: Path, capsys) -> None:
    got, want = _state(out), _state(ref)
    assert set(got) == set(want), set(got) ^ set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    capsys.readouterr()
    assert cli(["verify", str(out), str(ref)]) == 0
    assert "EQUAL" in capsys.readouterr().out


def _fails_in_one_line(args: list[str], capsys, *needles: str) -> str:
    capsys.readouterr()
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def _inspect(path: Path, capsys) -> dict:
    capsys.readouterr()
    rc = cli(["inspect", str(path), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == (2 if report["problems"] else 0)
    return report


@pytest.mark.parametrize("family", FAMILIES)
def test_verl_torchtitan_engine_saves_export_like_save_pretrained(titan_layouts, family, tmp_path, capsys):
    """PPO (global_step_N/step-N, nothing under actor/) and SFT (<root>/step-N beside global_step_N): found from
    global_step_N, global_step_N/actor and step-N; the family's adapter comes from the native keys (no
    --titan-model); bit for bit the reference; lr_scheduler and train_state in the extra state, step 500 from the
    folder (verl never advances torchtitan's train_state), and the summary says no rng was saved."""
    base = titan_layouts / family
    ppo, sft = base / "ppo" / "global_step_500", base / "sft" / "global_step_500"
    for path, step in ((ppo, ppo / "step-500"), (ppo / "actor", ppo / "step-500"), (ppo / "step-500", None),
                       (sft, base / "sft" / "step-500"), (base / "sft" / "step-500", None)):
        report = _inspect(path, capsys)
        assert report["format"] == "verl-torchtitan" and not report["problems"], report
        assert report["resolved_path"] == str(step or path)
        assert "verl TorchTitan engine" in report["details"]["writer"] and report["details"]["world_size"] == 2
        assert "none saved" in report["details"]["rng"]
    _fails_in_one_line(["to-hf", str(ppo), "--out", str(tmp_path / "x")], capsys, "--config")
    assert not (tmp_path / "x").exists()
    for name, src in (("ppo", ppo), ("sft", sft)):
        out = tmp_path / name
        capsys.readouterr()
        assert cli(["to-hf", str(src), "--out", str(out), "--config", str(base / "hf"), "--dtype", "keep",
                    "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["global_step"] == 500 and any("no rng state" in w for w in summary["warnings"]), summary
        _assert_export_is_reference(out, base / "reference", capsys)
        extra = torch.load(out / "extra_state_merged.pt", weights_only=False)
        assert extra["rng"] == {} and extra["global_step"] == 500
        assert extra["train_state"] == {"step": 0, "ntokens_seen": 0}  # what verl's engine really saves
        assert extra["lr_scheduler"] and "last_epoch" in json.dumps(extra["lr_scheduler"])
        capsys.readouterr()  # the save itself against an HF dir: through its adapter, with that dir's config
        assert cli(["verify", str(src), str(base / "reference")]) == 0
        assert "EQUAL" in capsys.readouterr().out


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_checkpointing_step_and_hf_final_save_export_like_save_pretrained(titan_layouts, family, tmp_path,
                                                                                capsys):
    """step-N (metadata.pkl + model/optimizer/lr_scheduler/dataloader/train_state_R.pt, pickled DTensors placed
    from the pickle; wq/wk/wv are Replicate, the rest Shard(0)) and the final HF save (consolidated root, no
    config: --config, else one line) both give the reference bit for bit."""
    base = titan_layouts / family
    step = base / "tc" / "checkpoint" / "step-500"
    report = _inspect(step, capsys)
    assert report["format"] == "torch-checkpointing" and not report["problems"], report
    assert report["details"]["world_size"] == 2 and "TorchCheckpointingManager" in report["details"]["writer"]
    assert set(report["details"]["items"]) == {"model", "optimizer", "lr_scheduler", "dataloader", "train_state"}
    assert any("Replicate" in k for k in report["placements"]) and any("Shard(0)" in k for k in report["placements"])
    out = tmp_path / "tc"
    assert cli(["to-hf", str(step), "--out", str(out), "--config", str(base / "hf"), "--dtype", "keep",
                "--quiet"]) == 0
    _assert_export_is_reference(out, base / "reference", capsys)
    extra = torch.load(out / "extra_state_merged.pt", weights_only=False)
    assert extra["train_state"] == {"step": 500, "ntokens_seen": 0} and extra["global_step"] == 500
    assert extra["lr_scheduler"] == {"last_epoch": 1} and set(extra["dataloader"]) == {0, 1}
    capsys.readouterr()
    assert cli(["verify", str(step), str(base / "reference")]) == 0 and "EQUAL" in capsys.readouterr().out

    final = base / "tc" / "checkpoint" / "step-501"
    assert _inspect(final, capsys)["format"] == "hf"
    _fails_in_one_line(["to-hf", str(final / "sharded"), "--out", str(tmp_path / "z"), "--config", str(base / "hf")],
                       capsys, "HF final save", str(final))
    _fails_in_one_line(["to-hf", str(final), "--out", str(tmp_path / "y")], capsys, "no config.json", "--config")
    assert not (tmp_path / "y").exists()
    assert cli(["to-hf", str(final), "--out", str(tmp_path / "final"), "--config", str(base / "hf"),
                "--dtype", "keep", "--quiet"]) == 0
    _assert_export_is_reference(tmp_path / "final", base / "reference", capsys)


def test_damaged_torch_checkpointing_saves_are_one_line_refusals(titan_layouts, tmp_path, capsys):
    """A missing rank file, a truncated model_R.pt, no metadata.pkl (an unfinished save), a metadata.pkl naming a
    global: exit 2, one line naming the file, no output."""
    from ckpt_bridge.formats.torch_checkpointing import save_problem

    src = titan_layouts / "llama3" / "tc" / "checkpoint" / "step-500"
    cfg = str(titan_layouts / "llama3" / "hf")
    assert save_problem(src) is None

    def damaged(name: str, how) -> Path:
        d = tmp_path / name / "step-500"
        shutil.copytree(src, d)
        how(d)
        return d

    missing = damaged("missing", lambda d: (d / "model_1.pt").unlink())
    truncated = damaged("truncated", lambda d: (d / "model_1.pt").write_bytes((d / "model_1.pt").read_bytes()[:900]))
    unfinished = damaged("unfinished", lambda d: (d / "metadata.pkl").unlink())

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    hostile = damaged("hostile", lambda d: (d / "metadata.pkl").write_bytes(pickle.dumps({"metadata": Evil()})))
    for d, needle in ((missing, "model_1.pt"), (truncated, "model_1.pt"), (unfinished, "metadata.pkl"),
                      (hostile, "builtins.print")):
        out = d.parent / "out"
        _fails_in_one_line(["to-hf", str(d), "--out", str(out), "--config", cfg], capsys, needle)
        assert not out.exists()
        capsys.readouterr()
        assert cli(["inspect", str(d)]) == 2
        if d in (missing, unfinished):  # the completeness check of watch: files by name, no data read
            assert save_problem(d) is not None


def test_watch_recognises_a_completed_engine_save(titan_layouts, tmp_path):
    """verl's TorchTitan engine writes global_step_N/step-N and no actor/: complete once DCP's .metadata (written
    last) is there; before that, watch and the callback wait.  A global_step_N holding only data.pt (N % 500 != 0:
    the engine's interval) says why nothing is there."""
    from ckpt_bridge.commands.watch import _settled, rank_files_problem, source_parts, step_action

    root = tmp_path / "run"
    shutil.copytree(titan_layouts / "llama3" / "ppo" / "global_step_500", root / "global_step_500")
    assert rank_files_problem(root / "global_step_500" / "actor") is None
    assert _settled(root, 500, "actor", None, {})
    assert source_parts(root / "global_step_500" / "actor") == {"model", "extra_state"}
    assert step_action(root, 500)[0] == "export"
    # a critic on this engine would overwrite the actor's step-N: never read the actor's weights as a critic's
    assert "does not exist" in rank_files_problem(root / "global_step_500" / "critic")
    (root / "global_step_500" / "step-500" / ".metadata").unlink()  # the save still being written
    assert ".metadata" in rank_files_problem(root / "global_step_500" / "actor")
    assert not _settled(root, 500, "actor", None, {})
    assert step_action(root, 500)[0] == "wait"

    (root / "global_step_7").mkdir()
    torch.save({}, root / "global_step_7" / "data.pt")
    with pytest.raises(Exception, match="500"):
        from ckpt_bridge.formats.detect import detect_format

        detect_format(root / "global_step_7")


def test_torch_checkpointing_rank_files_are_read_as_saved_data(titan_layouts):
    """The model files' DTensors are read through safeload's stand-ins (placements and mesh as pickled), never by
    importing torch.distributed.tensor: the path that reads the DTensor pickles of every torch release we support
    (tests/test_torch_fixtures.py), so a save written under another torch places its shards the same way."""
    import subprocess
    import sys

    from ckpt_bridge.testing.harness import REPO_ROOT

    step = titan_layouts / "qwen3" / "tc" / "checkpoint" / "step-500"
    code = ("import sys, torch\n"
            "from ckpt_bridge.formats.torch_checkpointing import TorchCheckpointingReader\n"
            f"r = TorchCheckpointingReader({str(step)!r})\n"
            "n = sum(r.read(k).numel() for k in r.tensors())\n"
            "assert 'torch.distributed.tensor' not in sys.modules\n"
            "print(n)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    from ckpt_bridge.formats.torch_checkpointing import TorchCheckpointingReader

    assert int(out.stdout.split()[-1]) == sum(i.numel for i in TorchCheckpointingReader(step).tensors().values())
