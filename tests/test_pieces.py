"""Issue 12: renamed tensors move in row pieces through reused buffers (ckpt_bridge.pipeline.pieces).  With pieces far
smaller than the tensors (so every tensor is cut, shard boundaries fall inside pieces and rows of one piece
come from two ranks), the files are byte for byte those of whole-tensor reads (reader.read)."""

from __future__ import annotations

import pytest

from ckpt_bridge.pipeline import pieces
from ckpt_bridge.commands.to_hf import to_hf


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix == ".safetensors"}


@pytest.mark.parametrize("case", ["verl-3-ranks-uneven", "verl-shard-dim-1", "dcp", "hf-sharded"])
def test_small_pieces_write_the_same_bytes(case, verl_ckpt, llama_dcp_with_aux, tiny_hf_dir, tmp_path, monkeypatch):
    src = {"verl-3-ranks-uneven": lambda: verl_ckpt("llama", "3"),
           "verl-shard-dim-1": lambda: verl_ckpt("llama", "2", shard_dim=1),
           "dcp": lambda: llama_dcp_with_aux[1], "hf-sharded": lambda: tiny_hf_dir}[case]()
    with monkeypatch.context() as m:
        m.setattr(pieces, "PIECE_BYTES", 1)  # no row fits: every tensor read whole (reader.read)
        to_hf(src, tmp_path / "whole", dtype="bf16", progress=False)
    calls = []
    real = pieces._in_rows

    def spy(t, reader, out_dt, slots, piece_bytes):
        for p in real(t, reader, out_dt, slots, piece_bytes):
            calls.append(p.offset)
            yield p

    monkeypatch.setattr(pieces, "PIECE_BYTES", 1000)  # rows of 64 bf16 values: 7 rows a piece
    monkeypatch.setattr(pieces, "_in_rows", spy)
    to_hf(src, tmp_path / "pieces", dtype="bf16", progress=False)
    assert sum(o > 0 for o in calls) > 50, "the tensors were not cut into pieces"
    assert _files(tmp_path / "whole") == _files(tmp_path / "pieces")
