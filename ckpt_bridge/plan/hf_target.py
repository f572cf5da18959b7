"""Planning an export to Hugging Face: source keys -> a checked plan of transforms
(:mod:`ckpt_bridge.plan.core`), computed before any tensor moves.

This is the HF target of the one planner (:mod:`.planner`: wrapper rules, recomputed buffers and
transformers' load-time conversions bring any source to the model's in-memory names, shared with the trainer
target).  What this target adds:

1. The wanted names are the persistent state dict of the model class the config
   names (built on the meta device: no memory, no weights): every expected key
   exactly one source of the same shape, every source key used or dropped by a
   named rule.  A source that already is what ``save_pretrained`` writes (a
   Hugging Face directory) is copied key for key.
2. Those names are written the way ``save_pretrained`` of the installed
   transformers writes them: its save-time conversions (:mod:`.conversions`, the
   reverse of the load-time ones: fused MoE experts split per expert, renamed
   sub-models) grouped the way transformers groups them, one transform per group.
3. Tied weights come from the model itself: parameters that are the same
   object (``lm_head.weight`` and ``model.embed_tokens.weight`` when
   ``tie_word_embeddings``) are written once, under the first name, exactly
   as ``save_pretrained`` does.
4. A value head (``score.weight [num_labels, hidden]``, no ``lm_head``) under a
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

from ..errors import KeyPlanError
from ..formats.base import TensorInfo
from ..jsonfiles import cache_root, cached_json, transformers_version
from ..models.custom_code import code_key, model_class_named
from ..models.hf import tie_groups
from .conversions import Conversions, Group
from .core import Plan, Transform, rename
from .planner import Target, canonicalize, plan_to

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
                            + b"\0v3" + code_key().encode()).hexdigest()[:32]
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
            cls = model_class_named(archs[0], cfg) if archs else None  # built in, or registered (custom_code)
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
    conv = hf_conversions(config_dir, overrides, "save", model)
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


_CONVERSIONS: dict[tuple[str, str, str], Conversions] = {}  # built once per process: converters need live objects


def hf_conversions(config_dir: Path, overrides: dict | None, direction: str, model=None) -> Conversions:
    """transformers' conversions of this config's class in one direction (``save`` / ``load``), built once per
    process on first use."""

    # keyed like the expectation cache (the config's bytes), so a watch process never reuses another model's rules
    key = (str(_cache_file(config_dir, overrides) or Path(config_dir).absolute()), json.dumps(overrides or {}),
           direction)
    if key not in _CONVERSIONS:
        _CONVERSIONS[key] = Conversions(model if model is not None else build_meta_model(config_dir, overrides),
                                        direction)
    return _CONVERSIONS[key]


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
    transformers' save-time conversions apply), its on-disk names (a Hugging
    Face directory: each tensor is copied), or names transformers' load-time
    conversions bring to the in-memory ones.
    """
    canon = canonicalize(src, where)
    _refuse_peft(canon, where)
    if config_dir is None:
        raise KeyPlanError(f"{where}: no config.json found; pass --config PATH (a config.json or a model dir)")
    overrides = value_head(canon, config_dir)
    exp = expectation or expected_model(config_dir, overrides)
    return plan_to(src, hf_target(exp, config_dir, overrides, canon), where=where)


def hf_target(exp: ModelExpectation, config_dir: Path, overrides: dict | None,
              canon: dict[str, TensorInfo]) -> Target:
    """What ``save_pretrained`` of ``exp``'s class writes, as a target of :func:`.planner.plan_to`."""
    alias_of = {alias: g[0] for g in exp.tie_groups for alias in g[1:]}
    wanted = {k: s for k, s in exp.shapes.items() if k not in alias_of}  # a tied pair is written once
    reachable = all(k in canon or any(a in canon for a, t in alias_of.items() if t == k) for k in wanted)
    disk = exp.disk_shapes
    saved = not reachable and all(k in canon and tuple(canon[k].shape) == tuple(s) for k, s in disk.items())
    if saved:  # already save_pretrained's form (a Hugging Face directory): every tensor copied as it is
        wanted, groups = dict(disk), [{"inputs": [k], "outputs": [[k, list(s)]], "patterns": None, "rule": ""}
                                      for k, s in disk.items()]
    else:
        groups = exp.save_groups
    cfg = config_dir / "config.json"
    return Target(
        name=f"{exp.model_class} from {cfg}", wants={k: (k, tuple(s)) for k, s in wanted.items()},
        ties=[] if saved else exp.tie_groups,
        load=None if saved else (lambda: hf_conversions(config_dir, overrides, "load")), known=set(exp.shapes),
        then=lambda infos: _save_plan(exp, groups, infos, config_dir, overrides),
        missing_why=f"{exp.model_class} needs are not in the checkpoint", unexpected_why="the model does not have",
        tail=f" (config: {cfg})", source_word="checkpoint")


def _save_plan(exp: ModelExpectation, groups: list[dict], infos: dict[str, TensorInfo], config_dir: Path,
               overrides: dict | None) -> Plan:
    """The in-memory names (``infos``) -> what ``save_pretrained`` writes: one transform per save group."""
    plan = Plan(model_class=exp.model_class, config_updates=dict(exp.config_updates))
    if overrides:
        plan.notes.append(f"value head score.weight {tuple(infos['score.weight'].shape)} and no lm_head: written "
                          f"as {exp.model_class} with num_labels={overrides['num_labels']}")
    for g in groups:
        first = infos[g["inputs"][0]]
        outs = tuple(TensorInfo(k, tuple(s), first.dtype) for k, s in g["outputs"])
        if g["patterns"] is None:
            plan.transforms.append(rename(g["inputs"][0], outs[0].key, first, g["rule"]))
            continue
        group = Group(g["layer"], tuple(g["inputs"]), tuple(g["patterns"]))
        n_in, n_out = len(group.inputs), len(outs)
        op = "split" if n_in < n_out else "fuse" if n_in > n_out else "convert"
        plan.transforms.append(Transform(op, group.inputs, outs, _converter_fn(config_dir, overrides, group),
                                         g["rule"]))
    return plan


def _converter_fn(config_dir: Path, overrides: dict | None, group: Group):
    """The transform function of one save group: transformers' own converter, built on first use."""

    def fn(tensors: dict[str, Any]) -> dict[str, Any]:
        return hf_conversions(config_dir, overrides, "save").run(group, tensors)

    return fn
