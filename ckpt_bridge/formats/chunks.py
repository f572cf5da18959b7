"""Do a tensor's chunks cover it exactly once?  One check for every chunked source.

A sharded save stores a tensor as chunks, each a box ``(offsets, sizes)`` in
the tensor's global index space: DCP's ``.metadata`` (TorchTitan / flame, and
Megatron-core ``dist_ckpt``, which is a DCP folder too) lists them, verl's rank
files imply them through DTensor placements.  Reading such a tensor fills an
uninitialised buffer chunk by chunk, so rows no chunk holds come out as
whatever the buffer held (zeros, usually) and rows two chunks hold come from
whichever was copied last.  Both are silent wrong outputs; every reader asks
:func:`coverage` before trusting a layout.  This module is a leaf (it imports
nothing from the project), so any reader can use it.

Cost: nothing proportional to the tensor.  The chunk boundaries cut each
dimension into intervals; the check counts, per cell of that grid, how many
chunks hold it (a few cells for the usual row-sharded or 2-D tiled layouts).
A layout whose grid would be huge (thousands of unaligned chunks in several
dimensions, only a hostile or broken file) is checked exactly by volume and a
pairwise overlap sweep instead, which names the overlap but only counts a gap.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from math import prod
from typing import Iterable, Sequence

Box = tuple[tuple[int, int], ...]  # per dimension [start, stop)
Chunk = tuple[Sequence[int], Sequence[int]]  # (offsets, sizes)

GRID_CELLS_MAX = 1 << 20  # above this the grid is not built (see the module docstring)


@dataclass(frozen=True)
class Coverage:
    """How ``chunks`` lie in a tensor of ``shape``; :attr:`exact` when each element is in exactly one."""

    shape: tuple[int, ...]
    outside: int | None = None  # index of a chunk that is not a box inside the tensor
    gap_elements: int = 0  # elements no chunk holds
    gap: Box | None = None  # their bounding box (None from the sweep: only counted)
    overlap_elements: int = 0  # elements more than one chunk holds (the sweep: at least this many)
    overlap: Box | None = None
    overlapping: tuple[int, int] | None = None  # indices of two chunks that share elements

    @property
    def exact(self) -> bool:
        return self.outside is None and not self.gap_elements and not self.overlap_elements

    def problem(self, chunks: Sequence[Chunk]) -> str | None:
        """What is wrong, in words (no file or tensor name: the caller adds those), or None."""
        if self.outside is not None:
            off, size = chunks[self.outside]
            return f"chunk at offsets {tuple(off)} sizes {tuple(size)} lies outside the tensor {self.shape}"
        if self.overlap_elements:
            i, j = self.overlapping
            return (f"chunks at offsets {tuple(chunks[i][0])} and {tuple(chunks[j][0])} both hold "
                    f"{_region(self.overlap, self.overlap_elements, self.shape)} of {self.shape}")
        if self.gap_elements:
            where = (_region(self.gap, self.gap_elements, self.shape) if self.gap is not None
                     else f"{self.gap_elements} of its {prod(self.shape)} elements")
            return f"no chunk holds {where} of {self.shape}"
        return None


def _region(box: Box, elements: int, shape: tuple[int, ...]) -> str:
    if prod(b - a for a, b in box) == elements:
        return describe_box(box, shape)
    return f"{elements} elements within {describe_box(box, shape)}"


def describe_box(box: Box, shape: Sequence[int]) -> str:
    """``rows 32-63`` when the box spans every other dimension whole, else ``[32:64, 0:8]``."""
    if not box:
        return "the value (0-d)"
    if box and all(b == (0, n) for b, n in zip(box[1:], shape[1:])):
        a, b = box[0]
        return f"row {a}" if b - a == 1 else f"rows {a}-{b - 1}"
    return "[" + ", ".join(f"{a}:{b}" for a, b in box) + "]"


def coverage(shape: Sequence[int], chunks: Sequence[Chunk]) -> Coverage:
    """Check that ``chunks`` (``(offsets, sizes)`` per chunk) tile a tensor of ``shape`` exactly once.

    Empty chunks (a size 0 somewhere: an FSDP rank with no rows) hold nothing and are allowed anywhere
    on the tensor's bounds.
    """
    shape = tuple(int(n) for n in shape)
    boxes: list[tuple[int, Box]] = []
    for i, (off, size) in enumerate(chunks):
        if len(off) != len(shape) or len(size) != len(shape) or any(
                o < 0 or s < 0 or o + s > n for o, s, n in zip(off, size, shape)):
            return Coverage(shape, outside=i)
        if all(s > 0 for s in size):
            boxes.append((i, tuple((int(o), int(o) + int(s)) for o, s in zip(off, size))))
    total = prod(shape)
    if total == 0:
        return Coverage(shape)
    full = tuple((0, n) for n in shape)
    if len(boxes) == 1 and boxes[0][1] == full:
        return Coverage(shape)
    if not boxes:
        return Coverage(shape, gap_elements=total, gap=full)
    if not shape:  # a 0-d tensor: one element, held by every (non-empty) chunk
        return Coverage(shape, overlap_elements=1, overlap=(), overlapping=(boxes[0][0], boxes[1][0]))
    cuts = [sorted({0, n} | {x for _, b in boxes for x in b[d]}) for d, n in enumerate(shape)]
    if prod(len(c) - 1 for c in cuts) <= GRID_CELLS_MAX:
        return _grid(shape, boxes, cuts)
    return _sweep(shape, boxes, total)


def _grid(shape: tuple[int, ...], boxes: list[tuple[int, Box]], cuts: list[list[int]]) -> Coverage:
    import numpy as np

    counts = np.zeros(tuple(len(c) - 1 for c in cuts), dtype=np.int32)
    cells = []
    for _, box in boxes:
        cell = tuple(slice(bisect_left(c, a), bisect_left(c, b)) for c, (a, b) in zip(cuts, box))
        counts[cell] += 1
        cells.append(cell)
    widths = [np.diff(np.asarray(c, dtype=np.int64)) for c in cuts]

    def measure(mask) -> tuple[int, Box | None]:
        if not mask.any():
            return 0, None
        n = int(np.einsum(mask.astype(np.int64), list(range(mask.ndim)),
                          *[x for d, w in enumerate(widths) for x in (w, [d])], []))
        box = []
        for d, c in enumerate(cuts):
            hit = np.nonzero(mask.any(axis=tuple(e for e in range(mask.ndim) if e != d)))[0]
            box.append((c[hit[0]], c[hit[-1] + 1]))
        return n, tuple(box)

    gap_n, gap = measure(counts == 0)
    over = counts > 1
    over_n, over_box = measure(over)
    pair = None
    if over_n:
        first = tuple(int(x[0]) for x in np.nonzero(over))
        holders = [i for (i, _), cell in zip(boxes, cells)
                   if all(s.start <= x < s.stop for s, x in zip(cell, first))]
        pair = (holders[0], holders[1])
    return Coverage(shape, gap_elements=gap_n, gap=gap, overlap_elements=over_n, overlap=over_box,
                    overlapping=pair)


def _sweep(shape: tuple[int, ...], boxes: list[tuple[int, Box]], total: int) -> Coverage:
    """Exact without a grid: no two boxes intersect and their volumes add up to the tensor's."""
    order = sorted(boxes, key=lambda ib: ib[1][0][0])
    active: list[tuple[int, Box]] = []
    for i, box in order:
        active = [(j, b) for j, b in active if b[0][1] > box[0][0]]  # still open along dim 0
        for j, other in active:
            inter = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(box, other))
            if all(a < b for a, b in inter):
                return Coverage(shape, overlap_elements=prod(b - a for a, b in inter), overlap=inter,
                                overlapping=(min(i, j), max(i, j)))
        active.append((i, box))
    held = sum(prod(b - a for a, b in box) for _, box in boxes)
    return Coverage(shape, gap_elements=total - held) if held != total else Coverage(shape)


def chunks_of_regions(regions: Iterable[Box]) -> list[Chunk]:
    """``(offsets, sizes)`` of ``[start, stop)`` regions (the form :mod:`ckpt_bridge.formats.shard_layout` computes)."""
    return [(tuple(a for a, _ in r), tuple(b - a for a, b in r)) for r in regions]


__all__ = ["Coverage", "GRID_CELLS_MAX", "chunks_of_regions", "coverage", "describe_box"]
