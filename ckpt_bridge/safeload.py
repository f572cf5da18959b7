"""Loading torch-save files without executing arbitrary pickles.

Checkpoints come from other machines and other people, so every ``torch.load``
here is ``weights_only=True``.  Two things need help to pass that check:

* DTensors: their classes (DTensor, DeviceMesh, Shard, ...) are registered as
  safe globals when ``torch.distributed.tensor`` is imported, so we import it.
* verl's ``extra_state_*.pt`` holds ``np.random.get_state()``, a numpy array.
  We allowlist exactly the numpy globals that pickle needs (under both the
  numpy 2 ``numpy._core`` and numpy 1 ``numpy.core`` names) and nothing else.

Anything else is refused with an :class:`UnsafePickleError` naming the file and
the global, unless the caller passes ``trust_pickle=True`` (``--trust-pickle``).
"""

from __future__ import annotations

import logging
import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed.tensor  # noqa: F401  registers DTensor classes as safe globals

from .errors import CheckpointFormatError, UnsafePickleError


def _numpy_rng_globals() -> list[Any]:
    """The globals ``np.random.get_state()`` pickles to, under every name numpy used."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return [
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        # numpy >= 1.25 may pickle dtypes through their DType classes
        (type(np.dtype("uint32")), "numpy.dtypes.UInt32DType"),
    ]


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence what unpickling checkpoints from another job prints.

    A DeviceMesh unpickled outside the job that saved it logs a warning per
    tensor about missing process groups (we never use them), and torch warns
    about storage/typed-storage details we do not act on.
    """
    log = logging.getLogger("torch.distributed.device_mesh")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def load(
    path: str | Path,
    *,
    mmap: bool = True,
    allow_numpy: bool = False,
    trust_pickle: bool = False,
) -> Any:
    """``torch.load`` a file safely; ``mmap=True`` reads no tensor data up front.

    Raises :class:`CheckpointFormatError` for unreadable/truncated files and
    :class:`UnsafePickleError` for pickles outside the allowlist.
    """
    path = Path(path)
    try:
        with quiet_loading():
            if trust_pickle:
                return torch.load(path, map_location="cpu", mmap=mmap, weights_only=False)
            if allow_numpy:
                with torch.serialization.safe_globals(_numpy_rng_globals()):
                    return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = _unsafe_global(str(e))
        raise UnsafePickleError(
            f"{path}: refusing to unpickle {culprit or 'a non-tensor object'} with weights_only=True; "
            f"if you trust where this file came from, rerun with --trust-pickle"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointFormatError(
            f"{path}: cannot be read as a torch.save archive ({first}); the file is truncated or "
            f"corrupt: copy it again from the training job's storage"
        ) from None


def _unsafe_global(message: str) -> str | None:
    # torch's message contains "Unsupported global: GLOBAL module.name" (or
    # "Unsupported operand" for other opcodes); pull the name out for our one-liner.
    for line in message.splitlines():
        if "GLOBAL" in line:
            return line.split("GLOBAL", 1)[1].strip().split()[0]
        if "Unsupported operand" in line:
            return line.strip()
    return None


def load_bytes(stream, *, where: str, allow_numpy: bool = True) -> Any:
    """``torch.load`` an in-memory blob (a DCP bytes entry) weights-only; numpy rng state allowed."""
    try:
        with quiet_loading():
            if allow_numpy:
                with torch.serialization.safe_globals(_numpy_rng_globals()):
                    return torch.load(stream, map_location="cpu", weights_only=True)
            return torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = _unsafe_global(str(e))
        raise UnsafePickleError(f"{where}: refusing to unpickle {culprit or 'a non-tensor object'} with "
                                f"weights_only=True") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointFormatError(f"{where}: cannot be read ({type(e).__name__}: {e}); the save is corrupt") from None
