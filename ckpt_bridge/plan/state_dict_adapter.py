"""A TorchTitan ``StateDictAdapter`` (``from_hf`` or ``to_hf``) as transforms of the plan.

An adapter is written for a whole state dict: ``from_hf`` of llama3/qwen3
with tied embeddings asserts that ``model.embed_tokens.weight`` is in *every*
call, qwen3's MoE stacks all experts of a layer, llama3 permutes q/k.  To
stream, we split the adapter into the smallest calls that give the same
result, learned from the adapter itself on meta tensors (no per-model table):

1. **What each output is computed from.**  One call on meta tensors of the
   whole state dict, under a ``TorchFunctionMode`` that tags every tensor with
   the source keys it was computed from (a rename keeps the input object, a
   permute/stack is a chain of torch ops).  Inputs that feed a common output
   form one *group* (all experts of a layer; the embedding with both
   ``tok_embeddings`` and a tied ``lm_head``).
2. **What each call must be shown.**  A group whose call alone fails (or
   misses outputs) gets *context*: other source keys the adapter checks for
   but does not compute the group's outputs from (tied models: the
   embedding).  Context is found by trying the contexts that worked before,
   then each single key, then shrinking "all other keys".  Context keys are
   handed to the real call as meta tensors: the trace proves the kept
   outputs do not depend on them, so they cost no read and no memory.

Each group becomes one ``adapter`` transform (:func:`ckpt_bridge.plan.core.derive`), checked like any other,
or a plain rename when the adapter hands the input tensor back under another name (most keys), so it streams in
row pieces like any rename.  The commands (and verify-dcp) compose this plan with the target's
(:func:`~.core.compose`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import KeyPlanError
from .core import Plan, derive, rename
from ..formats.base import Reader, TensorInfo

StateFn = Callable[[dict[str, Any]], dict[str, Any]]


class _Provenance(TorchFunctionMode):
    """Tags each tensor a torch op returns with the source keys its inputs were computed from."""

    def __init__(self, sources: dict[str, torch.Tensor]):
        super().__init__()
        self.of: dict[int, frozenset[str]] = {id(v): frozenset([k]) for k, v in sources.items()}
        self._alive: list[Any] = list(sources.values())  # ids stay unique while the trace runs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        deps: frozenset[str] = frozenset()
        for a in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(a, torch.Tensor):
                deps |= self.of.get(id(a), frozenset())
        if deps:
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor):
                    self.of[id(o)] = self.of.get(id(o), frozenset()) | deps
                    self._alive.append(o)
        return out

    def deps(self, t: Any) -> frozenset[str]:
        return self.of.get(id(t), frozenset())


def _metas(infos: dict[str, TensorInfo], keys) -> dict[str, torch.Tensor]:
    return {k: torch.empty(infos[k].shape, dtype=infos[k].dtype, device="meta") for k in keys}


def _trace(fn: StateFn, infos: dict[str, TensorInfo], keys) -> dict[str, tuple[TensorInfo, frozenset[str]]]:
    """``fn`` on meta tensors of ``keys``: output key -> (shape/dtype, source keys it depends on)."""
    inputs = _metas(infos, keys)
    with _Provenance(inputs) as mode:
        out = fn(dict(inputs))  # a fresh dict: adapters add keys to the one they are given
        return {k: (TensorInfo(k, tuple(v.shape), v.dtype), mode.deps(v)) for k, v in out.items()
                if isinstance(v, torch.Tensor)}


def _groups(full: dict[str, tuple[TensorInfo, frozenset[str]]], keys: list[str]) -> list[tuple[list[str], list[str]]]:
    """(inputs, outputs) per connected group: inputs sharing an output are one group (union-find)."""
    parent = {k: k for k in keys}

    def root(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for _, deps in full.values():
        d = sorted(deps)
        for other in d[1:]:
            parent[root(other)] = root(d[0])
    members: dict[str, list[str]] = {}
    for k in keys:  # source order, so the stream reads the files in order
        members.setdefault(root(k), []).append(k)
    outs: dict[str, list[str]] = {}
    for o, (_, deps) in full.items():
        outs.setdefault(root(next(iter(deps))), []).append(o)
    return [(ins, outs.get(r, [])) for r, ins in members.items()]


class _Grouper:
    """Finds the context each group's call needs (see the module docstring)."""

    def __init__(self, fn: StateFn, infos: dict[str, TensorInfo], full, groups, name: str):
        self.fn, self.infos, self.full, self.name = fn, infos, full, name
        self.groups = groups
        self.known: list[tuple[str, ...]] = [()]  # contexts that worked, tried first

    def works(self, ins: list[str], outs: list[str], ctx: tuple[str, ...]) -> bool:
        try:
            got = _trace(self.fn, self.infos, list(ins) + list(ctx))
        except Exception:  # noqa: BLE001 - the adapter refusing this call is the answer "no"
            return False
        return all(o in got and got[o][0] == self.full[o][0] and got[o][1] <= set(ins) for o in outs)

    def context(self, ins: list[str], outs: list[str]) -> tuple[str, ...]:
        for ctx in self.known:
            if self.works(ins, outs, ctx):
                return ctx
        others = [k for g, _ in self.groups if g is not ins for k in g]
        for k in others:
            if self.works(ins, outs, (k,)):
                self.known.append((k,))
                return (k,)
        if not self.works(ins, outs, tuple(others)):
            raise KeyPlanError(f"{self.name} cannot map {ins[0]!r}{' ..' if len(ins) > 1 else ''} even with every "
                               f"other key present; this adapter cannot be applied group by group")
        ctx = list(others)
        for g, _ in self.groups:  # drop whole groups the call does not need
            trial = [k for k in ctx if k not in g]
            if len(trial) < len(ctx) and self.works(ins, outs, tuple(trial)):
                ctx = trial
        self.known.append(tuple(ctx))
        return tuple(ctx)


