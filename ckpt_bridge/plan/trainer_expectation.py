"""What a to-dcp export needs to know of the trainer's model, cached per (config.json, aux modules, layout,
installed torchtitan, transformers and torch): the DCP keys its model-only load requests, its tie groups and
its in-memory names.

Finding them out means building the config's HF class on the meta device (transformers' modeling code, which
imports ``torch._dynamo``: ~1.5 s) and asking the installed torchtitan's ``CheckpointManager`` (its config
stack imports tyro), about 3 s of CPU of a 1.24B to-dcp whose streaming is ~7 s.  The answer depends on
nothing else, so, as :func:`.hf_target.expected_model` does for to-hf, a second export of the same config (the
real run after a ``--dry-run``, the next checkpoint of a sweep) reads it from ckpt-bridge's cache and imports
neither.  The reason line says the answer was remembered.

Transformers' load-time conversions are not cached: a source already holding the model's in-memory names (an
HF export of a dense model) needs none; one that does (per-expert MoE weights to fuse) builds the model then.
Aux modules made by a Python factory, or a model passed in, are never cached: nothing names them reliably.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import BridgeError
from ..formats.base import TensorInfo
from ..jsonfiles import cache_root, cached_json, transformers_version
from ..models import titan_eras
from ..models.custom_code import code_key
from ..models.hf import tie_groups
from ..models.titan_eras import TitanEra
from ..version import __version__
from .aux_modules import AuxSpec, attach_aux, aux_config
from .hf_target import build_meta_model
from .trainer_keys import NEST, RequestedKeys, requested_keys

SCHEMA = "trainer-v1"


@dataclass
class TrainerExpectation:
    """The trainer's model as to-dcp plans against it; ``model()`` builds it (meta) when a rule needs it."""

    model_class: str
    requested: RequestedKeys
    tie_groups: list[list[str]]
    known: frozenset[str]  # the model's in-memory names (its state dict, aux modules included)
    model: Callable[[], nn.Module]
    aux_config: dict[str, Any]  # what the aux modules are built from (aux_modules.aux_config)


# The installed torchtitan's files that decide what its checkpointer requests: the CheckpointManager and its
# helpers (components/, or checkpoint.py in the oldest layout) and the config classes whose fields pick an era's
# flags (config_manager.py, config/).  A git checkout or a flame submodule bump changes them without changing the
# version (e320a37 and cddd7dc both say 0.1.0) or __init__.py, so the key hashes their contents (~300 KB, ~1 ms).
_TITAN_DECIDING = ("components", "config", "config_manager.py", "checkpoint.py")
_MAX_HASHED_BYTES = 16 << 20  # a source tree beyond this is not a torchtitan install: key it by what was read


def _source_digest(root: Path | None, parts: tuple[str, ...]) -> str:
    """sha256 of the ``.py`` files under ``root``/``parts`` (relative path and bytes, in sorted order)."""
    if root is None:
        return "none"
    h = hashlib.sha256()
    budget = _MAX_HASHED_BYTES
    for part in parts:
        top = root / part
        files = [top] if top.suffix == ".py" else sorted(top.rglob("*.py")) if top.is_dir() else []
        for f in files:
            try:
                if not f.is_file():
                    continue
                data = f.read_bytes()[:budget]
            except OSError:
                data = b"<unreadable>"
            budget -= len(data)
            h.update(str(f.relative_to(root)).encode() + b"\0" + data + b"\0")
            if budget <= 0:
                return h.hexdigest()[:32]
    return h.hexdigest()[:32]


def _torchtitan_key() -> str:
    """Which torchtitan answers: its version, where pip recorded it from, its install dir, and the contents of
    the files that decide its checkpointer's requests."""
    pkg = titan_eras.package_dir()
    return (f"{titan_eras.torchtitan_version()}|{titan_eras.install_origin()}|{pkg}|"
            f"{_source_digest(pkg, _TITAN_DECIDING)}")


def _transformers_model_key(raw_config: bytes) -> str:
    """The contents of the installed transformers' files for the config's model_type (modeling / configuration),
    found without importing transformers: an editable install changes them without changing its version."""
    import importlib.util
    import json

    try:
        model_type = json.loads(raw_config).get("model_type")
    except (ValueError, AttributeError):
        model_type = None
    spec = importlib.util.find_spec("transformers")
    if not isinstance(model_type, str) or not model_type.isidentifier() or spec is None \
            or not spec.submodule_search_locations:
        return "none"
    models = Path(list(spec.submodule_search_locations)[0]) / "models" / model_type
    return _source_digest(models, (f"modeling_{model_type}.py", f"configuration_{model_type}.py"))


def cache_key_fields(raw_config: bytes, specs: list[AuxSpec], layout: str) -> list[str]:
    """Everything the remembered answer depends on besides config.json's bytes, one field each: the code that
    decides it, not just version strings.  A new dependency is one more line here."""
    return [
        SCHEMA,
        __version__,
        layout,
        _torchtitan_key(),
        str(transformers_version()),
        _transformers_model_key(raw_config),
        torch.__version__,
        code_key(),  # the model classes registered from outside transformers (--custom-import, auto_map)
        *(s.describe() for s in specs),
    ]


def _cache_file(cfg_dir: Path, specs: list[AuxSpec], layout: str) -> Path | None:
    try:
        raw = (Path(cfg_dir) / "config.json").read_bytes()
    except OSError:
        return None
    parts = cache_key_fields(raw, specs, layout)
    digest = hashlib.sha256(raw + b"\0" + "\0".join(parts).encode()).hexdigest()[:32]
    return cache_root() / "trainer-keys" / f"{digest}.json"


