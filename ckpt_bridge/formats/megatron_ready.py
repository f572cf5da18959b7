"""When a verl Megatron save is complete, for ``watch`` and the verl callback (:mod:`ckpt_bridge.commands.watch`).

verl's ``MegatronCheckpointManager`` writes ``ckpt_contents.json`` last, from rank 0, in the save's finalize
step: after every rank's dist_ckpt shards (an async save's background writers included) and the bridge's HF
weights.  So a schema-v2 save is complete exactly when that file exists; ``latest_checkpointed_iteration.txt``
is no proof (with ``async_save`` the trainer writes it while the shards are still being written).  A v1 save
(verl <= 0.8) has no manifest: it counts as complete once the reader finds every file its metadata names.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BridgeError
from .megatron import MANIFEST, is_dist_ckpt
from .megatron import MegatronReader

WAITING = (f"waiting for {MANIFEST} (verl's rank 0 writes it when every rank's part of the save has been "
           f"written); exported once it appears")


def is_megatron_save(role_dir: Path) -> bool:
    """A ``global_step_N/<role>`` of the Megatron manager, finished or still being written."""
    d = Path(role_dir)
    return (d / MANIFEST).is_file() or (d / "model" / "dist_ckpt").is_dir() or \
        (d / "extra" / "dist_ckpt").is_dir() or is_dist_ckpt(d / "dist_ckpt")


def is_complete(role_dir: Path) -> bool:
    d = Path(role_dir)
    return (d / MANIFEST).is_file() or (not (d / "model").is_dir() and is_dist_ckpt(d / "dist_ckpt"))


def save_problem(role_dir: Path) -> str | None:
    """None when the Megatron save at ``role_dir`` is complete and readable, else why not (one line)."""

    if not is_complete(role_dir):
        return f"{role_dir}: {WAITING}"
    try:
        problems = MegatronReader(Path(role_dir)).problems()
    except BridgeError as e:
        return str(e)
    return problems[0] if problems else None
