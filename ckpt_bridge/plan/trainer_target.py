"""The trainer target of the planner: HF weights -> the DCP keys a trainer's model-only load requests.

Source keys are brought to the in-memory names of the HF model the way ``from_pretrained`` does
(:mod:`.conversions`: transformers' load-time mapping, e.g. per-expert MoE weights fused into
``experts.gate_up_proj``), then matched to the requested keys (:mod:`.trainer_keys`) through the wrapper rules
and tied weights of :mod:`.hf_target`.  The HF target (:mod:`.hf_target`) applies the same conversions in the
save direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from ..errors import KeyPlanError, few
from ..formats.base import TensorInfo
from .conversions import Conversions, Group
from .core import Plan, Transform, derive, rename
from .hf_target import canonical_key, canonicalize, drop_reason, gap_error
from .trainer_keys import RequestedKeys


@dataclass
class DCPPlan(Plan):
    """The plan of one to-dcp export: transforms whose targets are the DCP keys the trainer requests.

    ``aux`` maps the DCP keys of auxiliary modules (made fresh or copied, not
    read from the source) to their shape and dtype.
    """

    requested: RequestedKeys | None = None
    aux: dict[str, TensorInfo] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return super().lines() + [f"(aux {k.split('.', 1)[0]}) -> {k}" for k in self.aux]


def plan_dcp(src: dict[str, TensorInfo], req: RequestedKeys, aux_fqns: set[str], groups: list[list[str]],
             *, where: str, model_class: str = "", conversions: Conversions | None = None) -> DCPPlan:
    """The checked plan that gives every key the trainer requests exactly one producer (or an aux module).

    Source keys are first brought to the in-memory names of the HF model the
    way ``from_pretrained`` does (``conversions``: transformers' load-time
    mapping, e.g. per-expert MoE weights fused into ``experts.gate_up_proj``;
    None: the names are taken as they are), then matched to the requested
    keys through the wrapper rules and tied weights.  Gaps either way are
    refused before anything is written.
    """
    canon = canonicalize(src, where)
    source_of = {canonical_key(k): k for k in src}
    plan = DCPPlan(model_class=model_class, requested=req)
    for c in canon:
        why = drop_reason(c)
        if why:
            plan.dropped.append((source_of[c], why))
    kept = [c for c in canon if source_of[c] not in {k for k, _ in plan.dropped}]
    producers = _load_groups(kept, canon, source_of, conversions)  # [(Group, {in-memory key: info}, fn)]
    alias: dict[str, list[str]] = {}
    for g in groups:
        g = [canonical_key(n) for n in g]
        for n in g:
            alias[n] = [m for m in g if m != n]
    wanted, missing = _assign(plan, req, aux_fqns, producers, alias, source_of, where)
    unexpected = []
    made_by = {m: i for i, (_, outs, _) in enumerate(producers) for m in outs}
    for i, (g, outs, fn) in enumerate(producers):
        got = wanted.get(i, {})
        if not got:
            tied = next((a for m in outs for a in alias.get(m, []) if a in made_by and made_by[a] in wanted), None)
            for k in g.inputs:
                if tied:
                    plan.dropped.append((source_of[k], f"tied to {tied}"))
                else:
                    unexpected.append(source_of[k])
        elif g.is_rename:  # a tied source feeds every name the trainer requests for it
            plan.transforms += [rename(source_of[g.inputs[0]], k, outs[g.target], _rule(g, conversions))
                                for k in got[g.target]]
        elif [m for m in outs if m not in got] or any(len(v) > 1 for v in got.values()):
            raise KeyPlanError(f"{where}: transformers converts {_inputs_of(producers[i], source_of)} into "
                               f"{', '.join(outs)}, but the trainer requests "
                               f"{few(sorted(k for v in got.values() for k in v))}")
        else:
            plan.transforms.append(_renamed(g, outs, got, fn, source_of, conversions))
    if missing or unexpected:
        hint = ("; the trainer's model differs from the config's (an aux module not passed with --aux?)"
                if missing and not unexpected else "")
        raise gap_error(where, missing, "the trainer requests are not in the source", unexpected,
                        "the trainer does not request", hint + f" (layout: {req.layout}, {req.trainer})")
    # Written in the trainer's request order, each transform's outputs together: DCP's writer still holds the
    # previous tensor while it asks for the next, so two large tensors of one source (a tied embedding and
    # lm_head) must not be written back to back (2 GB instead of 1 for a 1B model's fp32 embedding).
    pos = {k: i for i, k in enumerate(req.fqn_of)}
    plan.transforms.sort(key=lambda t: min(pos.get(k, len(pos)) for k in t.targets))
    return plan.check(src, where=where)


def _assign(plan: DCPPlan, req: RequestedKeys, aux_fqns: set[str], producers, alias: dict[str, list[str]],
            source_of: dict[str, str], where: str) -> tuple[dict[int, dict[str, list[str]]], list[str]]:
    """Each requested DCP key -> the producer of its in-memory name (or of a tied alias), or an aux module.

    Returns ({producer index: {in-memory key: [DCP keys]}}, [requested keys nothing produces]).
    """
    made_by = {m: i for i, (_, outs, _) in enumerate(producers) for m in outs}
    wanted: dict[int, dict[str, list[str]]] = {}
    missing, shape_errors = [], []
    for key, fqn in req.fqn_of.items():
        want = req.info[key]
        c = canonical_key(fqn)
        if c in aux_fqns:
            plan.aux[key] = want
            continue
        found = c if c in made_by else next((a for a in alias.get(c, []) if a in made_by), None)
        if found is None:
            missing.append(key)
            continue
        i = made_by[found]
        info = producers[i][1][found]
        if tuple(info.shape) != tuple(want.shape):
            shape_errors.append(f"{_inputs_of(producers[i], source_of)} gives {tuple(info.shape)} but the trainer's "
                                f"{key!r} is {tuple(want.shape)}")
            continue
        if found != c:
            plan.notes.append(f"{key} <- {found} (tied weights)")
        wanted.setdefault(i, {}).setdefault(found, []).append(key)
    if shape_errors:
        raise KeyPlanError(f"{where}: shapes differ from the trainer's model: {'; '.join(shape_errors[:3])}"
                           f"{' ...' if len(shape_errors) > 3 else ''}; wrong config for these weights")
    return wanted, missing


def _load_groups(keys: list[str], canon: dict[str, TensorInfo], source_of: dict[str, str],
                 conversions: Conversions | None) -> list[tuple[Group, dict[str, TensorInfo], Any]]:
    """Each group of source keys with the in-memory keys it produces (learned on meta tensors) and its function."""
    if conversions is None or conversions.empty:
        return [(Group(c, (c,), None, c), {c: TensorInfo(c, canon[c].shape, canon[c].dtype)}, None) for c in keys]
    out = []
    for g in conversions.groups(keys):
        if g.is_rename:
            out.append((g, {g.target: TensorInfo(g.target, canon[g.inputs[0]].shape, canon[g.inputs[0]].dtype)}, None))
            continue
        fn = partial(_run_group, conversions, g)
        t = derive("fuse", {c: canon[c] for c in g.inputs}, fn, conversions.describe(g))
        out.append((g, {o.key: o for o in t.outputs}, fn))
    return out


def _run_group(conversions: Conversions, group: Group, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return conversions.run(group, tensors)


def _renamed(g: Group, outs: dict[str, TensorInfo], got: dict[str, list[str]], fn, source_of: dict[str, str],
             conversions: Conversions) -> Transform:
    """A converter group as a transform reading source keys and producing the trainer's DCP keys."""
    dcp_of = {m: v[0] for m, v in got.items()}
    canon_of = {source_of[c]: c for c in g.inputs}

    def run(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        res = fn({canon_of[k]: v for k, v in tensors.items()})
        return {dcp_of[m]: v for m, v in res.items()}

    n_in, n_out = len(g.inputs), len(outs)
    op = "fuse" if n_in > n_out else "split" if n_in < n_out else "convert"
    return Transform(op, tuple(source_of[c] for c in g.inputs),
                     tuple(TensorInfo(dcp_of[m], i.shape, i.dtype) for m, i in outs.items()), run,
                     conversions.describe(g))


def _rule(g: Group, conversions: Conversions | None) -> str:
    if conversions is None or g.target == g.inputs[0]:
        return ""
    return f"transformers {type(conversions.model).__name__} load: rename"


def _inputs_of(producer, source_of: dict[str, str]) -> str:
    return few([source_of[c] for c in producer[0].inputs], 2)

