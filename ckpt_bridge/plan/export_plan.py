"""The HF target's entry: a reader's keys -> what ``save_pretrained`` writes, by the names the reader declares
(``Reader.key_names``).  Transformers' names first lose their auxiliary modules (kept apart, see
:func:`.aux_modules.split_aux`) and go to :func:`.hf_target.plan_hf_export`; megatron-core's go through
:func:`.megatron.plan_megatron_export` (unstacked layers, split qkv / fc1), which ends in the same save rules.
The one place a command or a check chooses a planner."""

from __future__ import annotations

from pathlib import Path

from ..formats.base import Reader, TensorInfo
from .aux_modules import split_aux
from .core import Plan
from .hf_target import plan_hf_export
from .megatron import plan_megatron_export


def plan_export(reader: Reader, infos: dict[str, TensorInfo], cfg_dir: Path, *, aux_prefixes: list[str] | None,
                where: str) -> tuple[Plan, dict[str, list[str]]]:
    """(the checked plan of ``reader``'s model tensors ``infos`` to an HF export, {aux module: its keys})."""
    if reader.key_names == "megatron":
        return plan_megatron_export(reader, cfg_dir, where=where), {}
    main, aux = split_aux(infos, reader, cfg_dir, aux_prefixes, where)
    return plan_hf_export(main, cfg_dir, where=where), aux
