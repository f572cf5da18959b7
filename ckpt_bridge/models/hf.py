"""Loading a Hugging Face model dir the way its config says, on every supported transformers version.

``verify --logits`` and ``verify --loss`` must run the model the weights are
for: the class ``config.architectures`` names (causal LM, image-text-to-text,
token classification for a verl critic), not ``AutoModelForCausalLM`` (which
refuses a VLM config and puts a random ``lm_head`` on a critic).  A load that
leaves any weight to a fresh random init is refused: comparing two random
heads says nothing about the checkpoints.
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BridgeError
from ..quiet import quieted
from ..jsonfiles import cache_root, cached_json, transformers_version
from .config_fit import read_fitting_config
from .custom_code import forward_needs_gpu, model_class_named
from ..formats.hf import HFReader


def quiet_transformers():
    """transformers' warnings and log lines silenced while a config is parsed or a model built from it.

    Our report is one line: a config transformers dislikes (``vocab_size`` 0, a pad id outside the
    vocabulary) made it log "This may result in unexpected behavior" lines before our error, and a fine
    one logs notes about defaults.  What matters is refused by us, in one line, before (see
    :mod:`ckpt_bridge.models.config_fit`) or after (the key plan) transformers runs."""
    return quieted("transformers")


def dtype_kwarg() -> str:
    """``dtype=`` came in transformers 4.56; older versions take ``torch_dtype=``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def architecture_class(config: Any) -> type:
    """The transformers class ``config.architectures[0]`` names; ``AutoModelForCausalLM`` if it names none."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    # transformers' own class, or one an imported package / trusted auto_map code registered with its Auto classes
    cls = model_class_named(archs[0], config) if archs else None
    if cls is None and archs:
        raise BridgeError(f"config.json names architecture {archs[0]!r}, which transformers "
                          f"{transformers.__version__} does not have and no imported package registered; pass "
                          f"--custom-import MODULE for the package that defines it, or fix config.json")
    return cls or transformers.AutoModelForCausalLM


def check_runnable(cls: type) -> None:
    """Refuse, in one line, to run a model whose forward cannot run on this machine (fla's GPU kernels)."""
    why = forward_needs_gpu(cls)
    if why:
        raise BridgeError(why)


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _config_class(model_type: Any) -> type | None:
    """The installed transformers' config class for ``model_type`` (``None`` if it has none)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type] if isinstance(model_type, str) else None
    except KeyError:
        return None


def _popped_rope_kwargs(cls: type) -> list[str]:
    """The legacy (4.x) key names a 5.x config class still accepts when reading rope settings: the names its
    ``convert_rope_params_to_dict`` pops (e.g. Gemma 3's ``rope_local_base_freq``)."""
    import inspect
    import re

    fn = getattr(cls, "convert_rope_params_to_dict", None)
    try:
        src = inspect.getsource(fn) if fn is not None else ""
    except (OSError, TypeError):
        return []
    names = re.findall(r"""kwargs\.pop\(\s*["'](\w+)["']""", src)
    return [n for n in dict.fromkeys(names) if n not in ("rope_scaling", "rope_theta", "partial_rotary_factor")]


@functools.lru_cache(maxsize=None)
def _per_layer_theta_names(model_type: str) -> dict[str, str]:
    """``{layer_type: legacy key}`` for a config class with one rope per layer type: which legacy key the
    class's own reading puts into which layer type's ``rope_theta`` (found by feeding it a sentinel)."""
    cls = _config_class(model_type)
    out: dict[str, str] = {}
    for name in _popped_rope_kwargs(cls) if cls is not None else []:
        sentinel = 12345.25
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rp = cls(**{name: sentinel}).rope_parameters
        except Exception:  # a class that cannot be built from defaults: nothing learnt, nothing written
            continue
        out.update({lt: name for lt, v in (rp or {}).items() if isinstance(v, dict) and v.get("rope_theta") == sentinel})
    return out


def _alias_fields(cfg: dict) -> dict:
    """The config class's ``attribute_map`` aliases, written beside the attributes they name.

    transformers 5 renamed fields and keeps the old name as an alias (Qwen3-MoE / Mixtral ``num_experts`` ->
    ``num_local_experts``) but writes only the new one; 4.57 reads only the old one (Qwen3-MoE: default 128
    experts).  Writing the alias too is read the same by both: an alias sets the attribute it names."""
    cls = _config_class(cfg.get("model_type"))
    amap = getattr(cls, "attribute_map", None) or {}
    return {alias: cfg[target] for alias, target in amap.items()
            if target in cfg and alias not in cfg and not alias.endswith("_config")}


def legacy_rope_fields(cfg: dict) -> dict:
    """``rope_theta`` / ``rope_scaling`` (what transformers 4.x reads) from a transformers 5 ``rope_parameters``.

    5.x writes ``rope_parameters`` (sometimes with ``rope_theta: null`` beside it); 4.x ignores it and
    silently uses rope_theta 10000 (or crashes on null).  5.x reads the legacy fields too (``rope_scaling``
    wins over ``rope_parameters``, so both must say the same).  Per-layer-type parameters (Gemma 3:
    ``{"full_attention": {...}, "sliding_attention": {...}}``) give the full-attention values, which is what
    4.x's global rope fields mean, and the other layer types' theta under the legacy key the config class
    maps to them (Gemma 3: ``rope_local_base_freq``).  Fields ``cfg`` already sets (not null) are kept.
    """
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict) or cfg.get("rope_theta") is not None:
        return {}
    out: dict[str, Any] = {}
    if rp.get("rope_theta") is None and isinstance(rp.get("full_attention"), dict):
        names = _per_layer_theta_names(cfg.get("model_type"))
        out.update({names[lt]: v["rope_theta"] for lt, v in rp.items() if lt in names and isinstance(v, dict)
                    and v.get("rope_theta") is not None and cfg.get(names[lt]) is None})
        rp, nested = rp["full_attention"], True
    else:
        nested = False
    if rp.get("rope_theta") is None:
        return out
    out["rope_theta"] = rp["rope_theta"]
    scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if "partial_rotary_factor" in rp and "partial_rotary_factor" not in cfg:
        out["partial_rotary_factor"] = rp["partial_rotary_factor"]
    # 5.x writes a per-layer rope_scaling that 4.x takes as one global scaling: replace it
    if "rope_scaling" not in cfg or nested:
        out["rope_scaling"] = None if scaling in ({}, {"rope_type": "default"}) else scaling
    return out


def with_legacy_fields(cfg: dict) -> dict:
    """``cfg`` (and its sub-configs: text_config, vision_config, ...) read the same by transformers 4.x and 5.x:
    legacy rope fields beside ``rope_parameters`` and the old names of renamed fields beside the new ones.

    The answer depends only on ``cfg`` and the transformers version, and finding it imports transformers
    (about a second, paid after the weights are written): it is cached per (cfg, version)."""
    import hashlib
    import json

    key = json.dumps(cfg, sort_keys=True).encode() + (transformers_version() or "unknown").encode()
    return cached_json(cache_root() / "legacy-config" / f"{hashlib.sha256(key).hexdigest()[:32]}.json",
                       lambda: _with_legacy_fields(cfg), lambda v: isinstance(v, dict))


def _with_legacy_fields(cfg: dict) -> dict:
    out = {k: _with_legacy_fields(v) if isinstance(v, dict) and k.endswith("_config") else v for k, v in cfg.items()}
    out.update(_alias_fields(out))
    out.update(legacy_rope_fields(out))
    return out


def _init_params(cls: type) -> set[str]:
    """Every key ``cls`` (and its bases) takes by name, aliases included."""
    import inspect

    names = set(getattr(cls, "attribute_map", None) or {})
    for c in cls.__mro__:
        if "__init__" in vars(c):
            names |= set(inspect.signature(c.__init__).parameters)
    return names


_BOOKKEEPING = {"model_type", "transformers_version", "rope_parameters", "dtype", "torch_dtype"}


def foreign_fields(cfg: dict) -> list[str]:
    """Fields of ``cfg`` the installed config class does not take and that carry a setting (not off / empty)
    no field it takes repeats: in a config written by the other transformers major, renamed or new fields
    this version may silently ignore (4.57 reading 5.x's ``num_local_experts``: 128 experts)."""
    cls = _config_class(cfg.get("model_type"))
    if cls is None:
        return []
    known = _init_params(cls)
    if hasattr(cls, "convert_rope_params_to_dict"):  # 5.x takes the legacy rope fields through its rope reading
        known |= {"rope_theta", "rope_scaling", "partial_rotary_factor", *_popped_rope_kwargs(cls)}
    values = [cfg[k] for k in cfg if k in known]
    return sorted(k for k, v in cfg.items() if k not in known and k not in _BOOKKEEPING
                  and not k.endswith("_config") and v not in (None, False, [], {}, "") and v not in values)


def load_config(hf_dir: str | Path) -> Any:
    """``AutoConfig`` of ``hf_dir``, normalised for this transformers: under 4.x a config written by 5.x is
    read with the legacy fields its ``rope_parameters`` implies (not 4.x's silent rope_theta 10000), and its
    ``architectures`` kept (4.57's Qwen2.5-VL config loses them to its text_config).  Fields of a config
    written by the other major that this version does not take are named in a warning."""
    import json
    import tempfile

    from transformers import AutoConfig

    path = Path(hf_dir) / "config.json"
    raw = json.loads(path.read_text()) if path.is_file() else {}
    with quiet_transformers():
        if transformers_major() >= 5 or with_legacy_fields(raw) == raw:
            config = AutoConfig.from_pretrained(str(hf_dir))
        else:
            with tempfile.TemporaryDirectory() as tmp:  # config.json only: AutoConfig reads nothing else
                (Path(tmp) / "config.json").write_text(json.dumps(with_legacy_fields(raw)))
                config = AutoConfig.from_pretrained(tmp)
    if raw.get("architectures") and not getattr(config, "architectures", None):
        config.architectures = raw["architectures"]
    _warn_foreign(path, raw)
    return config


def _warn_foreign(path: Path, raw: dict) -> None:
    import transformers

    writer = str(raw.get("transformers_version") or "")
    if not writer or writer.split(".")[0] == transformers.__version__.split(".")[0]:
        return
    foreign = foreign_fields(raw)
    if foreign:
        logging.getLogger("ckpt_bridge").warning(
            "%s was written by transformers %s; transformers %s does not take its field(s) %s, so the model it "
            "builds may differ. Re-export it with ckpt-bridge (which writes the fields both majors read) or use "
            "transformers %s.x", path, writer, transformers.__version__, ", ".join(foreign), writer.split(".")[0])


def load_pretrained(hf_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``from_pretrained`` of the class the config names, in eval mode; refuses a load that left weights random."""
    from transformers.utils import logging as hf_logging

    read_fitting_config(Path(hf_dir), HFReader(hf_dir).tensors())  # the config fits the weights: before any build

    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()  # our output is a report, not a loading bar
    config = load_config(hf_dir)
    cls = architecture_class(config)
    check_runnable(_concrete(cls, config))
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(str(hf_dir), config=config, output_loading_info=True,
                                              **{dtype_kwarg(): dtype})
    except (RuntimeError, ValueError) as e:  # e.g. a weight whose shape is not the config's
        raise BridgeError(f"{hf_dir}: transformers cannot load it as {cls.__name__} ({' '.join(str(e).split())[:300]}); "
                          f"its config.json does not describe these weights") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise BridgeError(f"{hf_dir}: {cls.__name__} (config.json architectures) needs {len(missing)} weight(s) the "
                          f"checkpoint lacks ({', '.join(missing[:3])}); transformers would initialise them at random, "
                          f"so nothing would be compared. Fix config.json's architectures to match the weights")
    return model.eval()


def from_config(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The class the config names, freshly built (weights to be loaded by the caller)."""
    cls = architecture_class(config)
    check_runnable(_concrete(cls, config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls._from_config(config, **{dtype_kwarg(): dtype})


def _concrete(cls: type, config: Any) -> type:
    """The model class an Auto class would build for ``config`` (``cls`` itself when it is not an Auto class)."""
    mapping = getattr(cls, "_model_mapping", None)
    if mapping is None:
        return cls
    try:
        return mapping[type(config)]
    except (KeyError, ValueError):
        return cls


def is_language_model(model: nn.Module) -> bool:
    """Does the model predict tokens (an LM head), or values/labels (a critic's ``score``)?"""
    get = getattr(model, "get_output_embeddings", None)
    return get is not None and get() is not None


def text_token_ids(config: Any, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random text token ids: never an id the config reserves (image / video / vision markers of a VLM,
    which would make the model expect pixels)."""
    vocab = config.get_text_config().vocab_size
    reserved = {v for k, v in vars(config).items() if isinstance(v, int) and k.endswith(("token_id", "token_index"))}
    allowed = torch.tensor([i for i in range(vocab) if i not in reserved])
    return allowed[torch.randint(0, len(allowed), shape, generator=generator)]


def tie_groups(model) -> list[list[str]]:
    """Parameter names that are one object (tied weights), first name first."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]
