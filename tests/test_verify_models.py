"""verify --logits / --loss load every model as the class config.json names: a VLM as image-text-to-text on
text tokens, a verl critic as token classification (its values compared, never a random lm_head)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ckpt_bridge.errors import BridgeError
from ckpt_bridge.models.hf import load_pretrained
from ckpt_bridge.testing.tiny_models import build_config, model_class
from ckpt_bridge.testing.tiny_olmo2 import corpus_text
from ckpt_bridge.checks.verify import compare_logits
from ckpt_bridge.checks.verify_dcp import format_dcp_result, verify_dcp


def _trainer_dcp(hf_dir, out):
    """The model-only DCP a trainer saves: the live model's state dict through torch's own DCP writer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model = model_class(build_config_of(hf_dir)).from_pretrained(hf_dir, dtype=torch.float32)
    with pytest.warns(UserWarning):  # "assuming the intent is to load in a single process"
        dcp.save(get_model_state_dict(model), checkpoint_id=str(out), no_dist=True)
    return out


def build_config_of(hf_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(corpus_text()[:300])
    return p


def test_vlm_loss_runs_on_text_tokens(tiny_hf_factory, tmp_path, text_file):
    hf = tiny_hf_factory("qwen2_5_vl")
    res = verify_dcp(_trainer_dcp(hf, tmp_path / "dcp"), hf, loss_text=text_file)
    live = load_pretrained(hf)
    assert type(live).__name__ == "Qwen2_5_VLForConditionalGeneration"
    from transformers import AutoTokenizer

    from ckpt_bridge.checks.loss import text_loss

    assert res.loss_hf == text_loss(live, AutoTokenizer.from_pretrained(hf), text_file.read_text())
    assert res.loss_ok and abs(res.loss_hf - res.loss_dcp) <= 1e-5 and res.loss_tokens > 50
    assert "loss on" in format_dcp_result(res)


def test_critic_loss_compares_values_of_the_value_head(tiny_hf_factory, tmp_path, text_file):
    hf = tiny_hf_factory("qwen2_critic")
    dcp_dir = _trainer_dcp(hf, tmp_path / "dcp")
    res = verify_dcp(dcp_dir, hf, loss_text=text_file)
    assert res.value_diff is not None and res.value_diff <= 1e-5 and res.loss_ok
    assert "values (value head)" in format_dcp_result(res)
    # the same check catches a value head that differs (a random head would, every time)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    other = model_class(build_config("qwen2_critic")).from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():
        other.score.weight.mul_(1.5)
    with pytest.warns(UserWarning):
        dcp.save(get_model_state_dict(other), checkpoint_id=str(tmp_path / "dcp2"), no_dist=True)
    bad = verify_dcp(tmp_path / "dcp2", hf, loss_text=text_file)
    assert bad.value_diff > 1e-3 and bad.loss_ok is False and not bad.ok


def test_logits_load_the_named_class_and_refuse_random_heads(tiny_hf_factory, tmp_path):
    vl = tiny_hf_factory("qwen2_5_vl")
    assert compare_logits(vl, vl) == 0.0
    critic = tiny_hf_factory("qwen2_critic")
    assert compare_logits(critic, critic) == 0.0
    changed = tmp_path / "critic2"
    model = load_pretrained(critic)
    with torch.no_grad():
        model.score.bias.add_(0.25)
    model.save_pretrained(changed)
    assert abs(compare_logits(critic, changed) - 0.25) < 1e-5  # the value head's own output, not a random lm_head
    # a critic whose config says causal LM (what verl writes) has no lm_head: refuse, never compare random heads
    wrong = tmp_path / "critic-as-lm"
    shutil.copytree(critic, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BridgeError, match="Qwen2ForCausalLM.*lm_head.weight.*at random"):
        compare_logits(critic, wrong)
