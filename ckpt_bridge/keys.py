"""The key plan: source keys -> target keys, computed and checked before any
tensor moves.

Rules, in order:

1. Wrapper prefixes are stripped by a rule table (:data:`WRAPPER_RULES`):
   DDP/FSDP1's ``module.`` at the front, and the ``_fsdp_wrapped_module``,
   ``_orig_mod`` (torch.compile) and ``_checkpoint_wrapped_module`` path
   components anywhere.  Two source keys that collapse onto one name are an
   error, never a silent overwrite.
2. The target key set is what the consumer expects: for a Hugging Face export,
   the persistent state dict of the model class the config names, built on the
   meta device (no memory, no weights).  Every expected key must have exactly
   one source of the same shape; every source key must land somewhere or be
   dropped by a named rule.
3. Tied weights come from the model itself: parameters that are the same
   object (``lm_head.weight`` and ``model.embed_tokens.weight`` when
   ``tie_word_embeddings``) are written once, under the first name, exactly
   as ``save_pretrained`` does.  An untied config with a missing head is an
   error (rule 2).
4. Rotary ``inv_freq`` buffers found in old checkpoints are dropped with a
   reason: transformers recomputes them and no longer stores them.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import KeyPlanError
from .formats.base import TensorInfo

# (kind, text): "prefix" strips text at the start of a key, "component" removes a
# dotted path component wherever it appears.
WRAPPER_RULES: tuple[tuple[str, str], ...] = (
    ("prefix", "module."),
    ("component", "_fsdp_wrapped_module"),
    ("component", "_orig_mod"),
    ("component", "_checkpoint_wrapped_module"),
)

_DROP_SUFFIXES = {"inv_freq": "rotary inv_freq is a non-persistent buffer recomputed from the config"}


def _drop_reason(key: str) -> str | None:
    return next((why for suf, why in _DROP_SUFFIXES.items() if key.endswith(suf)), None)


def canonical_key(key: str) -> str:
    for kind, text in WRAPPER_RULES:
        if kind == "prefix":
            while key.startswith(text):
                key = key[len(text):]
        else:
            key = ".".join(part for part in key.split(".") if part != text)
    return key


@dataclass
class PlanEntry:
    target: str
    source: str
    info: TensorInfo


@dataclass
class KeyPlan:
    entries: list[PlanEntry]
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (source key, why)
    notes: list[str] = field(default_factory=list)
    model_class: str | None = None

    def lines(self) -> list[str]:
        out = [f"{e.source} -> {e.target}" if e.source != e.target else e.target for e in self.entries]
        out += [f"{src} -> (dropped: {why})" for src, why in self.dropped]
        return out


@dataclass
class ModelExpectation:
    """What a transformers model class expects: keys with shapes, and tie groups."""

    model_class: str
    shapes: dict[str, tuple[int, ...]]
    tie_groups: list[list[str]]


def _cache_file(config_dir: Path) -> Path | None:
    """Where the expectation for this exact config.json and transformers version is cached."""
    import hashlib
    import os
    from importlib import metadata

    try:
        version = metadata.version("transformers")
        raw = (Path(config_dir) / "config.json").read_bytes()
    except (metadata.PackageNotFoundError, OSError):
        return None
    root = Path(os.environ.get("CKPT_BRIDGE_CACHE") or Path.home() / ".cache" / "ckpt-bridge")
    digest = hashlib.sha256(raw + b"\0transformers " + version.encode()).hexdigest()[:32]
    return root / "model-keys" / f"{digest}.json"


def expected_model(config_dir: Path) -> ModelExpectation:
    """What the config's model class expects, cached per (config.json, transformers version).

    Building the class means importing transformers, which costs seconds; a
    run that exports every save step of one model pays it once.  The cache
    holds keys, shapes and tie groups only, keyed by the config's bytes.
    """
    cache = _cache_file(config_dir)
    if cache is not None and cache.is_file():
        try:
            d = json.loads(cache.read_text())
            return ModelExpectation(d["model_class"], {k: tuple(v) for k, v in d["shapes"]}, d["tie_groups"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is rebuilt below
    exp = _build_expected_model(config_dir)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{id(exp)}")
            tmp.write_text(json.dumps({"model_class": exp.model_class, "shapes": list(exp.shapes.items()),
                                       "tie_groups": exp.tie_groups}))
            tmp.replace(cache)
        except OSError:
            pass  # a read-only home is fine: we just do not cache
    return exp


def build_meta_model(config_dir: Path):
    """The model class ``config_dir/config.json`` names, built on the meta device (no memory, no weights).

    Raises :class:`KeyPlanError` if transformers cannot build it.
    """
    import torch

    try:
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise KeyPlanError(f"transformers is needed to check keys against the model: {e}") from None
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = AutoConfig.from_pretrained(str(config_dir))
            archs = getattr(cfg, "architectures", None) or []
            cls = getattr(transformers, archs[0], None) if archs else None
            with torch.device("meta"):
                return cls._from_config(cfg) if cls is not None else AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - any failure means "cannot check"
        raise KeyPlanError(
            f"{config_dir / 'config.json'}: transformers cannot build this model ({type(e).__name__}: {e})"
        ) from None


def tie_groups(model) -> list[list[str]]:
    """Parameter names that are one object (tied weights), first name first."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _build_expected_model(config_dir: Path) -> ModelExpectation:
    model = build_meta_model(config_dir)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return ModelExpectation(type(model).__name__, shapes, tie_groups(model))


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


