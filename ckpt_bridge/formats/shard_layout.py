"""Where a rank's local shard sits inside the global tensor.

This is the arithmetic ``DTensor.full_tensor()`` does with collectives, done
from the saved metadata alone (placements + device mesh + global shape), so a
merge needs no process group and never guesses from tensor values.

Semantics follow ``torch.distributed.tensor.Shard``: along mesh dimension i a
``Shard(d)`` placement splits the *current* region of tensor dim ``d`` into
``mesh.size(i)`` pieces with ``torch.chunk`` sizes (ceil division, the last
piece smaller, trailing pieces possibly empty), taking piece ``coord[i]``; mesh
dims are applied left to right.  ``Replicate`` keeps the region.  ``Partial``
(a pending reduction) and ``_StridedShard`` (FSDP+TP interleaving) are layouts
we refuse rather than approximate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import CheckpointFormatError


@dataclass(frozen=True)
class Placement:
    """A placement reduced to plain data: kind is "shard" or "replicate"."""

    kind: str
    dim: int = -1

    def __str__(self) -> str:
        return f"Shard({self.dim})" if self.kind == "shard" else "Replicate()"


def placements_of(placements: Sequence[Any], where: str) -> tuple[Placement, ...]:
    """Convert torch placement objects to :class:`Placement`, refusing unknowable ones."""
    out = []
    for p in placements:
        name = type(p).__name__
        if name == "Shard":
            out.append(Placement("shard", int(p.dim)))
        elif name == "Replicate":
            out.append(Placement("replicate"))
        elif name == "_StridedShard":
            raise CheckpointFormatError(
                f"{where}: placement {p!r} (strided sharding from FSDP combined with tensor "
                f"parallelism) cannot be merged exactly from the saved metadata; save the "
                f"checkpoint without TP or export it from inside the job"
            )
        elif name == "Partial":
            raise CheckpointFormatError(
                f"{where}: placement {p!r} is a pending reduction (Partial); the full value is "
                f"not on disk, so it cannot be merged"
            )
        else:
            raise CheckpointFormatError(f"{where}: unknown placement {p!r}; cannot tell how it is laid out")
    return tuple(out)


def chunk_bounds(size: int, pieces: int, index: int) -> tuple[int, int]:
    """[start, stop) of piece ``index`` when ``torch.chunk``-style splitting ``size`` into ``pieces``."""
    full = -(-size // pieces) if size else 0
    start = min(full * index, size)
    stop = min(start + full, size)
    return start, stop


def local_region(
    global_shape: Sequence[int],
    mesh_shape: Sequence[int],
    placements: Sequence[Placement],
    coord: Sequence[int],
) -> tuple[tuple[int, int], ...]:
    """Per tensor dim, the [start, stop) that the rank at ``coord`` holds."""
    region = [(0, n) for n in global_shape]
    for mesh_dim, p in enumerate(placements):
        if p.kind != "shard":
            continue
        lo, hi = region[p.dim]
        s, e = chunk_bounds(hi - lo, mesh_shape[mesh_dim], coord[mesh_dim])
        region[p.dim] = (lo + s, lo + e)
    return tuple(region)


def source_coords(mesh_shape: Sequence[int], placements: Sequence[Placement]) -> list[tuple[int, ...]]:
    """The mesh coordinates whose shards together cover the tensor exactly once.

    Along a ``Replicate`` mesh dim every coordinate holds the same data, so we
    read only coordinate 0 there; along a ``Shard`` mesh dim we need them all.

    The other replicas (HSDP's ``Replicate()`` dim) are not compared, unlike a
    plain tensor's copies on every rank (``VerlFSDPReader._check_copies``): a
    plain "copy" that differs means a shard saved without its DTensor metadata,
    a layout we would otherwise misread, so it is checked; here the placements
    state the layout, and the replicas are equal by construction (the same
    all-reduced gradients and optimizer step on every replica group).  Comparing
    them would read every rank file in full, multiplying an HSDP export's reads
    by the replicate degree, to find a diverged training run, not a misread
    layout.
    """
    coords: list[tuple[int, ...]] = [()]
    for size, p in zip(mesh_shape, placements):
        choices = range(size) if p.kind == "shard" else range(1)
        coords = [c + (i,) for c in coords for i in choices]
    return coords
