"""Exports of verl save steps: where they go, whether one is complete, and
``ckpt-bridge watch`` for trainers without a save hook.

Default place: ``global_step_N/<role>_hf`` next to ``global_step_N/<role>``.
verl's ``max_actor_ckpt_to_keep`` / ``max_critic_ckpt_to_keep`` delete
``global_step_N/actor`` (critic) only, so the export survives that rotation
and stays beside the step it came from; ``keep_exports=K`` (callback) /
``--keep K`` (watch) rotates the exports themselves, oldest step first.

Safety rules (each checked before anything is written or deleted):

* an export location that is, contains or lies inside a source checkpoint
  (any ``global_step_N/<role>`` holding rank files) is refused;
* rotation deletes only directories carrying our ``ckpt_bridge_export.json``
  whose recorded source is elsewhere (:mod:`ckpt_bridge.writers.marker`);
* a step is exported only when complete: verl writes
  ``latest_checkpointed_iteration.txt`` after every rank's save (and after the
  critic's), so steps up to that number are complete once every rank file the
  layout names is there; a step past it (or with no such file) must also have
  ``fsdp_config.json`` and file sizes unchanged across two polls;
* an export records which parts it holds; one lacking a part the source has
  gained since (``extra_state_*`` written after the model) is redone.
* a verl Megatron save is complete only once its ``ckpt_contents.json`` exists, whatever the latest file
  says (:mod:`ckpt_bridge.formats.megatron_ready`).

An export is complete exactly when its directory exists: ``to_hf`` writes into
``.NAME.partial-PID`` and renames at the end; leftovers of killed processes
are cleaned by the writer (:mod:`ckpt_bridge.pipeline.atomic`).
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..confine import is_inside
from ..errors import BridgeError, OutputError
from ..writers.marker import MARKER, read_marker
from ..pipeline.atomic import OutputBusy, output_lock
from ..formats import automodel
from ..formats.megatron_ready import is_complete as megatron_complete, is_megatron_save, save_problem as megatron_problem
from ..formats.verl_fsdp import VerlFSDPReader
from ..formats.titan_engine import engine_save_problem
from .to_hf import to_hf

log = logging.getLogger("ckpt_bridge")
LATEST = "latest_checkpointed_iteration.txt"
_RANK_FILE = re.compile(r"^(model|optim|extra_state)_world_size_\d+_rank_\d+\.pt$")
EXPORTED_PARTS = ("model", "extra_state")  # the parts of a verl role dir an export carries (not the optimizer)


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


def source_dirs(root: Path) -> list[Path]:
    """Every source checkpoint under a verl root: ``global_step_N/<dir>`` holding rank files."""
    out = []
    for s in saved_steps(root):
        step = Path(root) / f"global_step_{s}"
        for d in sorted(p for p in step.iterdir() if p.is_dir()):
            try:
                if any(_RANK_FILE.match(f.name) for f in d.iterdir()) or is_megatron_save(d) or \
                        d.name == f"step-{s}":  # verl's TorchTitan engine's torchtitan step folder
                    out.append(d)
            except OSError:
                continue
    return out


def check_export_location(out: Path, sources: list[Path]) -> None:
    """Refuse an export location that is, contains or lies inside a source checkpoint."""
    for src in sources:
        if is_inside(src, out) or is_inside(out, src):
            raise OutputError(f"{out}: export location is, contains or lies inside the source checkpoint {src}; "
                              f"choose an --out-root outside every global_step_N/<role> (the default puts "
                              f"exports at global_step_N/<role>_hf)")


def check_root_exports(root: Path, role: str, out_root: str | Path | None) -> None:
    """Check the export location of every saved step of ``root`` against every source under it."""
    sources = source_dirs(root)
    for s in saved_steps(root):
        check_export_location(export_dir(Path(root) / f"global_step_{s}", role, out_root), sources)


def rank_files_problem(role_dir: Path) -> str | None:
    """None when every rank file of a verl role dir is present and readable by name, else why not."""

    engine = engine_save_problem(role_dir)  # verl's TorchTitan engine: torchtitan's step-N, complete with .metadata
    if engine is not None:
        return engine[1]
    if not role_dir.is_dir():
        return f"{role_dir} does not exist (nothing was saved for this role, or it was rotated away)"
    if is_megatron_save(role_dir):
        return megatron_problem(role_dir)
    if automodel.is_automodel_save(role_dir):
        return automodel.save_problem(role_dir)
    try:
        reader = VerlFSDPReader(role_dir)
    except BridgeError as e:
        return str(e)
    problems = reader.problems()
    if problems:
        return (problems[0] + " (on a multi-node run the driver sees every rank file only on shared storage: "
                "point trainer.default_local_dir at a filesystem every node writes to)")
    return None


def source_parts(role_dir: Path) -> set[str]:
    """The parts of a verl role dir an export would carry (model, extra_state), from file names alone."""
    kinds = set()
    if automodel.is_automodel_save(role_dir):
        return automodel.saved_parts(role_dir)
    if not role_dir.is_dir():  # verl's TorchTitan engine writes no role dir: its step-N holds model + extra state
        return set(EXPORTED_PARTS) if engine_save_problem(role_dir) is not None else kinds
    for f in role_dir.iterdir():
        m = _RANK_FILE.match(f.name)
        if m and m.group(1) in EXPORTED_PARTS:
            kinds.add(m.group(1))
    return kinds


def snapshot(role_dir: Path) -> dict[str, int]:
    """Every file under ``role_dir`` with its size: a save still being written changes it between polls."""
    out = {}
    for p in sorted(role_dir.rglob("*")):
        try:
            if p.is_file():
                out[str(p.relative_to(role_dir))] = p.stat().st_size
        except OSError:
            continue
    return out


def rotate(root: Path, role: str, keep: int, out_root: str | Path | None = None) -> list[Path]:
    """Delete our exports of all but the newest ``keep`` steps.

    Only directories carrying our marker (with a source elsewhere) are
    deleted, and never one that is, holds or lies in a source checkpoint.
    """
    if keep <= 0:
        return []
    sources = source_dirs(root)
    done = [export_dir(Path(root) / f"global_step_{s}", role, out_root) for s in saved_steps(root)]
    done = [d for d in done if d.is_dir() and read_marker(d) is not None]
    removed = []
    for d in done[:-keep]:
        if any(is_inside(src, d) or is_inside(d, src) for src in sources):
            log.error("ckpt-bridge: not removing %s: it is or holds a source checkpoint", d)
            continue
        try:
            with output_lock(d):  # never under a writer redoing it (another watch, the callback's export)
                shutil.rmtree(d, ignore_errors=True)
        except OutputBusy:
            continue
        removed.append(d)
    return removed


@dataclass
class WatchEvent:
    step: int
    out: str
    status: str  # exported | skipped (already exported) | failed | waiting (save incomplete)
    message: str = ""


def step_action(root: Path, step: int, role: str = "actor", out_root: str | Path | None = None,
                settled: bool = True) -> tuple[str, Path, str]:
    """What to do with one step: ("export" | "redo" | "skip" | "wait" | "refuse", export dir, why).

    Shared by ``watch`` and the verl callback, so both refuse the same
    locations, wait for the same incomplete saves and redo the same exports.
    Raises OutputError when the export location overlaps a source checkpoint.
    """
    step_dir = Path(root) / f"global_step_{step}"
    src = step_dir / role
    out = export_dir(step_dir, role, out_root)
    check_export_location(out, source_dirs(root))
    problem = rank_files_problem(src)
    if problem:
        return "wait", out, problem
    if not settled:
        return "wait", out, "save still in progress (files changing, or no fsdp_config.json yet); exported once stable"
    if not out.is_dir():
        return ("refuse", out, "exists and is not a directory; left alone") if out.exists() else ("export", out, "")
    marker = read_marker(out)
    if marker is None:
        return "refuse", out, (f"exists but is not a ckpt-bridge export (no valid {MARKER}); left alone: move it "
                               f"away or choose another --out-root")
    missing = sorted(source_parts(src) - set(marker.get("parts") or []))
    if not missing:
        return "skip", out, "already exported"
    return "redo", out, f"redone: the earlier export lacked {', '.join(missing)} (saved after it)"


def export_step(root: Path, step: int, *, role: str = "actor", out_root: str | Path | None = None,
                dtype: str = "keep", settled: bool = True, lora: str = "both", custom_import: tuple[str, ...] = (),
                trust_remote_code: bool = False) -> WatchEvent:
    """Export ``global_step_{step}/{role}`` once: skip when complete, redo when a part was missing.

    ``settled``: the caller knows the save finished (verl's latest file, or
    sizes stable across polls); otherwise the step waits.
    """

    action, out, why = step_action(root, step, role, out_root, settled)
    if action in ("wait", "skip", "refuse"):
        return WatchEvent(step, str(out), {"wait": "waiting", "skip": "skipped", "refuse": "failed"}[action], why)
    src = Path(root) / f"global_step_{step}" / role
    try:
        # The output's lock (the writer's, re-entrant) from the decision to the rename: another watch or the
        # callback exporting this step makes it a skip; decided again under the lock, as they may have finished.
        with output_lock(out):
            action, out, why = step_action(root, step, role, out_root, settled)
            if action in ("wait", "skip", "refuse"):
                return WatchEvent(step, str(out), {"wait": "waiting", "skip": "skipped", "refuse": "failed"}[action],
                                  why)
            s = to_hf(src, out, dtype=dtype, progress=False, overwrite=action == "redo", lora=lora,
                      custom_import=custom_import, trust_remote_code=trust_remote_code)
    except OutputBusy:
        return WatchEvent(step, str(out), "skipped", "another ckpt-bridge process is exporting it now")
    except BridgeError as e:
        return WatchEvent(step, str(out), "failed", str(e))
    return WatchEvent(step, str(out), "exported", why or f"{s.tensors} tensors in {s.seconds:.1f}s")


def _settled(root: Path, step: int, role: str, latest: int | None, seen: dict[int, dict[str, int]]) -> bool:
    """verl's own signal when it covers ``step``; else fsdp_config.json and sizes unchanged since the last poll.
    A Megatron save: its ckpt_contents.json, even when the latest file covers it (async saves)."""
    if is_megatron_save(Path(root) / f"global_step_{step}" / role):
        return megatron_complete(Path(root) / f"global_step_{step}" / role)
    if automodel.is_automodel_save(Path(root) / f"global_step_{step}" / role):
        return automodel.is_complete(Path(root) / f"global_step_{step}" / role)
    if latest is not None and step <= latest:
        return True
    engine = engine_save_problem(Path(root) / f"global_step_{step}" / role)
    if engine is not None:
        return engine[1] is None
    src = Path(root) / f"global_step_{step}" / role
    if not src.is_dir() or not (src / "fsdp_config.json").is_file():
        return False
    now = snapshot(src)
    before, seen[step] = seen.get(step), now
    return before == now


def watch(root: str | Path, *, role: str = "actor", out_root: str | Path | None = None, dtype: str = "keep",
          every_step: bool = False, once: bool = False, interval: float = 30.0, keep: int = 0,
          on_event=None, stop=None, settle: float = 2.0, lora: str = "both", custom_import: tuple[str, ...] = (),
          trust_remote_code: bool = False) -> list[WatchEvent]:
    """Follow ``ROOT/latest_checkpointed_iteration.txt`` and export each new step.

    ``every_step``: also export older saved steps not exported yet (default: the
    latest only, as they appear).  ``once``: one pass, then return (a step not
    covered by verl's latest file is polled twice, ``settle`` seconds apart).
    ``stop``: a callable; the loop ends when it returns True (tests, embedding).  ``lora``: what
    a LoRA run's exports hold (``to_hf``'s ``lora``: merge, adapter or both).  ``custom_import`` /
    ``trust_remote_code``: as to-hf's (a model class not built into transformers).
    """
    root = Path(root)
    if not (interval > 0 and interval != float("inf")):  # time.sleep(-5) raises mid-loop; NaN never waits
        raise BridgeError(f"--interval {interval}: give a number of seconds > 0")
    if not root.is_dir():
        raise BridgeError(f"{root}: not a directory; pass verl's trainer.default_local_dir")
    check_root_exports(root, role, out_root)  # refused before anything runs
    events: list[WatchEvent] = []
    seen: dict[int, dict[str, int]] = {}
    while True:
        latest = latest_step(root)
        todo = ([s for s in saved_steps(root) if latest is None or s <= latest] if every_step
                else ([latest] if latest is not None else []))
        check_root_exports(root, role, out_root)
        for step in todo:
            settled = _settled(root, step, role, latest, seen)
            if not settled and once:
                time.sleep(settle)
                settled = _settled(root, step, role, latest, seen)
            ev = export_step(root, step, role=role, out_root=out_root, dtype=dtype, settled=settled, lora=lora,
                             custom_import=custom_import, trust_remote_code=trust_remote_code)
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
