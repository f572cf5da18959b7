"""verl's TorchTitan engine saves (``verl/workers/engine/torchtitan/transformer_impl.py``, verl 0.9.1 / main).

``TorchTitanEngine.save_checkpoint(local_path, global_step=N)`` sets torchtitan's ``CheckpointManager.folder`` to
``os.path.dirname(local_path)`` and calls ``save(curr_step=N)``, so torchtitan writes its own DCP step folder one
level above where verl's other engines write::

    PPO (ray_trainer._save_checkpoint, local_path = global_step_N/actor):
        global_step_N/step-N/      .metadata, __R_0.distcp: torchtitan-native model keys (flat), optimizer,
                                   lr_scheduler, train_state (torchtitan's Trainer state: verl never advances it)
        global_step_N/data.pt      verl's dataloader state
        (no actor/: nothing is written there; a critic on this engine would overwrite the same step-N folder,
        so global_step_N/critic is never read as this layout)
    SFT (CheckpointHandler, local_path = <root>/global_step_N):
        <root>/step-N/             the same DCP;  <root>/global_step_N/data_R.pt

No rng state is saved.  torchtitan's default interval is 500 and the engine keeps it, so a save of a step that
is not a multiple of 500 writes nothing at all (verl's bug; ``global_step_N`` then holds only ``data.pt``).

The reader is the DCP reader on that step folder (found from ``global_step_N``, ``global_step_N/actor`` or
``step-N``), with ``key_names = "titan"``: the keys are a TorchTitan model's own, named for an HF export by that
family's ``StateDictAdapter`` (found from the keys, :func:`ckpt_bridge.plan.titan_names.native_titan_model`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .dcp import DCPReader, is_dcp_dir

_GLOBAL_STEP = re.compile(r"^global_step_(\d+)$")
NO_RNG = ("no rng state in this save: verl's TorchTitan engine saves none (torchtitan's CheckpointManager "
          "keeps model, optimizer, lr_scheduler, train_state); a resumed run draws fresh random numbers")


def find_engine_step(path: Path) -> Path | None:
    """The torchtitan step folder verl's TorchTitan engine wrote for ``path``, or None.

    ``global_step_N`` -> ``global_step_N/step-N`` (PPO) or its sibling ``step-N`` (SFT); ``global_step_N/actor``
    (empty or absent: the engine writes nothing there) -> its parent's ``step-N``; a ``step-N`` DCP folder
    inside ``global_step_N`` or beside ``global_step_N`` -> itself.  The ``global_step_N`` name is verl's:
    a step folder of torchtitan's own trainer (``<dump>/checkpoint/step-N``) is not taken for the engine's.
    """
    path = Path(path)
    m = re.fullmatch(r"step-(\d+)", path.name)
    if m and is_dcp_dir(path):
        n = m.group(1)
        if path.parent.name == f"global_step_{n}" or (path.parent / f"global_step_{n}").is_dir():
            return path
        return None
    # Only the actor: verl 0.9.1 registers this engine for language models, and a critic on it would overwrite
    # the actor's step-N (same dirname), so ``global_step_N/critic`` is never taken for the actor's weights.
    if path.name == "actor" and not _holds_other_files(path):
        path = path.parent
    m = _GLOBAL_STEP.match(path.name)
    if m is None:
        return None
    for step in (path / f"step-{m.group(1)}", path.parent / f"step-{m.group(1)}"):
        if is_dcp_dir(step):
            return step
    return None


def _holds_other_files(path: Path) -> bool:
    """An ``actor/`` with files of its own belongs to another engine (verl's FSDP rank files, Megatron's dirs)."""
    if path.name != "actor" or not path.is_dir():
        return False
    return any(True for _ in path.iterdir())


class TitanEngineReader(DCPReader):
    """The DCP step folder of a verl TorchTitan-engine save (see the module docstring)."""

    format = "verl-torchtitan"
    key_names = "titan"

    def __init__(self, path: Path, *, trust_pickle: bool = False, allow_missing_rng: bool = False):
        requested = Path(path)
        step = find_engine_step(requested) or requested
        super().__init__(step, trust_pickle=trust_pickle, allow_missing_rng=allow_missing_rng)
        self.requested = requested
        self.evidence.notes.append(f"verl's TorchTitan engine: torchtitan's {step.name} in {step.parent} "
                                   f"(CheckpointManager.folder = dirname(local_path)); no rng saved")

    def extra_state(self) -> dict[str, Any]:
        out = super().extra_state()
        step = self._folder_step()
        if out:
            # verl never advances torchtitan's Trainer.step: train_state says 0; the folder names verl's step
            out["global_step"] = step if step is not None else out.get("global_step")
            out.setdefault("warnings", []).append(NO_RNG)
        return out

    def _folder_step(self) -> int | None:
        m = re.fullmatch(r"step-(\d+)", self.path.name)
        return int(m.group(1)) if m else None

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(writer="verl TorchTitan engine (torchtitan CheckpointManager, folder = dirname(local_path))",
                 global_step=self._folder_step(), rng="none saved (the engine saves none)")
        return d


def engine_save_problem(role_dir: Path) -> tuple[Path, str | None] | None:
    """For ``global_step_N/<role>`` of a verl TorchTitan-engine run: (its step folder, None when the save is
    complete or why it is not yet); None when ``role_dir`` is not that layout.

    Complete means DCP's ``.metadata`` exists: ``dcp.save`` writes it last, on the coordinator, after every rank
    wrote its ``__R_0.distcp`` (torch's ``FileSystemWriter.finish``), so a folder without it is still being
    written (or was interrupted).
    """
    role_dir = Path(role_dir)
    step = find_engine_step(role_dir)
    if step is None:
        return None
    if not (step / ".metadata").is_file():
        return step, (f"{step}: no .metadata yet: torchtitan's DCP save is still being written (dcp.save writes "
                      f".metadata last, after every rank's data)")
    return step, None


def unsaved_step_hint(path: Path) -> str | None:
    """For a ``global_step_N`` holding only verl's dataloader state (``data.pt`` / ``data_R.pt``): verl's
    TorchTitan engine keeps torchtitan's default interval of 500, so it saved nothing unless N % 500 == 0."""
    path = Path(path)
    m = _GLOBAL_STEP.match(path.name)
    names = {p.name for p in path.iterdir()} if m and path.is_dir() else set()
    if not names or not all(re.fullmatch(r"data(_\d+)?\.pt|lora_train_meta\.json", n) for n in names):
        return None
    return (f"; only verl's dataloader state is here: if the run used verl's TorchTitan engine, it saved no model "
            f"(the engine keeps torchtitan's checkpoint interval of 500, so a save writes nothing unless "
            f"{m.group(1)} % 500 == 0)")