def _as_json(exp: TrainerExpectation) -> dict[str, Any]:
    req = exp.requested
    era = None if req.era is None else {
        "version": req.era.version, "origin": req.era.origin, "layout": req.era.layout, "how": req.era.how,
        "evidence": req.era.evidence, "fields": sorted(req.era.fields)}
    return {"model_class": exp.model_class, "tie_groups": exp.tie_groups, "known": sorted(exp.known),
            "aux_config": exp.aux_config,
            "layout": req.layout, "trainer": req.trainer, "reason": req.reason, "era": era,
            # lists of pairs: the request order is the order the export writes in
            "keys": [[k, req.fqn_of[k], list(req.info[k].shape), str(req.info[k].dtype).removeprefix("torch.")]
                     for k in req.fqn_of]}


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


_ERA_TYPES = {"version": str, "origin": str, "layout": str, "how": str, "evidence": str, "fields": list}


def _valid(v: Any) -> bool:
    """An entry is trusted only if every field has the type we wrote and it is consistent in itself: each
    requested key named from its fqn as ``requested_keys`` names it (an edit that swaps two fqns fails here),
    each fqn one of the model's in-memory names, once, with a shape of non-negative ints and a torch dtype.
    Anything else is recomputed (a cache never decides the output)."""
    if not isinstance(v, dict) or not all(f in v for f in ("model_class", "tie_groups", "known", "layout",
                                                            "trainer", "reason", "era", "aux_config", "keys")):
        return False
    if not (isinstance(v["model_class"], str) and isinstance(v["layout"], str) and isinstance(v["trainer"], str)
            and isinstance(v["reason"], str) and isinstance(v["aux_config"], dict) and _str_list(v["known"])
            and isinstance(v["tie_groups"], list) and all(_str_list(g) for g in v["tie_groups"])
            and isinstance(v["keys"], list)):
        return False
    era = v["era"]
    if era is not None and not (isinstance(era, dict) and set(era) == set(_ERA_TYPES)
                                and all(isinstance(era[f], t) for f, t in _ERA_TYPES.items())
                                and _str_list(era["fields"])):
        return False
    known = set(v["known"])
    seen: set[str] = set()
    for k in v["keys"]:
        if not (isinstance(k, list) and len(k) == 4 and isinstance(k[0], str) and isinstance(k[1], str)
                and isinstance(k[2], list) and all(type(n) is int and n >= 0 for n in k[2])
                and isinstance(k[3], str) and isinstance(getattr(torch, k[3], None), torch.dtype)):
            return False
        key, fqn = k[0], k[1]
        if fqn in seen or fqn not in known or key != (f"{NEST}.{fqn}" if v["layout"] == "nested" else fqn):
            return False
        seen.add(fqn)
    return all(name in known for g in v["tie_groups"] for name in g)


def _agrees_with_source(d: dict[str, Any], source: Mapping[str, TensorInfo] | None) -> bool:
    """Each remembered fqn that the source holds under the same name has the source's shape."""
    if not source:
        return True
    return all(tuple(shape) == tuple(source[fqn].shape) for _, fqn, shape, _ in d["keys"] if fqn in source)


def _from_json(d: dict[str, Any], model: Callable[[], nn.Module]) -> TrainerExpectation:
    era = None if d["era"] is None else TitanEra(**{**d["era"], "fields": frozenset(d["era"]["fields"])})
    fqn_of = {k: fqn for k, fqn, _, _ in d["keys"]}
    info = {k: TensorInfo(k, tuple(shape), getattr(torch, dtype)) for k, _, shape, dtype in d["keys"]}
    reason = f"{d['reason']} (remembered: same config, aux modules, torchtitan and transformers)"
    req = RequestedKeys(d["layout"], fqn_of, info, d["trainer"], reason, era)
    return TrainerExpectation(d["model_class"], req, [list(g) for g in d["tie_groups"]], frozenset(d["known"]),
                              model, d["aux_config"])


def trainer_expectation(cfg_dir: Path, specs: list[AuxSpec], layout: str,
                        hf_config: Callable[[], Any], source: Mapping[str, TensorInfo] | None = None
                        ) -> TrainerExpectation:
    """The config's HF class plus the aux modules ``specs`` name, as the installed trainer requests it.

    ``hf_config()``: the parsed HF config (the aux modules' sizes), asked only when the model is built.
    ``source``: the tensors to be written (names and shapes); a remembered entry that disagrees with them is
    recomputed.
    """
    built: list[nn.Module] = []

    def model() -> nn.Module:
        if not built:
            target = build_meta_model(cfg_dir)
            clash = [s.name for s in specs if hasattr(target, s.name)]
            if clash:
                raise BridgeError(f"--aux {clash[0]!r}: {type(target).__name__} already has a child of that name")
            attach_aux(target, specs, hf_config())
            built.append(target)
        return built[0]

    live: list[TrainerExpectation] = []

    def compute() -> dict[str, Any]:
        target = model()
        live.append(TrainerExpectation(type(target).__name__, requested_keys([target], layout), tie_groups(target),
                                       frozenset(target.state_dict()), model,
                                       aux_config(hf_config()) if specs else {}))
        return _as_json(live[0])

    cacheable = all(s.factory is None for s in specs)
    d = cached_json(_cache_file(cfg_dir, specs, layout) if cacheable else None, compute,
                    lambda v: _valid(v) and _agrees_with_source(v, source))
    if live:
        return live[0]  # computed here: the live answer, not the remembered one
    try:
        return _from_json(d, model)
    except (TypeError, ValueError, KeyError, AttributeError):  # a remembered entry _valid let through: recompute
        compute()
        return live[0]
