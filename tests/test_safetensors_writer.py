"""The streaming safetensors writer against the safetensors library's reader."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ckpt_bridge.writers.safetensors_shards import ShardedSafetensorsWriter, parse_size


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.weight": torch.randn(3, generator=g).to(torch.bfloat16),
        "c.mask": torch.tensor([True, False, True]),
        "d.scalar": torch.tensor(3.5, dtype=torch.float64),
        "e.empty": torch.zeros(0, 4),
        "f.ids": torch.arange(11, dtype=torch.int64),
    }


def _write(tmp_path, tensors, max_size):
    w = ShardedSafetensorsWriter(tmp_path, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], max_size)
    for k, v in tensors.items():
        w.write(k, v)
    return w.close()


def test_single_file_roundtrip_is_exact(tmp_path):
    t = _tensors()
    assert _write(tmp_path, t, 10**9) == ["model.safetensors"]
    back = load_file(tmp_path / "model.safetensors")
    assert back.keys() == t.keys()
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k]), k


def test_sharded_roundtrip_writes_index_with_total_size(tmp_path):
    t = _tensors()
    files = _write(tmp_path, t, 100)  # a.weight alone is 140 bytes: several shards
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in t.values())
    assert set(index["weight_map"]) == set(t)
    for k, v in t.items():
        assert torch.equal(load_file(tmp_path / index["weight_map"][k])[k], v)


def test_out_of_order_and_wrong_shape_are_refused(tmp_path):
    w = ShardedSafetensorsWriter(tmp_path, [("x", (2,), torch.float32), ("y", (2,), torch.float32)], 10**9)
    with pytest.raises(RuntimeError, match="out of plan order"):
        w.write("y", torch.zeros(2))
    with pytest.raises(RuntimeError, match="planned"):
        w.write("x", torch.zeros(3))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("five gigs")
