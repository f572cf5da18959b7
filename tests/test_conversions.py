"""ckpt_bridge.plan.conversions: transformers' own conversion mapping as streamable plan groups."""

from __future__ import annotations

import pytest
import torch

from ckpt_bridge.plan.conversions import Conversions
from ckpt_bridge.errors import KeyPlanError
from ckpt_bridge.testing.tiny_models import build_config, model_class


def _meta(name: str):
    cfg = build_config(name)
    with torch.device("meta"):
        return model_class(cfg)._from_config(cfg)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "qwen2_5_vl"])
def test_save_groups_give_what_revert_weight_conversion_gives(name):
    """Grouped and run one group at a time, the save direction yields exactly save_pretrained's own
    revert_weight_conversion of the whole state dict (names, shapes, values)."""
    from transformers.core_model_loading import revert_weight_conversion

    torch.manual_seed(0)
    cfg = build_config(name)
    model = model_class(cfg)._from_config(cfg)
    sd = model.state_dict()
    want = revert_weight_conversion(model, dict(sd))
    conv = Conversions(model, "save")
    got = {}
    for g in conv.groups(sd):
        got.update(conv.run(g, {k: sd[k] for k in g.inputs}))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert sorted(got) != sorted(sd)  # these families do differ on disk


def test_a_conversion_spanning_layers_is_refused_not_run_in_memory(monkeypatch):
    """A converter that would gather every layer into one tensor cannot stream: a KeyPlanError at
    planning time, never a whole-model fallback.  (Registered through transformers' own mapping cache,
    as a model's conversion would be; keys in an older checkpoint naming.)"""
    from transformers import conversion_mapping as cm
    from transformers.core_model_loading import MergeModulelist, WeightConverter

    cm.get_checkpoint_conversion_mapping("llama")  # fills transformers' mapping cache
    stack = WeightConverter(source_patterns=["layers.*.mlp.old_down.weight"],
                            target_patterns=["mlp_stack.down_proj"], operations=[MergeModulelist(dim=0)])
    monkeypatch.setitem(cm._checkpoint_conversion_mapping_cache, "LlamaForCausalLM", [stack])
    conv = Conversions(_meta("llama"), "load")
    with pytest.raises(KeyPlanError, match="across layers"):
        conv.groups([f"model.layers.{i}.mlp.old_down.weight" for i in range(2)])
