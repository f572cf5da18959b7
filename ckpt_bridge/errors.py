"""Exception families.

Every error a user can cause by pointing ckpt-bridge at bad input derives from
:class:`BridgeError`.  Messages are one line and name the file, key and rank at
fault plus what to do; the CLI prints the message (no traceback) and exits with
``exit_code``: 2 for bad input, 1 for a verification that ran and found a
difference.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP (what ``timeout``, Slurm, Kubernetes and a closed terminal send), raised by the CLI's
    handler.  A KeyboardInterrupt, so every path that already cleans up after a Ctrl-C (the temporary output
    removed, DCP's wrapper unwrapped, the ``--workers`` stopped) does the same for it; exit code 128 + signum."""

    def __init__(self, signum: int, name: str):
        super().__init__(name)
        self.signum, self.name = signum, name
        self.exit_code = 128 + signum


def root_cause(e: BaseException) -> BaseException:
    """The exception that actually happened, out of DCP's ``CheckpointException`` wrapper.

    ``dcp.save`` / ``dcp.load`` catch whatever a rank raised (a disk-full ``OSError``, a Ctrl-C, one of our
    BridgeErrors from inside a read) and re-raise it as ``CheckpointException({rank: (exc, traceback)})``,
    a ``BaseException`` whose message is a traceback.  Callers unwrap it to react to the real cause.
    """
    seen = 0
    while hasattr(e, "failures") and isinstance(getattr(e, "failures"), dict) and e.failures and seen < 8:
        first = next(iter(e.failures.values()))
        inner = first[0] if isinstance(first, tuple) else first
        if not isinstance(inner, BaseException):
            break
        e, seen = inner, seen + 1
    return interrupt_in(e) or e


def interrupt_in(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C (or :class:`Terminated`) behind ``e``, if one is in its ``__cause__`` / ``__context__`` chain.

    A signal's handler raises in whatever Python code runs at that moment; inside ``torch.save``'s zip writer
    (DCP's writer calling the stream's ``write``) the C++ side turns it into ``RuntimeError("unexpected pos
    ...")`` whose ``__context__`` is the KeyboardInterrupt: the run was interrupted, not broken.
    """
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen and len(seen) < 32:
        if isinstance(cur, KeyboardInterrupt):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def free_bytes(where: str | os.PathLike) -> int | None:
    """Free bytes on the file system holding ``where`` (or its nearest existing parent)."""
    p = Path(where).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _partial_bytes(where: str | os.PathLike) -> int:
    """Disk space the temporary output dir ``where`` is in takes (given back when it is removed).

    Allocated blocks, not sizes: the safetensors writer creates every file at its full size before writing
    (a sparse file), so the sizes of a half-written export add up to about the whole export, although
    only what was written takes space (``st_blocks`` counts 512-byte units on every Linux and macOS file system).
    """
    p = Path(where)
    top = next((q for q in (p, *p.parents) if re.fullmatch(r"\..+\.partial-\d+", q.name)), None)
    if top is None or not top.is_dir():
        return 0
    total = 0
    for f in top.rglob("*"):
        try:
            st = f.lstat()
        except OSError:  # removed meanwhile (another rank's part)
            continue
        if not f.is_symlink() and f.is_file():
            total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


def disk_full(e: BaseException, where: str | os.PathLike, needed: int | None) -> OutputError:
    """The one-line error for a full disk while writing ``where`` (``needed`` bytes in all)."""
    free = free_bytes(where)
    free = free + _partial_bytes(where) if free is not None else None
    target = _output_name(where)
    need = f"needs {needed:,} bytes" if needed is not None else "ran out of space"
    have = f" and {target.parent} has {free:,} bytes free" if free is not None else ""
    why = e.strerror if isinstance(e, OSError) and e.strerror else "No space left on device"
    return OutputError(f"{target}: no space left on the device ({why}): the export {need}{have}; "
                       f"free space or choose an --out on another disk (nothing was left behind)")


def is_disk_full(e: BaseException, where: str | os.PathLike | None = None) -> bool:
    """ENOSPC / EDQUOT; or, while writing ``where``, a write failure torch's own writers report without the
    errno (torch.save's zip writer: "unexpected pos ..." RuntimeError) on a file system left with < 1 MiB."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if where is None or not isinstance(e, (OSError, RuntimeError)):
        return False
    free = free_bytes(where)
    return free is not None and free < 2**20


def one_line(e: BaseException) -> str:
    """Any exception as one line: its class and the first line of its message."""
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(e, OSError) and e.filename is not None:
        first = f"{e.filename}: {e.strerror or first}"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _output_name(where: str | os.PathLike) -> Path:
    """The --out a temporary ``.NAME.partial-PID`` directory (or a file in it) stands for."""
    p = Path(where)
    for q in (p, *p.parents):
        m = re.fullmatch(r"\.(.+)\.partial-\d+", q.name)
        if m:
            return q.parent / m.group(1)
    return p


@contextmanager
def writing(where: str | os.PathLike, needed: int | None) -> Iterator[None]:
    """Around code that writes an output of ``needed`` bytes under ``where``: a full disk becomes the
    one-line :func:`disk_full` error, and what DCP wrapped (Ctrl-C, our own errors) is re-raised as itself."""
    try:
        yield
    except BaseException as e:
        cause = root_cause(e)
        if is_disk_full(cause, where):
            raise disk_full(cause, where, needed) from None
        if cause is not e and isinstance(cause, (KeyboardInterrupt, BridgeError)):
            raise cause from None
        raise


def few(keys: list[str], n: int = 4) -> str:
    """The first ``n`` keys and how many more: the list an error message names."""
    s = ", ".join(keys[:n])
    return s + (f" and {len(keys) - n} more" if len(keys) > n else "")
