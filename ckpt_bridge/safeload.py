"""Loading torch-save files without executing arbitrary pickles.

Checkpoints come from other machines and other people, so every ``torch.load``
here is ``weights_only=True``.  Two things need help to pass that check:

* DTensors: their classes (DTensor, DeviceMesh, Shard, ...) are registered as
  safe globals when ``torch.distributed.tensor`` is imported, so :func:`load` imports it; a reader that
  needs only a DTensor's fields (the verl merge) asks for ``saved_dtensors=True`` instead: stand-ins by
  name (:mod:`ckpt_bridge.meshes`), no import.
* verl's ``extra_state_*.pt`` holds ``np.random.get_state()``, a numpy array.
  We allowlist exactly the numpy globals that pickle needs (under both the
  numpy 2 ``numpy._core`` and numpy 1 ``numpy.core`` names) and nothing else.

Anything else is refused with an :class:`UnsafePickleError` naming the file and
the global, unless the caller passes ``trust_pickle=True`` (``--trust-pickle``).
"""

from __future__ import annotations

import dataclasses
import importlib
import pickle
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import CheckpointFormatError, UnsafePickleError
from .quiet import quieted
from .meshes import DTENSOR_STAND_INS, STAND_INS, MeshFormError, SavedDTensor, saved_as


def numpy_rng_globals() -> list[Any]:
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


def quiet_loading():
    """Silence what unpickling checkpoints from another job prints.

    A DeviceMesh unpickled outside the job that saved it logs a warning per
    tensor about missing process groups (we never use them), and torch warns
    about storage/typed-storage details we do not act on.
    """
    return quieted("torch.distributed.device_mesh")


def load(
    path: str | Path,
    *,
    mmap: bool = True,
    allow_numpy: bool = False,
    trust_pickle: bool = False,
    map_location: str = "cpu",
    saved_dtensors: bool = False,
) -> Any:
    """``torch.load`` a file safely; ``mmap=True`` reads no tensor data up front (``map_location="meta"``: none at all).

    ``saved_dtensors``: DTensors come back as :class:`~ckpt_bridge.meshes.SavedDTensor` (shape, dtype,
    ``_local_tensor``, ``placements``, ``device_mesh``; no tensor ops), and torch.distributed.tensor is not
    imported; otherwise as the running torch's DTensor (with its mesh and placements as saved).

    Raises :class:`CheckpointFormatError` for unreadable/truncated files and
    :class:`UnsafePickleError` for pickles outside the allowlist.
    """
    path = Path(path)
    stand_ins = {**STAND_INS, **DTENSOR_STAND_INS} if saved_dtensors else STAND_INS
    if not saved_dtensors:
        # registers the DTensor classes as safe globals (imported here: it costs ~0.5 s, which reading an HF
        # or DCP folder does not need); imported by name so ``torch`` stays this module's global
        importlib.import_module("torch.distributed.tensor")

    if mmap and is_legacy_format(path):
        mmap = False  # torch can only mmap zip archives; a legacy file is read whole (see is_legacy_format)
    try:
        with quiet_loading():
            if trust_pickle:
                return torch.load(path, map_location=map_location, mmap=mmap, weights_only=False,
                                  pickle_module=_stand_in_pickle(stand_ins))
            with _mesh_stand_ins(stand_ins, numpy_rng_globals() if allow_numpy else []):
                return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = _unsafe_global(str(e))
        if saved_dtensors and culprit and culprit.startswith("torch.distributed."):
            # a DTensor part our stand-ins do not know (a torch newer than 2.15): the running torch's own
            # classes may read it, as they read every file before the stand-ins
            return load(path, mmap=mmap, allow_numpy=allow_numpy, trust_pickle=trust_pickle,
                        map_location=map_location, saved_dtensors=False)
        raise UnsafePickleError(
            f"{path}: refusing to unpickle {culprit or 'a non-tensor object'} with weights_only=True"
            f"{_foreign_hint(culprit)}; if you trust where this file came from, rerun with --trust-pickle"
        ) from None
    except MeshFormError as e:  # a stand-in refused what the file asked of it (a dunder field, a swapped class)
        raise CheckpointFormatError(f"{path}: {e}; the file is damaged or was not written by torch.save of a "
                                    f"state dict") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointFormatError(
            f"{path}: cannot be read as a torch.save archive ({first}); the file is truncated or "
            f"corrupt: copy it again from the training job's storage"
        ) from None
    except (TypeError, AttributeError, IndexError, KeyError) as e:  # a valid archive whose objects do not rebuild
        raise CheckpointFormatError(
            f"{path}: its pickled objects cannot be rebuilt ({type(e).__name__}: {e}); the file is damaged or "
            f"was not written by torch.save of a state dict"
        ) from None


