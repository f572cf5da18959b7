"""after_load for any model: every non-persistent buffer and derived tensor attribute recomputed by the
model's own constructor (Gemma embed_scale, vision rotary inv_freq, dynamic rope original_inv_freq), and
tied weights tied again after meta build -> to_empty -> torchtitan's own checkpoint load."""

from __future__ import annotations

import pytest
import torch

from ckpt_bridge.errors import BridgeError
from ckpt_bridge.integrations.torchtitan import after_load, set_initial_load
from ckpt_bridge.models.after_load import retie_weights
from ckpt_bridge.testing.tiny_models import build_config, model_class


def _derived_state(model):
    """name -> tensor for every non-persistent buffer and plain tensor attribute."""
    out = {}
    for mod_name, m in model.named_modules():
        for b in m._non_persistent_buffers_set:
            out[f"{mod_name}.{b}"] = getattr(m, b)
        for k, v in vars(m).items():
            if isinstance(v, torch.Tensor):
                out[f"{mod_name}.{k}"] = v
    return out


def _meta_built(hf_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        model = model_class(cfg)._from_config(cfg)
    model.to_empty(device="cpu")
    return model


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text", "qwen2_5_vl", "llama3_rope", "llama_dynamic_rope",
                                  "llama_tied"])
def test_after_load_recomputes_what_from_pretrained_computes(tiny_hf_factory, name):
    hf = tiny_hf_factory(name)
    ref = model_class(build_config(name)).from_pretrained(hf, dtype=torch.float32).eval()
    model = _meta_built(hf)
    model.load_state_dict(ref.state_dict())  # the weights a trainer's load brings; derived state it cannot
    for t in _derived_state(model).values():
        if t.device.type != "meta" and t.is_floating_point():
            t.fill_(float("nan"))  # to_empty's memory is arbitrary: make "wrong" certain
    report = after_load(model, hf)
    want, got = _derived_state(ref), _derived_state(model)
    assert set(got) == set(want) and want
    for k in want:
        assert got[k].device.type == "cpu", k
        assert torch.equal(got[k], want[k]), k
    assert {n for n, _ in report.recomputed} == set(want)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 7]])
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_dynamic_rope_keeps_working_past_its_original_length(tiny_hf_factory):
    """Dynamic NTK rope grows inv_freq past max_position_embeddings and resets it from original_inv_freq."""
    hf = tiny_hf_factory("llama_dynamic_rope")
    ref = model_class(build_config("llama_dynamic_rope")).from_pretrained(hf, dtype=torch.float32).eval()
    model = _meta_built(hf)
    model.load_state_dict(ref.state_dict())
    after_load(model, hf)
    model.eval()
    for n in (200, 10):  # past 128 positions, then back: the reset reads original_inv_freq
        ids = torch.arange(n)[None] % 200 + 4
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits), n


def test_tied_weights_stay_one_tensor_through_titan_load_and_a_step(tiny_hf_factory, tmp_path, gloo1):
    """meta build -> to_empty (unties) -> torchtitan CheckpointManager.load of our DCP -> after_load -> a step."""
    from torchtitan.components.checkpoint import CheckpointManager

    hf = tiny_hf_factory("llama_tied")
    ck = CheckpointManager.Config(enable=True, folder="checkpoint", initial_load_model_only=False)
    set_initial_load(ck, hf, cache_dir=tmp_path / "cache")
    model = _meta_built(hf)
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # what to_empty does
    mgr = CheckpointManager(ck, dataloader=None, model_parts=[model], optimizers=None, lr_schedulers=None,
                            states={}, sd_adapter=None, base_folder=str(tmp_path / "run"))
    assert mgr.load()
    report = after_load(model, hf)
    assert report.retied == [["model.embed_tokens.weight", "lm_head.weight"]]
    assert len(list(model.parameters())) == 28
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 7]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    mgr.close()


def test_retie_refuses_tied_weights_loaded_with_different_values(tiny_hf_factory):
    model = _meta_built(tiny_hf_factory("llama_tied"))
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.fill_(2.0)
    with pytest.raises(BridgeError, match="model.embed_tokens.weight and lm_head.weight are tied .* different"):
        retie_weights(model)
