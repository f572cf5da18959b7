"""One reader per on-disk format, all behind :class:`~ckpt_bridge.formats.base.Reader`."""

from .base import Evidence, Reader, TensorInfo

__all__ = ["Evidence", "Reader", "TensorInfo"]
