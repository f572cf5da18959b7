"""Progress on stderr: a bar when stderr is a terminal, silence otherwise."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    def __init__(self, total_bytes: int, desc: str, enabled: bool | None = None):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                             file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, nbytes: int, key: str = "") -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(key[-40:], refresh=False)
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
