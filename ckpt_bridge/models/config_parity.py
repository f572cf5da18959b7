"""Config parity: the config fields that change the function a model's weights compute, compared between the
trainer's model config and the HF config the weights came from (a config built by hand gives no error, only a
different network: ``Olmo2Config`` defaults rope_theta=1e4, rms_norm_eps=1e-5, the OLMo-2 releases use 5e5 and
1e-6). Shared by the HF-model path (:mod:`ckpt_bridge.models.after_load`) and the TorchTitan one
(:mod:`ckpt_bridge.models.titan`), so neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BridgeError
from .hf import load_config


class ConfigMismatchError(BridgeError):
    """The trainer's model config differs from the config the weights came from."""


@dataclass
class AfterLoadReport:
    recomputed: list[tuple[str, float]] = field(default_factory=list)  # (buffer, max |old - new|)
    checked: list[str] = field(default_factory=list)  # config fields compared
    retied: list[list[str]] = field(default_factory=list)  # parameter names made one tensor again

    def lines(self) -> list[str]:
        out = [f"recomputed {name} (max |change| {d:.3g})" for name, d in self.recomputed]
        out += [f"re-tied {' = '.join(g)}" for g in self.retied]
        out.append(f"config matches on {', '.join(self.checked)}")
        return out



def config_field(cfg: Any, name: str) -> Any:
    """``cfg.name`` of a config object or a config dict (None when absent)."""
    return cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)


def rope_settings(cfg: Any) -> dict[str, Any]:
    """rope settings as one dict: transformers 5 keeps them in rope_parameters, 4.x in rope_theta/rope_scaling."""
    rp = config_field(cfg, "rope_parameters")
    out = dict(rp) if isinstance(rp, dict) else {}
    if "rope_theta" not in out and config_field(cfg, "rope_theta") is not None:
        out["rope_theta"] = config_field(cfg, "rope_theta")
    scaling = config_field(cfg, "rope_scaling")
    if isinstance(scaling, dict):
        out.update({k: v for k, v in scaling.items() if k not in out})
    out.setdefault("rope_type", out.pop("type", "default"))
    return out


def parity_fields(cfg: Any) -> dict[str, Any]:
    """The config fields that change what the weights compute (of the text model, for a VLM)."""
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    # flash-linear-attention's configs (flame's models) call the head count num_heads
    heads = config_field(cfg, "num_attention_heads") or config_field(cfg, "num_heads")
    hidden = config_field(cfg, "hidden_size")
    head_dim = config_field(cfg, "head_dim") or (hidden // heads if hidden and heads else None)
    rope = rope_settings(cfg)
    eps = next((config_field(cfg, n) for n in ("rms_norm_eps", "layer_norm_eps", "norm_eps") if config_field(cfg, n) is not None),
               None)
    tie = config_field(cfg, "tie_word_embeddings")
    return {
        "rope_theta": rope.get("rope_theta"),
        "rope_type": rope.get("rope_type"),
        "rope_scaling": {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")} or None,
        "rms_norm_eps": eps,
        "vocab_size": config_field(cfg, "vocab_size"),
        "head_dim": head_dim,
        "tie_word_embeddings": bool(tie) if tie is not None else None,
        "hidden_size": hidden,
        "num_hidden_layers": config_field(cfg, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": config_field(cfg, "num_key_value_heads") or heads,
        "intermediate_size": config_field(cfg, "intermediate_size"),
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
    p = Path(hf_dir)
    if not (p / "config.json").is_file():
        raise BridgeError(f"{p}: no config.json here; pass the Hugging Face model directory the weights came from")
    return load_config(p)
