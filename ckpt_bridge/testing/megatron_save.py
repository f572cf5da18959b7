"""Produce REAL verl Megatron checkpoints of tiny models, on CPU, under torchrun (test-only: needs megatron-core).

    torchrun --nproc_per_node=4 --master_addr=127.0.0.1 --master_port=PORT \\
        -m ckpt_bridge.testing.megatron_save --cases llama_tp2pp2,qwen2_tp2,... --out ROOT

For each case in turn (one process group and one set of imports for all of them):

1. rank 0 writes ``ROOT/<case>/base_model``: the HF model built from the case's config, every floating
   tensor (norm scales included: a swapped layernorm must show) re-drawn from a generator seeded by its
   name, saved with ``save_pretrained`` + a tokenizer.  That directory is also the reference an export
   must equal bit for bit.
2. every rank builds megatron-core's own ``GPTModel`` (local spec, no transformer_engine,
   ``use_cpu_initialization=True``) at the case's TP / PP / EP, and copies the HF weights into its
   parameters with the mapping below (:func:`hf_to_local`), written here from Megatron's module semantics
   and independent of ckpt-bridge's reader and plan.
3. megatron-core's own forward pass of that model on a fixed token batch (:func:`megatron_logits`: TP /
   EP collectives over gloo, PP stages chained by send/recv, ``device="cuda"`` constructors mapped to cpu)
   and the HF model's forward go to ``ROOT/<case>/reference/logits.pt``: the oracle that does not depend
   on either mapping.
4. verl 0.9.1's own ``MegatronCheckpointManager.save_checkpoint`` (``use_dist_checkpointing=True``, save
   contents model + extra) writes ``ROOT/<case>/global_step_1/actor``; ``torch.cuda.synchronize`` and
   ``torch.cuda.current_device`` get CPU stand-ins first (megatron calls them around its gloo barriers).  A
   ``megatron_fsdp`` case wraps the model in megatron-core's own ``FullyShardedDataParallel`` first and saves
   with ``use_megatron_fsdp=True`` (one combined DCP in ``model/dist_ckpt``).
5. each rank writes ``ROOT/<case>/reference/rank{R}_rng.pt``: the python / numpy / torch rng states it
   held right before the save, with its (pp, tp) rank.

Rank 0 writes ``ROOT/COMPLETE`` (json: cases, timings) at the end.  The entry point is behind a
``__main__`` guard: megatron's async writer machinery spawns processes that re-import this module.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import zlib
from pathlib import Path

import torch

SEED = 0

# case -> (family, tp, pp, ep).  Families are tiny configs below; layer counts divide every PP we use.
CASES: dict[str, tuple[str, int, int, int]] = {
    "llama_tp2pp2": ("llama", 2, 2, 1),
    "llama_tp2": ("llama", 2, 1, 1),
    "qwen2_tp2": ("qwen2", 2, 1, 1),
    "qwen3_pp2": ("qwen3", 1, 2, 1),
    "qwen3_moe_ep2": ("qwen3_moe", 1, 1, 2),
    "qwen2_moe_ep2": ("qwen2_moe", 1, 1, 2),
    "mixtral_ep2": ("mixtral", 1, 1, 2),
    "qwen2_critic_tp2pp2": ("qwen2_critic", 2, 2, 1),
    "llama_bridge_tp2pp2": ("llama", 2, 2, 1),
    "qwen3_moe_tp2ep2": ("qwen3_moe", 2, 1, 2),  # experts whole on each EP rank (expert-TP 1), attention TP2
    "qwen2_moe_tp2ep2_etp2": ("qwen2_moe", 2, 1, 2),  # experts split too: expert-TP 2 x EP 2 = 4 ranks
    "llama_pp2vpp2": ("llama", 1, 2, 1),  # 2 virtual stages per PP rank: one layer per model chunk
    # MLA + MoE: a dense first layer, then MoE layers with a shared expert, sigmoid routing with an expert bias,
    # group-limited top-k; attention TP2 (MLA's up/down projections column-split), experts EP2
    "deepseek_v3_tp2ep2": ("deepseek_v3", 2, 1, 2),
    # verl's use_megatron_fsdp: megatron-core's FullyShardedDataParallel over DP 2 x TP 2 (each parameter a
    # DTensor over (dp, tp), sharded on its flattened buffer), one combined DCP in model/dist_ckpt
    "llama_mfsdp": ("llama", 2, 1, 1),
}
# how a case's save differs from the default (use_dist_checkpointing=True, no bridge, no optimizer):
# "bridge": verl's default use_mbridge, use_dist_checkpointing=False: mbridge writes the HF weights into
# model/huggingface (vanilla mbridge, verl/models/mcore/mbridge.py)
# model/huggingface (vanilla mbridge, verl/models/mcore/mbridge.py); the Megatron model is then loaded as
# verl loads it, by the bridge from the HF dir (not by this module's mapping)
# "optimizer": a real Megatron optimizer + lr scheduler, built by verl's own helpers, saved too
# "etp": expert_tensor_parallel_size (default 1 when EP > 1); "vpp": virtual pipeline stages (model chunks)
# "megatron_fsdp": the model wrapped in megatron-core's FullyShardedDataParallel and saved by verl's manager with
# use_megatron_fsdp=True (its fsdp_dtensor path: :func:`_megatron_fsdp_wrap`, :func:`save_fsdp_dtensor_checkpoint`)
OPTIONS: dict[str, dict] = {"llama_bridge_tp2pp2": {"bridge": True}, "qwen3_pp2": {"optimizer": True},
                            "qwen2_moe_tp2ep2_etp2": {"etp": 2}, "llama_pp2vpp2": {"vpp": 2},
                            "llama_mfsdp": {"megatron_fsdp": True, "optimizer": True}}

# what the test session builds, in ONE torchrun job of 4 gloo ranks (tests/conftest.py megatron_ckpts)
SESSION_CASES = ["llama_tp2pp2", "qwen2_tp2", "qwen3_pp2", "qwen3_moe_ep2", "qwen2_moe_ep2", "mixtral_ep2",
                 "qwen2_critic_tp2pp2", "llama_bridge_tp2pp2", "qwen3_moe_tp2ep2", "qwen2_moe_tp2ep2_etp2",
                 "llama_pp2vpp2", "deepseek_v3_tp2ep2", "llama_mfsdp"]


def is_critic(family: str) -> bool:
    return family.endswith("_critic")


def family_config(family: str):
    """A tiny HF config of ``family``: vocab 256 and widths that divide TP 2 (Megatron needs even splits)."""
    import transformers

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, rms_norm_eps=1e-6,
              bos_token_id=1, eos_token_id=2, pad_token_id=3)
    arch = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
            # verl's Megatron critic: the causal LM's config, untied (a value head cannot share the embedding)
            "qwen2_critic": ("Qwen2Config", "Qwen2ForTokenClassification", {"num_labels": 1}),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16, "tie_word_embeddings": True}),
            "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                          {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                           "decoder_sparse_step": 1, "norm_topk_prob": True, "num_hidden_layers": 2}),
            "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                          {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                           "shared_expert_intermediate_size": 80, "decoder_sparse_step": 1, "norm_topk_prob": False,
                           "num_hidden_layers": 2}),
            "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                        {"num_local_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 2}),
            # every MLA width distinct (a swapped split shows); 2 groups of 2 experts, 1 group picked per token
            "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                            {"num_hidden_layers": 3, "first_k_dense_replace": 1, "num_key_value_heads": 4,
                             "q_lora_rank": 40, "kv_lora_rank": 24, "qk_nope_head_dim": 12, "qk_rope_head_dim": 8,
                             "v_head_dim": 10, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2,
                             "topk_group": 1, "n_shared_experts": 1, "moe_intermediate_size": 48,
                             "routed_scaling_factor": 2.5, "norm_topk_prob": True, "rope_interleave": True})}[family]
    kw.update(arch[2])
    cfg = getattr(transformers, arch[0])(**kw)
    cfg.architectures = [arch[1]]
    return cfg


def build_hf(family: str):
    """The HF model with every floating tensor drawn from a generator seeded by its name (norms near 1).

    A critic is ``XForTokenClassification`` with ``num_labels=1`` and a zero ``score.bias``: verl's Megatron
    value head (``LinearForLastLayer``) is an ``nn.Linear(hidden, 1, bias=False)``, so the HF model equal
    to it has no bias term."""
    import transformers

    cfg = family_config(family)
    model = getattr(transformers, cfg.architectures[0])._from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or "inv_freq" in name:
                continue
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            draw = torch.empty(t.shape).normal_(0.0, 0.05, generator=g)
            t.copy_(1.0 + draw if "norm" in name else draw)
        if is_critic(family):
            model.score.bias.zero_()
    return model.eval()


# ---------------------------------------------------------------- the test's own HF -> Megatron mapping


def _tp_chunk(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    return t.chunk(size, dim=dim)[rank].contiguous()


def hf_to_local(name: str, hf: dict, cfg, layer_of: dict[int, int], expert_of, tp: tuple[int, int],
                etp: tuple[int, int] = (0, 1)):
    """The value of the local Megatron parameter ``name`` taken from the HF state dict ``hf``.

    Megatron semantics used (megatron.core, local spec): ``linear_qkv`` is column-parallel and its output
    rows are grouped per KV group, ``[q heads of the group | k | v]``; ``linear_fc1`` of a gated MLP holds
    ``[gate ; up]`` per TP rank; ``linear_proj`` / ``linear_fc2`` are row-parallel (split on the input
    dim); the embedding and output layer are split on the vocab.  ``layer_of``: local layer index ->
    global; ``expert_of(j)``: local expert index -> global; ``etp``: (rank, size) of the expert-tensor-parallel
    group, which splits the routed experts' linears as ``tp`` splits the dense ones.
    """
    r, n = tp
    parts = name.split(".")
    if name == "embedding.word_embeddings.weight":
        return _tp_chunk(hf["model.embed_tokens.weight"], 0, r, n)
    if name == "output_layer.weight":
        if "score.weight" in hf:  # a critic's value head: replicated, not split on TP
            return hf["score.weight"]
        return _tp_chunk(hf["lm_head.weight"], 0, r, n)
    if name == "decoder.final_layernorm.weight":
        return hf["model.norm.weight"]
    assert parts[:2] == ["decoder", "layers"], name
    i = layer_of[int(parts[2])]
    rest = ".".join(parts[3:])
    p = f"model.layers.{i}."
    heads, groups = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if rest.startswith("self_attention.linear_qkv."):
        kind = parts[-1]  # weight / bias
        q = hf[p + f"self_attn.q_proj.{kind}"].reshape(groups, heads // groups * d, -1)
        k = hf[p + f"self_attn.k_proj.{kind}"].reshape(groups, d, -1)
        v = hf[p + f"self_attn.v_proj.{kind}"].reshape(groups, d, -1)
        fused = torch.cat([q, k, v], dim=1).reshape(groups * (heads // groups + 2) * d, -1)
        fused = fused if kind == "weight" else fused.reshape(-1)
        return _tp_chunk(fused, 0, r, n)
    if rest in _MLA_LINEARS:  # MLA (local spec): every projection column-parallel, row-split over TP
        return _tp_chunk(hf[p + _MLA_LINEARS[rest]], 0, r, n)
    simple = {"input_layernorm.weight": "input_layernorm.weight",
              "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
              "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
              "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
              "mlp.router.weight": "mlp.gate.weight",
              "mlp.shared_experts.gate_weight": "mlp.shared_expert_gate.weight",
              "mlp.router.expert_bias": "mlp.gate.e_score_correction_bias"}
    if cfg.model_type == "deepseek_v3":  # MLA's norms sit on the compressed q and kv, before the up-projections
        simple.update({"self_attention.q_layernorm.weight": "self_attn.q_a_layernorm.weight",
                       "self_attention.kv_layernorm.weight": "self_attn.kv_a_layernorm.weight"})
    moe = "block_sparse_moe." if cfg.model_type == "mixtral" else "mlp."  # Mixtral's checkpoint names
    if rest == "mlp.router.weight":
        return hf[p + moe + "gate.weight"]
    if rest in simple:
        return hf[p + simple[rest]]
    if rest == "self_attention.linear_proj.weight":
        return _tp_chunk(hf[p + "self_attn.o_proj.weight"], 1, r, n)
    shared = "mlp.shared_experts." if cfg.model_type == "deepseek_v3" else "mlp.shared_expert."
    mlp = {"mlp.": "mlp.", "mlp.shared_experts.": shared}
    if rest.startswith("mlp.experts.local_experts."):
        j = int(parts[6])
        e = expert_of(j)
        stem = p + moe + f"experts.{e}."
        rest = "mlp." + ".".join(parts[7:])
        names = ("w1", "w3", "w2") if cfg.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        gate, up, down = (hf[stem + w + ".weight"] for w in names)
        return _gated(rest, gate, up, down, *etp)
    else:
        head = "mlp.shared_experts." if rest.startswith("mlp.shared_experts.") else "mlp."
        prefix = p + mlp[head]
        rest = "mlp." + rest[len(head):]
    gate, up, down = (hf[prefix + w + ".weight"] for w in ("gate_proj", "up_proj", "down_proj"))
    return _gated(rest, gate, up, down, r, n)


# MLA's projections (megatron.core.transformer.multi_latent_attention.MLASelfAttention) -> DeepseekV3Attention's:
# the same output layouts ([kv_lora_rank | rope] rows of the kv down-projection, per head [nope | rope] rows of
# the q up-projection and [nope | v] of the kv up-projection), so each is the HF weight, split over TP rows
_MLA_LINEARS = {"self_attention.linear_q_down_proj.weight": "self_attn.q_a_proj.weight",
                "self_attention.linear_q_up_proj.weight": "self_attn.q_b_proj.weight",
                "self_attention.linear_q_proj.weight": "self_attn.q_proj.weight",
                "self_attention.linear_kv_down_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
                "self_attention.linear_kv_up_proj.weight": "self_attn.kv_b_proj.weight"}


def _gated(rest: str, gate, up, down, r: int, n: int) -> torch.Tensor:
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([_tp_chunk(gate, 0, r, n), _tp_chunk(up, 0, r, n)], dim=0)
    if rest == "mlp.linear_fc2.weight":
        return _tp_chunk(down, 1, r, n)
    raise KeyError(rest)


def _hf_state(model) -> dict:
    """The HF model's weights under their save names (transformers 5 fuses MoE experts in memory)."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        out = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            out.update(load_file(f))
    if "lm_head.weight" not in out and "score.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


