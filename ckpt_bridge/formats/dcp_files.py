"""The files ckpt-bridge keeps inside a DCP folder besides DCP's own, read and written here only.

- ``ckpt_bridge_manifest.json``: what ``to-dcp`` wrote (source, files hashed, plan, versions); written by
  :func:`ckpt_bridge.commands.to_dcp.to_dcp`, read by the DCP reader (to find the kept HF config) and ``verify-dcp``.
- ``hf_config/``: the source's config and tokenizer files, kept so a bootstrap checkpoint converts back without
  ``--config`` (paths recorded in a checkpoint are only followed inside it).
- ``source_extra_state/``: with ``to-dcp --extra-state``, the source's lr_scheduler / rng / step in the files
  ``to-hf`` writes (``extra_state_merged.pt``, ...); a model-only load does not read them.
- ``ckpt_bridge_rng/rank_R.pt``: every rank's rng state; torchtitan saves none, so the save hook
  (:mod:`ckpt_bridge.integrations.torchtitan`) writes one per rank and the DCP reader hands them to the export.

The exporter, the hook and the reader all import this module; it imports no writer, planner or command.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..jsonfiles import MANIFEST as SHAPE, read_json

MANIFEST = "ckpt_bridge_manifest.json"
# config.json, generation config and tokenizer / processor files of the source, kept inside the DCP folder:
# to-hf and verify read them from there (paths recorded in a checkpoint are only followed inside it), so a
# bootstrap checkpoint converts back without --config even after the source dir moved.
HF_CONFIG_DIR = "hf_config"
# to-dcp --extra-state: the source's optimizer-free training state (lr_scheduler, rng, step), as to-hf writes it
EXTRA_STATE_DIR = "source_extra_state"
RNG_DIR = "ckpt_bridge_rng"  # written by ckpt_bridge.integrations.torchtitan.attach (torchtitan saves no rng)
_RNG_FILE = re.compile(r"rank_(\d+)\.pt")


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The to-dcp manifest of a DCP folder, or None."""

    m = Path(path) / MANIFEST
    if not m.is_file():
        return None
    return read_json(m, SHAPE)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` (already made JSON-able) into ``folder``, the temporary output of to-dcp."""
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def rng_files(dcp_dir: Path) -> dict[int, Path]:
    """rank -> its rng file in ``dcp_dir`` (none when the save hook stored no rng)."""
    d = Path(dcp_dir) / RNG_DIR
    found = {}
    for f in d.glob("rank_*.pt") if d.is_dir() else ():
        m = _RNG_FILE.fullmatch(f.name)
        if m:
            found[int(m.group(1))] = f
    return found


def write_rng(dcp_dir: Path, rank: int, state: dict[str, Any]) -> None:
    """Store ``rank``'s rng state in ``dcp_dir`` (through a temporary name: a reader never sees half a file)."""
    import torch

    d = Path(dcp_dir) / RNG_DIR
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".rank_{rank}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, d / f"rank_{rank}.pt")
