"""Output directories that appear whole or not at all, and never over someone else's.

We write into ``.<name>.partial-<pid>`` next to the target and rename it into
place only after every file is written, so a failure (bad rank file found
halfway, disk full, Ctrl-C) leaves no directory under the final name.  The
target must not be, contain, or sit inside the source: an export must never
write into the checkpoint it reads or a base-model directory.

The final rename, chosen so that nothing is lost in any race:

* without ``--overwrite`` it must not replace anything that appeared at the
  name while we wrote (another export, a user's files).  Linux:
  ``renameat2(RENAME_NOREPLACE)``; macOS: ``renamex_np(RENAME_EXCL)``; both
  fail atomically with EEXIST.  Elsewhere: a plain ``rename``, which POSIX
  lets replace only an *empty* directory (a non-empty one gives ENOTEMPTY, a
  file ENOTDIR), so at worst an empty directory created in the last instant
  is replaced, never content.  (Taking the name first with ``mkdir`` would
  not help: the rename would then have to replace our own placeholder, which
  is exactly the replace-an-empty-dir rename.)  On a conflict the finished
  output is kept as ``NAME.conflict-PID`` and the error names both paths.
* with ``--overwrite`` the old export is swapped out atomically with
  ``renameat2(RENAME_EXCHANGE)`` and then deleted: at every instant the name
  holds either the old or the new export.  Without it, the old one is first
  moved to ``.NAME.old-PID``; if we die before the new one is in place, the
  next run writing to NAME puts the old one back (and says so).

Durability: the writers do not fsync file by file (DCP's writer would
otherwise fsync each of its one-file-per-tensor outputs as it closes it and
stall the stream on the disk every time).  Instead every file and directory
of the finished output is flushed once, just before the final rename, while
the kernel has mostly written it back already: after the rename the export
is on disk, never a name pointing at data still in memory.

Leftovers of dead processes (``.NAME.partial-PID``, ``.NAME.old-PID``) are
cleaned by the next run of any command writing to NAME.

One writer per output at a time: every process writing NAME (to-hf, to-dcp,
a ``watch``, the verl callback's background export) first takes an exclusive
``flock`` on ``.NAME.lock`` beside it (:func:`output_lock`), and holds it from
the first check of NAME to the final rename.  A second writer is refused at
once (:class:`OutputBusy`, naming the holder's pid); ``watch`` takes the lock
before deciding what a step needs and skips a step another process holds.
Two ``watch --once --all`` on one root used to race into the rename conflict
below and leave a full model copy as ``NAME.conflict-PID``.  The lock file is
removed on release (and one left by a killed process is taken over and
removed by the next writer); the kernel drops a dead holder's lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import shutil
import sys
from pathlib import Path

from ..errors import OutputError

log = logging.getLogger("ckpt_bridge")

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_RENAME_EXCL = 0x4  # macOS renamex_np


def _inside(a: Path, b: Path) -> bool:
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:  # pragma: no cover - no libc to load
        return None


_LIBC = _libc()


def _native_rename(src: Path, dst: Path, flag: str) -> bool:
    """Rename with ``flag`` ("noreplace" | "exchange") through libc; False when this OS/filesystem lacks it.

    Raises FileExistsError (noreplace, ``dst`` exists) and other OSErrors as they come.
    """
    if _LIBC is None:
        return False
    s, d = os.fsencode(src), os.fsencode(dst)
    if sys.platform.startswith("linux") and hasattr(_LIBC, "renameat2"):
        flags = _RENAME_NOREPLACE if flag == "noreplace" else _RENAME_EXCHANGE
        rc = _LIBC.renameat2(_AT_FDCWD, s, _AT_FDCWD, d, ctypes.c_uint(flags))
    elif sys.platform == "darwin" and hasattr(_LIBC, "renamex_np") and flag == "noreplace":
        rc = _LIBC.renamex_np(s, d, ctypes.c_uint(_RENAME_EXCL))
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # the kernel or this filesystem does not do it: fall back
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


# Switches for the tests: force the portable fallbacks, and a hook run between the two renames of an
# --overwrite without RENAME_EXCHANGE (a crash there is what the recovery of the next run is for).
USE_NATIVE = True
BETWEEN_RENAMES = None


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; FileExistsError if anything is at ``dst`` (see the module doc for the fallback)."""
    if USE_NATIVE and _native_rename(src, dst, "noreplace"):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    try:
        os.rename(src, dst)  # replaces at most an empty directory created since the check
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_leftovers(target: Path, kind: str) -> list[Path]:
    out = []
    for p in target.parent.glob(f".{target.name}.{kind}-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            out.append(p)
    return out


def restore_interrupted(target: str | Path) -> Path | None:
    """Put back the previous export an ``--overwrite`` moved to ``.NAME.old-PID`` before its writer died.

    Returns the path it was restored from (None if there was nothing to do).
    An ``.old`` whose writer did get the new export into place is garbage and
    is removed.
    """
    target = Path(target).absolute()
    restored = None
    for p in sorted(_dead_leftovers(target, "old")) if target.parent.is_dir() else []:
        try:
            rename_noreplace(p, target)
            restored = p
            log.warning("ckpt-bridge: %s was missing after an interrupted --overwrite; restored the previous "
                        "export from %s", target, p)
        except FileExistsError:
            shutil.rmtree(p, ignore_errors=True)
    return restored


def clear_stale_partials(target: str | Path) -> list[Path]:
    """Remove ``.NAME.partial-PID`` dirs of dead processes (unfinished outputs of ``target``); returns them."""
    target = Path(target).absolute()
    if not target.parent.is_dir():
        return []
    done = []
    for p in _dead_leftovers(target, "partial"):
        shutil.rmtree(p, ignore_errors=True)
        done.append(p)
    return done


def check_target(target: str | Path, *, overwrite: bool = False, protect: tuple[Path, ...] = ()) -> Path:
    """The checks of an output location, without touching anything (``--dry-run`` uses them too)."""
    target = Path(target).absolute()
    for src in protect:
        s = Path(src).resolve()
        t = target.resolve()
        if t == s or _inside(t, s) or _inside(s, t):
            raise OutputError(f"{target}: output would be inside (or contain) the source {s}; choose an --out "
                              f"outside it")
    if target.exists() and not overwrite:
        raise OutputError(f"{target}: already exists; pass --overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a directory")
    return target


def _fsync_path(p: Path) -> None:
    fd = os.open(p, (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if p.is_dir() else os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # a filesystem without fsync on dirs
            raise
    finally:
        os.close(fd)


def flush_tree(root: Path) -> None:
    """fsync every file, then every directory, under ``root`` (the one flush before the final rename)."""
    dirs = [root]
    for d, subdirs, files in os.walk(root):
        for name in files:
            _fsync_path(Path(d) / name)
        dirs += [Path(d) / s for s in subdirs]
    for d in reversed(dirs):
        _fsync_path(d)


class OutputBusy(OutputError):
    """Another process is writing this output right now."""


_HELD: dict[str, int] = {}  # lock file -> how deep this process holds it (re-entrant: watch, then to_hf)


def lock_path(target: str | Path) -> Path:
    target = Path(target).absolute()
    return target.parent / f".{target.name}.lock"


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "another process"


def _take(lp: Path) -> int:
    """An fd holding the exclusive flock on ``lp`` (created if missing); OutputBusy if someone else holds it."""
    while True:
        fd = os.open(lp, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(fd)
            os.close(fd)
            raise OutputBusy(f"{lp.parent / lp.name[1:-len('.lock')]}: another ckpt-bridge process ({who}) is "
                             f"writing it now; wait for it to finish, or choose another --out") from None
        # The previous holder removes the file as it lets go: a lock on a file no longer at lp locks nothing.
        try:
            here = os.stat(lp)
        except FileNotFoundError:
            here = None
        mine = os.fstat(fd)
        if here is not None and (here.st_ino, here.st_dev) == (mine.st_ino, mine.st_dev):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(target: str | Path):
    """The exclusive right to write ``target`` (see the module doc); re-entrant within one process."""
    lp = lock_path(target)
    key = str(lp)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    try:
        lp.parent.mkdir(parents=True, exist_ok=True)
        fd = _take(lp)
    except OSError as e:
        raise OutputError(f"{lp.parent}: cannot create the output here ({e.strerror})") from None
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lp)  # still holding it: whoever opened it meanwhile sees it gone and retries
        os.close(fd)


def busy(target: str | Path) -> bool:
    """Is another process writing ``target`` now?  (A probe: the answer may change right after.)"""
    lp = lock_path(target)
    if str(lp) in _HELD:
        return False
    try:
        fd = os.open(lp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def partial_path(target: str | Path, pid: int) -> Path:
    """Where process ``pid`` writes the output ``target`` before renaming it into place."""
    target = Path(target).absolute()
    return target.parent / f".{target.name}.partial-{pid}"


class AtomicDir:
    def __init__(self, target: str | Path, *, overwrite: bool = False, protect: tuple[Path, ...] = ()):
        self.target = check_target(target, overwrite=True, protect=protect)
        self.overwrite = overwrite
        self.tmp = partial_path(self.target, os.getpid())
        self._lock = contextlib.ExitStack()

    def _prepare(self) -> None:
        """Under the lock: leftovers of dead writers cleaned, an interrupted --overwrite undone, NAME checked."""
        clear_stale_partials(self.target)
        restored = restore_interrupted(self.target)  # before the existence check, which then sees it
        try:
            check_target(self.target, overwrite=self.overwrite)
        except OutputError as e:
            if restored is None:
                raise
            raise OutputError(f"{e} (restored the previous export from {restored}, left by an interrupted "
                              f"--overwrite)") from None

    def __enter__(self) -> Path:
        try:
            self._lock.enter_context(output_lock(self.target))
            self._prepare()
            try:
                if self.tmp.exists():
                    shutil.rmtree(self.tmp)
                self.tmp.mkdir()
            except OSError as e:
                raise OutputError(f"{self.target.parent}: cannot create the output here ({e.strerror})") from None
        except BaseException:
            self._lock.close()
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        with self._lock:
            self._finish(exc_type)

    def _finish(self, exc_type) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            flush_tree(self.tmp)
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise OutputError(f"{self.target}: the finished output could not be flushed to disk ({e.strerror}); "
                              f"nothing was put in place") from None
        try:
            rename_noreplace(self.tmp, self.target)
        except FileExistsError:
            if not self.overwrite:
                self._refuse_conflict()
            self._replace()
        _fsync_path(self.target.parent)  # the rename itself

    def _refuse_conflict(self) -> None:
        """Something appeared at the name while we wrote: keep our output beside it, say where."""
        kept = self.target.parent / f"{self.target.name}.conflict-{os.getpid()}"
        try:
            rename_noreplace(self.tmp, kept)
        except OSError:
            kept = self.tmp
        raise OutputError(f"{self.target}: appeared while this export ran (another export or your files; left "
                          f"untouched); the finished output is kept at {kept}") from None

    def _replace(self) -> None:
        """--overwrite: put the new output in place so that the old one is never lost without the new one."""
        if not self.target.is_dir() or self.target.is_symlink():
            raise OutputError(f"{self.target}: exists and is not a directory; not replaced (the finished output is "
                              f"kept at {self.tmp})")
        if USE_NATIVE and _native_rename(self.tmp, self.target, "exchange"):
            shutil.rmtree(self.tmp, ignore_errors=True)  # self.tmp now holds the old export
            return
        old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
        os.rename(self.target, old)
        if BETWEEN_RENAMES is not None:
            BETWEEN_RENAMES()
        try:
            rename_noreplace(self.tmp, self.target)
        except OSError as e:
            try:
                rename_noreplace(old, self.target)
                where = f"the previous export is back at {self.target}"
            except OSError:
                where = f"the previous export is at {old}"
            raise OutputError(f"{self.target}: could not put the new export in place ({e.strerror}); {where}; "
                              f"the new one is at {self.tmp}") from None
        shutil.rmtree(old, ignore_errors=True)
