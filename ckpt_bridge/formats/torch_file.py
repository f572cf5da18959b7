"""A single ``torch.save`` file holding a (possibly nested) state dict.

Nested dicts are flattened with dots, the way DCP flattens them, so
``{"model": {...}}`` shows up as ``model.<fqn>``.  DTensor values are refused:
a single rank file cannot be merged on its own (point at the directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import meshes
from . import pages
from .. import safeload
from ..errors import CheckpointFormatError
from .base import Reader, TensorInfo


def _flatten(obj: Any, prefix: str, out: dict[str, Any], other: list[str]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, other)
    else:
        other.append(prefix)


class TorchFileReader(Reader):
    format = "torch-file"

    def __init__(self, path: Path, *, trust_pickle: bool = False):
        super().__init__(path)
        self.evidence.files = [self.path.name]
        if safeload.is_legacy_format(self.path):
            self.evidence.notes.append(f"{self.path.name}: legacy (non-zip) torch.save format: loaded whole into "
                                       f"memory (no mmap), weights-only")
        obj = safeload.load(self.path, mmap=True, trust_pickle=trust_pickle, saved_dtensors=True)
        self._tensors: dict[str, torch.Tensor] = {}
        self.non_tensor: list[str] = []
        _flatten(obj, "", self._tensors, self.non_tensor)
        for k, v in self._tensors.items():
            if meshes.is_dtensor(v):
                raise CheckpointFormatError(
                    f"{self.path}: key {k!r} is a DTensor shard; one rank file cannot be merged alone: "
                    f"point ckpt-bridge at the directory holding every rank's file"
                )

    def tensors(self) -> dict[str, TensorInfo]:
        return {k: TensorInfo(k, tuple(v.shape), v.dtype) for k, v in self._tensors.items()}

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        v = self._tensors[key]
        out = v.to(dtype=dtype or v.dtype, copy=True)
        pages.release(v)
        return out

    def describe(self) -> dict[str, Any]:
        return {"non_tensor_entries": self.non_tensor[:20]}
