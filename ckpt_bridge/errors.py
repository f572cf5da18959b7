"""Exception families.

Every error a user can cause by pointing ckpt-bridge at bad input derives from
:class:`BridgeError`.  Messages are one line and name the file, key and rank at
fault plus what to do; the CLI prints the message (no traceback) and exits with
``exit_code``: 2 for bad input, 1 for a verification that ran and found a
difference.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base class: bad input or a refused operation (exit code 2)."""

    exit_code = 2


class CheckpointFormatError(BridgeError):
    """The files on disk are not a checkpoint we can read exactly (missing ranks,
    truncated files, mixed world sizes, unknowable layouts)."""


class UnsafePickleError(CheckpointFormatError):
    """A torch-save file needs globals outside the weights-only allowlist."""


class KeyPlanError(BridgeError):
    """Source keys cannot be mapped onto the target's keys one to one."""


class OutputError(BridgeError):
    """The requested output location is refused (exists, inside the source, ...)."""


class VerificationFailed(BridgeError):
    """Two checkpoints were compared and differ (exit code 1)."""

    exit_code = 1
