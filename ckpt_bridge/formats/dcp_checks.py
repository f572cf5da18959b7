"""Structural checks of a DCP ``Metadata`` before anything is read or allocated.

The metadata comes from the checkpoint itself, so every field we later act on
is checked against what the folder holds: entry types, storage paths (plain
file names inside the folder), byte ranges (inside their file: a truncated
``.distcp`` or an offset past its end is caught here, not as a torch traceback
mid-export), chunk boxes (inside their tensor, and together covering it exactly once:
:func:`ckpt_bridge.formats.chunks.coverage`, so rows no chunk holds are an error, not
zeros in the export), and each tensor's stored bytes (at least its size: a
shape in ``.metadata`` cannot make us allocate more than the files could fill).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any
from .chunks import coverage


def _is_size(v: Any) -> bool:
    return isinstance(v, tuple) and all(isinstance(n, int) and n >= 0 for n in v)


def _storage_problems(folder: Path, storage: Any) -> tuple[list[str], dict[Any, int]]:
    """Problems of ``storage_data``, and the stored length of each entry that is fine."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    meta = folder / ".metadata"
    if not isinstance(storage, dict):
        return [f"{meta}: storage_data is a {type(storage).__name__}, not a dict; the save is corrupt"], {}
    problems, lengths, sizes = [], {}, {}
    for index, info in storage.items():
        rel, off, n = (getattr(info, a, None) for a in ("relative_path", "offset", "length"))
        if not isinstance(index, MetadataIndex) or not isinstance(rel, str) or not all(
                isinstance(v, int) and v >= 0 for v in (off, n)):
            problems.append(f"{meta}: storage_data entry {getattr(index, 'fqn', index)!r} is malformed "
                            f"({info!r}); the save is corrupt")
            continue
        p = PurePosixPath(rel)
        if p.is_absolute() or len(p.parts) != 1 or p.name in ("", ".", ".."):
            problems.append(f"{meta}: entry {index.fqn!r} points at {rel!r}, outside the checkpoint folder; refused")
            continue
        if rel not in sizes:
            f = folder / rel
            sizes[rel] = f.stat().st_size if f.is_file() else None
            if sizes[rel] is None:
                problems.append(f"{f}: referenced by .metadata but missing; copy every .distcp file")
        if sizes[rel] is not None and off + n > sizes[rel]:
            problems.append(f"{folder / rel}: .metadata places entry {index.fqn!r} at bytes {off}..{off + n} but the "
                            f"file has {sizes[rel]} bytes: truncated or from another save; copy it again")
        lengths[index] = n
    return problems, lengths


def _tensor_problems(meta: Path, key: str, md: Any, lengths: dict[Any, int]) -> list[str]:
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    dtype = getattr(getattr(md, "properties", None), "dtype", None)
    size, chunks = getattr(md, "size", None), getattr(md, "chunks", None)
    if not isinstance(dtype, torch.dtype) or not _is_size(size) or not isinstance(chunks, list):
        return [f"{meta}: tensor {key!r} has malformed metadata ({md!r}); the save is corrupt"]
    stored = 0
    for c in chunks:
        if not (isinstance(c, ChunkStorageMetadata) and _is_size(c.offsets) and _is_size(c.sizes)
                and len(c.offsets) == len(c.sizes) == len(size)
                and all(o + s <= n for o, s, n in zip(c.offsets, c.sizes, size))):
            return [f"{meta}: tensor {key!r} {tuple(size)} has a chunk outside it ({c!r}); the save is corrupt"]
        n = lengths.get(MetadataIndex(key, c.offsets))
        if n is None:
            return [f"{meta}: tensor {key!r} has a chunk at {tuple(c.offsets)} with no storage entry; "
                    f"the save is corrupt"]
        stored += n

    boxes = [(c.offsets, c.sizes) for c in chunks]
    gap = coverage(size, boxes).problem(boxes)
    if gap is not None:
        return [f"{meta}: tensor {key!r}: {gap}; the save is incomplete or its metadata corrupt: use another "
                f"step or copy the folder again"]
    need = dtype.itemsize
    for n in size:
        need *= n
    if stored < need:  # checked before read() allocates the tensor
        return [f"{meta}: tensor {key!r} claims shape {tuple(size)} {dtype} ({need} bytes) but its stored chunks "
                f"hold {stored} bytes; the metadata is corrupt or hostile"]
    return []


def metadata_problems(folder: Path, md: Any) -> list[str]:
    """Every structural problem of ``md`` (a ``Metadata`` read from ``folder/.metadata``), one line each."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

    meta = folder / ".metadata"
    sdm = md.state_dict_metadata
    if not isinstance(sdm, dict):
        return [f"{meta}: state_dict_metadata is a {type(sdm).__name__}, not a dict; the save is corrupt"]
    pd = md.planner_data
    if pd is not None and not (isinstance(pd, dict) and all(
            isinstance(v, (tuple, list)) and all(isinstance(x, (str, int)) for x in v) for v in pd.values())):
        return [f"{meta}: planner_data is not a map of key paths; the save is corrupt"]
    problems, lengths = _storage_problems(folder, md.storage_data)
    for key, entry in sdm.items():
        if not isinstance(key, str):
            problems.append(f"{meta}: state_dict_metadata key {key!r} is not a string; the save is corrupt")
        elif isinstance(entry, TensorStorageMetadata):
            problems += _tensor_problems(meta, key, entry, lengths)
        elif isinstance(entry, BytesStorageMetadata):
            if MetadataIndex(key) not in lengths:
                problems.append(f"{meta}: entry {key!r} has no storage entry; the save is corrupt")
        else:
            problems.append(f"{meta}: entry {key!r} is a {type(entry).__name__}, not tensor or bytes metadata")
    return problems
