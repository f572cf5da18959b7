"""The DCP sink: a ``torch.distributed.checkpoint`` folder written by DCP's own ``FileSystemWriter``.

We hand DCP a state dict of *meta* tensors (shape and dtype only) and a planner whose ``resolve_data`` takes
each item's data from the pipeline's piece stream at the moment DCP writes it (:class:`RowFeed`).  A tensor
larger than a piece is planned as several write items, one per row block, so DCP records it as several chunks
with their offsets (``ChunkStorageMetadata``, as a sharded save does; every DCP loader, the trainer's
``CheckpointManager`` included, reassembles them) and each block is read straight from the source into a
reused buffer: memory is a few pieces, whatever the largest tensor.  The files are what ``dcp.save`` writes
(DCP's metadata, ``planner_data`` nesting and storage layout: nothing re-implemented).  Several processes each
save their share into a part folder of their own; the coordinator merges them into one folder
(:mod:`.dcp_parts`).
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from pathlib import Path
from typing import Iterator

import torch

from ..dtypes import nbytes
from ..errors import writing
from ..formats.base import TensorInfo
from ..pipeline import pieces
from ..pipeline.pieces import Piece, rows_per_piece
from ..pipeline.atomic import flush_tree
from .dcp_parts import merge_parts, part_dir
from .writeback import start_writeback


def row_blocks(info: TensorInfo, piece_bytes: int | None = None) -> list[tuple[int, int]] | None:
    """The row ranges a tensor is stored in, one DCP chunk each (the pipeline's row pieces,
    :func:`~ckpt_bridge.pipeline.pieces.rows_per_piece`); None: one whole item (no larger than a piece, or not
    in rows).  Depends on the shape and dtype only, so the files are the same whatever the source's format."""
    step = rows_per_piece(tuple(info.shape), info.dtype, piece_bytes)
    n = info.shape[0] if len(info.shape) else 0
    if step is None or n <= step:
        return None
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def chunked_planner(blocks: dict[str, list[tuple[int, int]]], fetch):
    """DCP's DefaultSavePlanner, except that a tensor in ``blocks`` (stored key -> row ranges) is planned as one
    write item per row range, and tensor data is ``fetch(key, start, stop)``-ed when the writer asks for it
    (``start, stop``: the item's rows; None, None for a whole item).

    DCP's own rules do the rest: its global plan turns the items into the ``TensorStorageMetadata`` chunks (and
    validates that they tile the tensor), and every loader reads a chunked tensor back through the chunks'
    offsets, as it reads a sharded save.  Built in a function so importing this module does not import
    torch.distributed.checkpoint.
    """
    import dataclasses

    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import WriteItemType

    def split(item):
        """DCP's one item for a whole tensor -> one SHARD item per row block (DCP's global plan allows several
        items for one key only when they are SHARDs)."""
        if item.type != WriteItemType.TENSOR or item.index.fqn not in blocks:
            return [item]
        size = item.tensor_data.size
        out = []
        for a, b in blocks[item.index.fqn]:
            offsets, sizes = torch.Size([a] + [0] * (len(size) - 1)), torch.Size([b - a, *size[1:]])
            out.append(dataclasses.replace(
                item, index=MetadataIndex(item.index.fqn, offsets), type=WriteItemType.SHARD,
                tensor_data=dataclasses.replace(item.tensor_data, chunk=ChunkStorageMetadata(offsets, sizes))))
        return out

    class ChunkedSavePlanner(DefaultSavePlanner):
        def create_local_plan(self):
            plan = super().create_local_plan()
            self.plan = dataclasses.replace(plan, items=[c for item in plan.items for c in split(item)])
            return self.plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.TENSOR:
                return fetch(write_item.index.fqn, None, None)
            if write_item.type == WriteItemType.SHARD:
                a = write_item.tensor_data.chunk.offsets[0]
                return fetch(write_item.index.fqn, a, a + write_item.tensor_data.chunk.sizes[0])
            return super().resolve_data(write_item)

    return ChunkedSavePlanner(dedup_save_to_lowest_rank=False)


