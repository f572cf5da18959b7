"""The plan of transforms: source keys -> target keys, computed and checked
before any tensor moves, then executed one transform at a time.

A :class:`Transform` takes a few source tensors (``inputs``) and produces a
few target tensors (``outputs``) with one named operation:

=========  ================================================================
rename     1 -> 1, the tensor unchanged (the common case; ``fn`` is None);
           more inputs are stored copies that must equal the first bit
           for bit (``same_as``: a tied pair), compared piece by piece
split      1 -> n, e.g. a fused MoE ``experts.gate_up_proj`` -> per-expert
fuse       n -> 1, e.g. per-expert weights -> one stacked tensor
transpose  1 -> 1 with the data moved
fold       W, A, B -> W' (a LoRA delta merged into its base weight)
adapter    a trainer's ``from_hf`` / ``to_hf`` applied to one group
convert    any other op taken from the library that owns the rule
           (a transformers ``ConversionOps`` chain, ...)
=========  ================================================================

Outputs are never written by hand: :func:`derive` runs the operation on
*meta* tensors (shape and dtype only, no data, no memory) and records what it
returns, so the plan states exactly what the real run will produce and a rule
that does not fit the weights fails before the output directory exists.

:meth:`Plan.check` enforces the two invariants every sink relies on: each
target has exactly one producer, and each source key is consumed by some
transform or dropped by a named rule.  :func:`ckpt_bridge.pipeline.execute.execute`
streams the plan: it reads one transform's inputs, applies the operation,
yields the outputs and lets go, reading the next transform's inputs in a
background thread; peak memory is the largest transform's tensors, not the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from ..compare import bits_equal
from ..errors import KeyPlanError, few
from ..formats.base import TensorInfo

OPS = ("rename", "split", "fuse", "transpose", "fold", "adapter", "convert")

TensorFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class DataCheckError(KeyPlanError):
    """A check on tensor data that failed while the plan ran (tied copies that differ), naming tensors by key.

    The keys are those of the transform that raised it; :func:`compose` renames them to the keys the source
    stores (a Megatron ``output_layer.weight``, not the in-memory ``lm_head.weight``), so the one line names
    the tensors as the user's files do.  ``say(*keys)`` words the line.  ``outputs``: what the transform gives
    when the check does not apply (see :func:`_then`), under the transform's output names."""

    def __init__(self, say: Callable[..., str], keys: tuple[str, ...],
                 outputs: dict[str, torch.Tensor] | None = None):
        self.say, self.keys, self.outputs = say, tuple(keys), outputs
        super().__init__(say(*self.keys))

    def renamed(self, stored: dict[str, str], outputs: list[tuple[str, str]] | None = None) -> "DataCheckError":
        """The same failure with keys under their ``stored`` names and (``outputs``: (old, new) pairs) the
        outputs renamed as the wrapping transform names them."""
        out = self.outputs
        if out is not None and outputs is not None:
            out = {new: out[old] for old, new in outputs}
        return DataCheckError(self.say, tuple(stored.get(k, k) for k in self.keys), out)


