"""LoRA checkpoints (a PEFT-wrapped model saved by verl): fold the adapters into
the base weights, and/or write them as a PEFT adapter directory.

A verl FSDP actor trained with LoRA is a ``PeftModel``, so its rank files hold
PEFT's module tree::

    base_model.model.<fqn>.base_layer.weight        the frozen base weight W
    base_model.model.<fqn>.base_layer.bias          (kept as <fqn>.bias)
    base_model.model.<fqn>.lora_A.<adapter>.weight  A  [r, in]
    base_model.model.<fqn>.lora_B.<adapter>.weight  B  [out, r]
    base_model.model.<fqn>.lora_embedding_A.<adapter>   (embedding targets: A [r, vocab])
    base_model.model.<fqn>.lora_embedding_B.<adapter>   (B [dim, r])
    base_model.model.<fqn>.modules_to_save.<adapter>.weight   a trained full copy
    base_model.model.<fqn>.original_module.weight             the untouched original
    base_model.model.<fqn>.weight                   everything LoRA did not touch

(``checkpoint.save_lora_only=True`` keeps only the ``lora_`` keys; the base then
comes from ``--base`` or the model dir recorded in the checkpoint.)

Everything here is planned as transforms (:mod:`ckpt_bridge.plan.core`): a *fold*
``W, A, B -> W'`` per adapted module, a *rename* for every other weight, and,
for the adapter directory, a rename of each adapter tensor to the name
``PeftModel.save_pretrained`` writes.  The fold repeats PEFT's
``LoraLayer.merge`` / ``get_delta_weight`` (peft 0.21, ``tuners/lora/layer.py``)
operation for operation, so the result equals ``merge_and_unload()`` bit for bit:

* Linear:    ``W += transpose(B @ A, fan_in_fan_out) * scale`` (in place, so a
  delta in another dtype is added the way ``weight.data += delta`` adds it);
  ``fan_in_fan_out`` is the module's class, as PEFT's ``dispatch_default``
  decides it: on for transformers' ``Conv1D``, off for ``nn.Linear``, whatever
  the adapter config says
* Embedding: ``W += (transpose(B @ A, True) * scale).to(W.dtype)``
* fp16/bf16 adapters: ``A`` and ``B`` go to fp32 for the product, the delta
  back to the adapter dtype (PEFT does this on CPU; we always compute on CPU,
  so a merge PEFT ran on a GPU may differ in the last bf16 bit)
* ``scale = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (a Python float,
  as PEFT keeps it).

What we cannot fold exactly is refused with the module named: DoRA
(``lora_magnitude_vector``), a trained LoRA bias, convolution LoRA, several
adapters, other PEFT tuner types.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

import torch

from .. import jsonfiles
from . import peft_match
from ..errors import CheckpointFormatError, KeyPlanError
from ..formats.base import TensorInfo
from ..jsonfiles import read_json
from .planner import canonical_key
from .core import Plan, derive, rename

PEFT_PREFIX = "base_model.model."
LORA_MODES = ("merge", "adapter", "both")
ADAPTER_SUBDIR = "lora_adapter"  # where --lora both puts the adapter, inside the merged model dir
BASE_NS = "base::"  # plan keys read from the --base model dir, not the checkpoint
META_FILE = "lora_train_meta.json"
ADAPTER_CONFIG = "adapter_config.json"

# (regex on the key after base_model.model., role).  The adapter name is group 2.
_PATTERNS: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), role) for p, role in (
    (r"^(.+)\.lora_A\.([^.]+)\.weight$", "A"),
    (r"^(.+)\.lora_B\.([^.]+)\.weight$", "B"),
    (r"^(.+)\.lora_embedding_A\.([^.]+)$", "embA"),
    (r"^(.+)\.lora_embedding_B\.([^.]+)$", "embB"),
    (r"^(.+)\.modules_to_save\.([^.]+)\.(.+)$", "copy"),
    (r"^(.+)\.original_module\.(.+)$", "original"),
    (r"^(.+)\.base_layer\.(weight|bias)$", "base"),
))
# Parameters of adapters we do not fold exactly: (regex, what it is).
_REFUSE: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), what) for p, what in (
    (r"^(.+)\.lora_magnitude_vector\.", "DoRA (lora_magnitude_vector): its merge renormalises W by a weight norm"),
    (r"^(.+)\.lora_B\.[^.]+\.bias$", "a trained LoRA bias (lora_bias=True)"),
    (r"^(.+?)\.base_layer\.base_layer\.", "nested adapter layers"),
    (r"^(.+?)\.base_layer\.(?!(?:weight|bias)$)", "LoRA on a bare parameter (target_parameters / ParamWrapper)"),
    (r"^(.+?)\.(?:token_adapter|trainable_tokens_)", "trainable token deltas (trainable_token_indices)"),
    (r"^(.+?)\.(?:lora_|hada_|lokr_|ia3_|oft_|boft_|vera_|adapter_|ln_tuning|prompt_|fourierft_)", "an adapter type "
     "ckpt-bridge does not fold (plain LoRA only)"),
))


@dataclass
class LoraSettings:
    """What decides each module's scale, and where it was read from."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    task_type: str | None = "CAUSAL_LM"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: Any = None  # as the adapter config gave it (list or regex), else derived from the keys
    modules_to_save: list[str] | None = None
    bias: str = "none"  # PEFT's LoRA bias mode (none / all / lora_only): which base biases were trained
    source: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # the adapter_config.json we read, if any

    def rank_alpha(self, module: str) -> tuple[int, float]:
        return (_pattern_value(self.rank_pattern, module, self.r),
                _pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def scale(self, module: str) -> float:
        """PEFT's ``LoraLayer.update_layer``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.rank_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(pattern: dict, module: str, default):
    # PEFT's get_pattern_key: a pattern matches the module name or a dotted suffix of it (regex allowed)
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class LoraModule:
    """One adapted module: its HF name and the source keys of W (if inside), A and B."""

    name: str
    kind: str  # "linear" | "embedding"
    a: str = ""
    b: str = ""
    base: str | None = None
    base_bias: str | None = None


@dataclass
class LoraCheckpoint:
    """The LoRA structure of a checkpoint, from its key set (no tensor data read)."""

    settings: LoraSettings
    adapter: str
    modules: dict[str, LoraModule]
    plain: dict[str, str]  # HF name -> source key (weights LoRA did not touch)
    copies: dict[str, str]  # HF name -> source key of a modules_to_save copy
    originals: list[str]  # source keys of the originals those copies replace
    infos: dict[str, TensorInfo]  # every source key

    @property
    def copy_modules(self) -> list[str]:
        """Modules whose trained modules_to_save copy the checkpoint holds."""
        return sorted({k.rsplit(".", 1)[0] for k in self.copies})

    @property
    def base_inside(self) -> bool:
        return all(m.base is not None for m in self.modules.values())

    def summary(self) -> dict[str, Any]:
        s = self.settings
        return {"r": s.r, "alpha": s.lora_alpha, "rslora": s.use_rslora, "targets": self.target_names(),
                "modules": len(self.modules), "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in self.copies}),
                "base_inside": self.base_inside, "settings_from": s.source}

    def target_names(self) -> list[str]:
        return sorted({m.name.rsplit(".", 1)[-1] for m in self.modules.values()})


def is_lora(keys) -> bool:
    """Does this key set come from a PEFT-wrapped model?"""
    return any(k.startswith(PEFT_PREFIX) or ".lora_A." in k or ".lora_embedding_A." in k for k in keys)


def find_settings(ckpt_dir: Path, lora_config: str | Path | None = None) -> LoraSettings | None:
    """The adapter settings: ``--lora-config`` (an adapter_config.json or its dir), else one saved
    with the checkpoint, else verl's ``lora_train_meta.json`` (r, alpha, task_type only: verl's own
    LoRA config has no rsLoRA / patterns, so those need ``--lora-config``)."""
    cands = [Path(lora_config)] if lora_config is not None else [
        ckpt_dir / ADAPTER_CONFIG, ckpt_dir / ADAPTER_SUBDIR / ADAPTER_CONFIG,
        ckpt_dir / "huggingface" / ADAPTER_CONFIG]
    for p in cands:
        f = p / ADAPTER_CONFIG if p.is_dir() else p
        if f.is_file():
            return _from_adapter_config(f)
        if lora_config is not None:
            raise KeyPlanError(f"--lora-config {p}: no {ADAPTER_CONFIG} there")
    meta = ckpt_dir / META_FILE
    if meta.is_file():
        d = read_json(meta, jsonfiles.LORA_META, required=("r", "lora_alpha"), fix=_FIX)
        return LoraSettings(r=d["r"], lora_alpha=d["lora_alpha"], task_type=d.get("task_type"), source=str(meta))
    return None


# PEFT's LoraConfig default for a field an adapter_config.json leaves out (peft 0.21 tuners/lora/config.py):
# PEFT loads such a file with it, so the fold must use it too (not alpha = r)
PEFT_DEFAULT_ALPHA = 8
_FIX = "fix it, or pass --lora-config ADAPTER_DIR (the adapter_config.json the run used)"


def _from_adapter_config(f: Path) -> LoraSettings:
    d = read_json(f, jsonfiles.ADAPTER_CONFIG, required=("r",), fix=_FIX)
    if d.get("peft_type", "LORA") != "LORA":
        raise KeyPlanError(f"{f}: peft_type {d.get('peft_type')!r}; ckpt-bridge folds LoRA adapters only")
    if d.get("use_dora"):
        raise KeyPlanError(f"{f}: use_dora=true; a DoRA merge renormalises W by its norm and is not folded exactly "
                           f"by ckpt-bridge (use --lora adapter, or PEFT's merge_and_unload)")
    return LoraSettings(r=d["r"], lora_alpha=d.get("lora_alpha", PEFT_DEFAULT_ALPHA),
                        use_rslora=d.get("use_rslora", False), fan_in_fan_out=d.get("fan_in_fan_out", False),
                        task_type=d.get("task_type"),
                        rank_pattern=d.get("rank_pattern") or {}, alpha_pattern=d.get("alpha_pattern") or {},
                        target_modules=d.get("target_modules"), modules_to_save=d.get("modules_to_save"),
                        bias=d.get("bias", "none"),
                        source=str(f), config=d)


def parse(infos: dict[str, TensorInfo], settings: LoraSettings | None, *, where: str) -> LoraCheckpoint:
    """Sort every key into folds, renames, copies and dropped originals; refuse what we cannot fold."""
    if settings is None:
        raise KeyPlanError(f"{where}: LoRA keys but no {META_FILE} or {ADAPTER_CONFIG} next to them; pass "
                           f"--lora-config ADAPTER_DIR (the adapter_config.json the run used)")
    mods: dict[str, LoraModule] = {}
    plain, copies, originals, adapters = {}, {}, [], set()
    for key in infos:
        rest = canonical_key(key)  # FSDP1 / compile wrapper components, as for any other checkpoint
        rest = rest[len(PEFT_PREFIX):] if rest.startswith(PEFT_PREFIX) else rest
        role, m = next(((role, m) for pat, role in _PATTERNS if (m := pat.match(rest))), (None, None))
        if role is None or ".base_layer" in m.group(1):
            bad = next(((m2, what) for pat, what in _REFUSE if (m2 := pat.match(rest))), None)
            if bad is not None:
                raise KeyPlanError(f"{where}: module {bad[0].group(1)!r} holds {bad[1]} ({key}); ckpt-bridge does "
                                   f"not fold this exactly: merge that run with PEFT's merge_and_unload instead")
            plain[rest] = key
        elif role in ("A", "B", "embA", "embB"):
            adapters.add(m.group(2))
            mod = mods.setdefault(m.group(1), LoraModule(m.group(1), "linear"))
            if role.startswith("emb"):
                mod.kind = "embedding"
            setattr(mod, role[-1].lower(), key)
        elif role == "copy":
            adapters.add(m.group(2))
            copies[f"{m.group(1)}.{m.group(3)}"] = key
        elif role == "original":
            originals.append(key)
        else:
            mod = mods.setdefault(m.group(1), LoraModule(m.group(1), "linear"))
            if m.group(2) == "weight":
                mod.base = key
            else:
                mod.base_bias = key
    if len(adapters) > 1:
        raise KeyPlanError(f"{where}: {len(adapters)} adapters ({', '.join(sorted(adapters))}) in one checkpoint; "
                           f"ckpt-bridge folds a single adapter (PEFT: set_adapter, then merge_and_unload)")
    for mod in mods.values():
        if not (mod.a or mod.b):
            raise KeyPlanError(f"{where}: module {mod.name!r} has a base_layer but no lora_A / lora_B: an adapter "
                               f"type ckpt-bridge does not fold (plain LoRA only)")
        if not (mod.a and mod.b):
            raise KeyPlanError(f"{where}: module {mod.name!r} has {'lora_A' if mod.a else 'lora_B'} but not "
                               f"{'lora_B' if mod.a else 'lora_A'}; the checkpoint is incomplete")
        a, b = infos[mod.a], infos[mod.b]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise KeyPlanError(f"{where}: module {mod.name!r}: LoRA weights of shape {tuple(a.shape)}; only Linear "
                               f"and Embedding LoRA are folded (not convolutions)")
        r = a.shape[0]  # A is [r, in] (Linear) or [r, vocab] (Embedding)
        want, _ = settings.rank_alpha(mod.name)
        if r != want:
            raise KeyPlanError(f"{where}: module {mod.name!r} has rank {r} but {settings.source} says r={want}; "
                               f"pass --lora-config with the adapter config the run used")
    return LoraCheckpoint(settings, next(iter(adapters), "default"), mods, plain, copies, originals, infos)


def _fold_linear(w: str, a: str, b: str, out: str, scale: float, fan_in_fan_out: bool) -> Callable:
    def fold(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        delta = _delta(t[a], t[b], t[b].dtype, scale, fan_in_fan_out)
        return {out: _add(t[w], delta)}
    return fold


def _fold_embedding(w: str, a: str, b: str, out: str, scale: float) -> Callable:
    def fold(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # PEFT's Embedding takes the delta dtype from A and casts it to W's dtype before adding
        delta = _delta(t[a], t[b], t[a].dtype, scale, True)
        return {out: _add(t[w], delta.to(t[w].dtype))}
    return fold


def _delta(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scale: float, transpose: bool) -> torch.Tensor:
    """PEFT's get_delta_weight on CPU: half-precision factors are multiplied in fp32."""
    half = dtype in (torch.float16, torch.bfloat16)
    if half:
        a, b = a.float(), b.float()
    delta = b @ a
    delta = (delta.T if transpose else delta) * scale
    return delta.to(dtype) if half else delta


