"""The options of each conversion, as dataclasses: built once by the CLI (``from_args``) or by a Python caller,
and accepted by :func:`ckpt_bridge.to_hf` / :func:`ckpt_bridge.to_dcp` (``options=``), which also still take
the same keyword arguments (``to_hf(src, out, dtype="bf16")`` builds ``ToHF(dtype="bf16")``).

Only plain values live here; checking them against the checkpoint (is ``--base`` a model dir, does the dtype
name exist) is the command's first step, so a bad option fails before anything is read.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ToHF:
    """``to-hf``: see :func:`ckpt_bridge.commands.to_hf.to_hf` for what each option does."""

    dtype: str = "keep"
    max_shard_size: str | int = "5GB"
    config: str | Path | None = None
    tokenizer: str | Path | None = None
    aux: str = "separate"
    aux_prefixes: list[str] | None = None
    models: list[str] | None = None
    base: str | Path | None = None
    titan_model: str | None = None
    lora: str = "both"
    lora_config: str | Path | None = None
    overwrite: bool = False
    trust_pickle: bool = False
    progress: bool | None = None
    allow_missing_rng: bool = False
    dry_run: bool = False
    custom_import: tuple[str, ...] = ()  # modules that register model classes (ckpt_bridge.models.custom_code)
    trust_remote_code: bool = False  # run the checkpoint's auto_map code (transformers' opt-in)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ToHF":
        return cls(dtype=args.dtype, max_shard_size=args.max_shard_size, config=args.config, tokenizer=args.tokenizer,
                   aux=args.aux, aux_prefixes=args.aux_prefix, models=[m for m in args.models.split(",") if m],
                   base=args.base, titan_model=args.titan_model, lora=args.lora, lora_config=args.lora_config,
                   overwrite=args.overwrite, trust_pickle=args.trust_pickle,
                   progress=False if args.quiet else None, allow_missing_rng=args.allow_missing_rng,
                   dry_run=args.dry_run, **code_args(args))


@dataclass(frozen=True)
class ToDCP:
    """``to-dcp``: see :func:`ckpt_bridge.commands.to_dcp.to_dcp` for what each option does.  ``model`` and
    ``sd_adapter`` (Python only) are the trainer's own model and its TorchTitan ``StateDictAdapter``."""

    layout: str = "auto"
    dtype: str = "fp32"
    aux: Any = None
    seed: int = 0
    aux_from: str | Path | None = None
    model: Any = None
    sd_adapter: Any = None
    titan_model: str | None = None
    config: str | Path | None = None
    overwrite: bool = False
    trust_pickle: bool = False
    progress: bool | None = None
    dry_run: bool = False
    # the source holds a TorchTitan model's own names (to-hf's --titan-model; default: what its manifest recorded)
    source_titan_model: str | None = None
    extra_state: bool = False  # copy the source's training extra state beside the DCP (as to-hf writes it)
    custom_import: tuple[str, ...] = ()  # modules that register model classes (ckpt_bridge.models.custom_code)
    trust_remote_code: bool = False  # run the checkpoint's auto_map code (transformers' opt-in)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ToDCP":
        return cls(layout=args.layout, dtype=args.dtype, aux=args.aux, seed=args.seed, aux_from=args.aux_from,
                   config=args.config, titan_model=args.titan_model, overwrite=args.overwrite,
                   trust_pickle=args.trust_pickle, progress=False if args.quiet else None, dry_run=args.dry_run,
                   source_titan_model=getattr(args, "source_titan_model", None),
                   extra_state=getattr(args, "extra_state", False), **code_args(args))


def code_args(args: argparse.Namespace) -> dict[str, Any]:
    """``--custom-import`` / ``--trust-remote-code`` as option fields (every verb that builds a model has them)."""
    return {"custom_import": tuple(getattr(args, "custom_import", None) or ()),
            "trust_remote_code": bool(getattr(args, "trust_remote_code", False))}


def resolve(kind: type, options: Any, kwargs: dict[str, Any], caller: str) -> Any:
    """``options``, or ``kind(**kwargs)``; both at once, or a keyword ``kind`` does not have, is a TypeError
    naming it (what Python says for a wrong keyword argument)."""
    if options is not None:
        if kwargs:
            raise TypeError(f"{caller}() got options= and keyword arguments ({', '.join(sorted(kwargs))}); pass one")
        return options
    known = {f.name for f in fields(kind)}
    wrong = sorted(set(kwargs) - known)
    if wrong:
        raise TypeError(f"{caller}() got an unexpected keyword argument {wrong[0]!r}")
    return kind(**kwargs)