# ------------------------------------------------------------- DTensor device meshes

# A DTensor's DeviceMesh (and the _MeshLayout / _FlatLayout it holds since torch 2.10 / 2.13) pickles as the
# mesh's fields, whose shape changed between torch releases; running torch's own classes on another release's
# fields fails, and a release without one of the classes cannot unpickle it at all.  So every load unpickles
# them as plain-data stand-ins by name (ckpt_bridge.meshes, which also reads the rank grid from the fields):
# constructing one runs no code beyond storing the fields.

_ALLOWLIST_LOCK = threading.RLock()


@contextmanager
def _mesh_stand_ins(stand_ins: dict[str, type], extra: list[Any]) -> Iterator[None]:
    """torch's weights-only allowlist, for one load, with the classes named in ``stand_ins`` replaced by our
    stand-ins (plus ``extra``).

    The allowlist is keyed by name but stored as a set, so the real classes (registered by importing
    torch.distributed.tensor / device_mesh) are taken out for the duration instead of shadowed.
    """

    with _ALLOWLIST_LOCK:  # the allowlist is process-wide: one load at a time changes it
        saved = torch.serialization.get_safe_globals()
        kept = [g for g in saved if _global_name(g) not in stand_ins]
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals([*kept, *((cls, name) for name, cls in stand_ins.items()), *extra])
        try:
            yield
        finally:
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals(saved)


def _global_name(g: Any) -> str:
    if isinstance(g, tuple):
        return g[1]
    return f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', '')}"