# ---------------------------------------------------------------- building and saving one case


def _cpu_stand_ins() -> None:
    """megatron-core calls these around its (here gloo) barriers and in the save; there is no GPU."""
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: torch.device("cpu")  # used as the device of small flag tensors
    # a tied embedding under PP is all-reduced between the first and last stage after `.cuda()`
    torch.Tensor.cuda = lambda self, *a, **k: self
    # megatron-core 0.16.1's router tests `te_general_gemm is not None`, a name bound only when
    # transformer_engine imports (NameError without it)
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # megatron-core 0.16.1's multi_latent_attention sets HAVE_TE = True whenever megatron's TE extension module
    # imports, which it does without transformer_engine (its `te` is then a MagicMock, and so is TELinear):
    # MLA's `isinstance(self.linear_proj, TELinear)` then raises TypeError.  Without TE, HAVE_TE is False.
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = te_ext.HAVE_TE


def transformer_config(cfg, tp: int, pp: int, ep: int, etp: int = 1):
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    moe = {}
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    if experts:
        moe = dict(num_moe_experts=experts, moe_router_topk=cfg.num_experts_per_tok,
                   moe_ffn_hidden_size=getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size,
                   moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
                   moe_aux_loss_coeff=0.0, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                   moe_grouped_gemm=False)
        shared = getattr(cfg, "shared_expert_intermediate_size", None)
        if shared:
            moe.update(moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=True)
        if not getattr(cfg, "norm_topk_prob", True):  # HF: softmax over all experts, top-k, no renormalising
            moe.update(moe_router_pre_softmax=True)
    kw = dict(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads, ffn_hidden_size=cfg.intermediate_size,
        kv_channels=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        normalization="RMSNorm", layernorm_epsilon=cfg.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=cfg.model_type in ("qwen2", "qwen2_moe"),
        qk_layernorm=cfg.model_type in ("qwen3", "qwen3_moe"), bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, params_dtype=torch.float32, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32, sequence_parallel=False, **moe)
    if cfg.model_type == "deepseek_v3":
        return _deepseek_v3_config(cfg, kw)
    return TransformerConfig(**kw)


