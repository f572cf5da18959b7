"""ckpt-bridge: exact, streaming checkpoint conversion between Hugging Face
transformers, TorchTitan/flame and verl.

Public API::

    ckpt_bridge.inspect(path)              -> report dict (no tensor data read)
    ckpt_bridge.to_hf(src, out, dtype=...) -> ExportSummary
    ckpt_bridge.to_dcp(hf_dir, out, ...)   -> DCPExportSummary
    ckpt_bridge.verify(a, b, ...)          -> VerifyResult (.ok)
"""

from .errors import (
    BridgeError,
    CheckpointFormatError,
    KeyPlanError,
    OutputError,
    UnsafePickleError,
    VerificationFailed,
)

from .version import __version__  # noqa: F401 - ckpt_bridge.__version__

__all__ = [
    "BridgeError", "CheckpointFormatError", "KeyPlanError", "OutputError", "UnsafePickleError",
    "VerificationFailed", "inspect", "to_hf", "to_dcp", "verify",
]  # fmt: skip


def inspect(path, **kw):
    """Detect and describe the checkpoint at ``path`` (see :func:`ckpt_bridge.checks.inspect.inspect`)."""
    from .checks.inspect import inspect as _inspect

    return _inspect(path, **kw)


def to_hf(src, out, **kw):
    """Export ``src`` to a Hugging Face directory (see :func:`ckpt_bridge.commands.to_hf.to_hf`)."""
    from .commands.to_hf import to_hf as _to_hf

    return _to_hf(src, out, **kw)


def to_dcp(src, out, **kw):
    """Write a Hugging Face model as the DCP a trainer's model-only load accepts (see
    :func:`ckpt_bridge.commands.to_dcp.to_dcp`)."""
    from .commands.to_dcp import to_dcp as _to_dcp

    return _to_dcp(src, out, **kw)


def verify(a, b, **kw):
    """Compare two checkpoints (see :func:`ckpt_bridge.checks.verify.verify`)."""
    from .checks.verify import verify as _verify

    return _verify(a, b, **kw)
