"""Cross-check against verl's own merger on the same checkpoint.

``python -m verl.model_merger merge`` casts every tensor to bf16, so we compare
with ``to-hf --dtype bf16``: the two exports must hold the same keys and
bit-identical tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys

from safetensors.torch import load_file

import ckpt_bridge


def _load_all(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_matches_verl_model_merger_bit_for_bit(verl_ckpt, tmp_path):
    import torch

    actor = verl_ckpt("olmo2", "2")
    theirs = tmp_path / "verl_merged"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
         "--local_dir", str(actor), "--target_dir", str(theirs)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert (theirs / "config.json").exists(), proc.stderr[-3000:]
    ours = tmp_path / "ours"
    ckpt_bridge.to_hf(actor, ours, dtype="bf16", progress=False)
    a, b = _load_all(ours), _load_all(theirs)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16, k
        assert torch.equal(a[k], b[k]), k
    assert ckpt_bridge.verify(ours, theirs).ok
