"""Equality of checkpoint values: one definition, used by every check.

``torch.equal`` is numeric equality: NaN != NaN (a bit-identical tensor with a
NaN "differs" from itself) and -0.0 == 0.0 (a sign flip passes as "exact").
Neither is what "the export is exact" or "every rank saved the same value"
means, so exact comparisons here compare the bits.  Tolerance comparisons
(``--atol``, ``--cast-to``) compare finite values numerically and NaN/Inf by
position: a NaN where the other side has a NaN, or the same infinity, is
equal; a NaN or Inf where the other side has something else is a difference
that is counted and reported, never hidden in a ``max abs diff nan``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import torch

_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes, reinterpreted as integers of the same width (complex as twice the floats)."""
    t = t.detach().cpu().contiguous()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view(_SAME_WIDTH_INT[t.element_size()])


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, same shape, same bits (NaN equals the same NaN; -0.0 differs from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(_bits(a), _bits(b)))


@dataclass
class Diff:
    """How two same-shape tensors differ under a tolerance comparison."""

    max_abs: float = 0.0  # over positions where both sides are finite
    nonfinite_mismatch: int = 0  # positions where a NaN/Inf on one side is not matched on the other
    example: str = ""  # one such position, e.g. "index 3: nan vs 1.5"

    def within(self, atol: float) -> bool:
        return self.nonfinite_mismatch == 0 and self.max_abs <= atol

    def describe(self) -> str:
        s = f"max abs diff {self.max_abs:.3g}"
        if self.nonfinite_mismatch:
            s += f"; NaN/Inf at {self.nonfinite_mismatch} position(s) not matched on the other side ({self.example})"
        return s


def diff(a: torch.Tensor, b: torch.Tensor) -> Diff:
    """Numeric difference of two same-shape tensors; matching NaN / same-sign Inf positions count as equal."""
    def flat(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().cpu()
        t = torch.view_as_real(t.to(torch.complex128)) if t.is_complex() else t.to(torch.float64)
        return t.reshape(-1)

    x, y = flat(a), flat(b)
    fx, fy = torch.isfinite(x), torch.isfinite(y)
    both = fx & fy
    out = Diff()
    if both.any():
        out.max_abs = float((x[both] - y[both]).abs().max())
    nf = ~(fx & fy)
    same_nonfinite = (torch.isnan(x) & torch.isnan(y)) | (torch.isinf(x) & (x == y))
    bad = nf & ~same_nonfinite
    out.nonfinite_mismatch = int(bad.sum())
    if out.nonfinite_mismatch:
        i = int(bad.nonzero()[0, 0])
        out.example = f"flat index {i}: {float(x[i])} vs {float(y[i])}"
    return out


def _float_bits_equal(a: float, b: float) -> bool:
    return struct.pack("<d", a) == struct.pack("<d", b)


def deep_equal(a: Any, b: Any) -> bool:
    """Structural equality of saved state (lr_scheduler dicts, rng states): tensors and floats by bits,
    numpy arrays by dtype, shape and bytes, containers element by element, other values by ``==``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and bits_equal(a, b)
    if type(a).__module__ == "numpy" or type(b).__module__ == "numpy":
        return _numpy_equal(a, b)
    if isinstance(a, float) and isinstance(b, float):
        return _float_bits_equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable values are not equal
        return False


def _numpy_equal(a: Any, b: Any) -> bool:
    import numpy as np

    if not (isinstance(a, (np.ndarray, np.generic)) and isinstance(b, (np.ndarray, np.generic))):
        return False
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and (a.dtype == object and bool((a == b).all())
                                                          or a.tobytes() == b.tobytes())
