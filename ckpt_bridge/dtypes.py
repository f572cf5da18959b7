"""dtype helpers shared by every direction: the ``--dtype`` names, the names configs record, the byte size
of a (shape, dtype), and the rule for which tensors a cast applies to. A leaf module (imports torch only)."""

from __future__ import annotations

from typing import Callable

import torch

from .errors import BridgeError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The name config.json records for a dtype ("dtype" in transformers 5, "torch_dtype" in 4.x).
TORCH_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32",
                     torch.float64: "float64"}  # fmt: skip


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype`` (no tensor needed)."""
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def parse_dtype(dtype: str, choices: str) -> torch.dtype | None:
    """``--dtype`` NAME -> torch dtype; ``keep`` -> None (write as stored). ``choices`` is the error's list."""
    if dtype == "keep":
        return None
    if dtype not in DTYPES:
        raise BridgeError(f"--dtype {dtype!r}: choose one of {choices}")
    return DTYPES[dtype]


def out_dtype(cast: torch.dtype | None) -> Callable:
    """The dtype a target is written in: ``cast`` for floating tensors, else as produced."""
    return lambda info: cast if cast is not None and info.dtype.is_floating_point else info.dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The name a config records for ``dtype``."""
    return TORCH_DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def dominant_float_dtype(infos, out_dt: Callable) -> torch.dtype:
    """The floating dtype most of ``infos``' elements are written in (what an exported config.json records)."""
    by_numel: dict[torch.dtype, int] = {}
    for info in infos:
        d = out_dt(info)
        if d.is_floating_point:
            by_numel[d] = by_numel.get(d, 0) + info.numel
    return max(by_numel, key=by_numel.__getitem__) if by_numel else torch.float32
