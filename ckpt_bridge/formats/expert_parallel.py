"""Expert stacks split across expert-parallel ranks outside DTensor (verl's VeOmni engine).

VeOmni (``veomni/distributed/parallel_plan.py``, ``ParallelPlan.apply``) cuts every stacked expert
parameter (``mlp.experts.gate_proj`` / ``gate_up_proj`` / ``down_proj``: ``[E, ...]``, no ``.weight``)
along dim 0 over the ``ep`` mesh dim and keeps only the local block ``[E/ep, ...]`` as a plain
parameter; FSDP2 then shards that block over the ``ep_fsdp`` dim.  verl's FSDPCheckpointManager saves
the result: a DTensor whose "global" shape is the block and whose mesh holds only the ranks of one EP
group.  Nothing in the file says which experts a rank holds.  What the save does record, and what is
checked here before any expert is placed:

* the config's expert count (``num_experts`` / ``num_local_experts`` / ``n_routed_experts``);
* the block's leading dim on every rank: ``ep = num_experts / block``, ``ep_fsdp = world / ep``;
* every rank's mesh: VeOmni's mesh is ``("ep", "ep_fsdp")`` with ``ep`` outer, so rank ``r`` is in EP
  group ``r // ep_fsdp`` and its block's mesh must hold exactly the ranks of that group.

Any of these missing or disagreeing is a one-line refusal that names expert parallelism; a merge
from the DTensor metadata alone would put every group's experts at index 0.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError
from ..jsonfiles import read_json
from .shard_layout import local_region, source_coords

# a stacked expert parameter: "...experts.<name>" without a per-expert index or a ".weight" suffix
_EXPERT_STACK = re.compile(r"(^|\.)experts\.[A-Za-z_][A-Za-z0-9_]*$")
_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def is_expert_stack(key: str) -> bool:
    return bool(_EXPERT_STACK.search(key)) and not key.endswith((".weight", ".bias"))


def num_experts(config_dir: Path | None) -> int | None:
    """The expert count the model's config records (its text config's, for a VLM), or None."""
    if config_dir is None or not (config_dir / "config.json").is_file():
        return None
    cfg = read_json(config_dir / "config.json")
    for node in (cfg, cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}):
        for f in _COUNT_FIELDS:
            if isinstance(node.get(f), int) and node[f] > 0:
                return node[f]
    return None


def place(key: str, where: str, ranks: list[dict[str, Any]], world: int, experts: int | None,
          ) -> tuple[tuple[int, ...], list[tuple[int, tuple[tuple[int, int], ...]]]]:
    """(full shape, [(rank, region in the full tensor)]) of an expert stack saved under expert parallelism.

    ``ranks[r]``: ``mesh`` (the rank grid of rank r's DTensor mesh), ``placements``, ``shape`` (the
    DTensor's shape = the EP-local block).  Raises a one-line error naming what is missing."""
    block = ranks[0]["shape"]
    held = sorted(ranks[0]["mesh"].flatten().tolist())
    what = (f"{where}: key {key!r} is an expert stack of {block[0]} experts whose device mesh holds ranks "
            f"{held} of world size {world}: expert parallelism (each EP group saved a different block of "
            f"experts, outside the DTensor metadata)")
    if experts is None:
        raise CheckpointFormatError(f"{what}, but the checkpoint's config.json records no num_experts; "
                                    f"cannot tell where each block goes (put the model's config.json in huggingface/)")
    if not block or block[0] == 0 or experts % block[0] or world % (experts // block[0]):
        raise CheckpointFormatError(f"{what}, but num_experts {experts} in config.json is not a multiple of the "
                                    f"block ({block[0]}) that divides the world size {world}; the files and the "
                                    f"config disagree")
    ep = experts // block[0]
    ep_fsdp = world // ep
    full = (experts,) + tuple(block[1:])
    sources: list[tuple[int, tuple[tuple[int, int], ...]]] = []
    for r, info in enumerate(ranks):
        group = r // ep_fsdp
        expect = list(range(group * ep_fsdp, (group + 1) * ep_fsdp))
        got = sorted(info["mesh"].flatten().tolist())
        if info["shape"] != block or got != expect or info["placements"] != ranks[0]["placements"]:
            raise CheckpointFormatError(
                f"{what}, but rank {r} holds a block {info['shape']} on ranks {got} where num_experts {experts} "
                f"gives EP={ep} x ep_fsdp={ep_fsdp} (ep outer): block {block} on ranks {expect}; cannot place "
                f"its experts")
    for group in range(ep):
        first = group * ep_fsdp
        mesh = ranks[first]["mesh"]
        for coord in source_coords(tuple(mesh.shape), ranks[first]["placements"]):
            r = int(mesh[coord])
            region = local_region(block, tuple(mesh.shape), ranks[first]["placements"], coord)
            (a, b), rest = region[0], region[1:]
            sources.append((r, ((a + group * block[0], b + group * block[0]),) + tuple(rest)))
    return full, sources
