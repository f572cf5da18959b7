"""The loss two models are compared on: mean next-token cross-entropy over a
text's tokens.

One window at a time (no padding, no attention mask) so the number does not
depend on batching; per-window sums are accumulated in float64 in a fixed
order; logits are taken in float32 while the model runs in its own dtype.  A
pure function of (weights, text): ``verify --loss`` and the tests use it to put
an HF model and a trainer-loaded model on exactly the same tokens.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _forward_windows(model: torch.nn.Module, windows: list[torch.Tensor]):
    """(ids, float32 per-token outputs) for each window, one forward per window, no_grad and eval mode."""
    device = next(model.parameters()).device
    with torch.no_grad(), _eval_mode(model):
        for w in windows:
            ids = w.to(device)[None]
            yield ids[0], model(input_ids=ids, use_cache=False).logits[0].float()


def windows_loss(model: torch.nn.Module, windows: list[torch.Tensor]) -> float:
    """Token-weighted mean next-token cross-entropy over 1-D windows, one forward per window.

    One window at a time (no padding, no attention mask) so the result does not
    depend on how windows would be batched; per-window sums are accumulated in
    float64 in a fixed order.
    """
    total, count = 0.0, 0
    for ids, logits in _forward_windows(model, [w for w in windows if w.numel() >= 2]):
        total += F.cross_entropy(logits[:-1], ids[1:], reduction="sum").double().item()
        count += ids.shape[0] - 1
    if count == 0:
        raise ValueError("need at least 2 tokens to measure a next-token loss")
    return total / count


def _windows(model: torch.nn.Module, tokenizer, text: str, max_tokens: int, seq_len: int | None) -> list[torch.Tensor]:
    if seq_len is None:
        seq_len = min(256, int(model.config.get_text_config().max_position_embeddings))
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens], dtype=torch.long)
    return list(ids.split(seq_len))


def text_values(model: torch.nn.Module, tokenizer, text: str, max_tokens: int = 2048,
                seq_len: int | None = None) -> torch.Tensor:
    """Per-token outputs ``[tokens, num_labels]`` (float64) of a value / token-classification model on ``text``.

    A critic has no next-token loss: its ``score`` head predicts values, so two
    critics are compared on the values themselves, over the same windows
    ``text_loss`` uses.
    """
    return torch.cat([out.double() for _, out in _forward_windows(model, _windows(model, tokenizer, text,
                                                                                  max_tokens, seq_len))])


def text_loss(model: torch.nn.Module, tokenizer, text: str, max_tokens: int = 2048,
              seq_len: int | None = None) -> float:
    """Mean next-token cross-entropy of causal LM ``model`` on ``text`` (nats per predicted token).

    The first ``max_tokens`` tokens of ``text`` (no bos added) are cut into
    consecutive windows of ``seq_len`` tokens (default
    ``min(256, config.max_position_embeddings)``; the last window may be
    shorter); every predicted position in every window weighs the same.
    Logits are taken in float32, under no_grad and eval mode (restored after).
    The model runs in its own dtype and device.  A pure function of (weights,
    text), so two models can be compared on exactly the same tokens.
    """
    return windows_loss(model, _windows(model, tokenizer, text, max_tokens, seq_len))
