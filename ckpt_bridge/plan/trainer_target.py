"""The trainer target of the one planner (:mod:`.planner`): HF weights -> the DCP keys a trainer's model-only
load requests.

The planner brings the source keys to the in-memory names of the HF model the way ``from_pretrained`` does
(:mod:`.conversions`: transformers' load-time mapping, e.g. per-expert MoE weights fused into
``experts.gate_up_proj``); this target wants each requested key (:mod:`.trainer_keys`) as the in-memory name
of its model fqn, a tied name standing in for its partner.  The HF target (:mod:`.hf_target`) wants the same
names and writes them through the same conversions in the save direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..formats.base import TensorInfo
from .conversions import Conversions
from .core import Plan
from .planner import Target, canonical_key, plan_to
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
             *, where: str, model_class: str = "", load: Callable[[], Conversions | None] | None = None,
             known: Iterable[str] = ()) -> DCPPlan:
    """The checked plan that gives every key the trainer requests exactly one producer (or an aux module).

    Source keys are first brought to the in-memory names of the HF model the
    way ``from_pretrained`` does (``load()``: transformers' load-time
    mapping, e.g. per-expert MoE weights fused into ``experts.gate_up_proj``,
    asked for only when a source key is not one of the model's in-memory
    names ``known``; None: the names are taken as they are), then matched to the requested
    keys through the wrapper rules and tied weights (``groups``: names that
    are one object in the trainer's model).  Gaps either way are refused
    before anything is written.
    """
    wants = {key: (canonical_key(fqn), tuple(req.info[key].shape)) for key, fqn in req.fqn_of.items()}
    served = {key for key, fqn in req.fqn_of.items() if canonical_key(fqn) in aux_fqns}
    target = Target(
        name="the trainer's model", wants=wants, ties=[[canonical_key(n) for n in g] for g in groups],
        served=served, load=load, known=set(known),
        missing_why="the trainer requests are not in the source", unexpected_why="the trainer does not request",
        missing_hint="; the trainer's model differs from the config's (an aux module not passed with --aux?)",
        tail=f" (layout: {req.layout}, {req.trainer})")
    plan = plan_to(src, target, where=where)
    # Written in the trainer's request order, each transform's outputs together: DCP's writer still holds the
    # previous tensor while it asks for the next, so two large tensors of one source (a tied embedding and
    # lm_head) must not be written back to back (2 GB instead of 1 for a 1B model's fp32 embedding).
    pos = {k: i for i, k in enumerate(req.fqn_of)}
    transforms = sorted(plan.transforms, key=lambda t: min(pos.get(k, len(pos)) for k in t.targets))
    return DCPPlan(transforms=transforms, dropped=plan.dropped, notes=plan.notes, model_class=model_class,
                   requested=req, aux={k: req.info[k] for k in req.fqn_of if k in served})
