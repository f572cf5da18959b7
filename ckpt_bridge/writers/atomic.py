"""Output directories that appear whole or not at all.

We write into ``.<name>.partial-<pid>`` next to the target and rename it into
place only after every file is written, so a failure (bad rank file found
halfway, disk full, Ctrl-C) leaves no directory under the final name.  The
target must not be, contain, or sit inside the source: an export must never
write into the checkpoint it reads or a base-model directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import OutputError


def _inside(a: Path, b: Path) -> bool:
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


class AtomicDir:
    def __init__(self, target: str | Path, *, overwrite: bool = False, protect: tuple[Path, ...] = ()):
        self.target = Path(target).absolute()
        for src in protect:
            s = Path(src).resolve()
            t = self.target.resolve()
            if t == s or _inside(t, s) or _inside(s, t):
                raise OutputError(
                    f"{self.target}: output would be inside (or contain) the source {s}; "
                    f"choose an --out outside it"
                )
        if self.target.exists() and not overwrite:
            raise OutputError(f"{self.target}: already exists; pass --overwrite to replace it")
        if self.target.exists() and not self.target.is_dir():
            raise OutputError(f"{self.target}: exists and is not a directory")
        self.tmp = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        except OSError as e:
            raise OutputError(f"{self.target.parent}: cannot create the output here ({e.strerror})") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
