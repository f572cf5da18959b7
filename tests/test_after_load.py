"""after_load and set_initial_load: the RoPE buffer no checkpoint stores, config drift, and the cached
one-time conversion that points a torchtitan config at the bootstrap checkpoint."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ckpt_bridge.errors import BridgeError
from ckpt_bridge.formats.dcp import DCPReader
from ckpt_bridge.integrations.torchtitan import after_load, set_initial_load
from ckpt_bridge.models.after_load import ConfigMismatchError, check_config_parity


def meta_built(hf_dir):
    cfg = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    model.to_empty(device="cpu")
    return model


def test_after_load_recomputes_inv_freq_like_from_pretrained(tiny_hf_factory):
    hf = tiny_hf_factory("olmo2")
    ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    model = meta_built(hf)
    rot = model.model.rotary_emb
    rot.inv_freq.fill_(float("nan"))  # to_empty's memory is arbitrary; make "wrong" certain
    report = after_load(model, hf)
    names = dict(report.recomputed)
    assert set(names) == {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"}
    assert names["model.rotary_emb.inv_freq"] == float("inf")  # NaN before: reported as an infinite change
    assert torch.equal(rot.inv_freq, ref.model.rotary_emb.inv_freq)
    assert torch.equal(rot.original_inv_freq, ref.model.rotary_emb.original_inv_freq)
    assert {"rope_theta", "rms_norm_eps", "vocab_size", "head_dim", "tie_word_embeddings"} <= set(report.checked)


def test_after_load_refuses_config_drift(tiny_hf_factory):
    """Olmo2Config defaults (rope_theta 1e4, eps 1e-5) are not the OLMo-2 release values (5e5, 1e-6)."""
    from transformers import Olmo2Config

    hf = tiny_hf_factory("olmo2")
    good = AutoConfig.from_pretrained(hf)
    by_hand = Olmo2Config(vocab_size=good.vocab_size, hidden_size=good.hidden_size,
                          intermediate_size=good.intermediate_size, num_hidden_layers=good.num_hidden_layers,
                          num_attention_heads=good.num_attention_heads, tie_word_embeddings=False,
                          max_position_embeddings=good.max_position_embeddings)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(by_hand)
    model.to_empty(device="cpu")
    with pytest.raises(ConfigMismatchError) as e:
        after_load(model, hf)
    msg = str(e.value)
    assert "rope_theta 10000.0 (trainer) vs 500000.0" in msg and "rms_norm_eps 1e-05 (trainer) vs 1e-06" in msg
    assert "\n" not in msg
    assert e.value.exit_code == 2
    cfg = AutoConfig.from_pretrained(hf)
    cfg.tie_word_embeddings = True
    with pytest.raises(ConfigMismatchError, match="tie_word_embeddings True"):
        check_config_parity(cfg, good)


def test_after_load_refuses_a_buffer_it_cannot_recompute(tiny_hf_factory):
    hf = tiny_hf_factory("olmo2")
    model = meta_built(hf)
    odd = torch.nn.Module()
    odd.register_buffer("table", torch.zeros(3), persistent=False)
    model.add_module("lookup", odd)
    with pytest.raises(BridgeError, match="lookup .* non-persistent buffer\\(s\\) table and no config"):
        after_load(model, hf)


def test_set_initial_load_converts_once_and_sets_the_config(tiny_hf_factory, tmp_path):
    from torchtitan.components.checkpoint import CheckpointManager

    hf = tiny_hf_factory("olmo2")
    cfg = CheckpointManager.Config(enable=True)
    assert cfg.initial_load_path is None
    path = set_initial_load(cfg, hf, aux=["future_predictor"], cache_dir=tmp_path / "cache")
    assert cfg.initial_load_path == str(path) and os.path.isabs(cfg.initial_load_path)
    assert cfg.initial_load_model_only is True and cfg.initial_load_in_hf is False
    assert "future_predictor.weight" in DCPReader(path).tensors()
    stamp = (path / ".metadata").stat().st_mtime_ns

    class Job:  # a job config with a checkpoint section, as torchtitan's trainer config has
        checkpoint = CheckpointManager.Config(enable=True)

    again = set_initial_load(Job, hf, aux=["future_predictor"], cache_dir=tmp_path / "cache")
    assert again == path and (path / ".metadata").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert Job.checkpoint.initial_load_path == str(path)
    other = set_initial_load(CheckpointManager.Config(enable=True), hf, aux=["future_predictor"], seed=1,
                             cache_dir=tmp_path / "cache")
    assert other != path
    with pytest.raises(BridgeError, match="no checkpoint.initial_load_path"):
        set_initial_load(object(), hf, cache_dir=tmp_path / "cache")
