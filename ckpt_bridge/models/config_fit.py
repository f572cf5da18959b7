"""Does the model a config.json describes fit the tensors the checkpoint holds?  Checked on the raw JSON,
before transformers parses it or anything is built.

Why before: transformers turns a config's counts into work at once.
``AutoConfig`` builds ``layer_types`` (a list of ``num_hidden_layers``
entries) and the meta build makes every layer's modules, so a config saying
``num_hidden_layers: 1000000000`` ran for minutes without an end; a
``vocab_size: 0`` printed transformers' warnings before our error.  The
sizes are cheap to check against what the files hold:

* every size field (``*_size``, ``num_*``, ``head_dim``, ``depth``, ...) of
  the config and of its sub-configs (``text_config``, ``vision_config``, ...)
  is an integer (not a bool, not ``1e9``, not a string) and not negative; the
  widths every model has (hidden size, vocabulary, layers, heads) are >= 1;
* a layer count is at most the largest numbered container the keys hold
  (``model.layers.0..N-1``, ``visual.blocks.*``), and an expert count at most
  that or the leading dimension of a stacked tensor: a config may describe
  fewer layers than a checkpoint carries (DeepSeek-V3's multi-token-prediction
  layer is saved after the last decoder layer), never more;
* the text model's ``hidden_size`` is a dimension of some tensor.

The key plan (:mod:`ckpt_bridge.plan.hf_target`) then compares every key and shape
exactly; this check only makes sure that building what it compares against
is cheap and that a config for another model is refused in one line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError
from ..formats.base import TensorInfo
from ..jsonfiles import check_config, read_json
from .custom_code import resolve_model_code

# Fields that size the model (matched on the name, in the config and each *_config sub-config).
_SIZE_FIELD = re.compile(r"^(num_\w+|n_\w+|\w+_size|head_dim|depth|\w+_dim|\w+_layers)$")
# Of those, the ones every model needs at least one of (when present and not null).
_AT_LEAST_ONE = ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "head_dim", "num_key_value_heads", "depth", "num_layers", "n_layer", "n_embd", "n_head")
_LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "depth")
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")


def _configs(cfg: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(where, dict) for the config and every nested ``*_config`` dict (VLM text/vision, audio, ...)."""
    out = [(path, cfg)]
    for k, v in cfg.items():
        if isinstance(v, dict) and k.endswith("_config"):
            out += _configs(v, f"{path}{k}.")
    return out


