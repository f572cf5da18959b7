"""Tiny transformers models and a tokenizer, built from configs only (never the hub).

Sizes are deliberately odd (vocab 251/253, intermediate 173/171) so FSDP shards
are uneven on every world size we test, and the llama presets carry
``attention_bias=True``: transformers initialises those biases to zero, which
makes their shards look "replicated" at step 0.

``llama_1b`` has the Llama-3.2-1B shape; it is for benchmarks only.  ``llama_1b_x2`` (the same widths,
twice the layers) is the benchmarks' second size; it lives in ``BENCH_PRESETS``, which ``build_config``
reads too but which is kept out of ``PRESETS``, whose every entry but ``llama_1b`` the version tests build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

# Token ids shared by every tiny preset and by save_tiny_tokenizer().
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def _llama(**over):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=251,
        hidden_size=64,
        intermediate_size=173,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        attention_bias=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    kw.update(over)
    cfg = LlamaConfig(**kw)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def _llama_tied():
    return _llama(tie_word_embeddings=True)


def _olmo2(**over):
    """Toy-size OLMo-2 with the release rope theta / norm eps (5e5, 1e-6), not Olmo2Config's defaults."""
    from transformers import Olmo2Config

    kw = dict(
        vocab_size=253,
        hidden_size=64,
        intermediate_size=171,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        **_rope(500000.0),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    kw.update(over)
    cfg = Olmo2Config(**kw)
    cfg.architectures = ["Olmo2ForCausalLM"]
    return cfg


def _qwen2(**over):
    """Toy-size Qwen2 with tied embeddings (as the small Qwen2 releases): q/k/v biases, no o_proj bias."""
    from transformers import Qwen2Config

    kw = dict(vocab_size=251, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
              bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    kw.update(over)
    cfg = Qwen2Config(**kw)
    cfg.architectures = ["Qwen2ForCausalLM"]
    return cfg


def _llama_1b(num_hidden_layers: int = 16):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        **_rope(500000.0, rope_type="llama3", factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                original_max_position_embeddings=8192),
        bos_token_id=128000,
        eos_token_id=128001,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def _rope(theta: float, **scaling):
    """Rope settings in the shape the installed transformers reads: ``rope_parameters`` (5.x) or
    ``rope_theta`` / ``rope_scaling`` (4.x), so a preset builds the same model on every version."""
    import transformers

    rope_type = scaling.pop("rope_type", "default")
    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": {"rope_type": rope_type, "rope_theta": theta, **scaling}}
    if rope_type == "default" and not scaling:
        return {"rope_theta": theta, "rope_scaling": None}
    return {"rope_theta": theta, "rope_scaling": {"rope_type": rope_type, **scaling}}


def _family(config_class: str, architecture: str, **over):
    """A 2-layer, hidden-64 model of any decoder family: odd vocab / intermediate sizes, GQA 4/2 heads."""
    import transformers

    kw = dict(vocab_size=251, hidden_size=64, intermediate_size=173, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
              bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    kw.update(over)
    cfg = getattr(transformers, config_class)(**kw)
    cfg.architectures = [architecture]
    return cfg


# The family matrix verl / TorchTitan users train (tiny: 2 layers, hidden 64, odd vocab, 4 experts).
FAMILIES: dict[str, Callable] = {
    "qwen2": lambda: _family("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen2_tied": lambda: _family("Qwen2Config", "Qwen2ForCausalLM", tie_word_embeddings=True),
    "qwen3": lambda: _family("Qwen3Config", "Qwen3ForCausalLM", head_dim=16, tie_word_embeddings=True),
    "qwen3_moe": lambda: _family("Qwen3MoeConfig", "Qwen3MoeForCausalLM", head_dim=16, num_experts=4,
                                 num_experts_per_tok=2, moe_intermediate_size=40, decoder_sparse_step=1,  # 16-byte strides for grouped_mm
                                 norm_topk_prob=True),
    "mixtral": lambda: _family("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2,
                                 intermediate_size=88),  # grouped_mm needs 16-byte strides
    "gemma2": lambda: _family("Gemma2Config", "Gemma2ForCausalLM", head_dim=16, query_pre_attn_scalar=16,
                              sliding_window=32, tie_word_embeddings=True),
    "gemma3_text": lambda: _family("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16, query_pre_attn_scalar=16,
                                   sliding_window=32, tie_word_embeddings=True),
    "phi3": lambda: _family("Phi3Config", "Phi3ForCausalLM"),
    "llama3_rope": lambda: _llama(attention_bias=False, **_rope(500000.0, rope_type="llama3", factor=8.0,
                                                                 low_freq_factor=1.0, high_freq_factor=4.0,
                                                                 original_max_position_embeddings=32)),
    "qwen2_critic": lambda: _family("Qwen2Config", "Qwen2ForTokenClassification", num_labels=1),
    "qwen2_5_vl": lambda: _qwen2_5_vl(),
}


def _qwen2_5_vl():
    """Qwen2.5-VL with a 2-block vision tower; image/video token ids inside the tiny vocab."""
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=251, hidden_size=64, intermediate_size=173, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                **_rope(1000000.0, rope_type="default", mrope_section=[2, 3, 3]))
    vision = dict(depth=2, hidden_size=32, intermediate_size=43, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=247, video_token_id=248,
                           vision_start_token_id=245, vision_end_token_id=246, tie_word_embeddings=False,
                           bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return cfg


PRESETS: dict[str, Callable] = {
    "llama": _llama,
    "llama_tied": _llama_tied,
    "olmo2": _olmo2,
    "llama_1b": _llama_1b,
    # dynamic NTK rope: transformers 4.x keeps original_inv_freq as a plain attribute, 5.x as a buffer
    "llama_dynamic_rope": lambda: _llama(**_rope(10000.0, rope_type="dynamic", factor=2.0)),
    **FAMILIES,
}

# Benchmark-only sizes, found by build_config like PRESETS (not in PRESETS: tests iterate over that).
BENCH_PRESETS: dict[str, Callable] = {
    "llama_1b_x2": lambda: _llama_1b(num_hidden_layers=32),  # 2x llama_1b's layers, same widths: 2.21B params
}


# The committed cross-torch fixtures' model (tests/fixtures/torch-*, ckpt_bridge.testing.torch_fixtures): a few KB,
# odd vocab so Shard(0) is uneven on 2 ranks, even widths so Shard(1) applies; found by build_config, not in PRESETS.
FIXTURE_PRESETS: dict[str, Callable] = {
    "llama_micro": lambda: _llama(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32),
}


def build_config(name: str):
    """A fresh ``PretrainedConfig`` for preset ``name`` (``config.architectures`` set)."""
    make = PRESETS.get(name) or BENCH_PRESETS.get(name) or FIXTURE_PRESETS.get(name)
    if make is None:
        raise ValueError(f"unknown tiny model {name!r}; "
                         f"choose from {sorted({**PRESETS, **BENCH_PRESETS, **FIXTURE_PRESETS})}")
    return make()


def build_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """The preset's model with weights that depend only on ``(name of each saved tensor, seed)``: the same
    model, bit for bit, in every process and on every supported transformers version.

    transformers' own random init is not that: its draw order follows the in-memory layout, which differs
    between versions (5.x fuses MoE experts, builds Qwen2.5-VL's rotary modules in another order).  So
    every tensor ``save_pretrained`` writes is re-drawn from a generator seeded by its on-disk name
    (:func:`_redraw`), and the model is loaded back with ``from_pretrained`` (transformers' own load
    conversion refuses nothing it wrote).  The model is built in float32 and then cast, so a bf16 model
    holds exactly ``fp32_model.to(bfloat16)``.  The global torch RNG is left seeded with ``seed`` plus
    whatever transformers' init consumed.
    """
    from transformers.utils import logging as hf_logging

    cfg = build_config(name)
    torch.manual_seed(seed)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the round trip below is ours, not the caller's
    try:
        model = _build_redrawn(cfg, seed)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.config._name_or_path = ""  # not the temporary dir
    if dtype != torch.float32:
        model = model.to(dtype)
        model.config.dtype = dtype
    return model.eval()


def _build_redrawn(cfg, seed: int):
    import tempfile
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_class(cfg)._from_config(cfg, dtype=torch.float32)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            _redraw(Path(tmp), seed, _init_std(cfg))
            return type(model).from_pretrained(tmp, config=cfg, **{_dtype_kwarg(): torch.float32})


def _init_std(cfg) -> float:
    std = getattr(cfg, "initializer_range", None) or getattr(cfg.get_text_config(), "initializer_range", None)
    return float(std or 0.02)


def _dtype_kwarg() -> str:
    from ckpt_bridge.models.hf import dtype_kwarg

    return dtype_kwarg()


def _redraw(directory: Path, seed: int, std: float) -> None:
    """Every saved tensor the init drew at random, re-drawn ``normal(0, std)`` from a generator seeded by its
    on-disk name; constant ones (norm scales, zero biases: the module's own init) are kept."""
    import zlib

    from safetensors.torch import load_file, save_file

    for f in sorted(directory.glob("*.safetensors")):
        tensors = load_file(f)
        for key, t in tensors.items():
            if t.is_floating_point() and t.numel() > 1 and not bool((t == t.flatten()[0]).all()):
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
                tensors[key] = torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=g).to(t.dtype)
        save_file(tensors, f, metadata={"format": "pt"})


def model_class(config):
    """The transformers class ``config.architectures[0]`` names (causal LM, token classification, VLM, ...)."""
    import transformers

    return getattr(transformers, config.architectures[0])


def generation_config_for(config):
    from transformers import GenerationConfig

    text = config.get_text_config()  # a VLM keeps its token ids in text_config (transformers 5)
    return GenerationConfig(
        bos_token_id=getattr(config, "bos_token_id", None) or text.bos_token_id,
        eos_token_id=getattr(config, "eos_token_id", None) or text.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None) or text.pad_token_id,
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
    )


_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny tokenizer for checkpoint tests",
    "fully sharded data parallel saves one file per rank",
    "a model state dict maps parameter names to tensors",
    "reinforcement learning from human feedback with verl",
    "torchtitan trains llama and olmo models with distributed checkpoints",
    "0123456789 + - * / = ( ) [ ] { } < > ! ? . , ; : ' \" # $ % & @ ^ _ ` | ~ \\",
]


def build_tiny_tokenizer(vocab_size: int = 251):
    """A ``PreTrainedTokenizerFast`` (character-level BPE with a few merges), built in memory.

    Deterministic; the vocabulary holds at most ``vocab_size`` tokens, every
    printable ASCII character is covered, and ids 0..3 are
    ``<unk> <s> </s> <pad>``.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    alphabet = sorted(set(string.printable) - set(string.whitespace)) + ["\u2581"]
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} is too small for the {len(alphabet)}-character alphabet")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=128,
    )


def save_tiny_tokenizer(directory, vocab_size: int = 251):
    """Write a working tokenizer (tokenizer.json + tokenizer_config.json ...) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(vocab_size)
    tok.save_pretrained(directory)
    return tok


def save_tiny_hf(directory, name: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0,
                 tokenizer: bool = True, max_shard_size: str | int | None = None):
    """``save_pretrained`` a tiny model (safetensors) + generation config + tokenizer."""
    directory = Path(directory)
    model = build_model(name, dtype=dtype, seed=seed)
    model.generation_config = generation_config_for(model.config)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kw)
    if tokenizer:
        save_tiny_tokenizer(directory, min(model.config.get_text_config().vocab_size, 251))
    return model


__all__ = [
    "BENCH_PRESETS",
    "FAMILIES",
    "FIXTURE_PRESETS",
    "PRESETS",
    "build_config",
    "build_model",
    "build_tiny_tokenizer",
    "generation_config_for",
    "model_class",
    "save_tiny_hf",
    "save_tiny_tokenizer",
]