def _stand_in_pickle(stand_ins: dict[str, type]) -> Any:
    """A ``pickle`` module for ``torch.load(weights_only=False)`` whose Unpickler maps the classes named in
    ``stand_ins`` to them."""
    import types

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            return stand_ins.get(f"{module}.{name}") or super().find_class(module, name)

    mod = types.ModuleType("ckpt_bridge_pickle")
    mod.__dict__.update({k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
    mod.Unpickler = Unpickler
    mod.load = lambda f, **kw: Unpickler(f, **kw).load()
    return mod


def _foreign_hint(culprit: str | None) -> str:
    """For a torch class this torch does not have: say the file probably comes from another torch release."""
    if not culprit or not culprit.startswith("torch."):
        return ""
    module, _, name = culprit.rpartition(".")
    try:
        if hasattr(importlib.import_module(module), name):
            return ""
    except ImportError:
        pass
    return (f" (torch {torch.__version__} has no such class: the file was written by another torch release; "
            f"read it with ckpt-bridge installed next to the torch that wrote it)")


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


def load_bytes(stream, *, where: str, allow_numpy: bool = True, trust_pickle: bool = False) -> Any:
    """``torch.load`` an in-memory blob (a DCP bytes entry) weights-only; numpy rng state allowed.

    ``trust_pickle``: any pickle (``--trust-pickle``), for a trainer state holding objects of its own.
    """
    try:
        with quiet_loading():
            if trust_pickle:
                return torch.load(stream, map_location="cpu", weights_only=False)
            if allow_numpy:
                with torch.serialization.safe_globals(numpy_rng_globals()):
                    return torch.load(stream, map_location="cpu", weights_only=True)
            return torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = _unsafe_global(str(e))
        raise UnsafePickleError(f"{where}: refusing to unpickle {culprit or 'a non-tensor object'} with "
                                f"weights_only=True; if you trust where this save came from, rerun with "
                                f"--trust-pickle") from None
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


# megatron-core 0.15 (dist_checkpointing/strategies/torch.py) pickles its dist_ckpt ``.metadata`` as
# ``MCoreMetadata(mcore_data=..., **vars(Metadata))``: a dataclass subclass of DCP's Metadata with one more field,
# ``mcore_data`` (per tensor key, a dict of plain data such as ``nd_reformulated_orig_global_shape``); its save
# plans are ``MCoreSavePlan``, a frozen SavePlan subclass with the same extra field.  0.16 keeps both names as
# empty classes only so those files load.  Both are read as the DCP classes they extend (megatron is never
# imported): built by NEWOBJ + the saved fields, as pickle builds any dataclass, and the extra field kept as an
# attribute.  Their contents are held to the allowlist above like any other field.
_MEGATRON_CLASSES = {("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"): "Metadata",
                     ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"): "SavePlan"}
_MEGATRON_READ_AS: dict[str, type] = {}


def _megatron_class(dcp_name: str) -> type:
    """A subclass of DCP's ``Metadata`` / ``SavePlan`` that becomes that class once its fields are set."""
    if dcp_name not in _MEGATRON_READ_AS:
        from torch.distributed.checkpoint.metadata import Metadata
        from torch.distributed.checkpoint.planner import SavePlan

        base = {"Metadata": Metadata, "SavePlan": SavePlan}[dcp_name]

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            # only a hand-made pickle calls the class with arguments: megatron-core's are dataclasses, which
            # pickle as NEWOBJ + fields
            raise pickle.UnpicklingError(
                f"megatron-core's MCore{dcp_name} called with arguments, which megatron-core never pickles: the "
                f"file was not written by megatron-core's dist_checkpointing")

        def __setstate__(self: Any, state: Any) -> None:
            if not isinstance(state, dict) or not all(isinstance(k, str) and not k.startswith("__") for k in state):
                raise pickle.UnpicklingError(f"megatron-core's MCore{dcp_name} with state of type "
                                             f"{type(state).__name__}, not the dataclass fields it pickles")
            self.__dict__.update(state)
            object.__setattr__(self, "__class__", base)  # the DCP class from here on (a frozen SavePlan too)

        _MEGATRON_READ_AS[dcp_name] = type(f"MCore{dcp_name}", (base,), {"__init__": __init__,
                                                                         "__setstate__": __setstate__})
    return _MEGATRON_READ_AS[dcp_name]


class _DCPMetadataUnpickler(pickle.Unpickler):
    """The allowlist above, and newer torches' extra fields tolerated (``trusted``: every other global too)."""

    def __init__(self, f: Any, *, trusted: bool = False):
        super().__init__(f)
        self.trusted = trusted

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.distributed.checkpoint.metadata" and name == "TensorProperties":
            return _tolerant_tensor_properties()
        if self.trusted or name in _DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if (module, name) in _MEGATRON_CLASSES:
            return _megatron_class(_MEGATRON_CLASSES[(module, name)])
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


# TensorProperties pickles as a tuple (its __getstate__), the one DCP metadata class whose state is positional:
# torch 2.6 - 2.14 write (dtype, layout, requires_grad, memory_format, pin_memory); 2.15 appends `strides`
# (None or the tensor's strides), and the __setstate__ of torch <= 2.14 refuses the 6-tuple ("too many values
# to unpack (expected 5)"), so their own FileSystemReader cannot read a 2.15 folder.  The others pickle as
# dicts, where a newer field is just an extra attribute.  We rebuild TensorProperties from the fields the
# running torch's class has (the 5 common ones, plus strides when it knows them) and ignore the rest: the
# tensor data does not depend on them (DCP stores every chunk contiguous).
_TOLERANT_CLASS: list[type] = []


def _tolerant_tensor_properties() -> type:
    """The TensorProperties subclass that reads every release's state (built once: DCP is imported lazily)."""
    if _TOLERANT_CLASS:
        return _TOLERANT_CLASS[0]
    from torch.distributed.checkpoint.metadata import TensorProperties

    class Tolerant(TensorProperties):
        def __setstate__(self, state: Any) -> None:
            if not isinstance(state, tuple) or len(state) < 5:
                raise pickle.UnpicklingError(f"TensorProperties state {state!r} is not the tuple DCP writes")
            known = {f.name for f in dataclasses.fields(TensorProperties)}
            # the state this torch's own __setstate__ expects: the 5 common fields, strides if it has them
            TensorProperties.__setstate__(self, state[:6] if "strides" in known and len(state) >= 6 else state[:5])
            self.__class__ = TensorProperties  # a real TensorProperties from here on

    _TOLERANT_CLASS.append(Tolerant)
    return Tolerant


def _layout(name: Any) -> torch.layout:
    value = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(value, torch.layout):
        raise pickle.UnpicklingError(f"{name!r} is not a torch layout")
    return value


def load_dcp_metadata(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """Unpickle a DCP ``.metadata`` file allowing only the classes DCP metadata is made of.

    Anything else is refused with :class:`UnsafePickleError` (``trust_pickle=True`` admits any global).
    The result is checked to be a ``Metadata`` so later code can rely on its fields.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    try:
        with open(path, "rb") as f:
            md = _DCPMetadataUnpickler(f, trusted=trust_pickle).load()
    except pickle.UnpicklingError as e:
        culprit = _unsafe_global(str(e))
        if culprit is not None and culprit.startswith("torch.distributed.checkpoint."):
            raise CheckpointFormatError(
                f"{path}: names {culprit}, which the DCP metadata of torch 2.6 - 2.15 does not hold: the folder "
                f"was written by a newer torch than ckpt-bridge knows; run ckpt-bridge where that torch is "
                f"installed (pip install torch==<the trainer's version>)"
            ) from None
        if culprit is not None:
            raise UnsafePickleError(
                f"{path}: refusing to unpickle {culprit}: a DCP .metadata holds only DCP's metadata classes; "
                f"if you trust where this file came from, rerun with --trust-pickle"
            ) from None
        raise CheckpointFormatError(f"{path}: not a DCP metadata pickle ({e}); the save is corrupt or "
                                    f"truncated: copy it again") from None
    except (EOFError, MemoryError, IndexError, KeyError) as e:  # what a cut or garbled pickle stream raises
        raise CheckpointFormatError(f"{path}: not a DCP metadata pickle ({type(e).__name__}: {e}); the save is "
                                    f"corrupt or truncated: copy it again") from None
    except Exception as e:  # noqa: BLE001 - a valid pickle whose DCP classes this torch cannot rebuild
        raise CheckpointFormatError(
            f"{path}: torch {torch.__version__} cannot rebuild this DCP metadata ({type(e).__name__}: {e}); "
            f"the folder was probably written by a newer torch: run ckpt-bridge where that torch is installed"
        ) from None
    if not isinstance(md, Metadata):
        raise CheckpointFormatError(f"{path}: holds a {type(md).__name__}, not DCP Metadata; the save is corrupt")
    return md


# ---------------------------------------------------------------- plain data out


def load_plain(path: str | Path) -> Any:
    """A file of plain data we wrote (``extra_state_merged.pt``), loaded as a user would: ``torch.load`` with
    ``weights_only=True`` and nothing allowed beyond numpy's rng state (:func:`numpy_rng_globals`): none of our
    stand-ins, no DTensor classes, and none of what the process registered (importing megatron.core adds
    PosixPath, Namespace, ... to torch's process-wide allowlist): the allowlist is exactly numpy's for the load."""
    with _ALLOWLIST_LOCK:
        saved = torch.serialization.get_safe_globals()
        torch.serialization.clear_safe_globals()
        try:
            torch.serialization.add_safe_globals(numpy_rng_globals())
            return torch.load(path, map_location="cpu", weights_only=True)
        finally:
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals(saved)


# What a file we write from a checkpoint's state (extra_state_merged.pt) may hold: what torch.load(weights_only=True)
# rebuilds by itself, plus numpy's rng state (numpy_rng_globals).  The state was read from another job's pickle,
# so it is rebuilt from these types alone, never pickled as the objects it holds (D2 of issue 26: a placement
# stand-in re-pickled as a class named by the file ran that class on the next weights_only=False load).
_PLAIN_SCALARS = (type(None), bool, int, float, str, bytes)
_PLAIN_TORCH = (torch.dtype, torch.device, torch.Size, torch.layout, torch.memory_format)
MAX_PLAIN_DEPTH = 200


def plain_data(obj: Any, *, where: str, notes: list[str] | None = None) -> Any:
    """``obj`` rebuilt from plain data alone: dicts, lists, tuples, scalars, plain tensors, numpy uint32 arrays.

    Any other object (a stand-in for a torch class, or under ``--trust-pickle`` a trainer's own class) becomes
    ``{"class": NAME, "fields": {...}}``: a string naming it and its fields as plain data, and a line in ``notes``.
    A stand-in's NAME is its type's (:func:`~ckpt_bridge.meshes.saved_as`), never a field of the file.
    Shared values stay shared; a cycle or nesting deeper than :data:`MAX_PLAIN_DEPTH` is a
    :class:`CheckpointFormatError` naming ``where``.
    """
    import numpy as np

    done: dict[int, Any] = {}
    busy: set[int] = set()
    keep: list[Any] = []  # ids stay unique while their objects are alive

    def named(o: Any) -> str:
        if hasattr(type(o), "_saved_as") and type(o)._saved_as:
            return saved_as(o)
        return f"{type(o).__module__}.{type(o).__qualname__}"

    def conv(o: Any, path: str, depth: int) -> Any:
        if type(o) in _PLAIN_SCALARS or isinstance(o, _PLAIN_TORCH):
            return o
        if depth > MAX_PLAIN_DEPTH:
            raise CheckpointFormatError(f"{where}: {path or 'the state'} nests deeper than {MAX_PLAIN_DEPTH} "
                                        f"levels; not a trainer's state")
        if id(o) in done:
            return done[id(o)]
        if id(o) in busy:
            raise CheckpointFormatError(f"{where}: {path or 'the state'} contains itself; not a trainer's state")
        busy.add(id(o))
        keep.append(o)
        try:
            out = convert(o, path, depth)
        finally:
            busy.discard(id(o))
        done[id(o)] = out
        return out

    def convert(o: Any, path: str, depth: int) -> Any:
        for base in (bool, int, float, str, bytes):  # a subclass (an IntEnum): its plain value
            if isinstance(o, base):
                return base(o)
        if isinstance(o, dict):
            out = {}
            for k, v in o.items():
                key = conv(k, path, depth + 1)
                try:
                    hash(key)
                except TypeError:  # a key object written as its fields: named by its repr instead
                    key = repr(k)[:200]
                out[key] = conv(v, f"{path}.{k}" if path else str(k), depth + 1)
            return out
        if isinstance(o, (list, tuple)):
            items = [conv(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(o)]
            return items if isinstance(o, list) else tuple(items)  # a namedtuple becomes a tuple
        if isinstance(o, SavedDTensor) or (isinstance(o, torch.Tensor) and type(o) is not torch.Tensor
                                           and type(o) is not torch.nn.Parameter):
            fields = {k: conv(v, f"{path}.{k}", depth + 1) for k, v in vars(o).items()} if hasattr(o, "__dict__") else {}
            return note(o, path, fields)
        if isinstance(o, torch.Tensor):
            return o.detach() if type(o) is not torch.Tensor else o
        if isinstance(o, np.ndarray):
            if type(o) is np.ndarray and o.dtype == np.uint32:  # np.random.get_state(): what the allowlist admits
                return o
            return torch.from_numpy(np.array(o)) if o.dtype.kind in "biuf" else conv(o.tolist(), path, depth + 1)
        if isinstance(o, np.generic):
            return conv(o.item(), path, depth + 1)
        if isinstance(getattr(o, "__dict__", None), dict):
            return note(o, path, {str(k): conv(v, f"{path}.{k}", depth + 1) for k, v in vars(o).items()})
        return note(o, path, repr(o)[:200])

    def note(o: Any, path: str, fields: Any) -> dict[str, Any]:
        name = named(o)
        if notes is not None:
            notes.append(f"{where}: {path or 'the state'} held a {name}; written as its fields "
                         f"({{'class': ..., 'fields': ...}}), plain data")
        return {"class": name, "fields": fields}

    return conv(obj, "", 0)
