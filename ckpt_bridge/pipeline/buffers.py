"""Buffers reused in turn instead of a fresh allocation per tensor.

A fresh buffer faults its pages in on first touch: casting 1 GB of fp32 into
a new bf16 tensor took 0.63 s, into a reused one 0.06 s.  A :class:`Recycled`
holds ``n`` grow-only buffers and hands them out in turn; the caller
guarantees that a buffer is no longer in use ``n`` takes later.  Each tensor
handed out has a storage of exactly its own size (a numpy view of the
buffer): DCP's writer clones any tensor whose storage is larger than it.
"""

from __future__ import annotations

import torch

from ..dtypes import nbytes


class Recycled:
    def __init__(self, n: int, size: int = 0):
        self.buffers: list[torch.Tensor | None] = [torch.empty(size, dtype=torch.uint8) if size else None
                                                   for _ in range(n)]
        self.turn = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = nbytes(shape, dtype)
        i, self.turn = self.turn, (self.turn + 1) % len(self.buffers)
        if self.buffers[i] is None or self.buffers[i].numel() < n:
            self.buffers[i] = None  # the old one goes before the larger one comes
            self.buffers[i] = torch.empty(max(n, 1), dtype=torch.uint8)
        return torch.from_numpy(self.buffers[i].numpy()[:n]).view(dtype).view(shape)

    def owns(self, t: torch.Tensor) -> bool:
        return any(b is not None and b.data_ptr() <= t.data_ptr() < b.data_ptr() + b.numel() for b in self.buffers)
