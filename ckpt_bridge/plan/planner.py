"""One planner, two targets: a source's keys -> the model's in-memory names -> what a target wants.

Every export is planned in the same three steps, whichever way it goes:

1. **The source, in memory names** (:func:`in_memory`).  Wrapper prefixes are stripped by a rule table
   (:data:`WRAPPER_RULES`: DDP/FSDP1's ``module.``, ``_fsdp_wrapped_module``, ``_orig_mod``,
   ``_checkpoint_wrapped_module``; two keys collapsing onto one name are an error), buffers the config
   recomputes are dropped with their reason, and transformers' *load-time* conversions
   (:class:`~.conversions.Conversions` in the ``load`` direction: what ``from_pretrained`` applies, e.g.
   per-expert MoE weights fused into ``experts.gate_up_proj``) bring the keys to the model's in-memory
   names.  A source already holding in-memory names (a trainer's state dict) is taken as it is:
   transformers' own fallback, and no transformers import on a warm run.
2. **Matched against the target** (:func:`plan_to`): every key the target wants names one in-memory tensor;
   it is produced by exactly one step of 1., directly or through a tied alias, with the target's shape.
   What is left over is dropped by a named rule (a tied alias whose partner is written) or is an error, as
   is a gap; all are found before anything is written.
3. **The target's own step** (:attr:`Target.then`): the HF target writes the in-memory names through
   transformers' *save-time* conversions (the same :class:`~.conversions.Conversions`, ``save`` direction:
   fused experts split back per expert), the trainer target names each tensor by the DCP key the trainer's
   load requests.  The steps are joined with :func:`~.core.compose`, so the result reads the source's stored
   keys and streams one group at a time.

The targets themselves live in :mod:`.hf_target` (what ``save_pretrained`` writes) and
:mod:`.trainer_target` (what a TorchTitan model-only load requests).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..compare import bits_equal
from ..errors import KeyPlanError, few
from ..formats.base import TensorInfo
from .conversions import Conversions, Group
from .core import DataCheckError, Plan, Transform, compose, derive, rename

# (kind, text): "prefix" strips text at the start of a key, "component" removes a
# dotted path component wherever it appears.
WRAPPER_RULES: tuple[tuple[str, str], ...] = (
    ("prefix", "module."),
    ("component", "_fsdp_wrapped_module"),
    ("component", "_orig_mod"),
    ("component", "_checkpoint_wrapped_module"),
)

_DROP_SUFFIXES = {"inv_freq": "rotary inv_freq is a non-persistent buffer recomputed from the config"}


def drop_reason(key: str) -> str | None:
    """Why ``key`` is not carried over (a buffer recomputed from the config), or None."""
    return next((why for suf, why in _DROP_SUFFIXES.items() if key.endswith(suf)), None)


def canonical_key(key: str) -> str:
    for kind, text in WRAPPER_RULES:
        if kind == "prefix":
            while key.startswith(text):
                key = key[len(text):]
        else:
            key = ".".join(part for part in key.split(".") if part != text)
    return key


def canonicalize(src: dict[str, TensorInfo], where: str) -> dict[str, TensorInfo]:
    """Apply the wrapper rules; refuse collisions."""
    out: dict[str, TensorInfo] = {}
    origin: dict[str, str] = {}
    for k, info in src.items():
        c = canonical_key(k)
        if c in out:
            raise KeyPlanError(
                f"{where}: keys {origin[c]!r} and {k!r} both become {c!r} after stripping wrapper prefixes; "
                f"the checkpoint holds two copies of one weight"
            )
        out[c] = info
        origin[c] = k
    return out


def gap_error(where: str, missing: list[str], missing_why: str, unexpected: list[str], unexpected_why: str,
              tail: str, source: str = "source") -> KeyPlanError:
    """One line for keys a target needs that the source lacks, and source keys the target does not take."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) {missing_why}: {few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} {source} key(s) {unexpected_why}: {few(unexpected)}")
    return KeyPlanError(f"{where}: " + "; ".join(parts) + tail)


@dataclass
class Target:
    """What one target wants, in the model's in-memory names, and how it words a gap.

    ``wants``: target key -> (the in-memory name it is, the shape it must have).  ``ties``: in-memory names
    that are one object (either may stand in for the other).  ``served``: target keys something else
    provides (auxiliary modules made fresh): not matched.  ``load``: transformers' load-time conversions of
    the model, built on first need (None: the source's names are taken as they are).  ``known``: the
    in-memory names (a source holding only these needs no conversion).  ``then``: the target's own step,
    from the wanted keys (with their in-memory shapes and dtypes) to what is written; None: the wanted
    keys are written.  ``name`` / ``missing_why`` / ``unexpected_why`` / ``tail`` / ``source_word``: the
    words of its errors.
    """

    name: str
    wants: dict[str, tuple[str, tuple[int, ...]]]
    ties: list[list[str]] = field(default_factory=list)
    served: set[str] = field(default_factory=set)
    load: Callable[[], Conversions | None] | None = None
    known: set[str] = field(default_factory=set)
    then: Callable[[dict[str, TensorInfo]], Plan] | None = None
    missing_why: str = "the target needs are not in the source"
    unexpected_why: str = "the target does not take"
    tail: str = ""
    missing_hint: str = ""  # said before the tail when keys are missing and none is left over
    source_word: str = "source"