def _refuse_peft(canon: dict[str, TensorInfo], where: str) -> None:
    """PEFT keys never reach a plain key plan: ``to_hf`` sends LoRA sources to :mod:`ckpt_bridge.lora_export`
    first; any other path that meets them (a DCP section, ...) says where LoRA is handled."""
    if any(k.startswith("base_model.model.") or ".lora_A." in k for k in canon):
        raise KeyPlanError(
            f"{where}: this is a LoRA/PEFT checkpoint (keys like {next(iter(canon))!r}); export it with "
            f"`ckpt-bridge to-hf SRC --out DIR --lora merge|adapter|both`"
        )


def provisional_hf_plan(src: dict[str, TensorInfo], config: dict[str, Any], *, where: str) -> KeyPlan | None:
    """The plan the rules give from the config JSON alone, or None if they cannot decide.

    Building the model class to check keys costs seconds (importing
    transformers), so an export starts streaming with this plan while that runs
    and must then confirm it (:func:`confirm_plan`) before the output is
    committed.  None (no ``tie_word_embeddings`` in the JSON: the class default
    decides) means: wait for the full plan.
    """
    canon = canonicalize(src, where)
    _refuse_peft(canon, where)
    if "tie_word_embeddings" not in config:
        return None
    tied = bool(config["tie_word_embeddings"])
    plan = KeyPlan([])
    for k, info in src.items():
        c = canonical_key(k)
        reason = _drop_reason(c)
        if tied and c == "lm_head.weight" and "model.embed_tokens.weight" in canon:
            plan.dropped.append((k, "tied to model.embed_tokens.weight"))
        elif reason:
            plan.dropped.append((k, reason))
        else:
            plan.entries.append(PlanEntry(c, k, TensorInfo(c, info.shape, info.dtype)))
    return plan


def confirm_plan(plan: KeyPlan, src: dict[str, TensorInfo], config_dir: Path, exp: ModelExpectation,
                 *, where: str) -> KeyPlan:
    """Check a provisional plan against the model's expectations; return the checked plan."""
    final = plan_hf_export(src, config_dir, where=where, expectation=exp)
    got = {(e.target, e.source, tuple(e.info.shape)) for e in plan.entries}
    want = {(e.target, e.source, tuple(e.info.shape)) for e in final.entries}
    if got != want:
        raise KeyPlanError(
            f"{where}: {exp.model_class} expects a different key set than the config's rules gave "
            f"(extra: {_few(sorted(t for t, _, _ in got - want))}; missing: {_few(sorted(t for t, _, _ in want - got))})"
        )
    return final


def plan_hf_export(src: dict[str, TensorInfo], config_dir: Path | None, *, where: str,
                   expectation: ModelExpectation | None = None) -> KeyPlan:
    """Plan an export of ``src`` (source key -> info) to a Hugging Face model directory."""
    canon = canonicalize(src, where)
    source_of = {canonical_key(k): k for k in src}
    _refuse_peft(canon, where)
    if config_dir is None:
        raise KeyPlanError(f"{where}: no config.json found; pass --config PATH (a config.json or a model dir)")
    exp = expectation or expected_model(config_dir)
    plan = KeyPlan([], model_class=exp.model_class)
    alias_of: dict[str, str] = {}
    for group in exp.tie_groups:
        for alias in group[1:]:
            alias_of[alias] = group[0]

    missing: list[str] = []
    used: set[str] = set()
    for target, shape in exp.shapes.items():
        if target in alias_of:
            continue  # written once, under the group's first name
        candidates = [target] + [a for a, t in alias_of.items() if t == target]
        found = next((c for c in candidates if c in canon), None)
        if found is None:
            missing.append(target)
            continue
        info = canon[found]
        if tuple(info.shape) != tuple(shape):
            raise KeyPlanError(
                f"{where}: key {source_of[found]!r} has shape {tuple(info.shape)} but {exp.model_class} from "
                f"{config_dir / 'config.json'} expects {tuple(shape)} for {target!r}; wrong config for these weights"
            )
        plan.entries.append(PlanEntry(target, source_of[found], TensorInfo(target, info.shape, info.dtype)))
        used.add(found)
        if found != target:
            plan.notes.append(f"{target} taken from tied alias {source_of[found]}")
    unexpected: list[str] = []
    for c in canon:
        if c in used:
            continue
        reason = _drop_reason(c)
        if c in alias_of:
            plan.dropped.append((source_of[c], f"tied to {alias_of[c]}"))
        elif reason:
            plan.dropped.append((source_of[c], reason))
        else:
            unexpected.append(source_of[c])
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) {exp.model_class} needs are not in the checkpoint: {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint key(s) the model does not have: {_few(unexpected)}")
        raise KeyPlanError(f"{where}: " + "; ".join(parts) + f" (config: {config_dir / 'config.json'})")
    return plan


def _few(keys: list[str], n: int = 4) -> str:
    s = ", ".join(keys[:n])
    return s + (f" and {len(keys) - n} more" if len(keys) > n else "")
