"""transformers' own weight conversions, as groups of a plan of transforms.

transformers 5 keeps some weights in memory in another shape than on disk:
MoE experts fused into one ``experts.gate_up_proj [E, 2I, H]`` (per-expert
``experts.{e}.gate_proj.weight`` / ``up_proj`` on disk), Mixtral's
``block_sparse_moe.`` renamed ``mlp.``, Qwen2.5-VL's ``model.language_model.*``
saved as ``model.*``.  The rules live in ``transformers.conversion_mapping``
(``get_model_conversion_mapping``) as ``WeightRenaming`` / ``WeightConverter``
objects; ``from_pretrained`` applies them forward, ``save_pretrained`` applies
their reverse (``revert_weight_conversion``).

:class:`Conversions` reuses those objects unchanged.  It buckets keys exactly
the way transformers does (by the converter-namespace key its
``rename_source_key`` gives), and runs one bucket's converter at a time, so a
plan can stream: one fused tensor and its parts in memory, never the model.
Nothing here is a table of families: a new family or a new transformers
version brings its own mapping.  On transformers 4.x there is no conversion
mapping; in-memory and on-disk names differ only through a model's
``_checkpoint_conversion_mapping`` (plain regex renames), which is applied the
way 4.x's ``save_pretrained`` / ``from_pretrained`` apply it.
"""

from __future__ import annotations

import re
from copy import deepcopy
from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import KeyPlanError

DIRECTIONS = ("save", "load")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Group:
    """Keys transformers converts together, and how.

    ``inputs`` are in transformers' natural order (``experts.0`` .. ``experts.E-1``),
    the order its ``MergeModulelist`` stacks them in.  ``patterns`` is the
    converter's matched source pattern per input, or None for a plain rename
    to ``target``.
    """

    layer: str
    inputs: tuple[str, ...]
    patterns: tuple[str, ...] | None = None
    target: str | None = None

    @property
    def is_rename(self) -> bool:
        return self.patterns is None


def natural_key(s: str) -> list[tuple[int, int | str]]:
    """Digits numerically, words alphabetically: transformers' ``dot_natural_key`` order."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in s.split(".")]


class Conversions:
    """The conversion rules of one (meta) model in one direction.

    ``save``: in-memory names -> what ``save_pretrained`` writes.
    ``load``: any checkpoint names -> the in-memory names ``from_pretrained`` fills.
    """

    def __init__(self, model: torch.nn.Module, direction: str):
        if direction not in DIRECTIONS:
            raise ValueError(direction)
        self.model = model
        self.direction = direction
        self.renamings: list = []
        self.converters: list = []
        self.legacy: dict[str, str] | None = None  # transformers 4.x: regex -> replacement
        self.meta_sd = model.state_dict()  # meta tensors: names only matter
        self.base_prefix = getattr(model, "base_model_prefix", "") or ""
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import PrefixChange, WeightConverter
        except ImportError:  # transformers 4.x
            mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}
            self.legacy = ({v: k for k, v in mapping.items()} if direction == "save" else dict(mapping))
            return
        if direction == "save":
            # What save_pretrained does for a model not loaded with from_pretrained (revert_weight_conversion).
            found = get_model_conversion_mapping(model, add_legacy=False)
            found = [c for c in found if not isinstance(c, PrefixChange)]
            found = [c.reverse_transform() for c in found[::-1]]
        else:
            found = get_model_conversion_mapping(model)
        self.converters = [c for c in found if isinstance(c, WeightConverter)]
        self.renamings = [c for c in found if not isinstance(c, WeightConverter)]
        self._by_pattern = {p: c for c in self.converters for p in c.source_patterns}

    @property
    def empty(self) -> bool:
        return not (self.renamings or self.converters or self.legacy)

    # ------------------------------------------------------------ planning

    def rename(self, key: str) -> tuple[str, str | None]:
        """(the key in the converter namespace or its final name, the matched converter pattern or None)."""
        if self.legacy is not None:
            return self._legacy_rename(key), None
        if self.direction == "save":
            from transformers.core_model_loading import rename_source_key

            conv_key, pattern = rename_source_key(key, [], self.converters)
            if pattern is not None:
                return conv_key, pattern
            return rename_source_key(conv_key, self.renamings, [])[0], None
        from transformers.core_model_loading import rename_source_key

        renamed, pattern = rename_source_key(key, self.renamings, self.converters, self.base_prefix, self.meta_sd)
        if renamed not in self.meta_sd and key in self.meta_sd:
            renamed, pattern = key, None  # already an in-memory name (transformers' own fallback)
        return renamed, pattern

    def _legacy_rename(self, key: str) -> str:
        for pattern, repl in self.legacy.items():
            if self.direction == "save":  # transformers 4.x save_pretrained's reverse_key_mapping handling
                repl = re.sub(r"\(.*\)", "", repl.lstrip("^"))
            new, n = re.subn(pattern, repl, key)
            if n:
                return new
        return key

    def groups(self, keys: Iterable[str]) -> list[Group]:
        """Buckets of ``keys`` in transformers' order: renames 1 -> 1, converters n -> m."""
        buckets: dict[str, list[tuple[str, str]]] = {}
        out: list[Group | str] = []
        for key in sorted(keys, key=natural_key):
            new, pattern = self.rename(key)
            if pattern is None:
                out.append(Group(new, (key,), None, new))
                continue
            if new not in buckets:
                buckets[new] = []
                out.append(new)
            buckets[new].append((key, pattern))
        groups = []
        for g in out:
            if isinstance(g, Group):
                groups.append(g)
                continue
            members = buckets[g]
            layers = {m.group(1) for k, _ in members if (m := _LAYER.search(k))}
            if len(layers) > 1:
                raise KeyPlanError(f"transformers converts {len(members)} keys across layers {sorted(layers)} as one "
                                   f"group ({g}); that cannot be streamed one layer at a time")
            groups.append(Group(g, tuple(k for k, _ in members), tuple(p for _, p in members)))
        return groups

    def describe(self, group: Group) -> str:
        """Where a converter group's rule comes from (shown by ``--dry-run``)."""
        conv = self._by_pattern[group.patterns[0]]
        ops = ", ".join(repr(op) for op in conv.operations)
        return f"transformers {type(self.model).__name__} {self.direction}: {ops}"

    # ------------------------------------------------------------ running

    def run(self, group: Group, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Apply transformers' converter of ``group`` to its tensors (meta tensors too)."""
        if group.is_rename:
            return {group.target: tensors[group.inputs[0]]}
        conv = deepcopy(self._by_pattern[group.patterns[0]])  # a fresh instance per bucket, as transformers does
        for key, pattern in zip(group.inputs, group.patterns):
            conv.add_tensor(group.layer, key, pattern, tensors[key])
        realized = conv.convert(group.layer, model=self.model, config=getattr(self.model, "config", None))
        out = {}
        for name, value in realized.items():
            value = value[0] if isinstance(value, list) else value
            if self.direction == "save":  # converter namespace -> checkpoint names (revert_weight_conversion)
                from transformers.core_model_loading import rename_source_key

                name = rename_source_key(name, self.renamings, [])[0]
            out[name] = value
        return out
