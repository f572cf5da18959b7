"""``ckpt_bridge_export.json``: the record every ``to-hf`` export carries.

It says what the export was made from (the resolved source path and format)
and which parts it holds (``model``, ``extra_state``, the ranks whose rng was
saved).  Two things rely on it: ``watch`` / the verl callback redo an export
that lacks a part the source has since gained (``extra_state_*`` written
after the model files), and rotation (``--keep``) deletes only directories
carrying a marker whose source is somewhere else - never a checkpoint, never a
directory we did not write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..confine import is_inside

MARKER = "ckpt_bridge_export.json"


def write_marker(out_dir: Path, *, source: Path, source_format: str, parts: list[str], **more: Any) -> str:
    record = {"tool": "ckpt-bridge", "command": "to-hf", "source": os.path.realpath(source),
              "source_format": source_format, "parts": sorted(parts), **more}
    (Path(out_dir) / MARKER).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return MARKER


def read_marker(export: Path) -> dict[str, Any] | None:
    """The marker of ``export`` when it is one of our exports of another directory, else None."""
    f = Path(export) / MARKER
    try:
        record = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("tool") != "ckpt-bridge" or not isinstance(record.get("source"), str):
        return None
    src = record["source"]
    # An export never is, holds or sits inside its source; a marker claiming otherwise was not written by us
    # (or the directory was moved over its source): treat it as foreign.
    if is_inside(export, src) or is_inside(src, export):
        return None
    return record
