"""A tiny OLMo-2 model that has actually been trained, built from a config only (never the hub).

Why: a randomly initialised model has a loss of about ln(vocab) whether its
tensors are in the right place or not, so a conversion that scrambles weights
looks exactly as good as one that preserves them.  A model trained for a few
seconds on ``data/corpus.txt`` (original prose shipped with the package) sits
far below that, so ``text_loss`` before and after a conversion is a loud check.

Pieces:

* ``build_byte_tokenizer()``: byte-level tokenizer, token id == byte value,
  plus ``<s>``=256, ``</s>``=257, ``<pad>``=258; built offline.
* ``olmo2_config()``: OLMo-2 architecture at toy size (vocab 259).
* ``train_model()`` / ``train_tiny_olmo2(out_dir)``: deterministic CPU/fp32
  training (in memory / then ``save_pretrained`` (safetensors) + tokenizer +
  ``training.json``).
* ``text_loss(model, tokenizer, text)``: mean next-token loss, a pure
  function of (weights, text), for comparing two models on the same tokens.

CLI: ``python -m ckpt_bridge.testing.tiny_olmo2 --out DIR [--steps N] [--seed S]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from ckpt_bridge.checks.loss import text_loss, windows_loss  # noqa: F401 - the library's loss, re-exported

if TYPE_CHECKING:
    from transformers import Olmo2Config, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259
CORPUS_PATH = Path(__file__).resolve().parent / "data" / "corpus.txt"

# Evaluation windows: fixed (no randomness) so the reported loss depends on the weights only.
_EVAL_WINDOWS = 32


__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "VOCAB_SIZE",
    "build_byte_tokenizer",
    "corpus_batches",
    "corpus_text",
    "corpus_tokens",
    "eval_windows",
    "olmo2_config",
    "save_trained",
    "text_loss",
    "train_model",
    "train_tiny_olmo2",
]


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode map, the alphabet ByteLevel pre-tokenization emits."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A ``transformers.PreTrainedTokenizerFast`` whose token id is the byte value (0..255).

    BPE with the 256 byte-level symbols as vocabulary and no merges, so every
    byte is its own token; ``<s>``=256 (bos), ``</s>``=257 (eos), ``<pad>``=258.
    No bos/eos is added automatically: ``tok("Hi")["input_ids"] == list(b"Hi")``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sym = _bytes_to_unicode()
    vocab = {sym[b]: b for b in range(256)}  # id == byte value
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Added after the 256 byte symbols, in this order, so they get ids 256, 257, 258.
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,  # decode must give back the exact text
    )
    assert (out.bos_token_id, out.eos_token_id, out.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    return out


def olmo2_config() -> Olmo2Config:
    """The tiny_models OLMo-2 preset (release rope theta / norm eps) with the byte vocabulary and 256 positions."""
    from .tiny_models import PRESETS

    return PRESETS["olmo2"](vocab_size=VOCAB_SIZE, max_position_embeddings=256, bos_token_id=BOS_ID,
                            eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def corpus_text() -> str:
    """The training corpus shipped with the package (ASCII English prose, ~15 KB)."""
    return CORPUS_PATH.read_text(encoding="ascii")


def corpus_tokens(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The whole corpus as a 1-D int64 tensor of token ids (no bos/eos)."""
    return torch.tensor(tokenizer(corpus_text())["input_ids"], dtype=torch.long)


def corpus_batches(tokenizer: PreTrainedTokenizerBase, seq_len: int, batch_size: int = 16,
                   num_batches: int | None = None, seed: int = 0) -> Iterator[torch.Tensor]:
    """Yield ``[batch_size, seq_len]`` int64 windows at random offsets of the corpus tokens.

    Offsets come from a private ``torch.Generator`` seeded with ``seed``, so the
    stream is reproducible and never touches (or is disturbed by) the global RNG.
    Infinite when ``num_batches`` is None.
    """
    ids = corpus_tokens(tokenizer)
    n_starts = ids.numel() - seq_len + 1
    if n_starts < 1:
        raise ValueError(f"seq_len {seq_len} is longer than the corpus ({ids.numel()} tokens)")
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len)
    i = 0
    while num_batches is None or i < num_batches:
        starts = torch.randint(0, n_starts, (batch_size,), generator=gen)
        yield ids[starts[:, None] + offsets]
        i += 1


