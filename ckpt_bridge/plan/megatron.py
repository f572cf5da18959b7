"""The plan that turns a Megatron (megatron-core GPTModel) state dict into what ``save_pretrained`` writes.

Two plans composed (:func:`ckpt_bridge.plan.core.compose`):

1. Megatron -> the HF model's in-memory names, one transform per layer slice
   (:class:`~ckpt_bridge.formats.megatron.MegatronReader` lists ``decoder.layers.X[i]``; PP stages are
   already at their global layer offsets in a dist_ckpt):

   =======================================================  =============================================
   ``embedding.word_embeddings.weight``                     ``model.embed_tokens.weight``
   ``output_layer.weight`` (absent when tied)               ``lm_head.weight``
   ``output_layer.weight`` ``[n, H]``, n != vocab (critic)  ``score.weight`` + a zero ``score.bias`` (below)
   ``decoder.final_layernorm.weight``                       ``model.norm.weight``
   ``self_attention.linear_qkv.layer_norm_weight``          ``input_layernorm.weight`` (fused into the linear)
   ``self_attention.linear_qkv.weight`` / ``.bias``         split per KV group ``[q heads | k | v]`` -> q/k/v
   ``self_attention.linear_proj.weight``                    ``self_attn.o_proj.weight``
   ``self_attention.{q,k}_layernorm.weight``                ``self_attn.{q,k}_norm.weight`` (Qwen3)
   ``mlp.linear_fc1.layer_norm_weight``                     ``post_attention_layernorm.weight``
   ``mlp.linear_fc1.weight``                                split ``[gate ; up]`` -> gate_proj / up_proj
   ``mlp.linear_fc2.weight``                                ``mlp.down_proj.weight``
   ``mlp.router.weight``                                    ``mlp.gate.weight``
   ``mlp.experts.experts.linear_fc1.weight`` ``[E, 2F, H]`` ``mlp.experts.gate_up_proj`` (axis 0 = global id)
   ``mlp.experts.experts.linear_fc2.weight`` ``[E, H, F]``  ``mlp.experts.down_proj``
   ``mlp.shared_experts.linear_fc1/2.weight``, ``gate_weight``  ``mlp.shared_expert.*``, ``shared_expert_gate``
   ``mlp.shared_experts.*`` (config has ``n_shared_experts``)  ``mlp.shared_experts.*`` (DeepSeek, no gate)
   ``mlp.router.expert_bias``                               ``mlp.gate.e_score_correction_bias``
   MLA (config has ``kv_lora_rank``): ``linear_q_down_proj``  ``q_a_proj``; ``linear_q_up_proj`` -> ``q_b_proj``;
   ``linear_kv_down_proj`` / ``linear_kv_up_proj``          ``kv_a_proj_with_mqa`` / ``kv_b_proj``;
   ``q_layernorm`` / ``kv_layernorm`` (or TE's fused        ``q_a_layernorm`` / ``kv_a_layernorm``
   ``linear_{q,kv}_up_proj.layer_norm_weight``)
   =======================================================  =============================================

   The unfused spellings (``input_layernorm.weight``, ``pre_mlp_layernorm.weight``) map the same way.
   A key not in this table is an error naming it: never a guess.

2. transformers' own save rules for the config's class (:func:`ckpt_bridge.plan.hf_target.plan_hf_export`): fused
   experts split per expert, renamed families (Mixtral's ``block_sparse_moe.experts.E.w1``), tied weights
   written once; it also checks completeness against the class (every expected layer and expert).

A critic (verl's ``value=True`` model) has a value head ``output_layer`` of ``[1, H]`` (verl's
``LinearForLastLayer``, ``bias=False``) instead of the vocabulary projection.  The HF model equal to it is the
family's ``*ForTokenClassification`` with that weight as ``score.weight`` and ``score.bias`` = 0
(transformers' ``score`` is an ``nn.Linear`` with a bias); :func:`ckpt_bridge.plan.hf_target.value_head` then names the
class and ``num_labels`` for the exported config.

The shapes the split rules need (heads, KV groups, head dim) come from the HF config, which is checked
first against the save's ``transformer_config.json``: a mismatch is a one-line error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import KeyPlanError
from ..formats.base import TensorInfo
from ..formats.megatron import MegatronReader, parse_slice
from .core import Plan, Transform, compose, derive, rename
from .hf_target import expected_model, plan_hf_export, value_head

_TOP = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "output_layer.weight": "lm_head.weight",
        "decoder.final_layernorm.weight": "model.norm.weight"}

_LAYER_RENAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.experts.experts.linear_fc1.weight": "mlp.experts.gate_up_proj",
    "mlp.experts.experts.linear_fc2.weight": "mlp.experts.down_proj",
    "mlp.shared_experts.linear_fc2.weight": "mlp.shared_expert.down_proj.weight",
    "mlp.shared_experts.gate_weight": "mlp.shared_expert_gate.weight",
}
_GATE_UP = {"mlp.linear_fc1.weight": "mlp.", "mlp.shared_experts.linear_fc1.weight": "mlp.shared_expert."}
# Megatron-FSDP's fsdp_dtensor save (formats/megatron_fsdp.py) stores a SwiGLU linear_fc1 already split by
# megatron-core's handle_swiglu_in_state_dict: ``weight_w`` the gate half, ``weight_v`` the up half, each gathered
# over TP (the [gate ; up] halves of every TP rank's rows): plain renames
_SWIGLU_HALVES = {"mlp.linear_fc1.weight_w": "mlp.gate_proj.weight", "mlp.linear_fc1.weight_v": "mlp.up_proj.weight",
                  "mlp.shared_experts.linear_fc1.weight_w": "mlp.shared_expert.gate_proj.weight",
                  "mlp.shared_experts.linear_fc1.weight_v": "mlp.shared_expert.up_proj.weight"}
_SWIGLU_HALVES_PLURAL = {"mlp.shared_experts.linear_fc1.weight_w": "mlp.shared_experts.gate_proj.weight",
                         "mlp.shared_experts.linear_fc1.weight_v": "mlp.shared_experts.up_proj.weight"}

# Multi-latent attention (DeepSeek-V2 / V3, Kimi-K2: HF configs with kv_lora_rank), megatron-core's MLASelfAttention
# -> DeepseekV3Attention.  Every projection keeps HF's output layout ([kv_lora_rank | rope] rows of the kv
# down-projection, per head [nope | rope] of q and [nope | v] of kv up), so all are renames (mbridge's
# DeepseekV3Bridge maps them the same way).  The q / kv norms are fused into the up-projections in TE's spec
# (``linear_*_up_proj.layer_norm_weight``), separate modules in the local spec (``q_layernorm`` / ``kv_layernorm``).
_MLA_RENAMES = {
    "self_attention.linear_q_proj.weight": "self_attn.q_proj.weight",  # q_lora_rank None: q not compressed
    "self_attention.linear_q_down_proj.weight": "self_attn.q_a_proj.weight",
    "self_attention.linear_q_up_proj.weight": "self_attn.q_b_proj.weight",
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attn.q_a_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_a_layernorm.weight",
    "self_attention.linear_kv_down_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "self_attention.linear_kv_up_proj.weight": "self_attn.kv_b_proj.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attn.kv_a_layernorm.weight",
    "self_attention.kv_layernorm.weight": "self_attn.kv_a_layernorm.weight",
}
# the router's expert bias (sigmoid routing, DeepSeek-V3) is HF's e_score_correction_bias
_ROUTER_BIAS = {"mlp.router.expert_bias": "mlp.gate.e_score_correction_bias"}
# HF families with n_shared_experts (DeepSeek, GLM-4 MoE) name the shared MLP in the plural, without a gate
_SHARED_PLURAL = {"mlp.shared_experts.linear_fc2.weight": "mlp.shared_experts.down_proj.weight"}
_GATE_UP_PLURAL = {"mlp.shared_experts.linear_fc1.weight": "mlp.shared_experts."}


def layer_rules(hf: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(renames, gate/up splits) inside a layer for the HF config's family."""
    renames, gate_up = {**_LAYER_RENAMES, **_ROUTER_BIAS, **_SWIGLU_HALVES}, dict(_GATE_UP)
    if hf.get("kv_lora_rank") is not None:
        renames.update(_MLA_RENAMES)
    if hf.get("n_shared_experts") is not None:
        renames.update(_SHARED_PLURAL)
        renames.update(_SWIGLU_HALVES_PLURAL)
        gate_up.update(_GATE_UP_PLURAL)
    return renames, gate_up

