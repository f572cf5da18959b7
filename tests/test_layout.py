"""Shard placement arithmetic against torch's own chunking and DTensor."""

import itertools

import pytest
import torch

from ckpt_bridge.errors import CheckpointFormatError
from ckpt_bridge.formats.shard_layout import Placement, chunk_bounds, local_region, placements_of, source_coords


@pytest.mark.parametrize("size", [0, 1, 2, 5, 7, 10, 173, 251])
@pytest.mark.parametrize("pieces", [1, 2, 3, 4, 10, 11])
def test_chunk_bounds_match_torch_chunk(size, pieces):
    chunks = torch.chunk(torch.arange(size), pieces) if size else ()
    for i in range(pieces):
        start, stop = chunk_bounds(size, pieces, i)
        want = chunks[i].tolist() if i < len(chunks) else []
        assert list(range(start, stop)) == want


def test_hsdp_region_ignores_replicate_dim():
    p = (Placement("replicate"), Placement("shard", 0))
    for ddp, fsdp in itertools.product(range(2), range(2)):
        assert local_region((7, 3), (2, 2), p, (ddp, fsdp)) == (((0, 4), (0, 3)) if fsdp == 0 else ((4, 7), (0, 3)))
    assert source_coords((2, 2), p) == [(0, 0), (0, 1)]


def test_nested_shards_on_one_dim_apply_left_to_right():
    p = (Placement("shard", 0), Placement("shard", 0))
    regions = [local_region((10,), (2, 3), p, c)[0] for c in source_coords((2, 3), p)]
    # mesh dim 0 splits 10 into 5|5, mesh dim 1 splits each 5 into 2|2|1
    assert regions == [(0, 2), (2, 4), (4, 5), (5, 7), (7, 9), (9, 10)]


def test_shard_dim1_region():
    p = (Placement("shard", 1),)
    assert [local_region((4, 173), (3,), p, (i,)) for i in range(3)] == [
        ((0, 4), (0, 58)), ((0, 4), (58, 116)), ((0, 4), (116, 173))]


def test_real_dtensor_placements_convert_and_unknowable_ones_refuse():
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    assert placements_of([Replicate(), Shard(1)], "x") == (Placement("replicate"), Placement("shard", 1))
    with pytest.raises(CheckpointFormatError, match="pending reduction"):
        placements_of([Partial()], "f.pt: key 'w'")
    with pytest.raises(CheckpointFormatError, match="strided sharding"):
        placements_of([_StridedShard(0, split_factor=2)], "f.pt: key 'w'")
