"""TorchTitan's own model definitions (``llama3``, ``qwen3``, ...) built from a
Hugging Face config.

TorchTitan 0.3.0 has no "from HF config" path: its models are built from
hand-written *flavors* (``torchtitan.models.llama3.llama3_configs["8B"]``) and
the ``StateDictAdapter`` only renames/permutes weights.  So the one thing we
write per model is the translation HF config -> the arguments of TorchTitan's
own layer builders (``_build_llama3_layers`` ...).  Everything else comes from
TorchTitan: the model class, the ``StateDictAdapter`` (from the model's
``model_registry``), the init functions, the RoPE cache.

The translation is then *checked* the other way: :func:`titan_parity` reads the
built TorchTitan config back under Hugging Face field names and
:func:`~ckpt_bridge.models.after_load.check_config_parity` compares it with the HF
config, so a field we did not map (or mapped wrongly) is a one-line error, not
a silently different network.  ``after_load`` uses the same reading.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from .config_parity import AfterLoadReport, check_config_parity, load_hf_config, rope_settings
from ..errors import BridgeError
from .config_fit import read_fitting_config
from ..plan.state_dict_adapter import to_hf_plan
from ..plan.hf_target import plan_hf_export
from ..writers.side_files import config_dir


class TitanModelError(BridgeError):
    """A TorchTitan model cannot be built for this Hugging Face config."""


@dataclass(frozen=True)
class TitanModelKind:
    """How one TorchTitan model family is built from a Hugging Face config."""

    name: str  # torchtitan.models.<name>
    hf_model_types: tuple[str, ...]  # config.json "model_type" values it accepts
    layers: Callable[[Any, dict], dict]  # (hf_cfg, common kwargs) -> kwargs of the family's layer builder
    builder: str  # the family's own layer builder in torchtitan.models.<name>
    rope: str  # the RoPE config class the family's adapter asserts on
    unsupported: Callable[[Any], list[str]]  # HF features the TorchTitan model does not implement


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    v = getattr(cfg, name, None)
    return default if v is None else v


def _rope_kwargs(hf: Any) -> dict[str, Any]:
    """TorchTitan ``RoPE.Config`` fields for the HF rope settings (theta, llama3 scaling)."""
    r = rope_settings(hf)
    out: dict[str, Any] = {"theta": float(r.get("rope_theta", 10000.0)), "dim": _head_dim(hf),
                           "max_seq_len": int(_get(hf, "max_position_embeddings", 4096))}
    if r.get("rope_type") == "llama3":
        out.update(scaling="llama", scaling_factor=float(r["factor"]), low_freq_factor=float(r["low_freq_factor"]),
                   high_freq_factor=float(r["high_freq_factor"]),
                   original_max_position_embeddings=int(r["original_max_position_embeddings"]))
    elif r.get("rope_type") not in (None, "default"):
        raise TitanModelError(f"rope_type {r.get('rope_type')!r}: TorchTitan's dense models implement default and "
                              f"llama3 rope scaling only")
    return out


def _head_dim(hf: Any) -> int:
    return _get(hf, "head_dim") or hf.hidden_size // hf.num_attention_heads


def _common_unsupported(hf: Any) -> list[str]:
    bad = []
    if _get(hf, "hidden_act", "silu") != "silu":
        bad.append(f"hidden_act={hf.hidden_act!r} (TorchTitan uses silu)")
    for f in ("attention_bias", "mlp_bias"):
        if _get(hf, f, False):
            bad.append(f"{f}=True (TorchTitan's layers have no bias)")
    return bad


def _llama3_layers(hf: Any, common: dict) -> dict:
    return dict(common, hidden_dim=hf.intermediate_size)


def _qwen3_layers(hf: Any, common: dict) -> dict:
    return dict(common, head_dim=_head_dim(hf), hidden_dim=hf.intermediate_size)


def _qwen3_unsupported(hf: Any) -> list[str]:
    bad = _common_unsupported(hf)
    if _get(hf, "use_sliding_window", False):
        bad.append("use_sliding_window=True (TorchTitan's qwen3 attends over the full sequence)")
    return bad


KINDS: dict[str, TitanModelKind] = {
    "llama3": TitanModelKind("llama3", ("llama",), _llama3_layers, "_build_llama3_layers", "ComplexRoPE",
                             _common_unsupported),
    "qwen3": TitanModelKind("qwen3", ("qwen3",), _qwen3_layers, "_build_qwen3_layers", "CosSinRoPE",
                            _qwen3_unsupported),
}


def kind_of(name: str) -> TitanModelKind:
    if name not in KINDS:
        raise TitanModelError(f"--titan-model {name!r}: ckpt-bridge builds {', '.join(KINDS)} from a Hugging Face "
                              f"config; for another TorchTitan model pass model= and sd_adapter= from Python")
    return KINDS[name]


def _module(name: str) -> Any:
    try:
        return importlib.import_module(f"torchtitan.models.{name}")
    except ImportError as e:
        raise TitanModelError(f"--titan-model {name}: cannot import torchtitan.models.{name} ({e}); torchtitan 0.3.0 "
                              f"models need triton (pip install triton)") from None


def _hf_config(hf_dir: str | Path) -> Any:

    return load_hf_config(hf_dir)


def _set_norm_eps(cfg: Any, eps: float, norm_cls: type) -> None:
    """Every RMSNorm config in the tree gets the HF eps (the families' builders hard-code theirs)."""
    if isinstance(cfg, norm_cls):
        cfg.eps = eps
        return
    if isinstance(cfg, list):
        for c in cfg:
            _set_norm_eps(c, eps, norm_cls)
    elif dataclasses.is_dataclass(cfg):
        for f in dataclasses.fields(cfg):
            _set_norm_eps(getattr(cfg, f.name), eps, norm_cls)


def titan_config(name: str, hf: Any, *, attn_backend: str = "flex") -> Any:
    """The TorchTitan model config of family ``name`` for HF config ``hf``, checked field by field."""
    kind = kind_of(name)
    if hf.model_type not in kind.hf_model_types:
        raise TitanModelError(f"--titan-model {name}: the HF config is model_type {hf.model_type!r}; {name} is built "
                              f"from {', '.join(kind.hf_model_types)} configs")
    bad = kind.unsupported(hf)
    if bad:
        raise TitanModelError(f"--titan-model {name}: the HF config uses {'; '.join(bad)}; the TorchTitan model would "
                              f"compute another function")
    mod = _module(name)
    from torchtitan.models.common import Embedding, Linear
    from torchtitan.models.common import rope as rope_mod
    from torchtitan.models.common.nn_modules import RMSNorm

    spec = mod.model_registry(next(iter(getattr(mod, f"{name}_configs"))))
    config_cls = type(spec.model)
    rope = getattr(rope_mod, kind.rope).Config(**_rope_kwargs(hf))
    common = dict(n_layers=hf.num_hidden_layers, dim=hf.hidden_size, n_heads=hf.num_attention_heads,
                  n_kv_heads=_get(hf, "num_key_value_heads", hf.num_attention_heads), rope=rope,
                  attn_backend=attn_backend)
    layers = getattr(mod, kind.builder)(**kind.layers(hf, common))
    # Init functions do not matter (every weight is loaded); the family's own are used where the builder sets them.
    cfg = config_cls(
        dim=hf.hidden_size, vocab_size=hf.vocab_size,
        enable_weight_tying=bool(_get(hf, "tie_word_embeddings", False)),
        tok_embeddings=Embedding.Config(num_embeddings=hf.vocab_size, embedding_dim=hf.hidden_size),
        norm=RMSNorm.Config(normalized_shape=hf.hidden_size),
        lm_head=Linear.Config(in_features=hf.hidden_size, out_features=hf.vocab_size),
        layers=layers,
    )  # fmt: skip
    _set_norm_eps(cfg, float(hf.rms_norm_eps), RMSNorm.Config)

    try:
        check_config_parity(titan_parity(cfg), hf, where="the HF config")
    except BridgeError as e:
        raise TitanModelError(f"--titan-model {name}: the TorchTitan config built for this HF config differs: {e}") \
            from None
    return cfg


def titan_parity(cfg: Any) -> dict[str, Any]:
    """A TorchTitan decoder config read under Hugging Face field names (what the weights' function depends on)."""
    attn = cfg.layers[0].attention
    rope = attn.rope
    params: dict[str, Any] = {"rope_theta": rope.theta, "rope_type": "default"}
    if rope.scaling == "llama":
        params.update(rope_type="llama3", factor=rope.scaling_factor, low_freq_factor=rope.low_freq_factor,
                      high_freq_factor=rope.high_freq_factor,
                      original_max_position_embeddings=rope.original_max_position_embeddings)
    elif rope.scaling != "none":
        params.update(rope_type=rope.scaling)
    ffn = cfg.layers[0].feed_forward
    return {
        "rope_parameters": params,
        "rms_norm_eps": cfg.norm.eps,
        "vocab_size": cfg.vocab_size,
        "head_dim": attn.head_dim or cfg.dim // attn.n_heads,
        "tie_word_embeddings": cfg.enable_weight_tying,
        "hidden_size": cfg.dim,
        "num_hidden_layers": len(cfg.layers),
        "num_attention_heads": attn.n_heads,
        "num_key_value_heads": attn.n_kv_heads or attn.n_heads,
        "intermediate_size": ffn.w1.out_features if ffn is not None else None,
    }


def is_titan_model(model: nn.Module | list[nn.Module]) -> bool:
    """A model (or model parts) built from TorchTitan's own model code."""
    parts = [model] if isinstance(model, nn.Module) else list(model)
    # By class origin first: an HF model's after_load must not import torchtitan (seconds, and maybe absent).
    if not any(c.__module__.startswith("torchtitan.") for p in parts for c in type(p).__mro__):
        return False
    from torchtitan.protocols.model import BaseModel

    return any(isinstance(p, BaseModel) for p in parts)


@dataclass
class TitanModel:
    """A TorchTitan model family built for one HF config: its config, meta model and StateDictAdapter."""

    name: str
    config: Any
    adapter: Any

    def build(self, device: str = "meta") -> nn.Module:
        import torch

        with torch.device(device), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.config.build()


def titan_model(name: str, hf_dir: str | Path, *, attn_backend: str = "flex") -> TitanModel:
    """``name`` (``llama3``, ``qwen3``) built for the HF model dir ``hf_dir``: config, adapter (meta model on demand)."""
    hf = _hf_config(hf_dir)
    cfg = titan_config(name, hf, attn_backend=attn_backend)
    mod = _module(name)
    spec = mod.model_registry(next(iter(getattr(mod, f"{name}_configs"))))
    adapter_cls = spec.state_dict_adapter
    if adapter_cls is None:
        raise TitanModelError(f"--titan-model {name}: torchtitan registers no StateDictAdapter for it")
    return TitanModel(name, cfg, adapter_cls(cfg, None))


def recorded_titan_model(reader: Any) -> str | None:
    """The TorchTitan model a to-dcp manifest says the checkpoint was written for."""
    m = reader.manifest()
    return (m or {}).get("titan_model")


# ---------------------------------------------------------------- what built a DCP, recorded and found again


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _registered_adapter(name: str) -> type | None:
    mod = _module(name)
    return mod.model_registry(next(iter(getattr(mod, f"{name}_configs")))).state_dict_adapter


def _model_config(model: Any) -> Any:
    parts = [model] if isinstance(model, nn.Module) else list(model or [])
    return next((p.config for p in parts if dataclasses.is_dataclass(getattr(p, "config", None))), None)


def adapter_record(sd_adapter: Any, model: Any, hf_dir: str | Path) -> dict[str, Any]:
    """What the manifest says about a ``model=`` + ``sd_adapter=`` conversion: the adapter's class, the model
    args its ``to_hf`` needs (the model config under HF names), and the ``--titan-model`` family that rebuilds
    the same adapter from the HF config, when one does (``family`` None: none does)."""
    cfg = _model_config(model)
    rec: dict[str, Any] = {"class": _qualname(type(sd_adapter)),
                           "model_config": titan_parity(cfg) if cfg is not None else None, "family": None}
    if cfg is None:
        return rec
    hf = _hf_config(hf_dir)
    for name, kind in KINDS.items():
        if hf.model_type not in kind.hf_model_types:
            continue
        try:
            if type(sd_adapter) is not _registered_adapter(name):
                continue

            check_config_parity(titan_parity(cfg), hf, where="the HF config")  # the same function: same adapter
        except Exception:  # noqa: BLE001 - not this family (or another config): nothing to rebuild from
            continue
        rec["family"] = name
    return rec


def working_titan_model(reader: Any, cfg_dir: str | Path | None) -> str | None:
    """The ``--titan-model`` whose adapter maps ``reader``'s keys onto the HF class, if one does (for errors)."""
    if cfg_dir is None:
        return None

    try:
        hf = _hf_config(cfg_dir)
    except Exception:  # noqa: BLE001 - the caller reports the config itself
        return None
    for name, kind in KINDS.items():
        if hf.model_type not in kind.hf_model_types:
            continue
        try:
            names = to_hf_plan(reader, titan_model(name, cfg_dir).adapter)
            plan_hf_export(names.targets(), Path(cfg_dir), where=str(reader.path))
        except Exception:  # noqa: BLE001 - this family's adapter does not fit these keys
            continue
        return name
    return None


def unrebuilt_adapter(reader: Any, cfg_dir: Path, m: dict) -> TitanModelError:
    """The manifest names an adapter that ckpt-bridge cannot rebuild by itself: what to pass instead."""
    rec = m.get("titan_adapter") if isinstance(m.get("titan_adapter"), dict) else {}
    named = [x.group(1) for n in m.get("notes", []) if isinstance(n, str)
             for x in [re.search(r"(\w+StateDictAdapter)\.from_hf", n)] if x]
    what = rec.get("class") or (named[0] if named else "a TorchTitan StateDictAdapter")
    name = working_titan_model(reader, cfg_dir)
    how = (f"pass --titan-model {name}" if name else
           f"none of --titan-model {', '.join(KINDS)} maps its keys: convert it from Python with that model's "
           f"own adapter (its to_hf)")
    return TitanModelError(f"{reader.path}: written through {what} (model=/sd_adapter=), which the manifest does "
                           f"not name a --titan-model for; {how}")


def adapter_in_manifest(m: dict | None) -> bool:
    """The to-dcp manifest says the weights went through a StateDictAdapter (also manifests before
    ``titan_adapter`` existed: their plan notes name ``<Adapter>.from_hf``)."""
    if not m:
        return False
    notes = m.get("notes") if isinstance(m.get("notes"), list) else []
    return bool(m.get("titan_adapter")) or any(isinstance(n, str) and "StateDictAdapter.from_hf" in n for n in notes)


def native_titan_model(reader: Any, cfg_dir: Path | None) -> str:
    """The TorchTitan family whose ``StateDictAdapter`` names ``reader``'s native keys: of the families built
    from the config's ``model_type`` (``KINDS``), the one whose ``to_hf`` maps every key onto the HF class."""
    reader.check()  # a damaged save is its own one-line error, not "no family maps these keys"
    if cfg_dir is None:
        raise TitanModelError(f"{reader.path}: holds a TorchTitan model's own weights ({reader.format}) and no Hugging "
                              f"Face config; pass --config HF_DIR (the model the run started from)")
    name = working_titan_model(reader, cfg_dir)
    if name is None:
        raise TitanModelError(f"{reader.path}: holds TorchTitan-native keys, but the adapter of none of "
                              f"{', '.join(KINDS)} maps them onto the model of {Path(cfg_dir) / 'config.json'}; "
                              f"pass the config the run started from, or --titan-model NAME")
    return name


def hf_names(reader: Any, config: str | Path | None, titan_model_name: str | None) -> Any:
    """The plan naming ``reader``'s tensors as Hugging Face's when it holds a TorchTitan model's own names
    (to be composed with the HF export's plan), else None.

    The model is ``titan_model_name`` or the one the to-dcp manifest recorded;
    its config is built from the HF config (``config``, or the manifest's
    source dir), and its adapter's ``to_hf`` is applied as plan transforms.
    """
    name = titan_model_name or recorded_titan_model(reader)
    if name is None:
        m = reader.manifest()
        if adapter_in_manifest(m):
            cfg_dir, _ = config_dir(reader, config)
            raise unrebuilt_adapter(reader, cfg_dir, m)
        if getattr(reader, "key_names", "hf") != "titan":
            return None
    cfg_dir, _ = config_dir(reader, config)
    if name is None:  # the reader's format holds TorchTitan-native keys (verl's TorchTitan engine, ...)
        name = native_titan_model(reader, cfg_dir)
    if cfg_dir is None:
        raise TitanModelError(f"{reader.path}: holds TorchTitan {name} weights; pass --config HF_DIR (the Hugging "
                              f"Face config they follow) so its adapter can name them")

    read_fitting_config(cfg_dir, reader.tensors())  # before the config is parsed and the model built
    return to_hf_plan(reader, titan_model(name, cfg_dir).adapter)


# ---------------------------------------------------------------- after the trainer's load


def _buffer_owners(parts: list[nn.Module]) -> list[tuple[str, nn.Module]]:
    """TorchTitan modules that compute their own non-persistent buffers (RoPE caches, MoE counters)."""
    from torchtitan.protocols.module import Module

    return [(name, m) for p in parts for name, m in p.named_modules()
            if isinstance(m, Module) and type(m)._init_self_buffers is not Module._init_self_buffers
            and any(b in m._non_persistent_buffers_set for b in m._buffers)]


def titan_after_load(model: nn.Module | list[nn.Module], hf_dir: str | Path, *, check_config: bool = True,
                     recompute: bool = True) -> Any:
    """``after_load`` for a TorchTitan model: config parity under mapped field names, buffers by its own code.

    The config check reads the model's TorchTitan config under HF names
    (:func:`titan_parity`: ``rope.theta`` -> ``rope_theta``, ``norm.eps`` ->
    ``rms_norm_eps``, ...).  The RoPE cache (and any other non-persistent
    buffer) is recomputed by the module's own ``_init_self_buffers`` -- what
    ``init_states`` does after ``to_empty`` -- without touching a parameter.
    """
    import torch


    parts = [model] if isinstance(model, nn.Module) else list(model)
    report = AfterLoadReport()
    if check_config:
        cfg = next((p.config for p in parts if getattr(p, "config", None) is not None), None)
        if cfg is None:
            raise BridgeError("after_load: the TorchTitan model has no .config to check against the HF config")
        report.checked = check_config_parity(titan_parity(cfg), load_hf_config(hf_dir),
                                             where=str(Path(hf_dir) / "config.json"))
    if recompute:
        with torch.no_grad():
            for name, m in _buffer_owners(parts):
                names = [b for b in m._buffers if b in m._non_persistent_buffers_set]
                old = {b: m._buffers[b].detach().clone() for b in names}
                m._init_self_buffers(buffer_device=next(iter(old.values())).device)
                for b in names:
                    new = m._buffers[b]
                    o = old[b]
                    change = (float((o.to(new.dtype) - new).abs().double().nan_to_num(float("inf")).max())
                              if o.shape == new.shape and o.numel() else float("inf") if o.shape != new.shape else 0.0)
                    report.recomputed.append((f"{name}.{b}" if name else b, change))
    return report


class HFStyleLM(nn.Module):
    """A TorchTitan decoder called like a transformers causal LM (``model(input_ids=...).logits``).

    So one loss function (:func:`ckpt_bridge.checks.loss.text_loss`) puts the HF model
    and the TorchTitan model on exactly the same tokens.  Positions are
    0..L-1 in one document: the causal mask TorchTitan's own
    ``get_attention_masks`` builds for it.
    """

    def __init__(self, model: nn.Module, hf_config: Any):
        super().__init__()
        self.model, self.config = model, hf_config

    def get_output_embeddings(self) -> nn.Module:
        """The LM head (TorchTitan calls it ``output``): marks this as a language model, not a critic."""
        return getattr(self.model, "output", self.model)

    def forward(self, input_ids, use_cache: bool = False):  # noqa: ARG002 - the HF signature
        import torch
        from types import SimpleNamespace

        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return SimpleNamespace(logits=self.model(input_ids, attention_masks=self.model.get_attention_masks(positions)))