# transformer_config.json field -> the HF config fields it must equal (first one present)
_CHECKED = (("num_layers", ("num_hidden_layers",)), ("hidden_size", ("hidden_size",)),
            ("num_attention_heads", ("num_attention_heads",)), ("num_query_groups", ("num_key_value_heads",)),
            ("kv_channels", ("head_dim",)), ("ffn_hidden_size", ("intermediate_size",)),
            ("num_moe_experts", ("num_experts", "num_local_experts", "n_routed_experts")),
            ("moe_ffn_hidden_size", ("moe_intermediate_size", "intermediate_size")))
# MLA's widths instead of kv_channels (which MLA does not use; HF's head_dim there is the rope dim)
_MLA_CHECKED = (("q_lora_rank", ("q_lora_rank",)), ("kv_lora_rank", ("kv_lora_rank",)),
                ("qk_head_dim", ("qk_nope_head_dim",)), ("qk_pos_emb_head_dim", ("qk_rope_head_dim",)),
                ("v_head_dim", ("v_head_dim",)))


# What the model computes, beyond its sizes: transformer_config.json fields (verl's override_transformer_config
# writes them) that the HF config must agree with, or that HF cannot express at all.  Each entry:
# (Megatron field, its default when absent, the value the HF config implies (None: not comparable), what it does).
_DEFAULT_ONLY = (  # Hugging Face's families here have no such switch: any other value computes something else
    ("layernorm_zero_centered_gamma", False, "norm weights stored as gamma - 1, where HF multiplies by the weight"),
    ("apply_residual_connection_post_layernorm", False, "the residual taken after the norm, where HF takes it before"),
    ("rotary_interleaved", False, "rotary on interleaved pairs, where HF rotates the two halves"),
)
_EPS_FIELDS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")
_SOFTMAX_ROUTERS = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2"}  # HF routers: softmax over the experts
_SIGMOID_ROUTERS = {"deepseek_v3", "glm4_moe"}  # sigmoid scores with a correction bias


