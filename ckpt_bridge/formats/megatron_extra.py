"""The training extra state of a verl Megatron save: every (pp, tp) rank's rng, the lr_scheduler, the step.

verl's ``get_rng_state`` saves each rank's ``{random_rng_state, np_rng_state, torch_rng_state,
rng_tracker_states}`` (in a one-element list) as a megatron ShardedObject ``rng_state`` of global shape
``(PP, TP)``: in the DCP each (pp, tp) rank is a bytes entry ``rng_state/shard_{pp}.{tp}_{PP}.{TP}`` (data
parallel replicas are not saved).  The lr_scheduler is a plain dict, which megatron puts in the dist_ckpt's
``common.pt`` (``optimizer/dist_ckpt`` in schema v2, the one ``dist_ckpt`` in v1).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError
from .. import safeload
from .dcp import DCPReader

_RNG = re.compile(r"^rng_state/shard_(\d+)\.(\d+)_(\d+)\.(\d+)$")


def rng_entries(extra_dir: Path, *, trust_pickle: bool = False) -> tuple[DCPReader, dict[tuple[int, int], str]]:
    """(the extra dist_ckpt's reader, ``{(pp, tp): its rng_state entry}``), from the metadata alone; a missing
    (pp, tp) rank or entries of two grids is an error naming it.  The one check of the rng entries: ``to-hf``
    (:func:`rng_states`) and ``inspect`` (:func:`extra_state_problem`) both go through it."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    reader = DCPReader(extra_dir, trust_pickle=trust_pickle)
    if reader.problems():
        raise CheckpointFormatError(reader.problems()[0])
    found: dict[tuple[int, int], str] = {}
    grid = set()
    for k, md in reader.metadata.state_dict_metadata.items():
        m = _RNG.match(k)
        if m and isinstance(md, BytesStorageMetadata):
            p, t, pp, tp = map(int, m.groups())
            found[(p, t)] = k
            grid.add((pp, tp))
    if not found:
        return reader, {}
    if len(grid) != 1:
        raise CheckpointFormatError(f"{extra_dir}: rng_state entries of several (PP, TP) grids {sorted(grid)}; "
                                    f"the folder mixes two saves")
    pp, tp = grid.pop()
    missing = [(p, t) for p in range(pp) for t in range(tp) if (p, t) not in found]
    if missing:
        p, t = missing[0]
        raise CheckpointFormatError(f"{extra_dir}: no rng_state for pp rank {p}, tp rank {t} (of PP={pp}, TP={tp}); "
                                    f"the save is incomplete: copy the whole folder again")
    return reader, found


def rng_states(extra_dir: Path, *, trust_pickle: bool = False) -> dict[str, Any]:
    """``{"pp{p}_tp{t}": rng state}`` for every (pp, tp) rank; a missing rank is an error naming it."""
    reader, found = rng_entries(extra_dir, trust_pickle=trust_pickle)
    out = {}
    for (p, t), k in sorted(found.items()):
        v = reader._bytes_entry(k)
        while isinstance(v, list) and len(v) == 1:  # ShardedObject data: [ [state of data-parallel rank 0] ]
            v = v[0]
        out[f"pp{p}_tp{t}"] = v
    return out


def lr_scheduler(dist_dir: Path, *, trust_pickle: bool = False) -> Any:
    """The lr_scheduler state megatron kept in ``common.pt`` of ``dist_dir``, or None."""
    f = Path(dist_dir) / "common.pt"
    if not f.is_file():
        return None
    common = safeload.load(f, mmap=False, allow_numpy=True, trust_pickle=trust_pickle)
    return common.get("lr_scheduler") if isinstance(common, dict) else None


def _rng_dir(layout, *, trust_pickle: bool = False) -> Path | None:
    """The extra dist_ckpt holding the rng, checked from metadata (the manifest lists it -> it is there, with
    an entry for every (pp, tp) rank); None when the save has no rng."""
    listed = layout.manifest is not None and "rng_state" in (layout.manifest.get("contents") or {})
    if listed and layout.extra_dir is not None and not (layout.extra_dir / ".metadata").is_file():
        # the manifest (written last, by rank 0) says the rng was saved: its absence is a lost resume state
        raise CheckpointFormatError(f"{layout.extra_dir}: ckpt_contents.json lists the rng_state here but there is "
                                    f"no dist_ckpt (.metadata); the save is incomplete: copy the whole folder again")
    if layout.extra_dir is None or not (layout.extra_dir / ".metadata").is_file():
        return None
    _, found = rng_entries(layout.extra_dir, trust_pickle=trust_pickle)
    if listed and not found:
        raise CheckpointFormatError(f"{layout.extra_dir}: ckpt_contents.json lists the rng_state here but the "
                                    f"dist_ckpt holds no rng_state entry; the save is incomplete or another "
                                    f"save's: copy the whole folder again")
    return layout.extra_dir if found else None


def extra_state_problem(layout, *, trust_pickle: bool = False) -> str | None:
    """Why ``to-hf`` would refuse this save's extra state (a lost or partial rng), from metadata alone: what
    ``inspect`` reports (the same checks :func:`read_extra_state` runs before reading any state)."""
    try:
        _rng_dir(layout, trust_pickle=trust_pickle)
    except CheckpointFormatError as e:
        return str(e)
    return None


def read_extra_state(layout, *, trust_pickle: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rng_dir = _rng_dir(layout, trust_pickle=trust_pickle)
    if rng_dir is not None:
        out["rng"] = rng_states(rng_dir, trust_pickle=trust_pickle)
        out["world_size"] = (layout.manifest or {}).get("world_size")
    if layout.optimizer_dir is not None and layout.optimizer_dir.is_dir():
        lr = lr_scheduler(layout.optimizer_dir, trust_pickle=trust_pickle)
        if lr is not None:
            out["lr_scheduler"] = lr
    if out:
        step = (layout.manifest or {}).get("global_step")
        if step is None:
            m = re.search(r"global_step_(\d+)", str(layout.root))
            step = int(m.group(1)) if m else None
        out["global_step"] = step
    return out