@dataclass(frozen=True)
class Transform:
    """One step of a plan: ``inputs`` (source keys) -> ``outputs`` (target keys with shape and dtype).

    ``fn`` maps ``{source key: tensor}`` to ``{target key: tensor}``; it must
    work on meta tensors too (see :func:`derive`).  ``fn`` is None only for a
    rename, whose single output is its single input under a new name.
    ``rule`` says where the operation comes from (shown by ``--dry-run``).

    A rename may read more inputs than the one it writes: ``inputs[1:]`` (:attr:`same_as`) are other stored
    copies of the same tensor (both names of a tied pair), which must equal ``inputs[0]`` bit for bit;
    ``differ(copy, kept)`` words the :class:`DataCheckError` when they do not.  It stays a rename, so the
    pipeline still moves it in row pieces and compares the same rows of the copies
    (:func:`check_same`), instead of holding both copies whole.
    """

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[TensorInfo, ...]
    fn: TensorFn | None = None
    rule: str = ""
    differ: Callable[[str, str], str] | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown transform op {self.op!r}; one of {', '.join(OPS)}")
        if self.fn is None and not (self.op == "rename" and len(self.outputs) == 1 and len(self.inputs) >= 1):
            raise ValueError(f"{self.op} {self.inputs} -> {self.targets}: only a 1 -> 1 rename may omit fn")
        if self.fn is None and len(self.inputs) > 1 and self.differ is None:
            raise ValueError(f"rename {self.inputs} -> {self.targets}: copies compared without a message")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(o.key for o in self.outputs)

    @property
    def same_as(self) -> tuple[str, ...]:
        """A rename's other stored copies, which must equal ``inputs[0]`` (empty for any other transform)."""
        return self.inputs[1:] if self.fn is None else ()

    def apply(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The outputs for these input tensors, checked against the planned shapes."""
        if self.fn is None:
            check_same(self, tensors)
            return {self.outputs[0].key: tensors[self.inputs[0]]}
        out = self.fn(tensors)
        want = {o.key: o.shape for o in self.outputs}
        got = {k: tuple(v.shape) for k, v in out.items()}
        if got != want:
            raise KeyPlanError(f"{self.op} {', '.join(self.inputs)}: produced {got} but the plan says {want}; "
                               f"the rule ({self.rule or 'unnamed'}) is not deterministic in shape")
        return out

    def line(self) -> str:
        """``--dry-run`` text: ``a -> b`` for a plain same-name copy, else the op and its rule."""
        if self.op == "rename" and self.inputs == self.targets:
            return self.inputs[0]
        src = ", ".join(self.inputs) if len(self.inputs) <= 3 else f"{self.inputs[0]} .. ({len(self.inputs)} keys)"
        dst = ", ".join(self.targets) if len(self.targets) <= 3 else f"{self.targets[0]} .. ({len(self.targets)} keys)"
        why = f"  [{self.rule}]" if self.rule else ""
        if self.same_as:  # the copies are read only to be compared; the rule says so
            return f"{self.inputs[0]} -> {dst}{why}"
        return f"{src} -> {dst}" if self.op == "rename" else f"{self.op}: {src} -> {dst}{why}"


def check_same(t: Transform, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a rename whose ``same_as`` copies in ``tensors`` (whole tensors or the same rows of each, as
    stored) are not bit-equal to its kept input: :class:`DataCheckError` naming both stored keys."""
    kept = tensors[t.inputs[0]]
    if kept.device.type == "meta":
        return
    for k in t.same_as:
        if not bits_equal(tensors[k], kept):
            raise DataCheckError(t.differ, (k, t.inputs[0]))


def rename(source: str, target: str, info: TensorInfo, rule: str = "", same_as: tuple[str, ...] = (),
           differ: Callable[[str, str], str] | None = None) -> Transform:
    return Transform("rename", (source, *same_as), (TensorInfo(target, tuple(info.shape), info.dtype),), None,
                     rule, differ)


def reading_from(t: Transform, source_key: dict[str, str]) -> Transform:
    """``t`` reading its inputs under other source keys (``source_key[k]`` for input ``k``): e.g. a section's
    plan, made on the section's own names, reading the checkpoint's stored keys."""
    inputs = tuple(source_key[k] for k in t.inputs)
    if t.fn is None:
        return Transform(t.op, inputs, t.outputs, None, t.rule, t.differ)
    back = dict(zip(inputs, t.inputs))
    stored = dict(zip(t.inputs, inputs))

    def fn(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        try:
            return t.fn({back[k]: v for k, v in tensors.items()})
        except DataCheckError as e:
            raise e.renamed(stored) from None

    return Transform(t.op, inputs, t.outputs, fn, t.rule)


def derive(op: str, inputs: dict[str, TensorInfo], fn: TensorFn, rule: str = "") -> Transform:
    """A transform whose outputs are learned by running ``fn`` on meta tensors of the inputs' shapes.

    An ``fn`` that fails on meta tensors is a rule that does not fit these
    weights: :class:`KeyPlanError` naming the inputs and the rule.
    """
    metas = {k: torch.empty(i.shape, dtype=i.dtype, device="meta") for k, i in inputs.items()}
    try:
        out = fn(metas)
    except Exception as e:  # noqa: BLE001 - the rule's own failure, named
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise KeyPlanError(f"{op} {', '.join(list(inputs)[:4])}: {rule or 'the rule'} does not apply "
                           f"({type(e).__name__}: {first})") from None
    outputs = tuple(TensorInfo(k, tuple(v.shape), v.dtype) for k, v in out.items())
    return Transform(op, tuple(inputs), outputs, fn, rule)


@dataclass
class Plan:
    """The transforms of one export, plus what was dropped and why."""

    transforms: list[Transform] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (source key, the named rule)
    notes: list[str] = field(default_factory=list)
    model_class: str | None = None
    config_updates: dict = field(default_factory=dict)  # what the target's config.json must say (a value head's class)

    def targets(self) -> dict[str, TensorInfo]:
        """Every target key in plan order with its shape and dtype (before any cast)."""
        return {o.key: o for t in self.transforms for o in t.outputs}

    def sources(self) -> set[str]:
        return {k for t in self.transforms for k in t.inputs}

    def check(self, source_keys: Iterable[str], *, where: str) -> "Plan":
        """Each target produced once; each source consumed or dropped by a named rule. Returns self."""
        producer: dict[str, Transform] = {}
        for t in self.transforms:
            for k in t.targets:
                if k in producer:
                    raise KeyPlanError(f"{where}: target {k!r} is produced twice ({producer[k].line()} and "
                                       f"{t.line()}); two source weights map onto one name")
                producer[k] = t
        src = set(source_keys)
        unknown = sorted(self.sources() - src)
        if unknown:
            raise KeyPlanError(f"{where}: the plan reads {few(unknown)}, which the checkpoint does not have")
        dropped = {k for k, _ in self.dropped}
        loose = sorted(src - self.sources() - dropped)
        if loose:
            raise KeyPlanError(f"{where}: {len(loose)} source key(s) are neither used nor dropped by a rule: "
                               f"{few(loose)}")
        return self

    def lines(self) -> list[str]:
        return [t.line() for t in self.transforms] + [f"{k} -> (dropped: {why})" for k, why in self.dropped]


def compose(first: Plan, second: Plan, *, where: str) -> Plan:
    """``second`` applied to what ``first`` produces, as one plan reading ``first``'s sources.

    E.g. a LoRA fold (W, A, B -> W') followed by the save rules of the model
    class (a rename, or transformers' split of fused experts): a chain of
    renames stays a rename; consecutive renames of a computed step's outputs
    rename that step (it runs once for all of them; ``second``'s order is
    kept, it is the order the files are laid out in); anything else becomes one transform
    that runs ``first``'s producers and then ``second``'s operation, so the
    stream still holds one group at a time.  A ``second`` rule that drops a tensor
    ``first`` computed (not merely renamed) is refused: the work would be lost.
    """
    producer = {k: t for t in first.transforms for k in t.targets}
    out = Plan(dropped=list(first.dropped), notes=first.notes + second.notes, model_class=second.model_class,
               config_updates=dict(second.config_updates))
    for key, why in second.dropped:
        t1 = producer.get(key)
        if t1 is None:
            raise KeyPlanError(f"{where}: the plan drops {key!r}, which no earlier step produces")
        if t1.fn is not None:
            raise KeyPlanError(f"{where}: {key} is computed ({t1.op}: {t1.rule or 'unnamed'}) but then dropped "
                               f"({why}); refusing to lose it")
        out.dropped.append((t1.inputs[0], why))
    # (a step of first or a whole transform, the renames of that step's outputs that follow each other in second)
    steps: list[tuple[Transform, list[Transform]]] = []
    for t2 in second.transforms:
        missing = [k for k in t2.inputs if k not in producer]
        if missing:
            raise KeyPlanError(f"{where}: {t2.line()} reads {few(missing)}, which no earlier step produces")
        t1s = list({id(producer[k]): producer[k] for k in t2.inputs}.values())
        if t2.fn is None and t1s[0].fn is None:  # rename after rename (its copies: what their renames read)
            rule = " + ".join(r for r in (t1s[0].rule, t2.rule) if r)
            # a copy an earlier step computed (a LoRA delta folded into a tied embedding: PEFT merges it into the
            # one tied weight, whose other stored name still holds the base) is not a stored copy: not compared
            copies = [k for c in t2.same_as if producer[c].fn is None for k in producer[c].inputs]
            same = tuple(k for k in dict.fromkeys(t1s[0].inputs + tuple(copies)) if k != t1s[0].inputs[0])
            steps.append((rename(t1s[0].inputs[0], t2.targets[0], t1s[0].outputs[0], rule, same,
                                 t2.differ or t1s[0].differ), []))
        elif t2.fn is None:  # renames of a computed step's outputs, one after the other: the step runs once
            if not (steps and steps[-1][0] is t1s[0] and steps[-1][1]):  # (second's order is the files' order)
                steps.append((t1s[0], []))
            steps[-1][1].append(t2)
        else:
            steps.append((_then(t1s, t2), []))
    for t, renames in steps:
        out.transforms.append(_renamed(t, renames) if renames else t)
    return out


def _then(t1s: list[Transform], t2: Transform) -> Transform:
    """``t2`` run on the outputs of the steps ``t1s``, as one transform reading their inputs."""
    inputs = tuple(dict.fromkeys(k for t1 in t1s for k in t1.inputs))

    stored = {t1.targets[0]: t1.inputs[0] for t1 in t1s if t1.fn is None}  # what a data check names
    computed = {k for t1 in t1s if t1.fn is not None for k in t1.targets}

    def run(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mid: dict[str, torch.Tensor] = {}
        for t1 in t1s:
            mid.update(t1.apply({k: tensors[k] for k in t1.inputs}))
        try:
            return t2.apply({k: mid[k] for k in t2.inputs})
        except DataCheckError as e:
            if e.outputs is not None and computed & set(e.keys):
                # the check compares copies the source stores; one of these an earlier step computed (a LoRA
                # delta folded into a tied embedding: PEFT merges it into the one tied weight, whose other
                # stored name still holds the base), so it is not a stored copy: the step's result stands
                return e.outputs
            raise e.renamed(stored) from None

    op = t2.op if t2.op != "rename" else t1s[0].op
    rule = " then ".join(r for r in (*(t1.rule for t1 in t1s[:1]), t2.rule) if r)
    return Transform(op, inputs, t2.outputs, run, rule)


def _renamed(t1: Transform, renames: list[Transform]) -> Transform:
    """The computed step ``t1`` with its outputs under the names ``renames`` give them (one output may get
    several names: a tied pair); outputs no rename reads are not kept."""
    info = {o.key: o for o in t1.outputs}
    outputs = tuple(TensorInfo(r.targets[0], info[r.inputs[0]].shape, info[r.inputs[0]].dtype) for r in renames)
    names = [(r.inputs[0], r.targets[0]) for r in renames]

    def run(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        try:
            got = t1.apply(tensors)
        except DataCheckError as e:
            raise e.renamed({}, names) from None
        return {new: got[old] for old, new in names}

    rules = [t1.rule, *(rn.rule for rn in renames)]
    return Transform(t1.op, t1.inputs, outputs, run, " + ".join(rule for rule in rules if rule))