def _group_fn(fn: StateFn, outs: list[str], ctx_infos: dict[str, TensorInfo], name: str) -> Callable:
    def run(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        full = dict(tensors)
        full.update(_metas(ctx_infos, ctx_infos))  # satisfies the adapter's checks; never a value source
        got = fn(full)
        real = any(t.device.type != "meta" for t in tensors.values())
        for o in outs:
            if real and got[o].device.type == "meta":
                raise KeyPlanError(f"{name}: {o!r} came out of a context key's placeholder; the traced plan is wrong "
                                   f"for this adapter")
        return {o: got[o] for o in outs}

    return run


def adapter_plan(infos: dict[str, TensorInfo], fn: StateFn, name: str, *, where: str, renames: bool = False) -> Plan:
    """The checked plan applying ``fn`` (an adapter's ``from_hf`` / ``to_hf``) group by group to ``infos``.

    ``renames``: a key the adapter hands back unchanged under another name becomes a plain rename (the
    pipeline then moves it in row pieces) instead of a call of the adapter; without it every group is a call
    (what the trace found, group by group)."""
    keys = list(infos)
    try:
        full = _trace(fn, infos, keys)
    except Exception as e:  # noqa: BLE001 - the adapter's own failure on these keys, named
        first = (str(e).strip().splitlines() or [""])[0]
        raise KeyPlanError(f"{where}: {name} cannot map these weights ({type(e).__name__}: {first}); wrong "
                           f"--titan-model or config for this checkpoint") from None
    made_of_nothing = [o for o, (_, d) in full.items() if not d]
    if made_of_nothing:
        raise KeyPlanError(f"{where}: {name} makes {made_of_nothing[0]!r} from no source tensor; not supported")
    groups = _groups(full, keys)
    grouper = _Grouper(fn, infos, full, groups, name)
    renamed = _handed_back(fn, infos, keys) if renames else {}
    plan = Plan()
    for ins, outs in groups:
        if not outs:
            plan.dropped += [(k, f"{name} maps it to nothing") for k in ins]
            continue
        if len(ins) == len(outs) == 1 and renamed.get(outs[0]) == ins[0]:
            plan.transforms.append(rename(ins[0], outs[0], infos[ins[0]], f"{name}: rename"))
            continue
        ctx = grouper.context(ins, outs)
        rule = name + (f" (with {', '.join(ctx[:2])}{' ..' if len(ctx) > 2 else ''} as context)" if ctx else "")
        plan.transforms.append(derive("adapter", {k: infos[k] for k in ins},
                                      _group_fn(fn, outs, {k: infos[k] for k in ctx}, name), rule))
    return plan.check(keys, where=where)


def _handed_back(fn: StateFn, infos: dict[str, TensorInfo], keys: list[str]) -> dict[str, str]:
    """Output key -> input key, for outputs that are the input tensor object itself (the adapter renamed it)."""
    inputs = _metas(infos, keys)
    by_id = {id(v): k for k, v in inputs.items()}
    out = fn(dict(inputs))
    return {o: by_id[id(v)] for o, v in out.items() if id(v) in by_id}


def from_hf_plan(reader: Reader, adapter: Any) -> Plan:
    """The plan that names an HF-named reader's tensors as a TorchTitan model's (its adapter's ``from_hf``)."""
    return adapter_plan(_source_infos(reader), adapter.from_hf, f"{type(adapter).__name__}.from_hf",
                        where=str(reader.path), renames=True)


def to_hf_plan(reader: Reader, adapter: Any) -> Plan:
    """The plan that names a TorchTitan-native checkpoint's tensors as Hugging Face's (its adapter's ``to_hf``)."""
    return adapter_plan(_source_infos(reader), adapter.to_hf, f"{type(adapter).__name__}.to_hf",
                        where=str(reader.path), renames=True)


def _source_infos(reader: Reader) -> dict[str, TensorInfo]:
    return reader.model_tensors()
