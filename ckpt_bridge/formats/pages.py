"""Give back the page-cache pages of an mmap-loaded tensor once it is copied.

``torch.load(mmap=True)`` maps each rank file privately; every page we touch
while copying a shard stays resident in *our* RSS until the mapping goes away.
Streaming a 5 GB checkpoint would otherwise end with 5 GB of RSS even though
we only ever need one tensor.  ``madvise(MADV_DONTNEED)`` on a private,
never-written file mapping drops those pages; touching them again simply
re-reads the file, so this is safe for the read-only views we use it on.

Only call :func:`release` on tensors that came from a ``mmap=True`` load: on
anonymous memory MADV_DONTNEED would zero the data.  On non-Linux systems it is
a no-op (correct, just less frugal).
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE
_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        _libc = None


def release(t: torch.Tensor) -> None:
    """Drop the resident pages under an mmap-backed CPU tensor's bytes."""
    if _libc is None or t.device.type != "cpu" or t.numel() == 0:
        return
    if t.is_contiguous():
        start = t.data_ptr()
        stop = start + t.numel() * t.element_size()
    else:  # a strided view: release the span of its storage it can reach
        st = t.untyped_storage()
        start, stop = st.data_ptr(), st.data_ptr() + st.nbytes()
    # Whole pages only, rounded inward: a page shared with a neighbouring
    # tensor stays, so we never drop what another view may still be using.
    lo = -(-start // _PAGE) * _PAGE
    hi = (stop // _PAGE) * _PAGE
    if hi > lo:
        _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)
