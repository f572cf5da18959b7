"""Streaming, sharded safetensors writer.

The safetensors header lists every tensor's dtype, shape and byte range, so it
must be written before the data.  We know all of them from the key plan, so we
lay out the shards up front, write each file's header when the file is opened,
and then stream tensor bytes straight from the tensor's memory into the file:
no shard is ever assembled in memory.  Tensors must arrive in plan order.

Layout follows ``save_pretrained``: one file ``model.safetensors`` when it all
fits in ``max_shard_size``, else ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (``metadata.total_size`` + ``weight_map``).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import BridgeError, writing

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}  # fmt: skip

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
    def __init__(self, out_dir: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int,
                 prefix: str = "model"):
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in specs:
            if dtype not in _DTYPE_NAMES:
                kind = str(dtype).replace("torch.", "")
                raise BridgeError(f"{name}: dtype {kind} cannot be stored in safetensors (it has no {kind}); "
                                  f"convert that tensor in the source (e.g. torch.view_as_real) or export to DCP")
            n = _nbytes(shape, dtype)
            if shards[-1] and size + n > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype, n))
            size += n
        self.shards = shards
        self.total_size = sum(n for s in shards for *_, n in s)
        self._order = [name for s in shards for name, *_ in s]
        self._next = 0
        self._file_index = -1
        self._fh: BinaryIO | None = None
        self._left_in_file = 0
        self.weight_map: dict[str, str] = {}

    def filename(self, i: int) -> str:
        if len(self.shards) == 1:
            return f"{self.prefix}.safetensors"
        return f"{self.prefix}-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def _open_next(self) -> None:
        self._close_file()
        self._file_index += 1
        entries = self.shards[self._file_index]
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, n in entries:
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            self.weight_map[name] = self.filename(self._file_index)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
        self._fh = open(self.out_dir / self.filename(self._file_index), "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._left_in_file = len(entries)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            with writing(self.out_dir, self.total_size):
                self._write(name, tensor)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Close the open file without flushing more (after a failure; the caller removes the directory).
        An open handle would keep a full file system busy and its space allocated after the rmtree."""
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:  # the buffered tail cannot be written either: the fd is closed regardless
                pass
            self._fh = None

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"tensor {name!r} written out of plan order (expected {expected!r})")
        if self._left_in_file == 0:
            self._open_next()
        _, shape, dtype, n = self.shards[self._file_index][len(self.shards[self._file_index]) - self._left_in_file]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
        t = tensor.contiguous()
        if n:
            # a uint8 view of the tensor's own memory: no copy between tensor and file
            self._fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._left_in_file -= 1
        self._next += 1

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> list[str]:
        """Finish; writes the index when sharded.  Returns the files written."""
        try:
            with writing(self.out_dir, self.total_size):
                return self._close()
        except BaseException:
            self.abort()
            raise

    def _close(self) -> list[str]:
        if self._next != len(self._order):
            raise RuntimeError(f"only {self._next} of {len(self._order)} planned tensors were written")
        if self._file_index < 0:  # an empty model: still write a valid file
            self._open_next()
        self._close_file()
        files = [self.filename(i) for i in range(len(self.shards))]
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.out_dir / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            files.append(f"{self.prefix}.safetensors.index.json")
        return files


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n