def _deepseek_v3_config(cfg, kw: dict):
    """The MLATransformerConfig of a DeepseekV3Config, as mbridge's DeepseekV3Bridge builds it
    (mbridge/models/deepseek_v3.py) without its TE-only fusions: plain rope (no yarn scaling), the first
    ``first_k_dense_replace`` layers dense, sigmoid routing with HF's ``e_score_correction_bias`` as megatron's
    expert bias, group-limited top-k, a shared expert without a gate.  ``kv_channels`` is the v head dim:
    megatron's local attention sizes its output by it (MLA's q / k heads are wider, nope + rope)."""
    from megatron.core.transformer import MLATransformerConfig

    kw = {k: v for k, v in kw.items() if k != "moe_router_pre_softmax"}
    kw.update(moe_shared_expert_intermediate_size=cfg.moe_intermediate_size * cfg.n_shared_experts,
              moe_layer_freq=[0 if i < cfg.first_k_dense_replace else 1 for i in range(cfg.num_hidden_layers)],
              moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
              moe_router_topk_scaling_factor=cfg.routed_scaling_factor, moe_router_num_groups=cfg.n_group,
              moe_router_group_topk=cfg.topk_group)
    kw.update(multi_latent_attention=True, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
              qk_head_dim=cfg.qk_nope_head_dim, qk_pos_emb_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
              rope_type="rope", rotary_base=_rope_theta(cfg), rotary_scaling_factor=1.0, mscale=1.0,
              mscale_all_dim=0.0, kv_channels=cfg.v_head_dim, qk_layernorm=True)
    return MLATransformerConfig(**kw)