def _computed(hf: dict) -> list[tuple[str, Any, Any, str]]:
    """(Megatron field, default, what the HF config implies, the HF side's name) of every compared field."""
    out: list[tuple[str, Any, Any, str]] = []
    eps = next((f for f in _EPS_FIELDS if hf.get(f) is not None), None)
    if eps:
        out.append(("layernorm_epsilon", 1e-5, float(hf[eps]), eps))
    if "rms_norm_eps" in hf or "layer_norm_eps" in hf or "layer_norm_epsilon" in hf:
        out.append(("normalization", "LayerNorm", "RMSNorm" if "rms_norm_eps" in hf else "LayerNorm",
                    "rms_norm_eps" if "rms_norm_eps" in hf else "layer_norm_eps (LayerNorm)"))
    out.append(("rotary_percent", 1.0, float(hf.get("partial_rotary_factor") or 1.0), "partial_rotary_factor"))
    # plan 1 splits every linear_fc1 as [gate ; up] (HF's gate_proj / up_proj): a SwiGLU MLP
    out.append(("gated_linear_unit", False, True, "a gated MLP (gate_proj, up_proj)"))
    experts = next((hf[f] for f in ("num_experts", "num_local_experts", "n_routed_experts") if hf.get(f)), None)
    if experts:
        if hf.get("num_experts_per_tok") is not None:
            out.append(("moe_router_topk", 2, int(hf["num_experts_per_tok"]), "num_experts_per_tok"))
        mt = hf.get("model_type")
        score = "sigmoid" if mt in _SIGMOID_ROUTERS else "softmax" if mt in _SOFTMAX_ROUTERS else None
        if hf.get("scoring_func") in ("softmax", "sigmoid"):
            score = hf["scoring_func"]
        if score is not None:
            out.append(("moe_router_score_function", "softmax", score, f"model_type {mt!r}'s router"))
        if score == "softmax" and (mt == "mixtral" or hf.get("norm_topk_prob") is not None):
            # HF: softmax over all experts, top-k, renormalised iff norm_topk_prob (Mixtral always).  Megatron:
            # pre_softmax=False is top-k then softmax over the k (= renormalised), True softmax then top-k.
            renorm = True if mt == "mixtral" else bool(hf["norm_topk_prob"])
            out.append(("moe_router_pre_softmax", False, not renorm,
                        "norm_topk_prob=" + ("true (Mixtral)" if mt == "mixtral" else str(renorm).lower())))
        if score == "sigmoid" or hf.get("routed_scaling_factor") is not None:
            f = hf.get("routed_scaling_factor")
            out.append(("moe_router_topk_scaling_factor", 1.0, float(f or 1.0), "routed_scaling_factor"))
        if isinstance(hf.get("n_group"), int) and hf["n_group"] > 1:  # group-limited routing (DeepSeek)
            for tf_field, hf_field in (("moe_router_num_groups", "n_group"), ("moe_router_group_topk", "topk_group")):
                if hf.get(hf_field) is not None:
                    out.append((tf_field, None, int(hf[hf_field]), hf_field))
    return out


