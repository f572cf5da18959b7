"""Planning an export to Hugging Face: source keys -> a checked plan of transforms
(:mod:`ckpt_bridge.plan.core`), computed before any tensor moves.

Rules, in order:

1. Wrapper prefixes are stripped by a rule table (:data:`WRAPPER_RULES`):
   DDP/FSDP1's ``module.`` at the front, and the ``_fsdp_wrapped_module``,
   ``_orig_mod`` (torch.compile) and ``_checkpoint_wrapped_module`` path
   components anywhere.  Two source keys that collapse onto one name are an
   error, never a silent overwrite.
2. The source must be the persistent state dict of the model class the config
   names (built on the meta device: no memory, no weights), or already what
   ``save_pretrained`` writes: every expected key exactly one source of the
   same shape, every source key used or dropped by a named rule.
3. The targets are what ``save_pretrained`` of the installed transformers
   writes: its save-time conversions (:mod:`ckpt_bridge.plan.conversions`: fused MoE
   experts split per expert, renamed sub-models) grouped the way transformers
   groups them, one transform per group.
4. Tied weights come from the model itself: parameters that are the same
   object (``lm_head.weight`` and ``model.embed_tokens.weight`` when
   ``tie_word_embeddings``) are written once, under the first name, exactly
   as ``save_pretrained`` does.
5. Rotary ``inv_freq`` buffers found in old checkpoints are dropped with a
   reason: transformers recomputes them and no longer stores them.
6. A value head (``score.weight [num_labels, hidden]``, no ``lm_head``) under a
   causal-LM config is a critic: the plan names the model type's
   token-classification class and ``num_labels`` for the exported config.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .conversions import Group
from ..errors import KeyPlanError, few
from ..formats.base import TensorInfo
from ..models.hf import tie_groups
from .core import Plan, Transform, rename
from ..jsonfiles import cache_root, cached_json, transformers_version
from .conversions import Conversions

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


@dataclass
class ModelExpectation:
    """What a transformers model class expects, and how ``save_pretrained`` writes it.

    ``shapes``: the in-memory persistent state dict (keys -> shapes).
    ``tie_groups``: parameter names that are one object, first name first.
    ``save_groups``: the in-memory keys (tied aliases and ``_keys_to_ignore_on_save``
    removed, as ``save_pretrained`` does) bucketed by transformers' reversed
    conversion mapping, each with the on-disk keys and shapes it becomes
    (learned by running the converter on meta tensors).
    ``config_updates``: what the exported config.json must say besides the
    source's (a value head's token-classification class and labels).
    ``transposed``: modules whose weight is stored ``[in, out]`` (transformers'
    ``Conv1D``, GPT-2 style): PEFT's LoRA transposes the delta for exactly these
    (``fan_in_fan_out``), whatever an adapter config says.  ``linear``: every
    ``nn.Linear`` / ``Conv1D`` module, and ``output_embedding`` the one
    ``get_output_embeddings()`` returns (what PEFT's ``"all-linear"`` targets).
    """

    model_class: str
    shapes: dict[str, tuple[int, ...]]
    tie_groups: list[list[str]]
    save_groups: list[dict] = field(default_factory=list)
    config_updates: dict[str, Any] = field(default_factory=dict)
    transposed: list[str] = field(default_factory=list)
    linear: list[str] = field(default_factory=list)
    output_embedding: str | None = None

    @property
    def disk_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(s) for g in self.save_groups for k, s in g["outputs"]}


def _cache_file(config_dir: Path, overrides: dict | None = None) -> Path | None:
    """Where the expectation for this exact config.json (+ overrides) and transformers version is cached."""
    import hashlib

    version = transformers_version()
    try:
        raw = (Path(config_dir) / "config.json").read_bytes()
    except OSError:
        return None
    if version is None:
        return None  # no transformers: nothing to key the expectation by
    root = cache_root()
    extra = json.dumps(overrides or {}, sort_keys=True).encode()
    digest = hashlib.sha256(raw + b"\0transformers " + version.encode() + b"\0" + extra
                            + b"\0v3").hexdigest()[:32]
    return root / "model-keys" / f"{digest}.json"


def expected_model(config_dir: Path, overrides: dict | None = None) -> ModelExpectation:
    """What the config's model class expects, cached per (config.json, overrides, transformers version).

    Building the class means importing transformers, which costs seconds; a
    run that exports every save step of one model pays it once.  The cache
    holds keys, shapes, tie groups and the save-time conversion groups (names
    and shapes only), keyed by the config's bytes: a warm export of a model
    whose conversions are all renames never imports transformers.
    """

    built: list[ModelExpectation] = []

    def build() -> dict:
        exp = _build_expected_model(config_dir, overrides)
        built.append(exp)
        return {"model_class": exp.model_class, "shapes": list(exp.shapes.items()), "tie_groups": exp.tie_groups,
                "save_groups": exp.save_groups, "config_updates": exp.config_updates, "transposed": exp.transposed,
                "linear": exp.linear, "output_embedding": exp.output_embedding}

    fields = ("model_class", "shapes", "tie_groups", "save_groups", "config_updates", "transposed", "linear",
              "output_embedding")
    d = cached_json(_cache_file(config_dir, overrides), build,
                    lambda v: isinstance(v, dict) and all(k in v for k in fields) and isinstance(v["shapes"], list)
                    and all(isinstance(x, list) and len(x) == 2 for x in v["shapes"]))
    if built:
        return built[0]
    return ModelExpectation(d["model_class"], {k: tuple(v) for k, v in d["shapes"]}, d["tie_groups"],
                            d["save_groups"], d["config_updates"], d["transposed"], d["linear"],
                            d["output_embedding"])


def build_meta_model(config_dir: Path, overrides: dict | None = None):
    """The model class ``config_dir/config.json`` names, built on the meta device (no memory, no weights).

    ``overrides``: config attributes to set first (``architectures``, ``num_labels``).

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
            extra = {k: v for k, v in (overrides or {}).items() if k != "architectures"}
            cfg = AutoConfig.from_pretrained(str(config_dir), **extra)
            if overrides and "architectures" in overrides:
                cfg.architectures = list(overrides["architectures"])
            # a config written by another transformers major may not hand its architectures back (4.57 reads
            # a 5.x Qwen2.5-VL config.json with architectures None): the JSON says which class it is
            archs = getattr(cfg, "architectures", None) or \
                json.loads((Path(config_dir) / "config.json").read_text()).get("architectures") or []
            cls = getattr(transformers, archs[0], None) if archs else None
            with torch.device("meta"):
                return cls._from_config(cfg) if cls is not None else AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - any failure means "cannot check"
        raise KeyPlanError(
            f"{config_dir / 'config.json'}: transformers cannot build this model ({type(e).__name__}: {e})"
        ) from None


def _build_expected_model(config_dir: Path, overrides: dict | None = None) -> ModelExpectation:
    model = build_meta_model(config_dir, overrides)
    sd = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    ties = tie_groups(model)
    aliases = {a for g in ties for a in g[1:]}
    ignore = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    conv = save_conversions(config_dir, overrides, model)
    groups = []
    for g in conv.groups(k for k in sd if k not in aliases and k not in ignore):
        out = conv.run(g, {k: sd[k] for k in g.inputs})  # meta tensors: learns names and shapes
        rule = "" if g.is_rename else conv.describe(g)
        if g.is_rename and g.target != g.inputs[0]:
            rule = f"transformers {type(model).__name__} save: rename"
        groups.append({"layer": g.layer, "inputs": list(g.inputs), "patterns": list(g.patterns or []) or None,
                       "outputs": [[k, list(v.shape)] for k, v in out.items()], "rule": rule})
    updates = {}
    if overrides:
        cfg = model.config
        updates = {"architectures": [type(model).__name__], "num_labels": cfg.num_labels,
                   "id2label": {str(k): v for k, v in cfg.id2label.items()},
                   "label2id": dict(cfg.label2id)}
    from transformers.pytorch_utils import Conv1D

    import torch

    modules = list(model.named_modules())
    transposed = [n for n, m in modules if isinstance(m, Conv1D)]
    linear = [n for n, m in modules if isinstance(m, (torch.nn.Linear, Conv1D))]
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out_name = next((n for n, m in modules if m is out_emb), None) if out_emb is not None else None
    return ModelExpectation(type(model).__name__, shapes, ties, groups, updates, transposed, linear, out_name)


_SAVE_CONVERSIONS: dict[tuple[str, str], Any] = {}  # built once per process: converters need live objects


def save_conversions(config_dir: Path, overrides: dict | None = None, model=None):
    """transformers' save-time conversions for this config (built once per process, on first use)."""

    # keyed like the expectation cache (the config's bytes), so a watch process never reuses another model's rules
    key = (str(_cache_file(config_dir, overrides) or Path(config_dir).absolute()), json.dumps(overrides or {}))
    if key not in _SAVE_CONVERSIONS:
        _SAVE_CONVERSIONS[key] = Conversions(model if model is not None else build_meta_model(config_dir, overrides),
                                             "save")
    return _SAVE_CONVERSIONS[key]


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
    """PEFT keys never reach a plain key plan: ``to_hf`` sends LoRA sources to :mod:`ckpt_bridge.commands.to_hf_lora`
    first; any other path that meets them (a DCP section, ...) says where LoRA is handled."""
    if any(k.startswith("base_model.model.") or ".lora_A." in k for k in canon):
        raise KeyPlanError(
            f"{where}: this is a LoRA/PEFT checkpoint (keys like {next(iter(canon))!r}); export it with "
            f"`ckpt-bridge to-hf SRC --out DIR --lora merge|adapter|both`"
        )


def value_head(canon: dict[str, TensorInfo], config_dir: Path) -> dict[str, Any] | None:
    """Overrides that turn the config's causal LM into its token-classification class, if the weights are a critic.

    verl's critic keeps ``architectures: [XForCausalLM]`` in its saved config,
    but its weights have a value head ``score.weight [num_labels, hidden]`` and
    no ``lm_head``.  The class to write is the one transformers' own auto
    mapping names for the model type (``AutoModelForTokenClassification``).
    """
    head = canon.get("score.weight")
    if head is None or "lm_head.weight" in canon or len(head.shape) != 2:
        return None
    try:
        cfg = json.loads((Path(config_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    archs = cfg.get("architectures") or []
    if archs and not archs[0].endswith("ForCausalLM"):
        return None  # the config already names a head class: trust it
    from transformers.models.auto.modeling_auto import MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES as names

    cls = names.get(cfg.get("model_type", ""))
    if cls is None:
        raise KeyPlanError(f"{config_dir / 'config.json'}: the weights have a value head (score.weight "
                           f"{tuple(head.shape)}, no lm_head) but transformers has no token-classification class "
                           f"for model_type {cfg.get('model_type')!r}; pass --config a config naming the class")
    return {"architectures": [cls], "num_labels": int(head.shape[0])}


def plan_hf_export(src: dict[str, TensorInfo], config_dir: Path | None, *, where: str,
                   expectation: ModelExpectation | None = None) -> Plan:
    """The checked plan of transforms that writes ``src`` (source key -> info) as ``save_pretrained`` would.

    The source may hold the model's in-memory names (a trainer's state dict:
    transformers' save-time conversions apply) or already the on-disk names
    (a Hugging Face directory: each tensor is copied).
    """
    canon = canonicalize(src, where)
    source_of = {canonical_key(k): k for k in src}
    _refuse_peft(canon, where)
    if config_dir is None:
        raise KeyPlanError(f"{where}: no config.json found; pass --config PATH (a config.json or a model dir)")
    overrides = value_head(canon, config_dir)
    exp = expectation or expected_model(config_dir, overrides)
    alias_of = {alias: g[0] for g in exp.tie_groups for alias in g[1:]}
    found, missing = _match(canon, exp.shapes, alias_of, source_of, where, exp, config_dir)
    groups = exp.save_groups
    if missing and all(k in canon and tuple(canon[k].shape) == tuple(s) for k, s in exp.disk_shapes.items()):
        # already save_pretrained's format (a Hugging Face directory): every tensor copied as it is
        found, missing = {k: k for k in exp.disk_shapes}, []
        groups = [{"inputs": [k], "outputs": [[k, list(s)]], "patterns": None, "rule": ""}
                  for k, s in exp.disk_shapes.items()]
    plan = Plan(model_class=exp.model_class, config_updates=dict(exp.config_updates))
    if overrides:
        plan.notes.append(f"value head score.weight {tuple(canon['score.weight'].shape)} and no lm_head: written as "
                          f"{exp.model_class} with num_labels={overrides['num_labels']}")
    for g in groups if not missing else []:
        plan.transforms.append(_transform(g, found, canon, source_of, config_dir, overrides))
        if g["patterns"] is None and found[g["inputs"][0]] != g["inputs"][0]:
            plan.notes.append(f"{g['outputs'][0][0]} taken from tied alias {source_of[found[g['inputs'][0]]]}")
    unexpected = _drop_the_rest(plan, canon, source_of, alias_of if not missing else {})
    if missing or unexpected:
        raise gap_error(where, missing, f"{exp.model_class} needs are not in the checkpoint", unexpected,
                        "the model does not have", f" (config: {config_dir / 'config.json'})", "checkpoint")
    return plan.check(src, where=where)


def gap_error(where: str, missing: list[str], missing_why: str, unexpected: list[str], unexpected_why: str,
              tail: str, source: str = "source") -> KeyPlanError:
    """One line for keys a target needs that the source lacks, and source keys the target does not take."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) {missing_why}: {few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} {source} key(s) {unexpected_why}: {few(unexpected)}")
    return KeyPlanError(f"{where}: " + "; ".join(parts) + tail)


def _transform(g: dict, found: dict[str, str], canon: dict[str, TensorInfo], source_of: dict[str, str],
               config_dir: Path, overrides: dict | None) -> Transform:
    """One save group as a transform over the checkpoint's own keys."""
    ins = [found[k] for k in g["inputs"]]
    first = canon[ins[0]]
    outs = tuple(TensorInfo(k, tuple(s), first.dtype) for k, s in g["outputs"])
    if g["patterns"] is None:
        return rename(source_of[ins[0]], outs[0].key, first, g["rule"])
    group = Group(g["layer"], tuple(g["inputs"]), tuple(g["patterns"]))
    mem_of = {source_of[c]: m for c, m in zip(ins, g["inputs"])}
    op = "split" if len(ins) < len(outs) else "fuse" if len(ins) > len(outs) else "convert"
    return Transform(op, tuple(source_of[c] for c in ins), outs,
                     _converter_fn(config_dir, overrides, group, mem_of), g["rule"])


def _drop_the_rest(plan: Plan, canon: dict[str, TensorInfo], source_of: dict[str, str],
                   alias_of: dict[str, str]) -> list[str]:
    """Drop unused source keys a named rule covers (tied aliases, inv_freq); return the others."""
    used = plan.sources()
    unexpected = []
    for c in canon:
        if source_of[c] in used:
            continue
        reason = drop_reason(c)
        if c in alias_of:
            plan.dropped.append((source_of[c], f"tied to {alias_of[c]}"))
        elif reason:
            plan.dropped.append((source_of[c], reason))
        else:
            unexpected.append(source_of[c])
    return unexpected


def _match(canon, shapes, alias_of, source_of, where, exp, config_dir) -> tuple[dict[str, str], list[str]]:
    """({in-memory key: canonical source key}, [in-memory keys with no source]); a wrong shape is an error."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for target, shape in shapes.items():
        if target in alias_of:
            continue  # written once, under the group's first name
        candidates = [target] + [a for a, t in alias_of.items() if t == target]
        hit = next((c for c in candidates if c in canon), None)
        if hit is None:
            missing.append(target)
            continue
        if tuple(canon[hit].shape) != tuple(shape):
            raise KeyPlanError(
                f"{where}: key {source_of[hit]!r} has shape {tuple(canon[hit].shape)} but {exp.model_class} from "
                f"{config_dir / 'config.json'} expects {tuple(shape)} for {target!r}; wrong config for these weights"
            )
        found[target] = hit
    return found, missing


def _converter_fn(config_dir: Path, overrides: dict | None, group: Group, mem_of: dict[str, str]):
    """The transform function of one converter group: transformers' own converter, built on first use."""

    def fn(tensors: dict[str, Any]) -> dict[str, Any]:
        conv = save_conversions(config_dir, overrides)
        return conv.run(group, {mem_of[k]: v for k, v in tensors.items()})

    return fn


