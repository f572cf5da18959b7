"""Reading DCP tensor chunks straight from the mapped ``.distcp`` files.

DCP's FileSystemWriter stores each chunk of a tensor as a ``torch.save``
archive at a byte range its metadata records.  Inside that archive the
tensor's bytes are one stored (uncompressed) record.  Loading the archive
with ``map_location="meta"`` reads only its small pickle and tells where that
record starts (``_checkpoint_offset``), so the chunk can be copied from the
page cache into its place in the result in one pass, cast included.

DCP's own loader, by comparison, reads the range into a buffer, unpickles a
second copy from it and copies that into the destination; for a 1 GB
embedding that is three passes and two extra gigabytes.

Only chunks that are exactly what the writer makes take this path: a plain
tensor of the recorded dtype and chunk shape, contiguous, whose storage is
the tensor, inside the recorded range and the file, with no stream transform
(compression, encryption extensions).  Everything else returns None and the
caller uses DCP's loader.  The ranges were already checked against the files
by :mod:`ckpt_bridge.formats.dcp_checks`; they are checked again here because
a read through a mapping past the end of a file is SIGBUS, not an error.
"""

from __future__ import annotations

import io
import mmap
import os
from pathlib import Path
from typing import Any

import torch

from . import pages
from .. import safeload
from ..dtypes import nbytes
from .base import TensorInfo

Span = tuple[tuple[int, ...], tuple[int, ...], Path, int]  # chunk offsets, chunk sizes, file, data start


class _Slice(io.RawIOBase):
    """A read-only file view of bytes [start, start + length) of an open file (for torch.load)."""

    def __init__(self, fd: int, start: int, length: int):
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.length + offset}[whence]
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        got = os.preadv(self.fd, [memoryview(b)[:n]], self.start + self.pos) if n else 0
        self.pos += got
        return got


class DirectChunks:
    def __init__(self, root: Path, metadata: Any, *, trust_pickle: bool = False):
        self.root, self.metadata, self.trust_pickle = Path(root), metadata, trust_pickle

    def spans(self, key: str, info: TensorInfo) -> list[Span] | None:
        """Where each chunk of ``key``'s bytes is, or None if any chunk is not a plain stored tensor."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        md = self.metadata.state_dict_metadata.get(key)
        chunks = getattr(md, "chunks", None)
        if not chunks or info.dtype.itemsize == 0:
            return None
        out = []
        for c in chunks:
            st = self.metadata.storage_data.get(MetadataIndex(key, c.offsets))
            if st is None or getattr(st, "transform_descriptors", None):
                return None
            span = self._locate(st.relative_path, st.offset, st.length, info.dtype, tuple(c.sizes))
            if span is None:
                return None
            out.append((tuple(c.offsets), tuple(c.sizes), self.root / st.relative_path, span))
        return out

    def _locate(self, name: str, start: int, length: int, dtype: torch.dtype, shape: tuple[int, ...]) -> int | None:
        """Absolute offset of the tensor bytes of the archive at [start, start+length) in ``name``, or None."""
        path = self.root / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            if start < 0 or length <= 0 or start + length > size:
                return None
            with safeload.quiet_loading():
                t = torch.load(io.BufferedReader(_Slice(fd, start, length)), map_location="meta",
                               weights_only=not self.trust_pickle)
        except Exception:  # noqa: BLE001 - not a plain archive: DCP's loader decides what it is
            return None
        finally:
            os.close(fd)
        if type(t) is not torch.Tensor or t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
            return None
        base = getattr(t.untyped_storage(), "_checkpoint_offset", None)
        n = t.numel() * t.element_size()
        if base is None or t.storage_offset() != 0 or t.untyped_storage().nbytes() != n:
            return None
        if base + n > length:
            return None
        return start + base  # may be misaligned for dtype (megatron's writer packs archives): see copy_rows

    def copy_into(self, out: torch.Tensor, spans: list[Span], info: TensorInfo) -> None:
        self.copy_rows(out, spans, info, 0, info.shape[0] if info.shape else 1)

    def copy_rows(self, out: torch.Tensor, spans: list[Span], info: TensorInfo, start: int, stop: int) -> None:
        """Rows [start, stop) of the tensor into ``out`` (all of it for a 0-d tensor)."""
        for offsets, sizes, path, at in spans:
            n = nbytes(sizes, info.dtype)
            lo, hi = (offsets[0], offsets[0] + sizes[0]) if sizes else (0, 1)
            a, b = max(start, lo), min(stop, hi)
            if n == 0 or a >= b:
                continue
            # One mapping per chunk, closed right after: a model has thousands of .distcp files, and each
            # open mapping keeps a file descriptor.
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: torch views it without a warning
            try:
                if at % info.dtype.itemsize:  # a misaligned record: only the wanted rows' bytes, copied aligned
                    row = n // sizes[0] if sizes else n
                    raw = torch.frombuffer(mm, dtype=torch.uint8, count=(b - a) * row, offset=at + (a - lo) * row)
                    src = raw.clone().view(info.dtype).view(((b - a),) + tuple(sizes[1:]) if sizes else ())
                    pages.release(raw)
                    del raw
                else:
                    src = torch.frombuffer(mm, dtype=torch.uint8, count=n, offset=at).view(info.dtype).view(sizes)
                    if sizes:
                        src = src[a - lo:b - lo]
                if sizes:
                    dst = out[(slice(a - start, b - start),) + tuple(slice(o, o + s) for o, s in
                                                                    zip(offsets[1:], sizes[1:]))]
                else:
                    dst = out
                dst.copy_(src)
                pages.release(src)
                del src
            finally:
                mm.close()