def _add(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    if tuple(delta.shape) != tuple(w.shape):
        raise ValueError(f"LoRA delta {tuple(delta.shape)} does not fit the base weight {tuple(w.shape)}")
    out = w.clone()  # the reader's tensor may be a read-only map of the file
    out += delta  # in place, like PEFT's `weight.data += delta` (a delta in another dtype adds the same way)
    return out


def merge_plan(ck: LoraCheckpoint, base: dict[str, TensorInfo] | None, *, where: str,
               transposed: Collection[str] = ()) -> Plan:
    """Transforms giving the merged model under HF names: folds, renames, modules_to_save copies.

    ``base``: the tensors of a ``--base`` model dir (HF names), for checkpoints
    that do not hold the base weights; plan keys read from it carry
    :data:`BASE_NS`.  ``transposed``: the modules whose weight is stored
    ``[in, out]`` (transformers' ``Conv1D``).  PEFT decides ``fan_in_fan_out``
    per module from its class, not from the config (``dispatch_default``: an
    ``nn.Linear`` target turns it off with a warning, a ``Conv1D`` turns it
    on), so the config's flag does not enter the fold.
    """
    plan = Plan()
    src_infos = dict(ck.infos)
    if base is not None:
        src_infos.update({BASE_NS + k: v for k, v in base.items()})

    def base_key(name: str, inside: str | None) -> str:
        if inside is not None:
            return inside
        if base is None or name not in base:
            raise KeyPlanError(f"{where}: no base weight for {name!r} (a LoRA-only save); pass --base HF_DIR, the "
                               f"model the run started from")
        return BASE_NS + name

    s = ck.settings
    covered: set[str] = set()
    for mod in ck.modules.values():
        w_name = f"{mod.name}.weight"
        w = base_key(w_name, mod.base)
        scale = s.scale(mod.name)
        fn = (_fold_embedding(w, mod.a, mod.b, w_name, scale) if mod.kind == "embedding"
              else _fold_linear(w, mod.a, mod.b, w_name, scale, mod.name in transposed))
        rule = f"PEFT LoRA merge, scale {'alpha/sqrt(r)' if s.use_rslora else 'alpha/r'} = {scale:g}"
        plan.transforms.append(derive("fold", {k: src_infos[k] for k in (w, mod.a, mod.b)}, fn, rule))
        covered.add(w_name)
        bias = mod.base_bias or (BASE_NS + f"{mod.name}.bias" if base is not None and f"{mod.name}.bias" in base
                                 else None)
        if bias is not None:
            plan.transforms.append(rename(bias, f"{mod.name}.bias", src_infos[bias], "strip base_layer"))
            covered.add(f"{mod.name}.bias")
    for name, key in ck.copies.items():
        plan.transforms.append(rename(key, name, src_infos[key], "modules_to_save copy replaces the original"))
        covered.add(name)
    plan.dropped += [(k, "original of a modules_to_save copy") for k in ck.originals]
    for name, key in ck.plain.items():
        if name in covered:
            raise KeyPlanError(f"{where}: {key!r} and a LoRA module both give {name!r}")
        plan.transforms.append(rename(key, name, src_infos[key], "strip base_model.model."))
        covered.add(name)
    if base is not None:  # the rest of the model comes from the base dir unchanged
        used = plan.sources()
        for name, info in base.items():
            if name not in covered:
                plan.transforms.append(rename(BASE_NS + name, name, info, "from --base"))
            elif BASE_NS + name not in used:
                plan.dropped.append((BASE_NS + name, "replaced by the checkpoint's weight"))
    plan.notes.append(f"LoRA: {len(ck.modules)} module(s) folded (r={s.r}, alpha={s.lora_alpha}"
                      f"{', rsLoRA' if s.use_rslora else ''}; settings from {s.source})")
    return plan.check(src_infos, where=where)


def merged_names(ck: LoraCheckpoint, base: dict[str, TensorInfo] | None) -> dict[str, TensorInfo]:
    """The merged model's weight names (HF in-memory names) with their source's info, without planning the folds."""
    out = {n: ck.infos[k] for n, k in {**ck.plain, **ck.copies}.items()}
    for mod in ck.modules.values():
        w = ck.infos.get(mod.base) if mod.base else (base or {}).get(f"{mod.name}.weight")
        if w is not None:
            out[f"{mod.name}.weight"] = w
    out.update({k: v for k, v in (base or {}).items() if k not in out})
    return out


def peft_adapter_plan(ck: LoraCheckpoint, base: dict[str, TensorInfo] | None, *, where: str) -> Plan:
    """Renames to the keys ``PeftModel.save_pretrained`` writes (adapter name removed).

    PEFT also saves the base weight of an adapted embedding (``save_embedding_layers``
    "auto"); we do the same when that weight is available.
    """
    plan = Plan()

    for mod in ck.modules.values():
        parts = ("lora_embedding_A", "lora_embedding_B") if mod.kind == "embedding" else ("lora_A.weight",
                                                                                             "lora_B.weight")
        for k, part in zip((mod.a, mod.b), parts):
            plan.transforms.append(rename(k, f"{PEFT_PREFIX}{mod.name}.{part}", ck.infos[k],
                                          "PEFT adapter key (adapter name removed)"))
        if mod.kind == "embedding":
            w = mod.base or (BASE_NS + f"{mod.name}.weight" if base and f"{mod.name}.weight" in base else None)
            if w is not None:
                info = ck.infos.get(w) or base[w[len(BASE_NS):]]
                plan.transforms.append(rename(w, f"{PEFT_PREFIX}{mod.name}.base_layer.weight", info,
                                              "PEFT saves adapted embedding layers"))
    for name, key in ck.copies.items():
        plan.transforms.append(rename(key, PEFT_PREFIX + name, ck.infos[key], "PEFT modules_to_save key"))
    for key, peft_name in trained_biases(ck, where).items():
        plan.transforms.append(rename(key, peft_name, ck.infos[key], f"PEFT bias={ck.settings.bias!r} saves it"))
    return plan


def trained_biases(ck: LoraCheckpoint, where: str) -> dict[str, str]:
    """Source key -> adapter key of the biases the adapter dir must carry (PEFT's ``_get_learnable_bias_state_dict``:
    ``bias="all"`` trains and saves every ``*.bias``, ``"lora_only"`` those of the adapted modules' base layers).
    The merged model has them anyway (they are plain weights of the checkpoint)."""
    bias = ck.settings.bias
    if bias == "none":
        return {}
    if bias not in ("all", "lora_only"):
        raise KeyPlanError(f"{ck.settings.source}: bias {bias!r}; PEFT's LoRA knows 'none', 'all' and 'lora_only'")
    if not ck.base_inside:
        raise KeyPlanError(f"{where}: bias={bias!r} trains base biases, but this LoRA-only checkpoint "
                           f"(save_lora_only) does not hold them: neither output could have the trained biases; "
                           f"save the run with the base weights")
    out = {m.base_bias: f"{PEFT_PREFIX}{m.name}.base_layer.bias" for m in ck.modules.values() if m.base_bias}
    if bias == "all":
        out.update({key: PEFT_PREFIX + name for name, key in ck.plain.items() if name.endswith(".bias")})
    return out


def adapter_config(ck: LoraCheckpoint, base_model: str | None, model: ModelView | None = None) -> dict[str, Any]:
    """adapter_config.json: the run's own config where we have it (checked against the tensors by
    :func:`check_targets`), with what it leaves out (target_modules, modules_to_save) set from the tensors."""
    s = ck.settings
    cfg = dict(s.config) if s.config else {
        "peft_type": "LORA", "task_type": s.task_type, "r": s.r, "lora_alpha": s.lora_alpha,
        "lora_dropout": 0.0, "bias": "none", "use_rslora": s.use_rslora, "use_dora": False,
        "fan_in_fan_out": s.fan_in_fan_out, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
    }
    view = model or ModelView.of(ck, None)
    if not s.config or not s.target_modules:
        cfg["target_modules"] = _targets(ck, view)
    if ck.copy_modules and not cfg.get("modules_to_save"):
        cfg["modules_to_save"] = sorted({m.rsplit(".", 1)[-1] for m in ck.copy_modules})
    if peft_match.mismatch(cfg, ck.modules, ck.copy_modules, view.modules, view.all_linear, view.complete):
        # leaf names that also reach a module we could not see: name every module exactly instead
        cfg["target_modules"] = sorted(ck.modules)
        cfg["modules_to_save"] = sorted(ck.copy_modules) or cfg.get("modules_to_save")
    cfg["inference_mode"] = True
    cfg["base_model_name_or_path"] = base_model or cfg.get("base_model_name_or_path")
    return cfg


@dataclass
class ModelView:
    """The module names PEFT would match against: the model class's (``complete``) or only the checkpoint's."""

    modules: set[str]
    all_linear: set[str]
    complete: bool

    @classmethod
    def of(cls, ck: LoraCheckpoint, exp: Any | None) -> "ModelView":
        """From a :class:`ckpt_bridge.plan.hf_target.ModelExpectation` when there is one, else from the checkpoint's keys."""
        if exp is None:
            mods = {k.rsplit(".", 1)[0] for k in ck.plain} | set(ck.modules) | set(ck.copy_modules)
            return cls(mods, set(), ck.base_inside)
        linear = set(exp.linear) - {exp.output_embedding}
        if exp.output_embedding is None and ck.settings.task_type == "SEQ_CLS":  # PEFT spares the classifier head
            linear -= set(next(([n] for n in peft_match.CLASSIFIER_MODULES if n in linear), []))
        return cls({k.rsplit(".", 1)[0] for k in exp.shapes if "." in k}, linear, True)


def check_targets(ck: LoraCheckpoint, view: ModelView) -> None:
    """The run's adapter_config.json must adapt exactly the modules the tensors hold (PEFT's matching rules,
    :mod:`ckpt_bridge.plan.peft_match`), or the adapter dir and the merged model would be two different models.

    A config that disagrees is refused rather than rewritten: it is evidently not this run's config, so its
    alpha, rsLoRA and patterns (which set every fold's scale and cannot be checked against the tensors) are
    not to be trusted either.  A field it leaves out is filled from the tensors by :func:`adapter_config`.
    """
    cfg = ck.settings.config
    if not cfg:
        return
    probe = dict(cfg)
    if not cfg.get("target_modules"):
        probe["target_modules"] = sorted(ck.modules)
    if not cfg.get("modules_to_save"):
        probe["modules_to_save"] = sorted(ck.copy_modules)
    problem = peft_match.mismatch(probe, ck.modules, ck.copy_modules, view.modules, view.all_linear, view.complete)
    if problem:
        raise KeyPlanError(f"{ck.settings.source}: {problem}; it is not the config this checkpoint was trained with: "
                           f"pass --lora-config with the adapter_config.json the run used")


def _targets(ck: LoraCheckpoint, view: ModelView) -> list[str]:
    """Leaf names (q_proj, ...) when every module of that leaf name is adapted, else the exact names."""
    out: set[str] = set()
    for name in ck.modules:
        leaf = name.rsplit(".", 1)[-1]
        others = [m for m in view.modules if m.rsplit(".", 1)[-1] == leaf and m not in ck.modules]
        out.add(name if others else leaf)
    return sorted(out)


def recorded_base(cfg_dir: Path | None, settings: LoraSettings) -> tuple[Path, str] | None:
    """(a local model dir the checkpoint names as its base, the file naming it): the adapter config's
    ``base_model_name_or_path``, else config.json's ``_name_or_path``.  Only reported: the caller follows it
    only when it lies inside the checkpoint (docs/safety.md)."""
    names = [(settings.config.get("base_model_name_or_path"), settings.source)]
    if cfg_dir is not None and (cfg_dir / "config.json").is_file():
        names.append((read_json(cfg_dir / "config.json", jsonfiles.CONFIG).get("_name_or_path"),
                      str(cfg_dir / "config.json")))
    for n, named_by in names:
        if isinstance(n, str) and n and (Path(n) / "config.json").is_file():
            return Path(n), named_by
    return None


def describe(infos: dict[str, TensorInfo], ckpt_dir: Path) -> dict[str, Any] | None:
    """``inspect``'s LoRA line: r, alpha, targets and whether the base is inside (None if not LoRA)."""
    if not is_lora(infos):
        return None
    try:
        return parse(infos, find_settings(ckpt_dir), where=str(ckpt_dir)).summary()
    except (KeyPlanError, CheckpointFormatError) as e:  # a bad setting (lora_train_meta.json's NaN alpha) too
        return {"problem": str(e)}


__all__ = ["ADAPTER_SUBDIR", "LORA_MODES", "LoraCheckpoint", "LoraSettings", "ModelView", "adapter_config",
           "peft_adapter_plan", "check_targets", "describe", "find_settings", "is_lora", "merge_plan", "merged_names",
           "parse", "recorded_base"]
