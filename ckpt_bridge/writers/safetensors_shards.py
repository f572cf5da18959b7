"""Streaming, sharded safetensors writer.

The safetensors header lists every tensor's dtype, shape and byte range, so it
must be written before the data.  We know all of them from the key plan, so we
lay out the shards up front, create each file with its header at its final
size, and then stream tensor bytes straight from the tensor's memory to their
offset in the file: no shard is ever assembled in memory, and several
processes can each write their share of the tensors (see :mod:`ckpt_bridge.pipeline.team`).

Layout follows ``save_pretrained``: one file ``model.safetensors`` when it all
fits in ``max_shard_size``, else ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (``metadata.total_size`` + ``weight_map``).
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
import torch

from ..dtypes import nbytes
from ..errors import BridgeError, writing
from ..formats.base import TensorInfo
from .writeback import start_writeback

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}  # fmt: skip

WRITEBACK_BYTES = 64 << 20  # a file's write-back is started each time this much more of it was written

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str | int) -> int:
    """"5GB" -> 5*10**9, "500MiB" -> 500*2**20 (transformers' convention)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read size {text!r}; use e.g. 5GB, 500MB, 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


class ShardedSafetensorsWriter:
    """Lays the shards out from the specs, then puts each tensor at its planned offset.

    ``create_files()`` writes every file's header and sizes the file (the
    coordinator of a multi-process export does this once); ``write()`` puts
    tensor bytes at their offset with ``pwrite``, so any process may write
    any subset (:meth:`only`) of the tensors and the files come out the same.
    Within one writer, tensors arrive in plan order (checked).
    """

    def __init__(self, out_dir: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int,
                 prefix: str = "model", create: bool = True):
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in specs:
            if dtype not in _DTYPE_NAMES:
                kind = str(dtype).replace("torch.", "")
                raise BridgeError(f"{name}: dtype {kind} cannot be stored in safetensors (it has no {kind}); "
                                  f"convert that tensor in the source (e.g. torch.view_as_real) or export to DCP")
            n = nbytes(shape, dtype)
            if shards[-1] and size + n > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype, n))
            size += n
        self.shards = shards
        self.total_size = sum(n for s in shards for *_, n in s)
        self.weight_map: dict[str, str] = {}
        self._headers: list[bytes] = []
        self._where: dict[str, tuple[int, int, tuple[int, ...], torch.dtype, int]] = {}  # file, offset, shape, dtype, n
        for i, entries in enumerate(shards):
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape, dtype, n in entries:
                header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + n]}
                self.weight_map[name] = self.filename(i)
                self._where[name] = (i, offset, shape, dtype, n)
                offset += n
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
            self._headers.append(struct.pack("<Q", len(raw)) + raw)
        self._order = [name for s in shards for name, *_ in s]
        self._next = 0
        self._fds: dict[int, int] = {}
        self._unqueued: dict[int, tuple[int, int]] = {}  # per file: the byte range written since its write-back
        self._done = 0  # bytes of the current tensor written so far (write_at pieces)
        self._create = create  # False: another process creates the files (create_files) before we write

    def filename(self, i: int) -> str:
        if len(self.shards) == 1:
            return f"{self.prefix}.safetensors"
        return f"{self.prefix}-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def file_of(self, name: str) -> int:
        return self._where[name][0]

    def only(self, names: set[str]) -> None:
        """This process writes just ``names`` (its share of a multi-process export); the layout is unchanged."""
        self._order = [n for n in self._order if n in names]

    def create_files(self) -> None:
        """Every file with its header, at its final size (data still to come)."""
        self._create = False
        with writing(self.out_dir, self.total_size):
            for i, head in enumerate(self._headers):
                data = sum(n for *_, n in self.shards[i])
                with open(self.out_dir / self.filename(i), "xb") as f:
                    f.write(head)
                    f.truncate(len(head) + data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            with writing(self.out_dir, self.total_size):
                self._write(name, tensor)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Close the open files (after a failure; the caller removes the directory).
        An open handle would keep a full file system busy and its space allocated after the rmtree."""
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def write_at(self, name: str, part: torch.Tensor, offset: int) -> None:
        """The bytes of ``part`` at byte ``offset`` of tensor ``name`` (pieces of one tensor, in order)."""
        try:
            with writing(self.out_dir, self.total_size):
                self._write(name, part, offset)
        except BaseException:
            self.abort()
            raise

    def _write(self, name: str, tensor: torch.Tensor, offset: int | None = None) -> None:
        if self._create:
            self.create_files()
        if self._next >= len(self._order) or name != self._order[self._next]:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing more"
            raise RuntimeError(f"tensor {name!r} written out of plan order (expected {expected!r})")
        i, start, shape, dtype, n = self._where[name]
        size = tensor.numel() * tensor.element_size()
        if offset is None:  # the whole tensor
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise RuntimeError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
            offset = 0
        elif tensor.dtype != dtype or offset != self._done or offset + size > n:
            raise RuntimeError(f"{name}: piece of {size} bytes {tensor.dtype} at {offset} does not follow the "
                               f"{self._done} bytes written of {n} planned ({dtype})")
        if size:
            if i not in self._fds:
                self._fds[i] = os.open(self.out_dir / self.filename(i), os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
            # a uint8 view of the tensor's own memory: no copy between tensor and file
            view = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            at = len(self._headers[i]) + start + offset
            done = 0
            while done < size:
                done += os.pwrite(self._fds[i], view[done:], at + done)
            # the disk works during the stream, not in the final flush: the range written since the last
            # request, once it is WRITEBACK_BYTES (many small tensors cost no call each)
            lo, hi = self._unqueued.get(i, (at, at))
            lo, hi = min(lo, at), max(hi, at + size)
            if hi - lo >= WRITEBACK_BYTES:
                start_writeback(self.out_dir / self.filename(i), lo, hi - lo)
                lo = hi
            self._unqueued[i] = (lo, hi)
        self._done = offset + size
        if self._done == n:
            self._next += 1
            self._done = 0

    def close(self, *, index: bool = True, sync: bool = False) -> list[str]:
        """Finish; writes the index when sharded (``index``: this process is the one that writes it);
        ``sync``: fsync the files this writer wrote to.  Returns the files of the whole output."""
        try:
            with writing(self.out_dir, self.total_size):
                if sync:
                    for fd in self._fds.values():
                        os.fsync(fd)
                return self._close(index)
        except BaseException:
            self.abort()
            raise

    def _close(self, index: bool) -> list[str]:
        if self._next != len(self._order):
            raise RuntimeError(f"only {self._next} of {len(self._order)} planned tensors were written")
        if self._create:  # nothing was written (an empty model): still valid files
            self.create_files()
        self.abort()  # nothing buffered: pwrite went straight to the files
        files = [self.filename(i) for i in range(len(self.shards))]
        if len(self.shards) > 1:
            if index:
                doc = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
                (self.out_dir / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(doc, indent=2) + "\n")
            files.append(f"{self.prefix}.safetensors.index.json")
        return files


class SafetensorsSink:
    """Sharded safetensors files (``PREFIX.safetensors``, or ``PREFIX-0000i-of-N`` + index) as a pipeline sink
    (:class:`ckpt_bridge.pipeline.run.Sink`): the coordinator creates every file at its final size with its
    header, then each process ``pwrite``s its share's row pieces at their offsets.  ``shared=False``: the
    coordinator writes all of it (a small file kept apart, such as the aux modules)."""

    def __init__(self, transforms: list, out_dt, max_shard_size: int | None = None, *, prefix: str = "model",
                 shared: bool = True, subdir: str = ""):
        """``max_shard_size`` None: one file, never sharded (PEFT loads one adapter_model.safetensors);
        ``subdir``: the files go into that folder of the output (created by the coordinator)."""
        self.out_dt, self.subdir = out_dt, subdir
        self._planned = [TensorInfo(o.key, tuple(o.shape), out_dt(o) or o.dtype) for t in transforms for o in t.outputs]
        specs = [(i.key, i.shape, i.dtype) for i in self._planned]
        if max_shard_size is None:
            max_shard_size = max(1, sum(nbytes(i.shape, i.dtype) for i in self._planned))
        self.writer = ShardedSafetensorsWriter(Path(), specs, max_shard_size, prefix=prefix, create=False)
        self.shared = shared
        self._ids = {id(t) for t in transforms}

    @property
    def out_dir(self) -> Path:
        return self.writer.out_dir

    @out_dir.setter
    def out_dir(self, path: Path) -> None:
        self.writer.out_dir = Path(path) / self.subdir if self.subdir else Path(path)

    @property
    def total_size(self) -> int:
        return self.writer.total_size

    def claims(self, transform) -> bool:
        return id(transform) in self._ids

    def planned(self) -> list:
        return list(self._planned)

    def file_of(self, key: str) -> int:
        return self.writer.file_of(key)

    def create_files(self) -> None:
        self.writer.out_dir.mkdir(exist_ok=True)
        self.writer.create_files()

    def write(self, tmp: Path, rank: int, transforms: list, source) -> None:
        self.writer.only({o.key for t in transforms for o in t.outputs})
        for p in source.pieces(transforms):  # in planned order: the writer checks it
            self.writer.write_at(p.key, p.tensor, p.offset)
            del p

    def flush_share(self, tmp: Path, rank: int) -> None:
        self.writer.close(index=False, sync=True)

    def finish(self, tmp: Path, team_size: int) -> list[str]:
        return [f"{self.subdir}/{f}" if self.subdir else f for f in self.writer.close()]
