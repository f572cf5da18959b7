"""Loading torch-save files without executing arbitrary pickles.

Checkpoints come from other machines and other people, so every ``torch.load``
here is ``weights_only=True``.  Two things need help to pass that check:

* DTensors: their classes (DTensor, DeviceMesh, Shard, ...) are registered as
  safe globals when ``torch.distributed.tensor`` is imported, so :func:`load` imports it.
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
    import torch.distributed.tensor  # noqa: F401  registers DTensor classes as safe globals (imported here:
    # it costs ~0.4 s, which reading an HF or DCP folder does not need)

    if mmap and is_legacy_format(path):
        mmap = False  # torch can only mmap zip archives; a legacy file is read whole (see is_legacy_format)
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


def is_legacy_format(path: str | Path) -> bool:
    """A pre-1.6 / ``_use_new_zipfile_serialization=False`` torch.save file (a bare pickle stream, not a zip).

    ``torch.load`` still reads these weights-only, but not with ``mmap=True``; they are loaded whole into
    memory instead (inspect says so).  The check is the file's magic: a legacy file starts with a pickle
    protocol opcode (0x80), a zip with ``PK``; anything else is left to the loader's corrupt-file message.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and head[:2] != b"PK"


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


# ---------------------------------------------------------------- DCP .metadata

# DCP writes ``.metadata`` with a plain ``pickle.dump`` of a ``Metadata`` dataclass, and torch's
# FileSystemReader reads it back with a plain ``pickle.load``: a hostile file runs any code it names.
# These are the only globals a DCP metadata pickle of torch 2.6 - 2.15 refers to (metadata.py: the
# dataclasses and the memory-format enum TensorProperties pickles; filesystem.py: the per-entry storage
# info; torch.Size for sizes/offsets; dtypes as torch.<name> globals; layouts through
# torch.serialization._get_layout, which we answer with our own name lookup).  Their construction runs
# no code beyond setting fields (TensorProperties.__setstate__ only maps its enum back).
_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "_MEM_FORMAT_ENCODING", "StorageMeta", "MetadataIndex",
    ),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo", "_StoragePrefix"),
    # megatron-core's save planner caches every rank's SavePlan in Metadata.all_local_plans: frozen
    # dataclasses and an enum of the same kind (fields only)
    "torch.distributed.checkpoint.planner": ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                             "BytesIOWriteData"),
    # StorageMeta.checkpoint_id is the path dcp.save was given (a PurePath's constructor does no I/O)
    "pathlib": ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"),
    "pathlib._local": ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"),  # Python >= 3.13
}  # fmt: skip


class _MegatronPlainData:
    """Stands in for megatron-core's empty marker classes (``MCoreMetadata``, ``MCoreSavePlan``) that older
    ``.metadata`` files pickle: unpickling only fills ``__dict__``; megatron is never imported."""


# megatron.core.dist_checkpointing.strategies.torch: classes with no behaviour, kept there only so old files load
_MEGATRON_PLAIN = {("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
                   ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan")}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if (module, name) in _MEGATRON_PLAIN:
            return _MegatronPlainData
        if module == "torch":
            if name == "Size":
                return torch.Size
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout)):  # torch.float32, torch.strided
                return value
        if module == "torch.serialization" and name == "_get_layout":
            return _layout  # how torch pickles a layout: _get_layout("torch.strided")
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset", "tuple", "list", "dict"):
            return super().find_class("builtins", name)  # plain containers (protocol < 2 pickles)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def _layout(name: Any) -> torch.layout:
    value = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(value, torch.layout):
        raise pickle.UnpicklingError(f"{name!r} is not a torch layout")
    return value


def load_dcp_metadata(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """Unpickle a DCP ``.metadata`` file allowing only the classes DCP metadata is made of.

    Anything else is refused with :class:`UnsafePickleError` (``trust_pickle=True`` uses plain pickle).
    The result is checked to be a ``Metadata`` so later code can rely on its fields.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    try:
        with open(path, "rb") as f:
            md = pickle.load(f) if trust_pickle else _DCPMetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        culprit = _unsafe_global(str(e))
        if culprit is not None:
            raise UnsafePickleError(
                f"{path}: refusing to unpickle {culprit}: a DCP .metadata holds only DCP's metadata classes; "
                f"if you trust where this file came from, rerun with --trust-pickle"
            ) from None
        raise CheckpointFormatError(f"{path}: not a DCP metadata pickle ({e}); the save is corrupt or "
                                    f"truncated: copy it again") from None
    except Exception as e:  # noqa: BLE001 - EOF, bad opcodes, wrong field types: all mean a corrupt file
        raise CheckpointFormatError(f"{path}: not a DCP metadata pickle ({type(e).__name__}: {e}); the save is "
                                    f"corrupt or truncated: copy it again") from None
    if not isinstance(md, Metadata):
        raise CheckpointFormatError(f"{path}: holds a {type(md).__name__}, not DCP Metadata; the save is corrupt")
    return md
