"""The to-hf stream in pieces: large renamed tensors move as row blocks through a few reused buffers.

A whole-tensor stream gives every tensor a fresh output buffer: its pages
fault in on first touch (a 1 GB fp32 -> bf16 cast into a new buffer took
0.63 s against 0.06 s into a reused one), and the read-ahead keeps two or
three such tensors alive.  For a rename - by far the most common transform,
the tensor unchanged but for its name and maybe its dtype - the output bytes
of rows [a, b) are exactly rows [a, b) of the source, so a reader that can
copy a row range (``read_rows``: verl shards, mapped safetensors, DCP chunks)
fills a small recycled buffer with them, cast on the way, and the writer puts
them at their offset in the file.  Memory is a few pieces instead of a few
tensors, and the buffers stay hot.

Everything else (splits, fuses, folds, readers without ``read_rows``, tensors
whose single row is larger than a piece) goes whole, as :func:`plan.execute`
runs it.  The producer runs one piece ahead in a thread (:func:`run_ahead`):
with the piece being written, the one queued and the one being read, three
buffers are in use, so four are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .buffers import Recycled
from ..formats.base import TensorInfo
from ..plan.core import Transform, check_same
from .execute import execute
from .stream import run_ahead

PIECE_BYTES = 32 << 20
SLOTS = 4


def rows_per_piece(shape: tuple[int, ...], dtype: torch.dtype, piece_bytes: int | None = None) -> int | None:
    """How many rows of a tensor go in one piece; None when it cannot move in rows (no rows, or one row is
    larger than a piece).  The one rule of the row blocks: the DCP sink records the same blocks as its chunks."""
    if len(shape) == 0 or shape[0] == 0:
        return None
    row = math.prod(shape[1:]) * dtype.itemsize
    piece_bytes = piece_bytes or PIECE_BYTES
    return piece_bytes // row if 0 < row <= piece_bytes else None


@dataclass
class Piece:
    key: str  # target key
    tensor: torch.Tensor  # the whole output, or rows of it
    offset: int  # byte offset of ``tensor`` within the whole output tensor
    transform: Transform


def stream_pieces(transforms: list[Transform], reader, out_dt: Callable[[TensorInfo], torch.dtype],
                  piece_bytes: int | None = None, *, ahead: bool = True) -> Iterator[Piece]:
    """Every output of ``transforms`` in order, large renames in row pieces (see the module doc).

    The consumer must be done with a piece before asking for the next one
    (its buffer is reused three pieces later).  ``ahead=False``: no producer thread (a consumer that still
    holds what it was given before, as DCP's writer does, would otherwise have three whole tensors alive).
    """
    rows = reader.read_rows if reader.reads_rows else None
    piece_bytes = piece_bytes or PIECE_BYTES

    def piecewise(t: Transform) -> bool:
        # small tensors too: one piece, in a buffer that is already there
        o = t.outputs[0]
        return rows is not None and t.fn is None and rows_per_piece(o.shape, out_dt(o), piece_bytes) is not None

    def produce() -> Iterator[Piece]:
        slots: Recycled | None = None
        whole: list[Transform] = []
        for t in transforms:
            if not piecewise(t):
                whole.append(t)
                continue
            if whole:
                yield from _whole(whole, reader, out_dt)
                whole = []
            slots = slots or Recycled(SLOTS, piece_bytes)
            yield from _in_rows(t, reader, out_dt, slots, piece_bytes)
        if whole:
            yield from _whole(whole, reader, out_dt)

    return run_ahead(produce) if ahead else produce()


def _whole(transforms: list[Transform], reader, out_dt) -> Iterator[Piece]:
    for t, outs in execute(transforms, reader.read, out_dt, ahead=False):
        for o in t.outputs:
            yield Piece(o.key, outs.pop(o.key), 0, t)


def _in_rows(t: Transform, reader, out_dt, slots: Recycled, piece_bytes: int) -> Iterator[Piece]:
    o = t.outputs[0]
    dt = out_dt(o)
    row_bytes = o.numel // o.shape[0] * dt.itemsize
    step = rows_per_piece(o.shape, dt, piece_bytes)
    # a rename with stored copies (``same_as``: a tied pair) reads the same rows of each, as stored, and
    # compares them before the piece goes out; two scratch pieces for the whole tensor, not two copies
    scratch = Recycled(1 + len(t.same_as)) if t.same_as else None
    for a in range(0, o.shape[0], step):
        b = min(a + step, o.shape[0])
        buf = slots.take((b - a, *o.shape[1:]), dt)
        if not _read(t, reader, buf, a, b, scratch):
            if a != 0:  # a reader answers for a whole key, never half of one
                raise RuntimeError(f"{t.inputs[0]}: read_rows refused rows {a}:{b} after accepting the first")
            yield from _whole([t], reader, out_dt)
            return
        yield Piece(o.key, buf, a * row_bytes, t)


def _read(t: Transform, reader, buf: torch.Tensor, a: int, b: int, scratch: Recycled | None) -> bool:
    """Rows [a, b) of ``t``'s output into ``buf``; with ``same_as`` copies, the same rows of each read as stored
    and compared bit for bit (:func:`~ckpt_bridge.plan.core.check_same`) first.  False: read it whole."""
    if scratch is None:
        return reader.read_rows(t.inputs[0], buf, a, b)
    stored = t.outputs[0].dtype
    shape = tuple(buf.shape)
    kept = buf if buf.dtype == stored else scratch.take(shape, stored)
    rows = {t.inputs[0]: kept}
    if not reader.read_rows(t.inputs[0], kept, a, b):
        return False
    for k in t.same_as:
        rows[k] = scratch.take(shape, stored)
        if not reader.read_rows(k, rows[k], a, b):
            return False
    check_same(t, rows)
    if kept is not buf:
        buf.copy_(kept)  # cast as the reader would have cast it
    return True