class RowFeed:
    """What DCP's writer asks for, in its order, from the pipeline's piece stream (the same order: the plan's).

    A row block the stream made as a piece (read straight from the source into a reused buffer) is handed out
    as it is; a tensor the stream made whole (a fuse or split, a reader without ``read_rows``) is handed out
    block by block from the one whole tensor, kept until its last block is asked for.  Anything else is a bug
    in the planning, refused rather than written wrong.
    """

    def __init__(self, pieces: Iterator[Piece], shapes: dict[str, tuple[int, ...]]):
        self.pieces, self.shapes = pieces, shapes
        self.whole: tuple[str, torch.Tensor] | None = None

    def take(self, key: str, start: int | None, stop: int | None) -> torch.Tensor:
        shape = self.shapes[key]
        if self.whole is not None and self.whole[0] == key:
            t = self.whole[1]
        else:
            self.whole = None
            p = next(self.pieces, None)
            if p is None or p.key != key:
                raise RuntimeError(f"{key}: DCP's writer asked for it, the stream made {p and p.key!r}")
            t = p.tensor
            if tuple(t.shape) != tuple(shape):  # a piece: exactly the rows asked for
                row = t.element_size() * math.prod(shape[1:])
                if start is None or p.offset != start * row or t.shape[0] != stop - start:
                    raise RuntimeError(f"{key}: DCP's writer asked for rows {start}:{stop}, the stream made "
                                       f"{t.shape[0]} rows at byte {p.offset}")
                return t
            if start is not None and stop < shape[0]:
                self.whole = (key, t)
        if start is None or (start, stop) == (0, shape[0]):
            return t.contiguous()
        if stop == shape[0]:
            self.whole = None
        return t[start:stop].contiguous()  # DCP's writer copies a block whose storage is the whole tensor's


_NO_CRC = threading.local()  # .on: this thread is inside our DCP writer's save (see no_zip_crc32)


def _crc32_switch() -> bool:
    """Answer torch's own ``get_crc32_options`` per thread: False in a thread inside :func:`no_zip_crc32`,
    torch's setting everywhere else.  Installed once; False if this torch has no such option."""
    import torch.serialization as ser

    own = getattr(ser, "get_crc32_options", None)
    if own is None:
        return False
    if getattr(own, "ckpt_bridge_per_thread", False):
        return True

    def get_crc32_options() -> bool:
        return False if getattr(_NO_CRC, "on", False) else own()

    get_crc32_options.__doc__ = own.__doc__
    get_crc32_options.ckpt_bridge_per_thread = True  # type: ignore[attr-defined]
    get_crc32_options.__wrapped__ = own  # type: ignore[attr-defined]
    ser.get_crc32_options = get_crc32_options
    return True


@contextlib.contextmanager
def no_zip_crc32():
    """torch.save without the CRC32 of each record, in this thread, for the duration.

    DCP's FileSystemWriter stores every item as a ``torch.save`` zip, and computing the zip's CRC32 of every
    byte was an eighth of to-dcp's CPU at 1.24B.  No torch loader reads it: torch builds its zip reader with
    ``MINIZ_DISABLE_ZIP_READER_CRC32_CHECKS`` (cmake/Dependencies.cmake), so ``torch.load`` (DCP's reader, the
    trainer's ``CheckpointManager``, our own) loads a record whatever its CRC field says, checked under torch
    2.9.1, 2.11, 2.13 and 2.15; ``set_crc32_options``' docstring says as much.  Only a generic unzip of a
    ``.distcp`` byte range would warn.

    Scoped to the thread that runs our writer (DCP's writer with ``thread_count=1`` writes in the calling
    thread): torch's own switch, ``set_crc32_options``, is process-wide, and flipping it also took the CRCs
    off a ``torch.save`` another thread of the same process made meanwhile (a trainer's async checkpoint
    next to an in-process export).  torch's zip writer asks ``torch.serialization.get_crc32_options()`` as
    it opens each archive (torch 2.11-2.15 ``_open_zipfile_writer_file`` / ``_buffer``); that function is
    wrapped once (:func:`_crc32_switch`) to say False only in a thread inside this context, and torch's own
    setting to every other thread and outside it.
    """
    if not _crc32_switch():
        yield
        return
    before = getattr(_NO_CRC, "on", False)
    _NO_CRC.on = True
    try:
        yield
    finally:
        _NO_CRC.on = before


