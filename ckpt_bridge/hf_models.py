"""Loading a Hugging Face model dir the way its config says, on every supported transformers version.

``verify --logits`` and ``verify --loss`` must run the model the weights are
for: the class ``config.architectures`` names (causal LM, image-text-to-text,
token classification for a verl critic), not ``AutoModelForCausalLM`` (which
refuses a VLM config and puts a random ``lm_head`` on a critic).  A load that
leaves any weight to a fresh random init is refused: comparing two random
heads says nothing about the checkpoints.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import BridgeError


def dtype_kwarg() -> str:
    """``dtype=`` came in transformers 4.56; older versions take ``torch_dtype=``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def architecture_class(config: Any) -> type:
    """The transformers class ``config.architectures[0]`` names; ``AutoModelForCausalLM`` if it names none."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None and archs:
        raise BridgeError(f"config.json names architecture {archs[0]!r}, which transformers "
                          f"{transformers.__version__} does not have; upgrade transformers or fix config.json")
    return cls or transformers.AutoModelForCausalLM


def _major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def legacy_rope_fields(cfg: dict) -> dict:
    """``rope_theta`` / ``rope_scaling`` (what transformers 4.x reads) from a transformers 5 ``rope_parameters``.

    5.x writes only ``rope_parameters``; 4.x ignores it and silently uses
    rope_theta 10000.  5.x reads the legacy fields too (``rope_scaling`` wins
    over ``rope_parameters``, so both must say the same).  Per-layer-type
    parameters (Gemma 3: ``{"full_attention": {...}, ...}``) give the
    full-attention values, which is what 4.x's global rope fields mean.
    Returns only fields ``cfg`` lacks; ``{}`` when there is nothing to add.
    """
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict) or "rope_theta" in cfg:
        return {}
    if "rope_theta" not in rp and isinstance(rp.get("full_attention"), dict):
        rp = rp["full_attention"]
    if "rope_theta" not in rp:
        return {}
    out: dict[str, Any] = {"rope_theta": rp["rope_theta"]}
    scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if "partial_rotary_factor" in rp and "partial_rotary_factor" not in cfg:
        out["partial_rotary_factor"] = rp["partial_rotary_factor"]
    if "rope_scaling" not in cfg:
        out["rope_scaling"] = None if scaling in ({}, {"rope_type": "default"}) else scaling
    return out


def with_legacy_rope(cfg: dict) -> dict:
    """``cfg`` (and its sub-configs: text_config, vision_config, ...) readable by both majors."""
    out = {k: with_legacy_rope(v) if isinstance(v, dict) and k.endswith("_config") else v for k, v in cfg.items()}
    out.update(legacy_rope_fields(out))
    return out


def load_config(hf_dir: str | Path) -> Any:
    """``AutoConfig`` of ``hf_dir``; under transformers 4.x a config written by 5.x (``rope_parameters``
    only) is read with its rope settings, not 4.x's silent rope_theta 10000."""
    import json
    import tempfile

    from transformers import AutoConfig

    path = Path(hf_dir) / "config.json"
    raw = json.loads(path.read_text()) if path.is_file() else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _major() >= 5 or with_legacy_rope(raw) == raw:
            return AutoConfig.from_pretrained(str(hf_dir))
        with tempfile.TemporaryDirectory() as tmp:  # config.json only: AutoConfig reads nothing else
            (Path(tmp) / "config.json").write_text(json.dumps(with_legacy_rope(raw)))
            return AutoConfig.from_pretrained(tmp)


def load_pretrained(hf_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``from_pretrained`` of the class the config names, in eval mode; refuses a load that left weights random."""
    from transformers.utils import logging as hf_logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()  # our output is a report, not a loading bar
    config = load_config(hf_dir)
    cls = architecture_class(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = cls.from_pretrained(str(hf_dir), config=config, output_loading_info=True,
                                          **{dtype_kwarg(): dtype})
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise BridgeError(f"{hf_dir}: {cls.__name__} (config.json architectures) needs {len(missing)} weight(s) the "
                          f"checkpoint lacks ({', '.join(missing[:3])}); transformers would initialise them at random, "
                          f"so nothing would be compared. Fix config.json's architectures to match the weights")
    return model.eval()


def from_config(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The class the config names, freshly built (weights to be loaded by the caller)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return architecture_class(config)._from_config(config, **{dtype_kwarg(): dtype})


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
