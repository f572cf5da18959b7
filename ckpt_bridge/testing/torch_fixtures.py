"""Write the small cross-torch fixtures of ``tests/fixtures/torch-<version>/`` under the running torch.

    PYTHONPATH=<torch overlay>:. .venv/bin/python -m ckpt_bridge.testing.torch_fixtures \\
        --out tests/fixtures/torch-<version>

(``ckpt_bridge.testing.overlays.torch_overlay(version)`` builds the overlay; see tests/fixtures/README.md.)
Everything is written by the real code of that torch release: verl 0.9.1's ``FSDPCheckpointManager`` on
gloo/CPU (``ckpt_bridge.testing.verl_save`` under torchrun, the tiny ``llama_micro`` preset: a few KB) and our
own ``to-dcp`` (DCP's ``FileSystemWriter`` of this torch).  Each case keeps only what the tests read:

* ``fsdp/``   2 ranks, 1-D ``('fsdp',)`` mesh, ``Shard(0)`` (uneven: vocab 61)
* ``hsdp/``   4 ranks, 2-D ``('ddp', 'fsdp')`` mesh, ``(Replicate(), Shard(0))``
* ``shard1/`` 2 ranks, ``Shard(1)`` wherever dim 1 divides by 2
  each as ``global_step_1/actor/`` (model and extra_state rank files, fsdp_config.json, huggingface/) and
  ``reference/global_step_1/`` (``hf/`` = save_pretrained of the live model's full state dict, what an export
  must equal; ``rank{R}_state.pt`` = the lr_scheduler / rng each rank held when verl saved; meta.json).
* ``dcp/``    ``to-dcp`` of ``fsdp``'s reference HF dir (flat TorchTitan keys + manifest) under this torch.
* ``torch_file.pt``  ``torch.save`` of that reference's state dict (a plain torch file of this torch).

``info.json`` records the torch / verl versions that wrote them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {  # name: (processes, verl_save arguments)
    "fsdp": (2, ["--mesh", "2"]),
    "hsdp": (4, ["--mesh", "2x2"]),
    "shard1": (2, ["--mesh", "2", "--shard-dim", "1"]),
}
MODEL = "llama_micro"
_ACTOR_KEEP = ("model_world_size_", "extra_state_world_size_", "fsdp_config.json", "huggingface")
_REFERENCE_KEEP = ("hf", "meta.json", "keys.json")


def _prune_copy(run: Path, dest: Path) -> None:
    """Copy the parts of a verl_save run the tests read (no optimizer state, base model or logits)."""
    actor, ref = run / "global_step_1" / "actor", run / "reference" / "global_step_1"
    for src_dir, out_dir, keep in ((actor, dest / "global_step_1" / "actor", _ACTOR_KEEP),
                                   (ref, dest / "reference" / "global_step_1", _REFERENCE_KEEP)):
        out_dir.mkdir(parents=True)
        for p in sorted(src_dir.iterdir()):
            if p.name.startswith(keep) or (src_dir is ref and p.name.startswith("rank") and p.name.endswith("_state.pt")):
                (shutil.copytree if p.is_dir() else shutil.copy2)(p, out_dir / p.name)


def write_torch_file(out: Path) -> None:
    """``torch_file.pt``: this torch's ``torch.save`` of the fsdp case's reference state dict."""
    import torch
    from safetensors.torch import load_file

    sd = load_file(out / "fsdp" / "reference" / "global_step_1" / "hf" / "model.safetensors")
    torch.save(sd, out / "torch_file.pt")


def relative_manifest(out: Path) -> None:
    """The to-dcp manifest records its source's absolute path (information only, never followed): store it
    relative to the fixture root, so a committed fixture names no path of the machine that wrote it."""
    manifest = out / "dcp" / "ckpt_bridge_manifest.json"
    manifest.write_text(manifest.read_text().replace(str(out) + "/", ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    import torch
    import verl

    from ckpt_bridge.testing.harness import run_torchrun

    out: Path = args.out.resolve()
    if out.exists():
        if not args.overwrite:
            raise SystemExit(f"{out} exists; pass --overwrite to write it again")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="ckpt-bridge-fixtures-") as tmp:
        for name, (nproc, extra) in CASES.items():
            run = Path(tmp) / name
            run_torchrun(["ckpt_bridge.testing.verl_save", "--model", MODEL, "--out", str(run), "--no-tokenizer",
                          *extra], nproc=nproc, timeout=600)
            _prune_copy(run, out / name)
    hf = out / "fsdp" / "reference" / "global_step_1" / "hf"
    subprocess.run([sys.executable, "-m", "ckpt_bridge", "to-dcp", str(hf), "--out", str(out / "dcp"),
                    "--quiet"], check=True)
    relative_manifest(out)
    write_torch_file(out)
    (out / "info.json").write_text(json.dumps({
        "torch": torch.__version__, "verl": verl.__version__, "model": MODEL,
        "written_by": "python -m ckpt_bridge.testing.torch_fixtures",
    }, indent=1) + "\n")
    print(f"wrote {out} under torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
