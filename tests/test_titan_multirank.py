"""The trainer flow on 2 CPU ranks (FSDP2, gloo), end to end: set_initial_load (rank 0 converts) ->
meta build + aux heads -> fully_shard -> to_empty -> torchtitan's CheckpointManager.load() -> after_load.
The tiny OLMo-2 is trained on the shipped corpus, so a broken RoPE shows as a loss gap."""

from __future__ import annotations

import json
import math

from ckpt_bridge.testing.harness import run_torchrun

AUX = ["future_predictor", "action_layer:linear:16"]


def test_two_rank_fsdp2_load_equals_hf_and_starts_at_the_hf_loss(trained_olmo2, tmp_path):
    out = tmp_path / "result.json"
    args = ["ckpt_bridge.testing.titan_load", "--hf", str(trained_olmo2), "--cache", str(tmp_path / "cache"),
            "--out", str(out)]
    for a in AUX:
        args += ["--aux", a]
    run_torchrun(args, nproc=2, timeout=300)
    r = json.loads(out.read_text())
    assert r["world"] == 2 and r["loaded"] is True
    assert r["initial_load_path"] == r["dcp"]
    # every HF tensor and every seeded aux tensor, gathered from the shards, is bit-identical
    assert r["different"] == [] and r["not_in_model"] == [] and r["not_in_source"] == []
    assert len(r["equal"]) == r["keys_in_model"] == 25 + 4
    assert r["aux_keys"] == ["action_layer.bias", "action_layer.weight", "future_predictor.bias",
                             "future_predictor.weight"]
    # the model really learned the corpus (a random init is ~ln(259) = 5.56)
    assert r["loss_hf"] < 2.6
    # first-step loss equals the HF model's once after_load has recomputed inv_freq ...
    assert abs(r["loss_after_load"] - r["loss_hf"]) <= 1e-5
    # ... and without it RoPE is silently wrong: same weights, a clearly worse loss (or NaN)
    before = r["loss_before_after_load"]
    assert not math.isfinite(before) or before - r["loss_hf"] > 0.2
    assert {name for name, _ in r["recomputed"]} == {"model.rotary_emb.inv_freq",
                                                      "model.rotary_emb.original_inv_freq"}
    assert "rope_theta" in r["config_checked"] and "rms_norm_eps" in r["config_checked"]