class ValueHead(torch.nn.Linear):
    """verl's ``LinearForLastLayer`` (verl/models/mcore/bridge.py, its fallback when Megatron-Bridge lacks it):
    the critic's ``output_layer``, ``nn.Linear(hidden, 1, bias=False)`` returning ``(logits.float(), None)``.
    Re-stated here because that verl module imports Megatron-Bridge at the top, which is not installed."""

    def __init__(self, hidden: int):
        super().__init__(hidden, 1, bias=False)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        return super().forward(input_).float(), None


def build_megatron(cfg, tf_config, critic: bool = False, vp_stage: int | None = None):
    """megatron-core's GPTModel as verl's model initializer builds it (a critic: value head on the last stage);
    ``vp_stage``: the model chunk of a virtual-pipeline run."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if tf_config.multi_latent_attention:
        spec = mla_block_spec(tf_config, vp_stage)
    else:
        spec = get_gpt_layer_local_spec(num_experts=tf_config.num_moe_experts, qk_layernorm=tf_config.qk_layernorm,
                                        normalization="RMSNorm")
    virtual = {} if vp_stage is None else {"ignore_virtual": False, "vp_stage": vp_stage}
    last = ps.is_pipeline_last_stage(**virtual)
    model = GPTModel(tf_config, spec, vocab_size=cfg.vocab_size, max_sequence_length=cfg.max_position_embeddings,
                     pre_process=ps.is_pipeline_first_stage(**virtual), post_process=last,
                     share_embeddings_and_output_weights=cfg.tie_word_embeddings and not critic,
                     position_embedding_type="rope", rotary_base=int(_rope_theta(cfg)),
                     **({} if vp_stage is None else {"vp_stage": vp_stage}))
    if critic and last:
        model.output_layer = ValueHead(tf_config.hidden_size)
    return model


def mla_block_spec(tf_config, vp_stage: int | None):
    """megatron-core's local block spec of an MLA model (dense and MoE layers by ``moe_layer_freq``), its core
    attention able to take MLA's arguments.

    megatron-core 0.16.1's ``MLASelfAttention`` builds its core attention with ``k_channels=`` / ``v_channels=``
    (the q / k head is nope + rope wide, the v head v_head_dim), which only ``TEDotProductAttention`` accepts;
    the local spec's ``DotProductAttention.__init__`` refuses them (TypeError).  Its forward needs neither (it
    takes the head widths from the q / k / v tensors, and the output width from ``kv_channels``, set to the v
    head dim): the class below drops the two arguments and is otherwise that class."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    block = get_gpt_decoder_block_spec(tf_config, use_transformer_engine=False, normalization="RMSNorm",
                                       vp_stage=vp_stage)
    attention = _local_mla_attention()
    for layer in block.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = attention
    return block


