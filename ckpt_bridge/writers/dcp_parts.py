"""One DCP folder written by several processes, byte for byte the same as by one.

Each process saves its share of the tensors with DCP's own writer, in a
single-process save of its own, into ``.part-RANK`` inside the temporary
output dir.  The coordinator then moves every ``.distcp`` file to the name a
one-process save gives it (``__0_<position of its first item>.distcp``;
the sink plans which consecutive items share a file for the whole export,
so the files are the same whoever wrote them; a file two processes each
wrote part of is put back together) and writes one ``.metadata`` for all of them.

That ``.metadata`` is built afresh, the same way whatever the number of
processes: entries in state-dict order, one object per distinct string,
no object shared between entries otherwise.  ``pickle`` output depends on
object identity as well as value, and DCP's own metadata also records the
temporary directory and a random ``save_id``; a canonical form makes two
exports of the same checkpoint identical files, wherever they are written.
``checkpoint_id`` is left empty (DCP's loader does not use it; it named the
temporary directory) and ``save_id`` is a UUID derived from the contents.
"""

from __future__ import annotations

import os
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from .. import safeload

PART_PREFIX = ".part-"


def part_dir(tmp: Path, rank: int) -> Path:
    return tmp / f"{PART_PREFIX}{rank}"


def merge_parts(tmp: Path, ranks: int, order: list[str], file_of: Callable[[Any], Any] | None = None) -> None:
    """Move the parts' files into ``tmp`` under their one-process names; write the one ``.metadata``.

    ``file_of(item index)``: the output file an item belongs to in a one-process save (None: each part file its
    own).  A file two processes each wrote a fragment of (fewer files than processes) is put back together: the
    later ranks' fragments appended, their items' offsets moved by the bytes before them (each item is a
    self-contained ``torch.save`` blob, read back by offset and length).
    """
    parts = [safeload.load_dcp_metadata(part_dir(tmp, r) / ".metadata") for r in range(ranks)]
    position = item_positions(order, [idx for md in parts for idx in md.storage_data])
    fragments: dict[Any, list[tuple[int, str]]] = {}  # output file -> (rank, part file), in rank order
    first: dict[Any, int] = {}  # output file -> position of its first item
    storage: dict[Any, Any] = {}
    for r, md in enumerate(parts):
        for idx, info in md.storage_data.items():
            out = file_of(idx) if file_of is not None else (r, info.relative_path)
            if (r, info.relative_path) not in fragments.setdefault(out, []):
                fragments[out].append((r, info.relative_path))
            first[out] = min(first.get(out, len(position)), position[idx])
        storage.update({idx: (r, info) for idx, info in md.storage_data.items()})
    placed: dict[tuple[int, str], tuple[str, int]] = {}  # (rank, part file) -> (output file, its offset there)
    for out, frags in fragments.items():
        name = f"__0_{first[out]}.distcp"
        (r0, f0), rest = frags[0], frags[1:]
        os.rename(part_dir(tmp, r0) / f0, tmp / name)
        placed[(r0, f0)] = (name, 0)
        if rest:
            with open(tmp / name, "ab") as dst:
                for r, f in rest:
                    placed[(r, f)] = (name, dst.tell())
                    with open(part_dir(tmp, r) / f, "rb") as src:
                        shutil.copyfileobj(src, dst, 16 << 20)
    sdm: dict[str, Any] = {}
    planner: dict[str, Any] = {}
    for md in parts:
        sdm.update(md.state_dict_metadata)
        planner.update(md.planner_data or {})
    meta = canonical_metadata(order, sdm, planner, storage, placed, parts[0].version)
    with open(tmp / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    for r in range(ranks):
        shutil.rmtree(part_dir(tmp, r))


def item_positions(order: list[str], items: list) -> dict[Any, int]:
    """Each stored item's place in a one-process save: by key in state-dict order, a chunked tensor's chunks
    by their offsets."""
    position = {k: i for i, k in enumerate(order)}
    ranked = sorted(items, key=lambda idx: (position[idx.fqn], tuple(idx.offset or ())))
    return {idx: i for i, idx in enumerate(ranked)}


def canonical_metadata(order: list[str], sdm: dict, planner: dict, storage: dict, placed: dict,
                       version: str | None):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, StorageMeta, TensorProperties,
                                                       TensorStorageMetadata)

    strings: dict[str, str] = {}

    def s(x: str) -> str:  # one object per distinct string, so pickle's memo sees the same graph every time
        return strings.setdefault(x, x)

    def size(x) -> torch.Size:
        return torch.Size([int(v) for v in x])

    out_sdm: dict[str, Any] = {}
    out_planner: dict[str, Any] = {}
    out_storage: dict[Any, Any] = {}
    by_fqn: dict[str, list] = {}
    for idx, ri in storage.items():
        by_fqn.setdefault(idx.fqn, []).append((idx, ri))
    for k in order:
        m = sdm[k]
        if isinstance(m, TensorStorageMetadata):
            p = m.properties
            props = TensorProperties(dtype=p.dtype, layout=p.layout, requires_grad=p.requires_grad,
                                     memory_format=p.memory_format, pin_memory=p.pin_memory)
            out_sdm[s(k)] = TensorStorageMetadata(props, size(m.size), [ChunkStorageMetadata(size(c.offsets),
                                                                                              size(c.sizes))
                                                                         for c in m.chunks])
        else:
            out_sdm[s(k)] = BytesStorageMetadata()
        if k in planner:
            out_planner[s(k)] = tuple(s(x) for x in planner[k])
        for idx, (r, info) in sorted(by_fqn.get(k, []), key=lambda e: tuple(e[0].offset or ())):
            key = MetadataIndex(s(k), None if idx.offset is None else size(idx.offset), idx.index)
            desc = list(info.transform_descriptors) if info.transform_descriptors else None
            name, base = placed[(r, info.relative_path)]
            out_storage[key] = _StorageInfo(s(name), base + int(info.offset), int(info.length), desc)
    digest = uuid.uuid5(uuid.NAMESPACE_URL, "ckpt-bridge:" + "\n".join(
        f"{k}:{list(getattr(sdm[k], 'size', []))}" for k in order))
    return Metadata(state_dict_metadata=out_sdm, planner_data=out_planner, storage_data=out_storage,
                    storage_meta=StorageMeta(checkpoint_id=None, save_id=str(digest)), version=version)
