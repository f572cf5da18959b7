"""The CLI's main paths under the running torch (a torch overlay): one subprocess per torch version.

    PYTHONPATH=<torch overlay>:. python -m ckpt_bridge.testing.torch_checks --out RESULTS.json --work DIR \\
        --fsdp ACTOR --hsdp ACTOR --lora ACTOR --lora-export DIR --text FILE --dcp DIR

``--fsdp`` / ``--hsdp`` / ``--lora`` are verl saves written under the pinned torch (with their
``reference/`` dirs), ``--lora-export`` the pinned torch's export of ``--lora``, ``--dcp`` the pinned torch's
chunked to-dcp output of ``--fsdp``'s reference HF (written without zip CRC32s: it must load here too).  Every check runs the
CLI in this process and compares what it wrote bit for bit with the reference; the committed fixtures of
every torch (tests/fixtures/torch-*) are exported too.  Results: ``{"torch": ..., "checks": {name:
{"ok": bool, "error": str}}}``; a failing check never stops the others.  Used by tests/test_torch_versions.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import traceback
from pathlib import Path
from typing import Callable

from .harness import reference_dir

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"


def _cli(*argv: object) -> str:
    from ckpt_bridge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    if code != 0:
        raise AssertionError(f"exit {code}: ckpt-bridge {' '.join(map(str, argv))}: {err.getvalue()[-1500:]}")
    return out.getvalue()


def _same_safetensors(got_dir: Path, ref_dir: Path) -> None:
    """Every safetensors file under ref_dir has its twin under got_dir, tensor for tensor, bit for bit."""
    import torch
    from safetensors.torch import load_file

    ref_files = sorted(p.relative_to(ref_dir) for p in ref_dir.rglob("*.safetensors"))
    got_files = sorted(p.relative_to(got_dir) for p in got_dir.rglob("*.safetensors"))
    if not ref_files or ref_files != got_files:
        raise AssertionError(f"safetensors files {got_files} != {ref_files}")
    for rel in ref_files:
        got, ref = load_file(got_dir / rel), load_file(ref_dir / rel)
        if sorted(got) != sorted(ref):
            raise AssertionError(f"{rel}: keys differ: {sorted(set(got) ^ set(ref))[:5]}")
        bad = [k for k in ref if got[k].dtype != ref[k].dtype or not torch.equal(got[k], ref[k])]
        if bad:
            raise AssertionError(f"{rel}: {len(bad)} tensors differ, e.g. {bad[0]}")


def _export_verl(actor: Path, out: Path) -> None:
    _cli("inspect", actor)
    _cli("to-hf", actor, "--out", out, "--quiet")
    _same_safetensors(out, reference_dir(actor) / "hf")


def _fixture_checks(work: Path) -> dict[str, Callable[[], None]]:
    checks: dict[str, Callable[[], None]] = {}
    for root in sorted(FIXTURES.glob("torch-*")):
        for case in ("fsdp", "hsdp", "shard1"):
            actor = root / case / "global_step_1" / "actor"
            checks[f"fixture/{root.name}/{case}"] = (
                lambda a=actor, o=work / root.name / case: _export_verl(a, o))
        dcp, ref = root / "dcp", root / "fsdp" / "reference" / "global_step_1" / "hf"

        def dcp_check(dcp=dcp, ref=ref, out=work / root.name / "dcp-hf") -> None:
            _cli("verify", dcp, "--against", ref)
            _cli("to-hf", dcp, "--out", out, "--quiet")
            _same_safetensors(out, ref)

        checks[f"fixture/{root.name}/dcp"] = dcp_check

        def torch_file_check(src=root / "torch_file.pt", ref=ref, out=work / root.name / "torch-file-hf") -> None:
            _cli("to-hf", src, "--config", ref, "--out", out, "--quiet")
            _same_safetensors(out, ref)

        checks[f"fixture/{root.name}/torch_file"] = torch_file_check
    return checks


def _dcp_round_trip(hf: Path, work: Path, text: Path) -> None:
    """to-dcp of an export, verify --against it with --loss, and DCP -> HF back, equal to the export."""
    _cli("to-dcp", hf, "--out", work / "dcp", "--quiet")
    _cli("inspect", work / "dcp")
    _cli("verify", work / "dcp", "--against", hf, "--loss", text)
    _cli("to-hf", work / "dcp", "--out", work / "dcp-hf", "--quiet")
    _same_safetensors(work / "dcp-hf", hf)


def _hf_state(hf: Path) -> dict:
    from safetensors.torch import load_file

    from ckpt_bridge.formats.hf import weight_files

    out = {}
    for f in weight_files(hf)[1]:
        out.update(load_file(f))
    return out


def _same_as_hf(got: dict, hf: Path, prefix: str) -> None:
    """Every HF tensor is ``got[prefix + key]``, bit for bit once cast to its dtype (bf16/fp32 -> fp32 is exact)."""
    import torch

    want = _hf_state(hf)
    if sorted(prefix + k for k in want) != sorted(got):
        raise AssertionError(f"keys differ: {sorted(set(got) ^ {prefix + k for k in want})[:5]}")
    bad = [k for k, v in want.items() if not torch.equal(got[prefix + k], v.to(got[prefix + k].dtype))]
    if bad:
        raise AssertionError(f"{len(bad)} tensors differ from {hf}, e.g. {bad[0]}")


def _pinned_dcp_load(dcp_dir: Path, hf: Path) -> None:
    """DCP's own reader (FileSystemReader, dcp.load into empty tensors) on the pinned torch's to-dcp output."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = dcp.FileSystemReader(str(dcp_dir)).read_metadata()
    state = {k: torch.zeros(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata)}
    if max(len(m.chunks) for m in md.state_dict_metadata.values() if hasattr(m, "chunks")) < 2:
        raise AssertionError("the pinned output has no chunked tensor")
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(dcp_dir)), no_dist=True)
    _same_as_hf(state, hf, "")  # to-dcp stores the trainer's flat keys (no {"model": ...} nesting)