def check_computation(hf: dict, tc: dict, cfg_file: Path, tc_file: Path) -> None:
    """transformer_config.json computes what the HF config does (see :data:`_DEFAULT_ONLY`, :func:`_computed`),
    or a one-line error naming the field and both values: exporting such a save under config.json's values
    gives an HF model that computes something else (off by one on every norm for zero-centred gamma)."""
    for tf_field, default, why in _DEFAULT_ONLY:
        have = tc.get(tf_field, default)
        if have is not None and have != default:
            raise KeyPlanError(f"{tc_file}: {tf_field}={json.dumps(have)} ({why}), but {cfg_file.name}'s model "
                               f"has no such setting (it computes {tf_field}={json.dumps(default)}); the export "
                               f"would compute something else: export a run trained without this override")
    for tf_field, default, want, hf_name in _computed(hf):
        if tf_field not in tc:
            continue  # an older megatron-core's dump without the field
        have = tc[tf_field] if tc[tf_field] is not None else default
        same = (float(have) == float(want)) if isinstance(want, float) and isinstance(have, (int, float)) \
            else have == want
        if not same:
            raise KeyPlanError(f"{tc_file}: {tf_field}={json.dumps(have)}, but {cfg_file} implies "
                               f"{tf_field}={json.dumps(want)} ({hf_name}); the export would compute something "
                               f"else: pass --config the model this run trained, or fix the config to match")


