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
from typing import Any, Callable

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
from .trainer_keys import RequestedKeys, requested_keys

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


def _torchtitan_key() -> str:
    """Which torchtitan answers: its version, where pip recorded it from, and which install (path, mtime)."""
    pkg = titan_eras.package_dir()
    try:
        stamp = (pkg / "__init__.py").stat().st_mtime_ns if pkg is not None else 0
    except OSError:
        stamp = 0
    return f"{titan_eras.torchtitan_version()}|{titan_eras.install_origin()}|{pkg}|{stamp}"


def _cache_file(cfg_dir: Path, specs: list[AuxSpec], layout: str) -> Path | None:
    try:
        raw = (Path(cfg_dir) / "config.json").read_bytes()
    except OSError:
        return None
    parts = [SCHEMA, __version__, layout, _torchtitan_key(), str(transformers_version()), torch.__version__,
             code_key(), *(s.describe() for s in specs)]
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


def _valid(v: Any) -> bool:
    return isinstance(v, dict) and isinstance(v.get("keys"), list) and all(
        isinstance(k, list) and len(k) == 4 and isinstance(getattr(torch, str(k[3]), None), torch.dtype)
        for k in v["keys"]) and all(f in v for f in ("model_class", "tie_groups", "known", "layout", "trainer",
                                                      "reason", "era", "aux_config"))


def _from_json(d: dict[str, Any], model: Callable[[], nn.Module]) -> TrainerExpectation:
    era = None if d["era"] is None else TitanEra(**{**d["era"], "fields": frozenset(d["era"]["fields"])})
    fqn_of = {k: fqn for k, fqn, _, _ in d["keys"]}
    info = {k: TensorInfo(k, tuple(shape), getattr(torch, dtype)) for k, _, shape, dtype in d["keys"]}
    reason = f"{d['reason']} (remembered: same config, aux modules, torchtitan and transformers)"
    req = RequestedKeys(d["layout"], fqn_of, info, d["trainer"], reason, era)
    return TrainerExpectation(d["model_class"], req, [list(g) for g in d["tie_groups"]], frozenset(d["known"]),
                              model, d["aux_config"])


def trainer_expectation(cfg_dir: Path, specs: list[AuxSpec], layout: str,
                        hf_config: Callable[[], Any]) -> TrainerExpectation:
    """The config's HF class plus the aux modules ``specs`` name, as the installed trainer requests it.

    ``hf_config()``: the parsed HF config (the aux modules' sizes), asked only when the model is built.
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
    d = cached_json(_cache_file(cfg_dir, specs, layout) if cacheable else None, compute, _valid)
    return live[0] if live else _from_json(d, model)  # computed here: the live answer, not the remembered one
