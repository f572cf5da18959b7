"""The streaming guard of the tests: how many earlier source tensors are still alive at each read."""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field


@dataclass
class LiveReads:
    """``reads``: tensors read so far; ``peak``: the most earlier ones whose storage was alive at a read."""

    refs: list = field(default_factory=list)
    peak: int = 0

    @property
    def reads(self) -> int:
        return len(self.refs)


def count_live_reads(monkeypatch, reader_class, *, collect: bool = False) -> LiveReads:
    """Wrap ``reader_class.read``: each time the next source tensor is read, count the earlier ones whose
    storage is still alive (held by a view, an alias, a writer's cache).  torch keeps one Python object per
    storage for as long as the storage lives, so a weak reference to it tracks the memory exactly.
    ``collect``: run the garbage collector first (without it, a storage held only by a cycle counts as
    alive, so the check errs on the strict side)."""
    live = LiveReads()
    original = reader_class.read

    def counting_read(self, key, dtype=None):
        if collect:
            gc.collect()
        live.peak = max(live.peak, sum(r() is not None for r in live.refs))
        t = original(self, key, dtype)
        live.refs.append(weakref.ref(t.untyped_storage()))
        return t

    monkeypatch.setattr(reader_class, "read", counting_read)
    return live
