"""After a trainer's checkpoint load: recompute what no checkpoint stores, and
refuse a model whose config is not the one the weights came from.

Non-persistent buffers (rotary ``inv_freq`` / ``original_inv_freq`` and the
like) are never in a state dict, a DCP or a safetensors file.  After the
meta-device build -> ``fully_shard`` -> ``to_empty()`` that flame and
torchtitan use, they hold whatever memory ``to_empty`` handed out, unless
something recomputes them (transformers 4.x and 5.23 ``post_init()`` do not).
Nothing raises: RoPE is simply wrong and the first-step loss is far above the
source model's.  We recompute each one with the model's own code:

- Hugging Face rotary modules: the rope function of the module's own
  ``rope_type`` from ``module.config``, exactly what transformers'
  ``_init_weights`` does on ``from_pretrained``;
- any other module with a ``config``: a fresh instance built from that config
  on CPU, whose constructor computes the buffers;
- anything else is refused by name (we will not guess a buffer's value).

Config parity: a trainer-side config built by hand gives no error, only a
different network (``Olmo2Config`` defaults rope_theta=1e4, rms_norm_eps=1e-5;
the OLMo-2 releases use 5e5 and 1e-6).  We compare the fields that change the
function the weights compute and refuse on any difference.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import BridgeError


class ConfigMismatchError(BridgeError):
    """The trainer's model config differs from the config the weights came from."""


@dataclass
class AfterLoadReport:
    recomputed: list[tuple[str, float]] = field(default_factory=list)  # (buffer, max |old - new|)
    checked: list[str] = field(default_factory=list)  # config fields compared

    def lines(self) -> list[str]:
        out = [f"recomputed {name} (max |change| {d:.3g})" for name, d in self.recomputed]
        out.append(f"config matches on {', '.join(self.checked)}")
        return out


def _parts(model: nn.Module | list[nn.Module]) -> list[nn.Module]:
    return [model] if isinstance(model, nn.Module) else list(model)


# ---------------------------------------------------------------- config parity


def _get(cfg: Any, name: str) -> Any:
    return cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)


def _rope(cfg: Any) -> dict[str, Any]:
    """rope settings as one dict: transformers 5 keeps them in rope_parameters, 4.x in rope_theta/rope_scaling."""
    rp = _get(cfg, "rope_parameters")
    out = dict(rp) if isinstance(rp, dict) else {}
    if "rope_theta" not in out and _get(cfg, "rope_theta") is not None:
        out["rope_theta"] = _get(cfg, "rope_theta")
    scaling = _get(cfg, "rope_scaling")
    if isinstance(scaling, dict):
        out.update({k: v for k, v in scaling.items() if k not in out})
    out.setdefault("rope_type", out.pop("type", "default"))
    return out