def attention_shape(hf: dict) -> tuple[int, int, int]:
    """(heads, KV groups, head dim) of the HF config."""
    heads = int(hf["num_attention_heads"])
    groups = int(hf.get("num_key_value_heads") or heads)
    d = int(hf.get("head_dim") or int(hf["hidden_size"]) // heads)
    return heads, groups, d


def check_config(hf: dict, tc: dict | None, cfg_file: Path, tc_file: Path) -> None:
    """The HF config and Megatron's transformer_config.json describe the same model, or one-line error."""
    if not tc:
        return
    mla, tc_mla = hf.get("kv_lora_rank") is not None, tc.get("multi_latent_attention")
    if tc_mla is not None and bool(tc_mla) != mla:
        have = "an MLA model (kv_lora_rank)" if mla else "not an MLA model"
        raise KeyPlanError(f"{cfg_file}: {have}, but the checkpoint's {tc_file.name} says multi_latent_attention="
                           f"{bool(tc_mla)}; pass --config the model this run trained")
    checked = [c for c in _CHECKED if c[0] != "kv_channels"] + list(_MLA_CHECKED) if mla else _CHECKED
    for tf_field, hf_fields in checked:
        want = tc.get(tf_field)
        have = next((hf[f] for f in hf_fields if hf.get(f) is not None), None)
        if tf_field == "kv_channels" and have is None and hf.get("hidden_size") and hf.get("num_attention_heads"):
            have = int(hf["hidden_size"]) // int(hf["num_attention_heads"])
        if tf_field == "num_query_groups" and want is None:
            want = tc.get("num_attention_heads")
        if want is None or have is None:
            continue
        if int(want) != int(have):
            raise KeyPlanError(f"{cfg_file}: {hf_fields[0]} is {have} but the checkpoint's {tc_file.name} says "
                               f"{tf_field}={want}; pass --config the model this run trained")
    _check_dense_layers(hf, tc, cfg_file, tc_file)
    check_computation(hf, tc, cfg_file, tc_file)


def _check_dense_layers(hf: dict, tc: dict, cfg_file: Path, tc_file: Path) -> None:
    """Megatron's ``moe_layer_freq`` (a 0/1 list, or every N-th layer MoE) picks the same dense layers as HF's
    ``first_k_dense_replace`` (DeepSeek)."""
    freq, k, n = tc.get("moe_layer_freq"), hf.get("first_k_dense_replace"), tc.get("num_layers")
    if k is None or freq is None or not tc.get("num_moe_experts") or not isinstance(n, int):
        return
    moe = list(freq) if isinstance(freq, list) else [int(i % int(freq) == 0) for i in range(n)]
    want = [int(i >= int(k)) for i in range(n)]
    if [int(bool(x)) for x in moe] != want:
        raise KeyPlanError(f"{cfg_file}: first_k_dense_replace={k} makes layers {want} MoE, but the checkpoint's "
                           f"{tc_file.name} says moe_layer_freq={freq}; pass --config the model this run trained")


def _split_qkv(groups: int, per_group: int, d: int, names: tuple[str, str, str]):
    def fn(t: dict) -> dict:
        (x,) = t.values()
        v = x.reshape(groups, per_group + 2, d, *x.shape[1:])
        q = v[:, :per_group].reshape(groups * per_group * d, *x.shape[1:])
        return {names[0]: q.contiguous(), names[1]: v[:, per_group].reshape(groups * d, *x.shape[1:]).contiguous(),
                names[2]: v[:, per_group + 1].reshape(groups * d, *x.shape[1:]).contiguous()}

    return fn


def _split_gate_up(names: tuple[str, str]):
    def fn(t: dict) -> dict:
        (x,) = t.values()
        if x.shape[0] % 2:
            raise ValueError(f"linear_fc1 has {x.shape[0]} rows, not [gate ; up]")
        gate, up = x.chunk(2, dim=0)
        return {names[0]: gate.contiguous(), names[1]: up.contiguous()}

    return fn


def _value_head(n: int):
    def fn(t: dict) -> dict:
        (x,) = t.values()
        return {"score.weight": x, "score.bias": torch.zeros(n, dtype=x.dtype, device=x.device)}

    return fn


def _output_layer(key: str, info: TensorInfo, hf: dict, where: str) -> Transform:
    """``lm_head.weight``, or a critic's value head (rows != vocab_size) as ``score.weight`` + zero bias."""
    vocab = hf.get("vocab_size")
    rows = info.shape[0] if info.shape else None
    if vocab is None or rows == int(vocab):
        return rename(key, "lm_head.weight", info, "megatron name")
    if len(info.shape) != 2 or rows > 16:
        raise KeyPlanError(f"{where}: {key} is {tuple(info.shape)}: neither the vocabulary projection "
                           f"(vocab_size {vocab}) nor a value head [num_labels, hidden]; pass --config the model "
                           f"this run trained")
    return derive("split", {key: info}, _value_head(rows),
                  f"critic: output_layer {tuple(info.shape)} is verl's value head (no bias): score.weight, "
                  f"score.bias = 0")


def _layer_of(key: str) -> tuple[str, int] | None:
    """(name inside the layer, global layer index) of a stacked slice or a per-index key; else None."""
    base, i = parse_slice(key)
    if not base.startswith("decoder.layers."):
        return None
    rest = base[len("decoder.layers."):]
    if i is not None:
        return rest, i
    head, _, tail = rest.partition(".")
    return (tail, int(head)) if head.isdigit() else None


def megatron_to_hf_names(infos: dict[str, TensorInfo], hf: dict, where: str) -> Plan:
    """Plan 1: Megatron keys (layer slices) -> the HF model's in-memory names (see the module doc)."""
    heads, groups, d = attention_shape(hf)
    renames, gate_up = layer_rules(hf)
    plan = Plan()
    for key, info in infos.items():
        if key == "output_layer.weight":
            plan.transforms.append(_output_layer(key, info, hf, where))
            continue
        if key in _TOP:
            plan.transforms.append(rename(key, _TOP[key], info, "megatron name"))
            continue
        layer = _layer_of(key)
        if layer is None and key.startswith("mtp."):
            raise KeyPlanError(f"{where}: Megatron key {key!r} is a multi-token-prediction (MTP) layer; the "
                               f"transformers classes of the families that have one (DeepseekV3, Qwen3-Next) hold no "
                               f"MTP modules (save_pretrained never writes them, from_pretrained drops the hub's), so "
                               f"ckpt-bridge cannot check an export of it against the class: refusing to guess, "
                               f"nothing written (docs/megatron.md, 'MTP')")
        if layer is None:
            raise KeyPlanError(f"{where}: Megatron key {key!r} is not one ckpt-bridge maps to Hugging Face "
                               f"(known: embedding, decoder.layers.*, decoder.final_layernorm, output_layer); "
                               f"refusing to guess")
        rest, i = layer
        p = f"model.layers.{i}."
        why = f"layer {i} of the stacked tensor" if parse_slice(key)[1] is not None else f"layer {i}"
        if rest in renames:
            plan.transforms.append(rename(key, p + renames[rest], info, f"{why}: megatron name"))
        elif rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            names = tuple(p + f"self_attn.{x}_proj.{kind}" for x in "qkv")
            rule = f"{why}: split linear_qkv per KV group ({groups} x [{heads // groups} q heads | k | v], d={d})"
            plan.transforms.append(derive("split", {key: info}, _split_qkv(groups, heads // groups, d, names), rule))
        elif rest in gate_up:
            names = tuple(p + gate_up[rest] + f"{x}_proj.weight" for x in ("gate", "up"))
            plan.transforms.append(derive("split", {key: info}, _split_gate_up(names),
                                          f"{why}: split linear_fc1 [gate ; up]"))
        else:
            raise KeyPlanError(f"{where}: Megatron key {key!r} (layer {i}: {rest!r}) is not one ckpt-bridge maps to "
                               f"Hugging Face; refusing to guess (MTP / LoRA layers are not read yet)")
    return plan


def check_bridge_weights(infos: dict[str, TensorInfo], cfg_dir: Path, where: str) -> None:
    """Bridge-written weights hold every tensor ``save_pretrained`` of the class writes, at its shape: a lost
    expert or layer (the bridges' known silent losses) is named, not exported as a smaller model."""

    exp = expected_model(cfg_dir, value_head(infos, cfg_dir))
    want = exp.disk_shapes
    missing = [k for k in want if k not in infos]
    if missing:
        raise KeyPlanError(f"{where}: the bridge-written weights lack {len(missing)} tensor(s) {exp.model_class} "
                           f"has: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; the save lost them "
                           f"(use an earlier step or re-save)")
    bad = [k for k in want if tuple(infos[k].shape) != tuple(want[k])]
    if bad:
        k = bad[0]
        raise KeyPlanError(f"{where}: bridge-written {k} is {tuple(infos[k].shape)}, but {exp.model_class} of "
                           f"{Path(cfg_dir) / 'config.json'} has {tuple(want[k])}")


def check_save_config(reader: MegatronReader, cfg_dir: Path) -> dict[str, Any]:
    """The HF config describes the model the save trained (sizes, what it computes, the recorded class), or a
    one-line error; returns the config (a VLM's text part merged in).  ``to-hf`` and ``inspect`` both ask it."""
    cfg_file = Path(cfg_dir) / "config.json"
    hf: dict[str, Any] = json.loads(cfg_file.read_text())
    hf = {**hf.get("text_config", {}), **hf} if "num_attention_heads" not in hf else hf
    check_config(hf, reader.transformer_config(), cfg_file, reader.layout.root / "transformer_config.json")
    arch, archs = (reader.layout.manifest or {}).get("arch"), hf.get("architectures") or []
    if arch and archs and arch not in archs:  # verl records the HF class it trained: another config is not it
        raise KeyPlanError(f"{cfg_file}: architectures {archs} but the checkpoint's ckpt_contents.json says arch "
                           f"{arch!r}; pass --config the model this run trained")
    return hf


def megatron_names(reader: MegatronReader, cfg_dir: Path, *, where: str) -> tuple[Plan | None, dict[str, TensorInfo]]:
    """(the checked plan naming the save's tensors as the HF model's in-memory names, or None for a bridge-written
    save, which already holds HF names; the tensors it names).  The config is checked against the save first.
    Shared by the HF target (:func:`plan_megatron_export`) and to-dcp's trainer target."""
    hf = check_save_config(reader, cfg_dir)
    cfg_file = Path(cfg_dir) / "config.json"
    infos = reader.model_tensors()
    if reader.has_bridge_weights:  # already HF names: transformers' own rules, every tensor accounted for
        check_bridge_weights(infos, cfg_dir, where)
        return None, infos
    emb = infos.get("embedding.word_embeddings.weight")
    if emb is not None and hf.get("vocab_size") is not None and emb.shape[0] != int(hf["vocab_size"]):
        raise KeyPlanError(f"{cfg_file}: vocab_size is {hf['vocab_size']} but the checkpoint's embedding has "
                           f"{emb.shape[0]} rows (a padded vocabulary?); pass --config the model this run trained")
    first = megatron_to_hf_names(infos, hf, where)
    first.check(infos, where=where)
    first.dropped += [(k, "megatron _extra_state (bytes, not a weight)") for k in reader.skipped_entries()]
    return first, infos


def expect_reads(reader: MegatronReader, plan: Plan) -> None:
    """Tell the reader how often ``plan`` reads each layer slice (q, k, v of one ``linear_qkv``): kept between."""
    from collections import Counter

    reader.expect_reads(Counter(k for t in plan.transforms if t.fn is not None for k in t.inputs))


def plan_megatron_export(reader: MegatronReader, cfg_dir: Path, *, where: str) -> Plan:
    """The checked plan: Megatron dist_ckpt (or bridge-written HF weights) -> what ``save_pretrained`` writes."""

    first, infos = megatron_names(reader, cfg_dir, where=where)
    if first is None:
        return plan_hf_export(infos, cfg_dir, where=where)
    second = plan_hf_export(first.targets(), cfg_dir, where=where)
    out = compose(first, second, where=where)
    expect_reads(reader, out)
    return out