def _bad_number(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be the size ``name``, or None."""
    if value is None:
        return None
    if isinstance(value, list):
        return next((why for v in value if (why := _bad_number(name, v))), None)
    if isinstance(value, bool) or not isinstance(value, int):
        return "is not an integer"
    if value < 0 or (value < 1 and name in _AT_LEAST_ONE):
        return "must be at least 1" if name in _AT_LEAST_ONE else "is negative"
    return None


def check_numbers(cfg: dict[str, Any], path: Path) -> None:
    """Every size field of ``cfg`` (and its sub-configs) an integer in range; one line naming the first that is not."""
    for where, sub in _configs(cfg):
        for name, value in sub.items():
            if _SIZE_FIELD.match(name):
                why = _bad_number(name, value)
                if why:
                    raise CheckpointFormatError(f"{path}: field {where}{name} = {json.dumps(value)} {why}; fix config.json "
                                                f"(or pass --config the config these weights were trained with)")


def numbered_containers(keys: list[str]) -> dict[str, int]:
    """{container: how many numbered children the keys hold}: ``model.layers`` -> 2 for ``model.layers.{0,1}.*``,
    ``model.layers.*.mlp.experts`` -> 8 (earlier numbers replaced by ``*``)."""
    seen: dict[str, set[str]] = {}
    for k in keys:
        parts = k.split(".")
        for i, p in enumerate(parts):
            if p.isdigit():
                prefix = ".".join("*" if q.isdigit() else q for q in parts[:i])
                seen.setdefault(prefix, set()).add(p)
    return {c: len(ix) for c, ix in seen.items()}


def check_fit(cfg: dict[str, Any], infos: dict[str, TensorInfo], path: Path) -> None:
    """Refuse (one line) a config whose sizes are not numbers or describe more than the tensors hold."""
    check_numbers(cfg, path)
    if not infos:
        return
    containers = numbered_containers(list(infos))
    most = max(containers.items(), key=lambda kv: kv[1], default=("", 0))
    stacked = max((i.shape[0] for i in infos.values() if len(i.shape) >= 3), default=0)
    for where, sub in _configs(cfg):
        for name in _LAYER_COUNTS + _EXPERT_COUNTS:
            n = sub.get(name)
            if not isinstance(n, int) or not containers and name in _LAYER_COUNTS:
                continue  # no numbered weights at all (an adapter of one head): nothing to count against
            bound = max(most[1], stacked) if name in _EXPERT_COUNTS else most[1]
            if n > bound and name in _EXPERT_COUNTS and bound > 1 and n % bound == 0:
                # a whole fraction of the experts: one expert-parallel rank's share, not another model
                raise CheckpointFormatError(
                    f"{path}: field {where}{name} = {n}, but the checkpoint holds {bound} experts per MoE layer, "
                    f"1/{n // bound} of them: it looks split by expert parallelism (each EP rank saves its "
                    f"{bound} local experts); export a save that holds every expert (gathered, or a Megatron "
                    f"dist_ckpt, whose experts carry their global index), not one EP rank's part")
            if n > bound:
                held = (f"at most {most[1]} numbered module(s) ({most[0]}.0-{most[1] - 1})" if most[1]
                        else "no numbered modules")
                raise CheckpointFormatError(
                    f"{path}: field {where}{name} = {n}, but the checkpoint's {len(infos)} tensors hold {held}; "
                    f"this config describes another model: pass --config the one these weights were trained with")
    for where, sub in _configs(cfg):  # nn.Embedding's rule: transformers warns, then the build asserts
        vocab, pad = sub.get("vocab_size"), sub.get("pad_token_id")
        if isinstance(vocab, int) and isinstance(pad, int) and not isinstance(pad, bool) and not -vocab <= pad < vocab:
            raise CheckpointFormatError(f"{path}: field {where}pad_token_id = {pad} is outside the vocabulary "
                                        f"(vocab_size {vocab}); fix config.json")
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    hidden = text.get("hidden_size")
    if isinstance(hidden, int) and not any(hidden in i.shape for i in infos.values()):
        widths = sorted({d for i in infos.values() for d in i.shape})
        raise CheckpointFormatError(
            f"{path}: field {'text_config.' if text is not cfg else ''}hidden_size = {hidden}, but no tensor has "
            f"a dimension of that size (the checkpoint's sizes: {', '.join(map(str, widths[-6:]))}); this config "
            f"describes another model: pass --config the one these weights were trained with")


def read_fitting_config(cfg_dir: Path, infos: dict[str, TensorInfo]) -> dict[str, Any]:
    """config.json checked as every command reads it (:func:`ckpt_bridge.jsonfiles.check_config`: UTF-8, field
    types, a model_type transformers has built in or the user's code registered, auto_map code only with
    --trust-remote-code: :func:`ckpt_bridge.models.custom_code.resolve_model_code`), then against the tensors (:func:`check_fit`).  The one gate
    before anything parses the config with transformers or builds a model from it: to-hf, to-dcp, verify and
    inspect all call it."""

    path = Path(cfg_dir) / "config.json"
    cfg = read_json(path)
    if isinstance(cfg, dict):
        check_numbers(cfg, path)  # before check_config: a number transformers would choke on, named first
        # which code builds the model: built in, registered by the user's imports, or trusted auto_map code
        resolve_model_code(cfg, path)
    cfg = check_config(cfg, path)
    check_fit(cfg, infos, path)
    return cfg