def parity_fields(cfg: Any) -> dict[str, Any]:
    """The config fields that change what the weights compute."""
    heads = _get(cfg, "num_attention_heads")
    hidden = _get(cfg, "hidden_size")
    head_dim = _get(cfg, "head_dim") or (hidden // heads if hidden and heads else None)
    rope = _rope(cfg)
    eps = next((_get(cfg, n) for n in ("rms_norm_eps", "layer_norm_eps", "norm_eps") if _get(cfg, n) is not None),
               None)
    tie = _get(cfg, "tie_word_embeddings")
    return {
        "rope_theta": rope.get("rope_theta"),
        "rope_type": rope.get("rope_type"),
        "rope_scaling": {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")} or None,
        "rms_norm_eps": eps,
        "vocab_size": _get(cfg, "vocab_size"),
        "head_dim": head_dim,
        "tie_word_embeddings": bool(tie) if tie is not None else None,
        "hidden_size": hidden,
        "num_hidden_layers": _get(cfg, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": _get(cfg, "num_key_value_heads") or heads,
        "intermediate_size": _get(cfg, "intermediate_size"),
    }


def check_config_parity(model_config: Any, hf_config: Any, *, where: str = "") -> list[str]:
    """Raise :class:`ConfigMismatchError` naming every differing field; return the fields compared."""
    a, b = parity_fields(model_config), parity_fields(hf_config)
    diffs = [f"{k} {a[k]!r} (trainer) vs {b[k]!r}" for k in a if a[k] != b[k]]
    if diffs:
        raise ConfigMismatchError(
            f"the trainer's model config differs from {where or 'the HF config'}: {'; '.join(diffs)}; build the "
            f"trainer model from that config (AutoConfig.from_pretrained) or these weights compute another function"
        )
    return [k for k in a if a[k] is not None]


def load_hf_config(hf_dir: str | Path) -> Any:
    from transformers import AutoConfig

    p = Path(hf_dir)
    if not (p / "config.json").is_file():
        raise BridgeError(f"{p}: no config.json here; pass the Hugging Face model directory the weights came from")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoConfig.from_pretrained(str(p))


# ---------------------------------------------------------------- buffers


def _fresh_buffers(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """Correct values of ``module``'s non-persistent buffers, computed by the model's own code."""
    bufs = sorted(module._non_persistent_buffers_set)
    cfg = getattr(module, "config", None)
    if cfg is not None and hasattr(module, "rope_type") and "inv_freq" in bufs:
        # transformers' own _init_weights branch for rotary modules.
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        fn = (module.compute_default_rope_parameters if module.rope_type == "default"
              and hasattr(module, "compute_default_rope_parameters") else ROPE_INIT_FUNCTIONS[module.rope_type])
        inv_freq, _ = fn(cfg, torch.device("cpu"))
        out = {b: inv_freq for b in bufs if b in ("inv_freq", "original_inv_freq")}
        if len(out) == len(bufs):
            return out
    if cfg is not None:
        try:
            with torch.device("cpu"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fresh = type(module)(cfg)
            return {b: getattr(fresh, b) for b in bufs}
        except Exception as e:  # noqa: BLE001 - say which buffer and why
            raise BridgeError(f"after_load: cannot recompute non-persistent buffer(s) {', '.join(bufs)} of {name} "
                              f"({type(module).__name__}({type(cfg).__name__}) failed: {e})") from None
    raise BridgeError(f"after_load: {name} ({type(module).__name__}) has non-persistent buffer(s) {', '.join(bufs)} "
                      f"and no config to recompute them from; pass recompute=False and set them yourself")


@torch.no_grad()
def recompute_buffers(model: nn.Module | list[nn.Module]) -> list[tuple[str, float]]:
    """Recompute every non-persistent buffer in place; return (name, max |old - new|) for each."""
    done = []
    for part in _parts(model):
        for mod_name, module in part.named_modules():
            names = [b for b in module._non_persistent_buffers_set if getattr(module, b, None) is not None]
            if not names:
                continue
            fresh = _fresh_buffers(mod_name or type(module).__name__, module)
            for b in sorted(names):
                cur = getattr(module, b)
                new = fresh[b].to(device=cur.device, dtype=cur.dtype)
                if cur.shape != new.shape:
                    raise BridgeError(f"after_load: {mod_name}.{b} has shape {tuple(cur.shape)} but its config gives "
                                      f"{tuple(new.shape)}")
                old = cur.detach().double()
                change = float((old - new.double()).abs().nan_to_num(float("inf")).max()) if cur.numel() else 0.0
                cur.copy_(new)
                done.append((f"{mod_name}.{b}" if mod_name else b, change))
    return done


def model_config_of(model: nn.Module | list[nn.Module]) -> Any:
    for part in _parts(model):
        cfg = getattr(part, "config", None)
        if cfg is not None:
            return cfg
    return None


def after_load(model: nn.Module | list[nn.Module], hf_dir: str | Path, *, model_config: Any = None,
               check_config: bool = True, recompute: bool = True) -> AfterLoadReport:
    """Call once after the trainer's checkpoint load (every rank).

    Refuses (:class:`ConfigMismatchError`, one line) when the model's config
    differs from ``hf_dir``'s on rope_theta, rms_norm_eps, vocab, head_dim,
    tie_word_embeddings or the shape fields; then recomputes every
    non-persistent buffer from the model's config.
    """
    from .titan_models import is_titan_model

    if model_config is None and is_titan_model(model):  # TorchTitan's own model code: its config, its buffers
        from .titan_models import titan_after_load

        return titan_after_load(model, hf_dir, check_config=check_config, recompute=recompute)
    report = AfterLoadReport()
    if check_config:
        cfg = model_config if model_config is not None else model_config_of(model)
        if cfg is None:
            raise BridgeError("after_load: the model has no .config; pass model_config= (its HF-style config)")
        report.checked = check_config_parity(cfg, load_hf_config(hf_dir), where=str(Path(hf_dir) / "config.json"))
    if recompute:
        report.recomputed = recompute_buffers(model)
    return report
