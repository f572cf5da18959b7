"""A reader plus tensors made in memory (the fresh weights of a to-dcp aux module, or ones copied from another
checkpoint), so the pipeline reads both through one interface and the plan renames them like any source key."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from .base import Reader, TensorInfo


class _Joined(Reader):
    """A reader made of ``primary`` and more tensors: everything that is not a tensor comes from ``primary``."""

    def __init__(self, primary: Reader):
        super().__init__(primary.path)
        self.primary = primary
        self.format, self.reads_rows = primary.format, primary.reads_rows

    def extra_state(self) -> dict[str, Any]:
        return self.primary.extra_state()

    def hf_config_dir(self) -> Path | None:
        return self.primary.hf_config_dir()

    def source_files(self) -> list[Path]:
        return self.primary.source_files()


class WithTensors(_Joined):
    """``base``'s tensors, plus ``extra`` (key -> tensor) under keys ``base`` does not have."""

    def __init__(self, base: Reader, extra: dict[str, torch.Tensor]):
        super().__init__(base)
        clash = sorted(set(extra) & set(base.tensors()))
        if clash:
            raise ValueError(f"in-memory tensors shadow source keys: {clash[:3]}")
        self.base, self.extra = base, extra
        self._base_takes_out = "out" in inspect.signature(base.read).parameters

    def tensors(self) -> dict[str, TensorInfo]:
        return {**self.base.tensors(),
                **{k: TensorInfo(k, tuple(v.shape), v.dtype) for k, v in self.extra.items()}}

    def read(self, key: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        if key not in self.extra:
            if out is None:
                return self.base.read(key, dtype)
            if self._base_takes_out:
                return self.base.read(key, dtype, out=out)
            return out.copy_(self.base.read(key, dtype))
        t = self.extra[key].to(dtype) if dtype is not None else self.extra[key]
        if out is None:
            return t.clone()
        return out.copy_(t)

    def read_rows(self, key: str, out: torch.Tensor, start: int, stop: int) -> bool:
        if key not in self.extra:
            return self.base.read_rows(key, out, start, stop)
        out.copy_(self.extra[key][start:stop])
        return True


class WithNamespace(_Joined):
    """``main``'s tensors plus ``other``'s under ``prefix`` + key: e.g. a LoRA-only checkpoint and the base model
    dir its folds read the base weights from, seen by the pipeline as one source."""

    def __init__(self, main: Reader, prefix: str, other: Reader):
        super().__init__(main)
        self.main, self.prefix, self.other = main, prefix, other
        self.reads_rows = main.reads_rows or other.reads_rows

    def _route(self, key: str) -> tuple[Reader, str]:
        return (self.other, key[len(self.prefix):]) if key.startswith(self.prefix) else (self.main, key)

    def tensors(self) -> dict[str, TensorInfo]:
        return {**self.main.tensors(),
                **{self.prefix + k: TensorInfo(self.prefix + k, i.shape, i.dtype) for k, i in self.other.tensors().items()}}

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        r, k = self._route(key)
        return r.read(k, dtype)

    def read_rows(self, key: str, out: torch.Tensor, start: int, stop: int) -> bool:
        r, k = self._route(key)
        return r.reads_rows and r.read_rows(k, out, start, stop)