def eval_windows(tokenizer: PreTrainedTokenizerBase, seq_len: int, count: int = _EVAL_WINDOWS) -> torch.Tensor:
    """``[count, seq_len]`` windows at evenly spaced corpus offsets: the fixed evaluation set."""
    ids = corpus_tokens(tokenizer)
    last = ids.numel() - seq_len
    if last < 0:
        raise ValueError(f"seq_len {seq_len} is longer than the corpus ({ids.numel()} tokens)")
    starts = torch.linspace(0, last, count).round().long()
    return ids[starts[:, None] + torch.arange(seq_len)]


@contextlib.contextmanager
def _torch_threads(n: int | None):
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def train_model(steps: int = 300, seed: int = 0, seq_len: int = 256, batch_size: int = 4, lr: float = 3e-3,
                num_threads: int | None = 1) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, dict]:
    """Train ``Olmo2ForCausalLM`` (``from_config(olmo2_config())``) on the corpus, in memory.

    Returns ``(model, tokenizer, info)``; the model is in eval mode, ``info`` is
    what ``train_tiny_olmo2`` writes as ``training.json`` (``initial_loss`` and
    ``final_loss`` are mean next-token losses on ``eval_windows(tokenizer, seq_len)``).

    Deterministic: seeded init, data offsets from a private generator, fp32 on
    CPU, so the same arguments give bit-identical weights.  ``num_threads``
    is the torch intra-op thread count while training (1 is the fastest at this
    size; None keeps the current one); it and the global torch RNG state are
    restored afterwards.  AdamW, linear warmup then cosine decay to lr/10.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    t0 = time.perf_counter()
    tokenizer = build_byte_tokenizer()
    evals = list(eval_windows(tokenizer, seq_len))
    warmup = max(1, min(20, steps // 10))

    # fork_rng: seeding for the init must not leak into the caller's RNG stream.
    with torch.random.fork_rng(devices=[]), _torch_threads(num_threads):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(olmo2_config(), dtype=torch.float32)
        initial = windows_loss(model, evals)
        # Weight decay on matrices only, the usual recipe (norm gains stay at their scale).
        params = list(model.named_parameters())
        opt = torch.optim.AdamW([{"params": [p for _, p in params if p.dim() >= 2], "weight_decay": 0.01},
                                 {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0}],
                                lr=lr, betas=(0.9, 0.95), eps=1e-8, foreach=False)
        model.train()
        batches = corpus_batches(tokenizer, seq_len, batch_size, num_batches=steps, seed=seed)
        for step, batch in enumerate(batches):
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, steps, lr, warmup)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        model.eval()
        final = windows_loss(model, evals)

    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    info = {
        "steps": steps,
        "seed": seed,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup,
        "eval_windows": len(evals),
        "initial_loss": initial,
        "final_loss": final,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return model, tokenizer, info


def save_trained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, info: dict,
                 out_dir: str | Path) -> Path:
    """``save_pretrained`` model (safetensors) and tokenizer into ``out_dir``, plus ``training.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def train_tiny_olmo2(out_dir: str | Path, steps: int = 300, seed: int = 0, seq_len: int = 256,
                     batch_size: int = 4, lr: float = 3e-3, num_threads: int | None = 1) -> dict:
    """``train_model(...)`` then ``save_trained(...)`` into ``out_dir``; returns the ``training.json`` dict.

    ``out_dir`` gets ``config.json``, ``generation_config.json``,
    ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json`` and
    ``training.json`` (steps, seed, hyper-parameters, initial/final loss,
    seconds).  About 10 s for the default 300 steps on one CPU core.
    """
    t0 = time.perf_counter()
    model, tokenizer, info = train_model(steps=steps, seed=seed, seq_len=seq_len, batch_size=batch_size, lr=lr,
                                         num_threads=num_threads)
    info["seconds"] = round(time.perf_counter() - t0, 3)  # include the save
    save_trained(model, tokenizer, info, out_dir)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ckpt_bridge.testing.tiny_olmo2",
                                description="Train the tiny OLMo-2 test model on the bundled corpus and save it.")
    p.add_argument("--out", required=True, help="output directory (HF save_pretrained layout)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    info = train_tiny_olmo2(args.out, steps=args.steps, seed=args.seed)
    print(f"initial loss {info['initial_loss']:.4f}  final loss {info['final_loss']:.4f}  "
          f"(ln {VOCAB_SIZE} = {math.log(VOCAB_SIZE):.4f})  {info['seconds']:.1f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