def _pinned_dcp_titan(dcp_dir: Path, hf: Path, work: Path) -> None:
    """The trainer's own load (torchtitan's CheckpointManager, model-only, on a 1-process gloo group) of it."""
    import torch
    import torch.distributed as dist
    from torchtitan.components.checkpoint import CheckpointManager
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf))
    model.to_empty(device="cpu")
    work.mkdir(parents=True)
    dist.init_process_group("gloo", init_method=f"file://{work / 'store'}", rank=0, world_size=1)
    try:
        mc = CheckpointManager.Config(enable=True, folder="checkpoint", keep_latest_k=0,
                                      initial_load_path=str(dcp_dir.absolute()), initial_load_model_only=True)
        mgr = CheckpointManager(mc, dataloader=None, model_parts=[model], optimizers=None, lr_schedulers=None,
                                states={}, sd_adapter=None, base_folder=str(work / "dump"))
        try:
            if mgr.load() is not True:
                raise AssertionError("CheckpointManager.load() did not load")
        finally:
            mgr.close()
    finally:
        dist.destroy_process_group()
    sd = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    _same_as_hf(sd, hf, "")


def _verl_hook(actor: Path, work: Path) -> None:
    """integrations/verl.py's HFExportCallback on a copy of a save (it runs where verl's trainer would)."""
    from ckpt_bridge.integrations.verl import HFExportCallback

    run = work / "run"
    shutil.copytree(actor.parent.parent, run)
    cb = HFExportCallback(out_root=work / "exports")
    cb.on_save(trainer=None, global_step=1, checkpoint_dir=str(run / actor.parent.name))
    outcomes = cb.wait()
    if [o["ok"] for o in outcomes] != [True]:
        raise AssertionError(f"callback outcomes {outcomes}")
    exports = sorted((work / "exports").rglob("model.safetensors"))
    if len(exports) != 1:
        raise AssertionError(f"callback wrote {exports}")
    _same_safetensors(exports[0].parent, reference_dir(actor) / "hf")


def _torchtitan_import() -> None:
    import torchtitan.components.checkpoint  # noqa: F401
    import torchtitan.models.llama3  # noqa: F401

    import ckpt_bridge.integrations.torchtitan  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    for name in ("out", "work", "fsdp", "hsdp", "lora", "lora-export", "text", "dcp"):
        p.add_argument(f"--{name}", required=True, type=Path)
    a = p.parse_args(argv)
    import torch

    work = a.work
    checks: dict[str, Callable[[], None]] = {
        "to-hf/fsdp": lambda: _export_verl(a.fsdp, work / "fsdp"),
        "to-hf/hsdp": lambda: _export_verl(a.hsdp, work / "hsdp"),
        "dcp-round-trip": lambda: _dcp_round_trip(work / "fsdp", work / "round-trip", a.text),
        "lora": lambda: (_cli("to-hf", a.lora, "--out", work / "lora", "--quiet"),
                         _same_safetensors(work / "lora", a.lora_export)),
        "verl-hook": lambda: _verl_hook(a.fsdp, work / "hook"),
        "pinned-dcp/dcp.load": lambda: _pinned_dcp_load(a.dcp, reference_dir(a.fsdp) / "hf"),
        **_fixture_checks(work / "fixtures"),
        "torchtitan-import": _torchtitan_import,
        "pinned-dcp/torchtitan": lambda: _pinned_dcp_titan(a.dcp, reference_dir(a.fsdp) / "hf", work / "titan"),
    }
    results: dict[str, dict] = {}
    for name, fn in checks.items():
        try:
            fn()
            results[name] = {"ok": True}
        except Exception as e:  # noqa: BLE001 - each check reports, the others still run
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            results[name] = {"ok": False, "error": tb[-2000:]}
    a.out.write_text(json.dumps({"torch": torch.__version__, "checks": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