FILE_BYTES = 256 << 20  # items share a .distcp file up to this size


def file_groups(items: list[tuple[tuple, int, bool]], file_bytes: int | None = None) -> dict[tuple, int]:
    """Each stored item's output file, for the whole export (every process computes the same): consecutive
    items in request order share a file up to ``file_bytes``.

    ``items``: (item id, bytes, alone) in request order.  DCP's writer keeps every tensor it wrote to a file
    referenced until the file closes (torch 2.13 filesystem.py ``_write_files_from_queue``: ``tensor_dict``):
    a row piece costs nothing there (its buffer is reused anyway), a tensor the pipeline made whole does, so
    an ``alone`` item (a whole tensor larger than a piece) gets a file of its own, and the rest held per file
    is at most ``file_bytes``.
    """
    file_bytes = file_bytes or FILE_BYTES
    out: dict[tuple, int] = {}
    f, used = -1, file_bytes
    for item, n, alone in items:
        if alone or used + n > file_bytes:
            f, used = f + 1, 0
        out[item] = f
        used = file_bytes if alone else used + n
    return out


class WritebackPlanner:
    """The planner DCP's writer asks for each item's data, which also starts the write-back of a file once the
    writer has moved on to the next one (torch 2.13 ``_write_files_from_queue`` writes the files one after the
    other, each closed before the next one's first item is resolved): the final flush then waits only for the
    last file (:mod:`.writeback`).  Everything else is the wrapped planner's."""

    def __init__(self, planner, path_of: dict):
        self.planner, self.path_of, self.current = planner, path_of, None

    def resolve_data(self, write_item):
        path = self.path_of.get(write_item.index)
        if path != self.current:
            if self.current is not None:
                start_writeback(self.current)
            self.current = path
        return self.planner.resolve_data(write_item)

    def __getattr__(self, name):
        return getattr(self.planner, name)


def grouped_writer(path: Path, file_of: dict[tuple, int]):
    """DCP's FileSystemWriter, except that consecutive items of one planned file (``file_of``: (stored key,
    offsets) -> file) are written into one ``.distcp`` file, in plan order.  torch 2.13's ``write_data`` offers
    one file per item or one file per thread (items sorted by size); the files themselves are still written
    by its own ``_write_data`` (one thread, items resolved one at a time).  That method is private: a torch
    without it in the form 2.11-2.15 have (``planner, file_queue``) gets DCP's own ``write_data`` (a part file
    per item), which :func:`.dcp_parts.merge_parts` puts together into the planned files: the same output."""
    import inspect
    import queue

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX

    own = getattr(dcp.FileSystemWriter, "_write_data", None)
    groups = own is not None and list(inspect.signature(own).parameters)[1:] == ["planner", "file_queue"]

    class GroupedFileSystemWriter(dcp.FileSystemWriter):
        def write_data(self, plan, planner):
            if not groups:
                return super().write_data(plan, planner)
            files: queue.Queue = queue.Queue()
            group: list = []
            path_of = {}
            for item in [*plan.items, None]:
                if group and (item is None or key(item) != key(group[0])):
                    name = f"{plan.storage_data.prefix}{files.qsize()}{DEFAULT_SUFFIX}"
                    files.put((self.fs.concat_path(self.path, name), name, group))
                    path_of.update((i.index, self.fs.concat_path(self.path, name)) for i in group)
                    group = []
                if item is not None:
                    group.append(item)
            return self._write_data(WritebackPlanner(planner, path_of), files)

    def key(item) -> int:
        return file_of.get((item.index.fqn, tuple(item.index.offset or ())), -1)

    # sync_files=False: no fsync per file; AtomicDir flushes the whole output once before the rename
    # (per-file fsync stalled the stream on the disk 147 times: 20 s -> 11 s, 1.24B).
    return GroupedFileSystemWriter(str(path), single_file_per_rank=False, thread_count=1, sync_files=False)


