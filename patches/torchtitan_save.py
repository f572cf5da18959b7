"""Wrap one TorchTitan ``CheckpointManager`` instance's ``save`` with an after-save callback.

torchtitan (0.3.0) has no hook after a checkpoint save.  This is the smallest
patch that gives one: the *instance's* ``save`` (the public entry point every
trainer calls; ``BaseCheckpointManager.save`` dispatches to ``_save``) is
replaced by a wrapper that calls the original, then ``after_save(step,
last_step)`` when it returned True (a checkpoint was written or staged).  The
class, other instances and every other method are untouched.  A failing
callback is logged, never raised into the training loop.

Tested with torchtitan 0.3.0; other versions are refused with a clear message
(set ``CKPT_BRIDGE_ALLOW_UNTESTED_TORCHTITAN=1`` to try one anyway).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from ckpt_bridge.errors import BridgeError
from ckpt_bridge.models.titan_eras import torchtitan_version

TESTED_VERSIONS = ("0.3.0",)
log = logging.getLogger("ckpt_bridge")


def check_version() -> str:
    version = torchtitan_version()
    if version is None:
        raise BridgeError("ckpt_bridge.patches.torchtitan_save: torchtitan is not installed")
    if version not in TESTED_VERSIONS and os.environ.get("CKPT_BRIDGE_ALLOW_UNTESTED_TORCHTITAN") != "1":
        raise BridgeError(
            f"ckpt_bridge.patches.torchtitan_save: tested with torchtitan {', '.join(TESTED_VERSIONS)}, this is "
            f"{version}; CheckpointManager.save may have changed. Set CKPT_BRIDGE_ALLOW_UNTESTED_TORCHTITAN=1 to try "
            f"it, and check that every save still produces an export"
        )
    return version


def wrap_save(manager: Any, after_save: Callable[[int, bool], None]) -> None:
    check_version()
    for attr in ("save", "folder", "_create_checkpoint_id"):
        if not hasattr(manager, attr):
            raise BridgeError(f"ckpt_bridge.patches.torchtitan_save: {type(manager).__name__} has no {attr!r}; is "
                              f"checkpointing enabled (checkpoint.enable=True)?")
    if getattr(manager, "_ckpt_bridge_original_save", None) is not None:
        raise BridgeError("ckpt_bridge.patches.torchtitan_save: this CheckpointManager is already wrapped")
    original = manager.save

    def save(curr_step: int, last_step: bool = False) -> bool:
        saved = original(curr_step, last_step)
        if saved:
            try:
                after_save(curr_step, last_step)
            except Exception:  # noqa: BLE001 - an export must never stop training
                log.exception("ckpt-bridge: after-save hook failed for step %s (training continues)", curr_step)
        return saved

    manager._ckpt_bridge_original_save = original
    manager.save = save


def unwrap_save(manager: Any) -> None:
    if getattr(manager, "_ckpt_bridge_original_save", None) is not None:
        del manager.save  # the instance attribute goes; the class's own save is visible again
        manager._ckpt_bridge_original_save = None
