"""The one planner (``plan/planner.py``): any source is brought to the model's in-memory names by transformers'
load-time rules, then a target takes them (the HF target through the save-time rules, the trainer target by
the keys its load requests)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from ckpt_bridge import to_dcp, to_hf
from ckpt_bridge.formats.base import TensorInfo
from ckpt_bridge.formats.dcp import DCPReader
from ckpt_bridge.pipeline.execute import execute
from ckpt_bridge.plan.core import Plan, Transform, compose, rename


def _tiny_tied_llama(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    ref = tmp_path / "ref"
    model.save_pretrained(ref)
    return model, ref


def test_a_base_model_state_dict_exports_like_save_pretrained(tmp_path):
    """``torch.save(model.model.state_dict())``: no ``model.`` prefix.  from_pretrained loads it (transformers'
    base-model-prefix rule, a load-time rule); the HF target gets it through the same rules, so the export is
    what save_pretrained of the full model writes, bit for bit.  (Before the one planner the HF target knew
    only in-memory and on-disk names: "keys LlamaForCausalLM needs are not in the checkpoint".)"""
    model, ref = _tiny_tied_llama(tmp_path)
    src = tmp_path / "backbone.pt"
    torch.save(model.model.state_dict(), src)
    summary = to_hf(src, tmp_path / "out", config=ref, progress=False)
    want, got = load_file(ref / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(want) and summary.tensors == len(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_both_targets_take_the_same_source_through_the_same_load_rules(tmp_path):
    """The same prefix-less source goes to the trainer target too: every requested key, bit for bit."""
    model, ref = _tiny_tied_llama(tmp_path)
    src_dir = tmp_path / "hf_backbone"
    src_dir.mkdir()
    for name in ("config.json", "generation_config.json"):
        (src_dir / name).write_bytes((ref / name).read_bytes())
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, src_dir / "model.safetensors")
    to_dcp(src_dir, tmp_path / "dcp", progress=False)
    to_dcp(ref, tmp_path / "dcp_ref", progress=False)  # save_pretrained's own files, the usual to-dcp source
    got, want = DCPReader(tmp_path / "dcp"), DCPReader(tmp_path / "dcp_ref")
    assert set(got.tensors()) == set(want.tensors()) and len(want.tensors()) > 10
    assert all(torch.equal(got.read(k), want.read(k)) for k in want.tensors())


def test_renames_of_a_computed_step_run_it_once():
    """A split followed by renames of its outputs (Megatron's qkv, a converter's outputs named by the trainer):
    one transform, the split run once, its input read once."""
    calls = []

    def split(t):
        calls.append(1)
        w = t["w"]
        return {"a": w[:2], "b": w[2:]}

    first = Plan(transforms=[Transform("split", ("w",), (TensorInfo("a", (2, 3), torch.float32),
                                                         TensorInfo("b", (2, 3), torch.float32)), split)])
    second = Plan(transforms=[rename("a", "x.a", first.transforms[0].outputs[0]),
                              rename("b", "x.b", first.transforms[0].outputs[1])])
    plan = compose(first, second, where="t")
    assert [t.targets for t in plan.transforms] == [("x.a", "x.b")]
    value = torch.arange(12.0).reshape(4, 3)
    reads = []
    out = {}
    for _, got in execute(plan, lambda k, dtype=None: reads.append(k) or value, ahead=False):
        out.update(got)
    assert reads == ["w"] and len(calls) == 1
    assert torch.equal(out["x.a"], value[:2]) and torch.equal(out["x.b"], value[2:])