class DCPSink:
    """The trainer's DCP keys, as DCP stores them (``targets``: flattened key -> shape and dtype as written, in
    state-dict order).  ``nested`` is the state dict's shape: ``{"model": {fqn: tensor}}`` (``fqn_of`` maps a
    flattened key to its fqn under ``model``) or flat ``{key: tensor}``."""

    shared = True

    def __init__(self, targets: dict[str, TensorInfo], *, nested: bool, fqn_of: dict[str, str], out_dt):
        self.targets, self.nested, self.fqn_of, self.out_dt = targets, nested, fqn_of, out_dt
        self.out_dir = Path()
        # the flattened key DCP stores and hands back to resolve_data ("model.<fqn>" when nested)
        self.stored = {k: (f"model.{fqn_of[k]}" if nested else k) for k in targets}
        # each tensor larger than a piece is written as row chunks, fed from row pieces (memory: a few pieces)
        self.blocks = {self.stored[k]: b for k, i in targets.items() if (b := row_blocks(i)) is not None}
        items = []
        for k, i in targets.items():
            rest, row = (0,) * max(0, len(i.shape) - 1), nbytes(i.shape[1:], i.dtype) if len(i.shape) else 0
            blocks = self.blocks.get(self.stored[k])
            if blocks is None:
                size = nbytes(i.shape, i.dtype)
                items.append(((self.stored[k], (0, *rest) if len(i.shape) else ()), size,
                              size > pieces.PIECE_BYTES))
            else:
                items += [((self.stored[k], (a, *rest)), (b - a) * row, False) for a, b in blocks]
        self.files = file_groups(items)

    def claims(self, transform) -> bool:
        return bool(transform.outputs) and transform.outputs[0].key in self.targets

    def planned(self) -> list[TensorInfo]:
        return list(self.targets.values())

    def file_of(self, key: str) -> int:
        """The file of the key's first item (a file split over two processes is put back together by
        :func:`~.dcp_parts.merge_parts`; a share is cut at file boundaries when there are enough files)."""
        i = self.targets[key]
        return self.files[(self.stored[key], (0,) * len(i.shape))]

    def create_files(self) -> None:
        pass  # each process creates its own part folder

    def write(self, tmp: Path, rank: int, transforms: list, source) -> None:
        import torch.distributed.checkpoint as dcp

        mine = [o.key for t in transforms for o in t.outputs]
        feed = RowFeed(source.pieces(transforms, ahead=False), {k: tuple(self.targets[k].shape) for k in mine})
        key_of = {self.stored[k]: k for k in mine}
        order = {k: i for i, k in enumerate(self.targets)}
        meta = {(self.fqn_of[k] if self.nested else k): torch.empty(self.targets[k].shape,
                                                                     dtype=self.targets[k].dtype, device="meta")
                for k in sorted(mine, key=order.__getitem__)}
        state = {"model": meta} if self.nested else meta
        total = sum(nbytes(i.shape, i.dtype) for i in self.targets.values())
        # writing(): DCP wraps a full disk, a Ctrl-C or our own read errors in a CheckpointException (a
        # BaseException carrying a traceback as its message); this re-raises the real cause.
        with writing(tmp, total):
            part_dir(tmp, rank).mkdir()
            with warnings.catch_warnings(), no_zip_crc32():
                warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
                dcp.save(state, storage_writer=grouped_writer(part_dir(tmp, rank), self.files),
                         planner=chunked_planner(self.blocks, lambda fqn, a, b: feed.take(key_of[fqn], a, b)),
                         no_dist=True)
            if next(feed.pieces, None) is not None:
                raise RuntimeError("the piece stream made more than DCP's writer asked for")

    def flush_share(self, tmp: Path, rank: int) -> None:
        flush_tree(part_dir(tmp, rank))

    def finish(self, tmp: Path, team_size: int) -> list[str]:
        """One folder of every process's part, named as a one-process save names it (:mod:`.dcp_parts`)."""
        with writing(tmp, 0):
            merge_parts(tmp, team_size, [self.stored[k] for k in self.targets],
                        lambda idx: self.files[(idx.fqn, tuple(idx.offset or ()))])
        return sorted(p.name for p in tmp.iterdir() if p.suffix == ".distcp" or p.name == ".metadata")