def _local_mla_attention():
    """``DotProductAttention`` taking (and dropping) MLA's ``k_channels`` / ``v_channels``."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class LocalMLAAttention(DotProductAttention):
        def __init__(self, *args, k_channels=None, v_channels=None, **kw):
            super().__init__(*args, **kw)

    return LocalMLAAttention


def _rope_theta(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None) or {}
    return float(rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def load_hf_into(model, hf: dict, cfg) -> None:
    from megatron.core import parallel_state as ps

    tp = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
    etp = (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size())
    layer_of = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
    ep_rank, ep = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or 0
    expert_of = lambda j: ep_rank * (experts // max(ep, 1)) + j  # noqa: E731
    # megatron's expert bias is a (persistent) buffer, HF's e_score_correction_bias too
    bias = [(n, b) for n, b in model.named_buffers() if n.endswith("mlp.router.expert_bias")]
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *bias]:
            if name == "output_layer.weight" and cfg.tie_word_embeddings and "score.weight" not in hf:
                # the last stage's copy of the tied embedding (Megatron keeps it in sync by all-reduce)
                value = _tp_chunk(hf["model.embed_tokens.weight"], 0, *tp)
            else:
                value = hf_to_local(name, hf, cfg, layer_of, expert_of, tp, etp)
            assert tuple(value.shape) == tuple(p.shape), (name, tuple(value.shape), tuple(p.shape))
            p.copy_(value)


# ---------------------------------------------------------------- the forward-logits oracle


def fixed_tokens(vocab: int) -> torch.Tensor:
    """The token batch both models see: [2, 12], no special ids."""
    return torch.randint(4, vocab, (2, 12), generator=torch.Generator().manual_seed(1234))


class _CudaToCpu:
    """Maps ``device="cuda"`` (which megatron's causal-mask / scratch constructors pass) to cpu, and makes the
    model-parallel rng tracker's ``fork`` a no-op (it swaps CUDA rng states around dropout; dropout is 0)."""

    NAMES = ("ones", "zeros", "empty", "full", "arange", "tensor", "rand", "randn")

    def __enter__(self):
        from megatron.core import tensor_parallel

        self.saved = {n: getattr(torch, n) for n in self.NAMES}
        for n, f in self.saved.items():
            setattr(torch, n, self._wrap(f))
        self.tracker = tensor_parallel.get_cuda_rng_tracker()
        self.tracker.fork = lambda *a, **k: __import__("contextlib").nullcontext()
        return self

    @staticmethod
    def _wrap(f):
        def g(*a, **k):
            d = k.get("device")
            if d is not None and str(d).startswith("cuda"):
                k["device"] = "cpu"
            return f(*a, **k)

        return g

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch, n, f)
        del self.tracker.fork  # back to the class's method
        return False


def megatron_logits(models: list, tokens: torch.Tensor) -> torch.Tensor | None:
    """megatron-core's own forward of ``tokens`` (fp32, causal, TP/EP collectives over gloo, PP stages and
    virtual-pipeline chunks chained with send/recv around the PP ring): the full-vocabulary logits
    ``[b, s, V]`` on the last stage, else None."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    out = None
    with torch.no_grad(), _CudaToCpu():
        for v, model in enumerate(models):
            model.eval()
            if not (v == 0 and ps.is_pipeline_first_stage()):
                h = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size)
                dist.recv(h, src=ps.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(h)
            out = model(tokens, pos, None, runtime_gather_output=True)
            if not (v == len(models) - 1 and ps.is_pipeline_last_stage()):
                dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
                out = None
    return out


def record_logits(models: list, hf_model, ref: Path) -> None:
    """``ref/logits.pt``: {"megatron", "hf", "tokens"} from the last stage's first (tp, dp) rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tokens = fixed_tokens(hf_model.config.vocab_size)
    got = megatron_logits(models, tokens)
    got = got[0] if isinstance(got, tuple) else got
    if got is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0 \
            and ps.get_expert_model_parallel_rank() == 0:
        with torch.no_grad():
            want = hf_model(tokens).logits
        torch.save({"megatron": got, "hf": want, "tokens": tokens}, ref / "logits.pt")
    dist.barrier()


