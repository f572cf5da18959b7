"""Exports of verl save steps: where they go, whether one is complete, and
``ckpt-bridge watch`` for trainers without a save hook.

Default place: ``global_step_N/<role>_hf`` next to ``global_step_N/<role>``.
verl's ``max_actor_ckpt_to_keep`` / ``max_critic_ckpt_to_keep`` delete
``global_step_N/actor`` (critic) only, so the export survives that rotation
and stays beside the step it came from; ``keep_exports=K`` (callback) /
``--keep K`` (watch) rotates the exports themselves, oldest step first.

An export is complete exactly when its directory exists: ``to_hf`` writes into
``.NAME.partial-PID`` and renames at the end.  A partial directory left by a
killed process (its PID is gone) is removed before the step is redone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import BridgeError

log = logging.getLogger("ckpt_bridge")
LATEST = "latest_checkpointed_iteration.txt"


def export_dir(step_dir: Path, role: str = "actor", out_root: str | Path | None = None) -> Path:
    step_dir = Path(step_dir)
    if out_root is None:
        return step_dir / f"{role}_hf"
    return Path(out_root) / step_dir.name / role


def latest_step(root: Path) -> int | None:
    f = Path(root) / LATEST
    try:
        text = f.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def saved_steps(root: Path) -> list[int]:
    out = []
    for p in Path(root).glob("global_step_*"):
        m = re.fullmatch(r"global_step_(\d+)", p.name)
        if m and p.is_dir():
            out.append(int(m.group(1)))
    return sorted(out)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale_partials(out: Path) -> list[Path]:
    """Remove ``.NAME.partial-PID`` dirs of ``out`` whose process is gone (an interrupted export)."""
    removed = []
    for p in out.parent.glob(f".{out.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def rank_files_problem(role_dir: Path) -> str | None:
    """None when every rank file of a verl role dir is present and readable by name, else why not."""
    from .formats.verl_fsdp import VerlFSDPReader

    if not role_dir.is_dir():
        return f"{role_dir} does not exist (nothing was saved for this role, or it was rotated away)"
    try:
        reader = VerlFSDPReader(role_dir)
    except BridgeError as e:
        return str(e)
    problems = reader.problems()
    if problems:
        return (problems[0] + " (on a multi-node run the driver sees every rank file only on shared storage: "
                "point trainer.default_local_dir at a filesystem every node writes to)")
    return None


def rotate(root: Path, role: str, keep: int, out_root: str | Path | None = None) -> list[Path]:
    """Delete exports of all but the newest ``keep`` steps."""
    done = [(s, export_dir(Path(root) / f"global_step_{s}", role, out_root)) for s in saved_steps(root)]
    done = [(s, d) for s, d in done if d.is_dir()]
    removed = []
    for _, d in done[:-keep] if keep > 0 else []:
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


@dataclass
class WatchEvent:
    step: int
    out: str
    status: str  # exported | skipped (already exported) | failed | waiting (rank files incomplete)
    message: str = ""


def export_step(root: Path, step: int, *, role: str = "actor", out_root: str | Path | None = None,
                dtype: str = "keep", lora: str = "both") -> WatchEvent:
    """Export ``global_step_{step}/{role}`` once: skip when complete, redo when interrupted."""
    from .export import to_hf

    step_dir = Path(root) / f"global_step_{step}"
    out = export_dir(step_dir, role, out_root)
    if out.is_dir():
        return WatchEvent(step, str(out), "skipped", "already exported")
    problem = rank_files_problem(step_dir / role)
    if problem:
        return WatchEvent(step, str(out), "waiting", problem)
    clear_stale_partials(out)
    try:
        s = to_hf(step_dir / role, out, dtype=dtype, lora=lora, progress=False)
    except BridgeError as e:
        return WatchEvent(step, str(out), "failed", str(e))
    return WatchEvent(step, str(out), "exported", f"{s.tensors} tensors in {s.seconds:.1f}s")


def watch(root: str | Path, *, role: str = "actor", out_root: str | Path | None = None, dtype: str = "keep",
          every_step: bool = False, once: bool = False, interval: float = 30.0, keep: int = 0,
          on_event=None, stop=None, lora: str = "both") -> list[WatchEvent]:
    """Follow ``ROOT/latest_checkpointed_iteration.txt`` and export each new step.

    ``every_step``: also export older saved steps not exported yet (default: the
    latest only, as they appear).  ``once``: one pass, then return.  ``stop``: a
    callable; the loop ends when it returns True (tests, embedding).  ``lora``: what
    a LoRA run's exports hold (``to_hf``'s ``lora``: merge, adapter or both).
    """
    root = Path(root)
    if not root.is_dir():
        raise BridgeError(f"{root}: not a directory; pass verl's trainer.default_local_dir")
    events: list[WatchEvent] = []
    while True:
        latest = latest_step(root)
        todo = ([s for s in saved_steps(root) if latest is None or s <= latest] if every_step
                else ([latest] if latest is not None else []))
        for step in todo:
            ev = export_step(root, step, role=role, out_root=out_root, dtype=dtype, lora=lora)
            if ev.status != "skipped" or once:
                events.append(ev)
                if on_event:
                    on_event(ev)
        if keep:
            for gone in rotate(root, role, keep, out_root):
                log.info("ckpt-bridge watch: removed old export %s (--keep %s)", gone, keep)
        if once or (stop is not None and stop()):
            return events
        time.sleep(interval)