def in_memory(src: dict[str, TensorInfo], conversions: Callable[[], Conversions | None] | None,
              known: set[str], *, where: str) -> Plan:
    """Step 1: the plan from ``src``'s stored keys to the model's in-memory names (see the module docstring)."""
    canon = canonicalize(src, where)
    source_of = {canonical_key(k): k for k in src}
    plan = Plan()
    kept = []
    for c in canon:
        why = drop_reason(c)
        if why:
            plan.dropped.append((source_of[c], why))
        else:
            kept.append(c)
    conv = conversions() if conversions is not None and not set(kept) <= known else None
    if conv is None or conv.empty:
        plan.transforms = [rename(source_of[c], c, canon[c]) for c in kept]
        return plan
    for g in conv.groups(kept):
        if g.is_rename:
            rule = "" if g.target == g.inputs[0] else f"transformers {type(conv.model).__name__} load: rename"
            plan.transforms.append(rename(source_of[g.inputs[0]], g.target, canon[g.inputs[0]], rule))
        else:
            plan.transforms.append(_converted(conv, g, {source_of[c]: c for c in g.inputs}, canon))
    return plan


def _converted(conv: Conversions, g: Group, canon_of: dict[str, str], canon: dict[str, TensorInfo]) -> Transform:
    """One converter group as a transform over the stored keys; its outputs learned on meta tensors."""

    def fn(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return conv.run(g, {canon_of[k]: v for k, v in tensors.items()})

    t = derive("convert", {k: canon[c] for k, c in canon_of.items()}, fn, conv.describe(g))
    n_in, n_out = len(t.inputs), len(t.outputs)
    return dataclasses.replace(t, op="fuse" if n_in > n_out else "split" if n_in < n_out else "convert")


def plan_to(src: dict[str, TensorInfo], target: Target, *, where: str) -> Plan:
    """The checked plan that gives every key ``target`` wants one producer from ``src`` (steps 1-3)."""
    memory = in_memory(src, target.load, target.known, where=where)
    made_by = {o.key: t for t in memory.transforms for o in t.outputs}
    info_of = {o.key: o for t in memory.transforms for o in t.outputs}
    alias = {n: [m for m in g if m != n] for g in target.ties for n in g}
    named = Plan()  # in-memory names -> the target's keys
    picked: dict[str, list[str]] = {}
    missing, wrong = [], []
    for key, (name, shape) in target.wants.items():
        if key in target.served:
            continue
        found = name if name in made_by else next((a for a in alias.get(name, []) if a in made_by), None)
        if found is None:
            missing.append(key)
            continue
        if tuple(info_of[found].shape) != tuple(shape):
            wrong.append(f"{_inputs(made_by[found])} gives {tuple(info_of[found].shape)} but {key!r} is "
                         f"{tuple(shape)}")
            continue
        if found != name:
            named.notes.append(f"{key} <- {few(made_by[found].inputs, 2)} (tied weights)")
        named.transforms.append(rename(found, key, info_of[found]))
        picked.setdefault(found, []).append(key)
    if wrong:
        raise KeyPlanError(f"{where}: shapes differ from {target.name}: {'; '.join(wrong[:3])}"
                           f"{' ...' if len(wrong) > 3 else ''}; wrong config for these weights")
    unexpected = _leftovers(memory, picked, alias, where)
    _check_tied_copies(memory, made_by, target.ties, where)
    if missing or unexpected:
        hint = target.missing_hint if missing and not unexpected else ""
        raise gap_error(where, missing, target.missing_why, unexpected, target.unexpected_why, hint + target.tail,
                        target.source_word)
    plan = compose(memory, named, where=where)
    if target.then is not None:
        plan = compose(plan, target.then(plan.targets()), where=where)
    return plan.check(src, where=where)


def _leftovers(memory: Plan, picked: dict[str, list[str]], alias: dict[str, list[str]], where: str) -> list[str]:
    """Drop the steps nothing wants (a tied alias whose partner is written: dropped by that rule); return the
    stored keys of the others.  A conversion whose outputs are wanted only in part is refused: its other
    outputs would be computed and lost."""
    unexpected, keep = [], []
    for t in memory.transforms:
        used = [o.key for o in t.outputs if o.key in picked]
        if used and len(used) < len(t.outputs):
            raise KeyPlanError(f"{where}: transformers converts {_inputs(t)} into {', '.join(t.targets)}, but the target "
                               f"wants {few(sorted(k for o in used for k in picked[o]))}")
        if used:
            keep.append(t)
            continue
        tied = next((a for o in t.outputs for a in alias.get(o.key, []) if a in picked), None)
        if tied:
            memory.dropped += [(k, f"tied to {tied}") for k in t.inputs]
        else:
            unexpected += list(t.inputs)
    memory.transforms = keep
    return unexpected


def _inputs(t: Transform) -> str:
    return few(list(t.inputs), 2)


def _check_tied_copies(memory: Plan, made_by: dict[str, Transform], ties: list[list[str]], where: str) -> None:
    """Names the config ties (``lm_head.weight`` and ``model.embed_tokens.weight`` with tie_word_embeddings) are
    one tensor in the model, so what is written is one of them.  When the source stores more than one of them
    (verl FSDP and DCP state dicts hold both names; a Megatron run may save ``output_layer`` beside the
    embedding), the stored copies must be that one tensor: bit-equal.  An output layer trained apart from the
    embedding under a config that says tied would otherwise be dropped and the export would silently use the
    embedding as its head.  The comparison needs the data, so it runs when the plan is executed: when the
    producers are renames (the common case) the copy the target uses stays a rename whose other copies must
    equal it (:func:`_tied_rename`: streamed in row pieces, compared piece by piece); otherwise the producers
    become one transform that reads them all (one group in memory), compares them, and gives what the target
    wants (an equal pair is written once, as ``save_pretrained`` does).
    ``verify`` reads through the same plan, so it refuses the pair too.  Different shapes or dtypes are
    refused here, before anything is read."""
    kept = {id(t): i for i, t in enumerate(memory.transforms)}
    for group in ties:
        present = [n for n in group if n in made_by]
        producers = list({id(made_by[n]): made_by[n] for n in present}.values())
        mine = [t for t in producers if id(t) in kept]
        if len(producers) < 2 or not mine:
            continue
        info = {o.key: o for t in producers for o in t.outputs}
        first = present[0]
        names = {n: _inputs(made_by[n]) for n in present}
        for n in present[1:]:
            a, b = info[first], info[n]
            if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
                raise KeyPlanError(_tie_message(where, names[n], names[first]).replace(
                    " hold different values", f" differ ({tuple(b.shape)} {b.dtype} vs {tuple(a.shape)} {a.dtype})"))
        # a copy not written stays listed as dropped (tied to ...): it is read only to be compared (the merged
        # transform's rule says so in --dry-run)
        if all(t.fn is None for t in producers):
            # renames (the common case): the first copy the target uses carries the comparison with every other
            # stored copy; each copy the target uses (to-dcp asks for both names) stays its own streamed rename
            checked = _tied_rename(producers, mine[0], where)
            memory.transforms = [checked if t is mine[0] else t for t in memory.transforms]
            kept = {id(t): i for i, t in enumerate(memory.transforms)}
            continue
        merged = _tied_group(producers, mine, present, names, where)
        pos = min(kept[id(t)] for t in mine)
        gone = {id(t) for t in mine}
        memory.transforms = [merged if i == pos else t for i, t in enumerate(memory.transforms)
                             if i == pos or id(t) not in gone]
        kept = {id(t): i for i, t in enumerate(memory.transforms)}


def _tie_message(where: str, alias: str, kept: str) -> str:
    return (f"{where}: {alias} and {kept} hold different values, but the config ties them (tie_word_embeddings: "
            f"true), so the export would write one tensor for both and lose {alias} (trained apart from the "
            f"embedding); set \"tie_word_embeddings\": false in config.json, or pass --config a config that unties "
            f"them")


def _tied_rename(producers: list[Transform], mine: Transform, where: str) -> Transform:
    """The stored copies of a tie group as one rename of the copy the target uses whose other stored copies
    must equal it (:attr:`~.core.Transform.same_as`): the pipeline still streams it in row pieces, comparing
    the same rows of every copy, so a tied embedding is never held twice."""
    others = tuple(k for t in producers if t is not mine for k in t.inputs)
    rule = " + ".join(r for r in (mine.rule, f"tied weights: {', '.join(others)} must be bit-equal to "
                                              f"{mine.inputs[0]} (compared when read)") if r)
    return rename(mine.inputs[0], mine.targets[0], mine.outputs[0], rule, others,
                  lambda a, b: _tie_message(where, a, b))


def _tied_group(producers: list[Transform], mine: list[Transform], present: list[str], names: dict[str, str],
                where: str) -> Transform:
    """One transform reading every stored copy of a tie group, refusing copies that are not bit-equal, giving
    the outputs of ``mine`` (the producers the target uses)."""
    inputs = tuple(dict.fromkeys(k for t in producers for k in t.inputs))
    outputs = tuple(o for t in mine for o in t.outputs)
    # the stored names (one key each when the producers are renames): what the error names; a later compose
    # that renames these inputs renames them in the message too (core.DataCheckError)
    stored = {n: names[n] for n in present}

    def fn(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        vals: dict[str, torch.Tensor] = {}
        for t in producers:
            vals.update(t.apply({k: tensors[k] for k in t.inputs}))
        ref, out = vals[present[0]], {o.key: vals[o.key] for o in outputs}
        for n in present[1:]:
            if ref.device.type != "meta" and not bits_equal(vals[n], ref):
                raise DataCheckError(lambda a, b: _tie_message(where, a, b), (stored[n], stored[present[0]]), out)
        return out

    rule = f"tied weights: {', '.join(stored[n] for n in present)} must be bit-equal (compared when read)"
    return Transform("convert", inputs, outputs, fn, rule)