def make_optimizer(model, wrapped=None):
    """(DDP-wrapped model, optimizer, lr scheduler) as verl's Megatron engine builds them
    (``verl.utils.megatron.optimizer``: megatron-core's ``get_megatron_optimizer`` and
    ``OptimizerParamScheduler``), the scheduler stepped 3 times so its state is not the initial one.  ``wrapped``:
    a model already wrapped in Megatron-FSDP's ``FullyShardedDataParallel``, given megatron-core's distributed
    optimizer (verl sets ``use_distributed_optimizer`` for Megatron-FSDP)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from omegaconf import OmegaConf

    from verl.utils.megatron.optimizer import (get_megatron_optimizer, get_megatron_optimizer_param_scheduler,
                                               init_megatron_optim_config)

    ddp = wrapped if wrapped is not None else DistributedDataParallel(model.config, DistributedDataParallelConfig(),
                                                                      model)
    optim = OmegaConf.create({"optimizer": "adam", "lr": 1e-4, "min_lr": 1e-6, "clip_grad": 1.0,
                              "weight_decay": 0.01, "lr_warmup_init": 0.0, "lr_decay_steps": 10,
                              "lr_warmup_steps": 2, "lr_decay_style": "cosine", "total_training_steps": 10,
                              "weight_decay_incr_style": "constant", "use_checkpoint_opt_param_scheduler": False,
                              "lr_wsd_decay_style": "exponential", "lr_warmup_steps_ratio": None,
                              "lr_wsd_decay_steps": None})
    with _CudaToCpu():  # FP32Optimizer keeps a loss scale made with device="cuda"
        optimizer = get_megatron_optimizer([ddp], init_megatron_optim_config(
            optim, use_distributed_optimizer=wrapped is not None, bf16=False))
    scheduler = get_megatron_optimizer_param_scheduler(optimizer, optim)
    for _ in range(3):
        scheduler.step(increment=1)
    return ddp, optimizer, scheduler


def make_bridge(cfg):
    """verl's vanilla mbridge for ``cfg`` (what its Megatron engine builds with ``vanilla_mbridge``).

    mbridge names the parameters of transformer_engine's layer spec, where the layernorms are fused into
    the next linear (``linear_qkv.layer_norm_weight``); without TE the local spec keeps them as separate
    ``input_layernorm`` / ``pre_mlp_layernorm`` modules, so those two names are added to this instance's
    tables.  (Its MoE tables assume TE's grouped experts, ``experts.linear_fc1.weight<E>``, which the
    local spec's ``experts.local_experts.<E>`` cannot be made to match: no bridge MoE case.)"""
    from verl.models.mcore.mbridge import AutoBridge

    bridge = AutoBridge.from_config(cfg, dtype=torch.float32)
    bridge._OTHER_MAPPING = {**bridge._OTHER_MAPPING,
                             "input_layernorm.weight": ["model.layers.{layer_number}.input_layernorm.weight"]}
    bridge._MLP_MAPPING = {"pre_mlp_layernorm.weight": ["model.layers.{layer_number}.post_attention_layernorm.weight"],
                           **bridge._MLP_MAPPING}
    return bridge


class _MegatronFSDPOnCpu:
    """CPU stand-ins while megatron-core 0.16.1's ``FullyShardedDataParallel`` wraps a model (no GPU here):
    its ``MegatronFSDP`` compares the device with ``cuda:{current_device()}`` (an int is needed), builds its
    DeviceMeshes with ``device_type="cuda"`` (gloo: cpu) and creates side streams (none on CPU: no-ops).  The
    sharding, the DTensors and the state dict are megatron-fsdp's own."""

    def __enter__(self):
        import contextlib

        from torch.distributed.device_mesh import DeviceMesh

        class _Stream:
            def __init__(self, *a, **k):
                pass

            def wait_stream(self, *a, **k):
                pass

            def synchronize(self):
                pass

        self.saved = {n: getattr(torch.cuda, n) for n in ("current_device", "Stream", "current_stream", "stream",
                                                          "get_rng_state", "set_rng_state")}
        self.from_group = DeviceMesh.__dict__["from_group"]
        original = self.from_group.__func__

        def from_group(*a, **k):
            if k.get("device_type") == "cuda":
                k["device_type"] = "cpu"
            return original(*a, **k)

        DeviceMesh.from_group = staticmethod(from_group)
        torch.cuda.current_device = lambda: 0
        torch.cuda.Stream = _Stream
        # without transformer_engine, megatron's TE extension binds TELinear to a MagicMock (see _cpu_stand_ins);
        # the adapter's isinstance(m, TELinear) under TP > 1 then raises TypeError: no module is a TELinear here
        from megatron.core.distributed.fsdp import mcore_fsdp_adapter
        from megatron.core.extensions import transformer_engine as te_ext

        self.te_linear = mcore_fsdp_adapter.TELinear
        if not te_ext.HAVE_TE:
            mcore_fsdp_adapter.TELinear = type("NoTELinear", (), {})
        torch.cuda.current_stream = lambda *a, **k: _Stream()
        torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
        # under TP > 1 the wrapper broadcasts TP rank 0's rng states, the CUDA one included: there is none
        torch.cuda.get_rng_state = lambda *a, **k: torch.zeros(0, dtype=torch.uint8)
        torch.cuda.set_rng_state = lambda *a, **k: None
        return self

    def __exit__(self, *exc):
        from torch.distributed.device_mesh import DeviceMesh

        from megatron.core.distributed.fsdp import mcore_fsdp_adapter

        for n, f in self.saved.items():
            setattr(torch.cuda, n, f)
        DeviceMesh.from_group = self.from_group
        mcore_fsdp_adapter.TELinear = self.te_linear
        return False


def _megatron_fsdp_wrap(model, tf_config):
    """``model`` wrapped as verl's ``use_megatron_fsdp`` wraps it: megatron-core's ``FullyShardedDataParallel``
    with the DDP config verl's ``make_megatron_module`` sets for Megatron-FSDP (verl/utils/megatron_utils.py:
    use_distributed_optimizer, use_megatron_fsdp, data_parallel_sharding_strategy="optim_grads_params")."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.fsdp.mcore_fsdp_adapter import FullyShardedDataParallel

    ddp = DistributedDataParallelConfig(use_distributed_optimizer=True, use_megatron_fsdp=True,
                                        data_parallel_sharding_strategy="optim_grads_params")
    with _MegatronFSDPOnCpu():
        wrapper = FullyShardedDataParallel(tf_config, ddp, model, device=torch.device("cpu"))
    _FSDP_WRAPPER_OF[id(wrapper.module)] = wrapper
    return wrapper


# MegatronFSDP module -> its FullyShardedDataParallel wrapper.  verl 0.9.1 hands the bridge
# ``getattr(model[0], "module")`` (the MegatronFSDP module), while megatron-core's SwiGLU handler looks each key of
# the wrapper's state dict (``module.<name>``) up as ``module.module.<name>`` from the module it is given, i.e. from
# the wrapper, which is what Megatron-Bridge's own trainer passes (``model[0]``); from the MegatronFSDP module the
# lookup fails (AttributeError).  The saved keys do not depend on it: the handler only reads each parameter's
# sharding from it.
_FSDP_WRAPPER_OF: dict[int, object] = {}


def save_fsdp_dtensor_checkpoint(checkpoint_path, state_dict, *, cfg, model, storage_writer=None, barrier=True):
    """Megatron-Bridge's ``save_fsdp_dtensor_checkpoint``, which verl's manager imports from
    ``megatron.bridge.training.checkpointing`` (Megatron-Bridge is not installed here), re-stated from its source
    (NVIDIA-NeMo/Megatron-Bridge 067f987, src/megatron/bridge/training/checkpointing.py,
    ``preprocess_fsdp_dtensor_state_dict`` and ``save_fsdp_dtensor_checkpoint``) with megatron-core 0.16.1's own
    handlers: drop ``_extra_state``; SwiGLU ``linear_fc1`` split into ``_w`` / ``_v`` DTensors; expert keys
    renumbered globally; (the GDN / fused-MLA / MTP handlers do not exist in megatron-core 0.16.1, which the
    bridge then skips); uneven-DTensor chunk metadata; then ``torch.distributed.checkpoint.save`` with a
    ``FileSystemWriter``."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core.distributed.fsdp.src.megatron_fsdp.uneven_dtensor import (
        preprocess_state_dict_for_uneven_dtensor)
    from megatron.core.transformer.fsdp_dtensor_checkpoint import (handle_experts_in_state_dict,
                                                                   handle_fp8_extra_state_case,
                                                                   handle_swiglu_in_state_dict)
    from megatron.core.utils import get_model_config

    model = _FSDP_WRAPPER_OF.get(id(model), model)
    state_dict = state_dict.copy()
    handle_fp8_extra_state_case(state_dict["model"])
    config = get_model_config(model)
    if getattr(config, "gated_linear_unit", False) and getattr(config, "activation_func", None) is F.silu:
        state_dict["model"], optimizer = handle_swiglu_in_state_dict(model, state_dict["model"],
                                                                     state_dict.get("optimizer"))
        if "optimizer" in state_dict:
            state_dict["optimizer"] = optimizer
    if getattr(config, "num_moe_experts", None):
        state_dict["model"] = handle_experts_in_state_dict(state_dict["model"], config.num_moe_experts)
    preprocess_state_dict_for_uneven_dtensor(state_dict)
    writer = storage_writer or torch.distributed.checkpoint.FileSystemWriter(str(checkpoint_path))
    result = torch.distributed.checkpoint.save(state_dict=state_dict, storage_writer=writer)
    if barrier and dist.is_initialized():
        dist.barrier()
    return result


