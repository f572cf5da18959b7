"""A reader seen through a TorchTitan state-dict adapter's ``from_hf``.

TorchTitan's own model definitions (llama3, qwen3, ...) do not use Hugging
Face names, and some weights differ by more than a name (llama3 reverse-
permutes q/k for its RoPE).  The model's ``StateDictAdapter.from_hf`` knows
both; we call it one HF key at a time, first on a meta tensor (to learn the
native key(s) and shape without reading data), then on the real tensor when it
is read, so the stream still holds one tensor.  An adapter that needs several
HF keys at once to produce one native key (fused experts) cannot be streamed
this way and is refused by name.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import KeyPlanError
from .base import Reader, TensorInfo


class AdapterView(Reader):
    format = "hf-via-adapter"

    def __init__(self, inner: Reader, adapter: Any):
        super().__init__(inner.path)
        self.inner, self.adapter = inner, adapter
        self.evidence = inner.evidence
        self._info: dict[str, TensorInfo] | None = None
        self._origin: dict[str, str] = {}  # native key -> HF key
        self.dropped: list[tuple[str, str]] = []

    def _from_hf(self, key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        try:
            return dict(self.adapter.from_hf({key: value}))
        except Exception as e:  # noqa: BLE001 - the adapter's own failure, named
            raise KeyPlanError(f"{type(self.adapter).__name__}.from_hf cannot map {key!r} on its own "
                               f"({type(e).__name__}: {e}); this adapter cannot be streamed key by key") from None

    def tensors(self) -> dict[str, TensorInfo]:
        if self._info is not None:
            return self._info
        info: dict[str, TensorInfo] = {}
        for k, i in self.inner.tensors().items():
            native = self._from_hf(k, torch.empty(i.shape, dtype=i.dtype, device="meta"))
            if not native:
                self.dropped.append((k, f"{type(self.adapter).__name__}.from_hf maps it to nothing"))
            for nk, v in native.items():
                if nk in self._origin:
                    raise KeyPlanError(f"{type(self.adapter).__name__}.from_hf maps both {self._origin[nk]!r} and "
                                       f"{k!r} to {nk!r}")
                self._origin[nk] = k
                info[nk] = TensorInfo(nk, tuple(v.shape), v.dtype)
        self._info = info
        return info

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        self.tensors()
        src = self._origin[key]
        t = self._from_hf(src, self.inner.read(src))[key]
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def hf_config_dir(self):
        return self.inner.hf_config_dir()

    def close(self) -> None:
        self.inner.close()