def _install_bridge_checkpointing() -> None:
    """``megatron.bridge.training.checkpointing`` for verl's import, holding :func:`save_fsdp_dtensor_checkpoint`
    (only when Megatron-Bridge itself is not installed)."""
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("megatron.bridge") is not None:
        return
    for name in ("megatron.bridge", "megatron.bridge.training"):
        sys.modules.setdefault(name, types.ModuleType(name))
    mod = types.ModuleType("megatron.bridge.training.checkpointing")
    mod.save_fsdp_dtensor_checkpoint = save_fsdp_dtensor_checkpoint
    sys.modules[mod.__name__] = mod


def save_case(case: str, root: Path, world: int) -> dict:
    import numpy as np
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from omegaconf import OmegaConf

    from verl.utils.checkpoint.megatron_checkpoint_manager import MegatronCheckpointManager

    from .tiny_models import generation_config_for, save_tiny_tokenizer

    family, tp, pp, ep = CASES[case]
    opts = OPTIONS.get(case, {})
    t0 = time.perf_counter()
    out = root / case
    base = out / "base_model"
    torch.manual_seed(SEED)
    hf_model = build_hf(family)
    cfg = hf_model.config
    if dist.get_rank() == 0:
        hf_model.generation_config = generation_config_for(cfg)
        hf_model.save_pretrained(base)
        save_tiny_tokenizer(base, cfg.vocab_size)
    dist.barrier()
    hf = _hf_state(hf_model)
    ps.destroy_model_parallel()
    vpp = opts.get("vpp")
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp, expert_model_parallel_size=ep,
                                 expert_tensor_parallel_size=opts.get("etp", 1) if ep > 1 else None)
    tf_config = transformer_config(cfg, tp, pp, ep, opts.get("etp", 1))
    tf_config.virtual_pipeline_model_parallel_size = vpp
    models = [build_megatron(cfg, tf_config, critic=is_critic(family), vp_stage=v) for v in range(vpp)] if vpp \
        else [build_megatron(cfg, tf_config, critic=is_critic(family))]
    bridge = make_bridge(cfg) if opts.get("bridge") else None
    if bridge is not None:
        bridge.load_weights(models, str(base))  # as verl's engine loads the HF weights with the bridge
    else:
        for model in models:
            load_hf_into(model, hf, cfg)
    saved_cfg, role = cfg, "actor"
    if is_critic(family):  # verl's critic keeps its causal LM's config (untied) and arch; role critic
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        saved_cfg = family_config(family)
        saved_cfg.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg.model_type]]
        saved_cfg.tie_word_embeddings, role = False, "critic"
        if dist.get_rank() == 0:  # the config a user passes with --config (without a bridge verl writes none)
            saved_cfg.save_pretrained(out / "causal_lm_config")

    from transformers import AutoTokenizer

    chunks, optimizer, scheduler = models, None, None
    mfsdp = bool(opts.get("megatron_fsdp"))
    if mfsdp:
        (out / "reference").mkdir(parents=True, exist_ok=True)
        record_logits(models, hf_model, out / "reference")  # before the wrap moves the weights into its buffers
        _install_bridge_checkpointing()
        chunks = [_megatron_fsdp_wrap(models[0], tf_config)]
    if opts.get("optimizer"):
        ddp, optimizer, scheduler = make_optimizer(models[0], chunks[0] if mfsdp else None)
        chunks = [ddp]

    tokenizer = AutoTokenizer.from_pretrained(base)
    contents = ["model", "optimizer", "extra"] if optimizer is not None else ["model", "extra"]
    manager = MegatronCheckpointManager(
        config=OmegaConf.create({"model": {"path": str(base)}, "megatron": {}}),
        checkpoint_config=OmegaConf.create({"save_contents": contents, "load_contents": contents,
                                            "async_save": False}),
        model_config=saved_cfg, transformer_config=tf_config, role=role, model=chunks,
        arch=saved_cfg.architectures[0], hf_config=saved_cfg, param_dtype=torch.float32,
        share_embeddings_and_output_weights=saved_cfg.tie_word_embeddings, processing_class=tokenizer,
        optimizer=optimizer, optimizer_scheduler=scheduler, use_distributed_optimizer=mfsdp,
        use_dist_checkpointing=bridge is None, use_megatron_fsdp=mfsdp, bridge=bridge)
    ref = out / "reference"
    ref.mkdir(parents=True, exist_ok=True)
    if not mfsdp:
        record_logits(models, hf_model, ref)
    # every rank's rng differs (the test checks each (pp, tp) rank's state lands in the export)
    rank = dist.get_rank()
    random.seed(100 + rank)
    np.random.seed(100 + rank)
    torch.manual_seed(100 + rank)
    torch.save({"pp": ps.get_pipeline_model_parallel_rank(), "tp": ps.get_tensor_model_parallel_rank(),
                "dp": ps.get_data_parallel_rank(), "torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "random": random.getstate()}, ref / f"rank{rank}_rng.pt")
    if scheduler is not None and rank == 0:
        torch.save(scheduler.state_dict(), ref / "lr_scheduler.pt")
    manager.save_checkpoint(str(out / "global_step_1" / role), global_step=1)
    dist.barrier()
    return {"case": case, "family": family, "tp": tp, "pp": pp, "ep": ep, "etp": opts.get("etp", 1), "world": world,
            "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> None:
    import torch.distributed as dist

    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", required=True, help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    torch.set_num_threads(1)
    _cpu_stand_ins()
    dist.init_process_group("gloo")
    root = Path(args.out)
    done = [save_case(c, root, dist.get_world_size()) for c in cases]
    dist.barrier()
    if dist.get_rank() == 0:
        (root / "COMPLETE").write_text(json.dumps({"cases": done}, indent=2) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
