"""``verify``: compare two checkpoints of any supported formats, tensor by tensor.

Keys are compared after the wrapper rules of :mod:`ckpt_bridge.plan.hf_target`; a tied
alias present on one side only (``lm_head.weight`` of a tied model) is not a
difference.  Values are compared exactly by default (same bits: ``compare.bits_equal``); with
``cast_to`` both sides are cast first (the export changed dtype), with ``atol``
a max-abs-difference tolerance applies.  One tensor per side is in memory at a
time.  ``logits=True`` additionally loads both as transformers models and
compares their logits on a fixed token batch.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..compare import bits_equal, diff
from ..models.config_fit import read_fitting_config
from ..formats.detect import detect_format, open_reader
from ..errors import BridgeError, KeyPlanError
from ..commands.to_hf import to_hf
from ..dtypes import DTYPES
from ..plan.export_plan import plan_export
from ..plan.core import compose
from ..plan.titan_names import hf_names
from ..plan.hf_target import expected_model
from ..plan.planner import canonical_key, canonicalize
from ..formats.hf import SafetensorsFileReader
from ..models.hf import load_pretrained, text_token_ids


@dataclass
class VerifyResult:
    a: str
    b: str
    compared: int = 0
    equal: int = 0
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    tied_aliases: list[str] = field(default_factory=list)
    aux_only: list[str] = field(default_factory=list)  # aux modules one side keeps apart: not a difference
    shape_diffs: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    dtype_diffs: list[tuple[str, str, str]] = field(default_factory=list)
    value_diffs: list[tuple[str, float]] = field(default_factory=list)
    max_abs_diff: float = 0.0
    logits_max_abs_diff: float | None = None
    logits_ok: bool | None = None
    tolerance: str = "exact"
    nonfinite: dict[str, str] = field(default_factory=dict)  # key -> why it differs beyond max abs diff

    @property
    def ok(self) -> bool:
        return not (self.only_in_a or self.only_in_b or self.shape_diffs or self.value_diffs
                    or (self.dtype_diffs and self.tolerance == "exact") or self.logits_ok is False)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["ok"] = self.ok
        return d


def _tied_aliases(reader) -> set[str]:
    cfg = reader.hf_config_dir()
    if cfg is None:
        return set()
    read_fitting_config(cfg, reader.tensors())  # before the model is built from it
    try:
        exp = expected_model(cfg)
    except KeyPlanError:
        return set()
    return {alias for g in exp.tie_groups for alias in g[1:]}


def verify(a: str | Path, b: str | Path, *, atol: float = 0.0, cast_to: str | None = None,
           logits: bool = False, trust_pickle: bool = False) -> VerifyResult:
    cast = None
    if cast_to is not None:
        if cast_to not in DTYPES:
            raise BridgeError(f"--cast-to {cast_to!r}: choose one of {', '.join(DTYPES)}")
        cast = DTYPES[cast_to]
    res = VerifyResult(str(a), str(b))
    res.tolerance = "exact" if not atol and cast is None else f"cast_to={cast_to} atol={atol}"
    with open_reader(a, trust_pickle=trust_pickle) as ra0, open_reader(b, trust_pickle=trust_pickle) as rb0:
        ra, rb = _model_view(ra0), _model_view(rb0)
        ia, ib = ra.tensors(), rb.tensors()
        ca, cb = canonicalize(ia, str(ra.path)), canonicalize(ib, str(rb.path))
        if set(ca) != set(cb):  # one side in-memory names (a trainer's), the other save_pretrained's?
            cfg_a, cfg_b = ra.hf_config_dir(), rb.hf_config_dir()  # a Megatron side may use the other's config
            ra, rb = _as_saved(ra, cfg_b), _as_saved(rb, cfg_a)
            ia, ib = ra.tensors(), rb.tensors()
            ca, cb = canonicalize(ia, str(ra.path)), canonicalize(ib, str(rb.path))
        src_a = {canonical_key(k): k for k in ia}
        src_b = {canonical_key(k): k for k in ib}
        one_sided = (set(ca) ^ set(cb))
        aliases = (_tied_aliases(ra) | _tied_aliases(rb)) if one_sided else set()
        for k in ca:
            if k not in cb:
                (res.tied_aliases if k in aliases else res.aux_only if k in ra.aux_keys else res.only_in_a).append(k)
        for k in cb:
            if k not in ca:
                (res.tied_aliases if k in aliases else res.aux_only if k in rb.aux_keys else res.only_in_b).append(k)
        for k in ca:
            if k not in cb:
                continue
            x, y = ca[k], cb[k]
            if x.shape != y.shape:
                res.shape_diffs.append((k, x.shape, y.shape))
                continue
            if x.dtype != y.dtype:
                res.dtype_diffs.append((k, str(x.dtype), str(y.dtype)))
            ta = ra.read(src_a[k], cast if (cast and x.dtype.is_floating_point) else None)
            tb = rb.read(src_b[k], cast if (cast and y.dtype.is_floating_point) else None)
            res.compared += 1
            _compare_values(res, k, ta, tb, atol)
    if logits:
        res.logits_max_abs_diff = compare_logits(a, b, trust_pickle=trust_pickle)
        res.logits_ok = res.logits_max_abs_diff <= max(atol, 1e-5) if cast is None else \
            res.logits_max_abs_diff <= max(atol, 1e-2)
    return res


def _compare_values(res: VerifyResult, key: str, ta: torch.Tensor, tb: torch.Tensor, atol: float) -> None:
    """Exact: same bits (a NaN equals the same NaN, -0.0 differs from 0.0).  With a tolerance: finite values
    within ``atol`` and NaN/Inf at the same positions (compare.diff)."""
    if bits_equal(ta, tb):
        res.equal += 1
        return
    d = diff(ta, tb)
    res.max_abs_diff = max(res.max_abs_diff, d.max_abs)
    if ta.dtype != tb.dtype and res.tolerance == "exact":
        return  # reported as a dtype difference
    exact = res.tolerance == "exact"
    if d.within(atol) and not exact:
        res.equal += 1
        return
    res.value_diffs.append((key, d.max_abs))
    if d.nonfinite_mismatch:
        res.nonfinite[key] = d.describe()
    elif exact and d.max_abs == 0:
        res.nonfinite[key] = "equal as numbers but the bits differ (-0.0 vs 0.0, or another NaN payload)"


class _ModelView:
    """What verify compares: a checkpoint's model tensors (a DCP's without optimizer / training sections,
    under its own layout) plus, for an HF export, the aux modules kept apart in aux_modules.safetensors."""

    def __init__(self, reader):
        self.inner, self.path = reader, reader.path
        self._aux = None
        aux_file = reader.aux_file()
        if aux_file is not None:
            self._aux = SafetensorsFileReader(aux_file)

    @property
    def aux_keys(self) -> set[str]:
        return set(self._aux.tensors()) if self._aux else set()

    def tensors(self):
        base = self.inner.model_tensors()
        return {**base, **(self._aux.tensors() if self._aux else {})}

    def read(self, key, dtype=None):
        if self._aux is not None and key in self._aux.tensors():
            return self._aux.read(key, dtype)
        return self.inner.read(key, dtype)

    def hf_config_dir(self):
        return self.inner.hf_config_dir()


def _model_view(reader) -> _ModelView:
    return _ModelView(reader)


class _SavedView:
    """A side seen through its to-hf plan: the keys ``save_pretrained`` writes (fused MoE experts split,
    sub-models renamed), so a trainer's checkpoint compares with its export.  Reading a key runs the
    transform that produces it, once; its other outputs wait for their turn (one group in memory)."""

    def __init__(self, view: _ModelView, plan, aux: set[str]):
        self.view, self.path, self.aux_keys = view, view.path, view.aux_keys
        self._producer = {o.key: t for t in plan.transforms for o in t.outputs}
        infos = view.tensors()
        self._infos = {**plan.targets(), **{k: infos[k] for k in aux}}
        self._ready: dict[str, torch.Tensor] = {}

    def tensors(self):
        return self._infos

    def read(self, key, dtype=None):
        t = self._producer.get(key)
        if t is None:
            return self.view.read(key, dtype)  # an aux tensor, as it is
        if t.fn is None and not t.same_as:
            return self.view.read(t.inputs[0], dtype)
        if key not in self._ready:
            self._ready = t.apply({k: self.view.read(k) for k in t.inputs})
        v = self._ready.pop(key)
        return v.to(dtype) if dtype is not None else v

    def hf_config_dir(self):
        return self.view.hf_config_dir()


def _as_saved(view: _ModelView, other_cfg: Path | None = None):
    """``view`` under the names its to-hf export would have, or ``view`` itself if no plan applies.

    A verl Megatron checkpoint goes through its to-hf plan (unstacked layers, split qkv / fc1, ...), with
    its own HF config or else the other side's (``other_cfg``: the HF dir it is compared with)."""
    megatron = view.inner.key_names == "megatron"  # its names are never an HF model's: it must go through a plan
    native = view.inner.key_names == "titan"  # a TorchTitan model's own names: its family's adapter, then the plan
    cfg = view.hf_config_dir() or (other_cfg if megatron or native else None)
    if cfg is None:
        if megatron:
            raise BridgeError(f"{view.path}: a Megatron checkpoint is compared through its to-hf plan, which needs "
                              f"a config.json: the save has none and the other side is not an HF dir with one")
        return view
    try:
        infos = {k: v for k, v in view.tensors().items() if k not in view.aux_keys}
        names = hf_names(view.inner, cfg, None) if native else None
        plan, aux = plan_export(view.inner, names.targets() if names else infos, cfg, aux_prefixes=None,
                                where=str(view.path))
        if names is not None:
            plan = compose(names, plan, where=str(view.path))
    except BridgeError:
        if megatron or native:
            raise  # comparing its names as they are would say nothing
        return view  # not a model the config describes: compare the keys as they are
    main = {k: v for k, v in infos.items() if not any(k in keys for keys in aux.values())}
    if {canonical_key(k) for k in main} == set(plan.targets()):
        return view
    return _SavedView(view, plan, {k for keys in aux.values() for k in keys} | view.aux_keys)


def _as_hf_dir(path: Path, tmp: Path, trust_pickle: bool) -> Path:
    if detect_format(path) == "hf":
        return path
    out = tmp / "export"
    to_hf(path, out, trust_pickle=trust_pickle, progress=False)
    return out


def compare_logits(a: str | Path, b: str | Path, *, trust_pickle: bool = False, seed: int = 0) -> float:
    """Max |logits_a - logits_b| on a fixed batch of text tokens, both sides loaded as the class their
    config.json names (causal LM, VLM, token classification), fp32 compute."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as ta, tempfile.TemporaryDirectory() as tb:
        da = _as_hf_dir(Path(a), Path(ta), trust_pickle)
        db = _as_hf_dir(Path(b), Path(tb), trust_pickle)
        outs = []
        tokens = None
        for d in (da, db):
            model = load_pretrained(d)
            if tokens is None:  # one batch for both sides: configs reserving other ids must not change the input
                tokens = text_token_ids(model.config, (2, 16), torch.Generator().manual_seed(seed))
            if int(tokens.max()) >= model.config.get_text_config().vocab_size:
                return float("inf")  # a smaller vocabulary than the other side: not the same model
            with torch.no_grad():
                outs.append(model(input_ids=tokens).logits)
            del model
        if outs[0].shape != outs[1].shape:
            return float("inf")
        d = diff(outs[0], outs[1])  # the same NaN/Inf positions are equal; unmatched ones are a difference
        return float("inf") if d.nonfinite_mismatch else d.max_abs


def format_result(r: VerifyResult) -> str:
    lines = [f"verify {r.a}  vs  {r.b}   ({r.tolerance})"]
    lines.append(f"  compared {r.compared} tensors: {r.equal} equal; max abs diff {r.max_abs_diff:.3g}")
    if r.tied_aliases:
        lines.append(f"  tied aliases (one side only, not a difference): {', '.join(r.tied_aliases)}")
    if r.aux_only:
        lines.append(f"  aux modules kept apart in aux_modules.safetensors (one side only, not a difference): "
                     f"{', '.join(r.aux_only[:8])}{' ...' if len(r.aux_only) > 8 else ''}")
    for title, items in (("only in A", r.only_in_a), ("only in B", r.only_in_b)):
        if items:
            lines.append(f"  {title} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}")
    for k, sa, sb in r.shape_diffs[:8]:
        lines.append(f"  shape differs  {k}: {tuple(sa)} vs {tuple(sb)}")
    if r.dtype_diffs and r.tolerance != "exact":
        pairs = sorted({f"{da} vs {db}" for _, da, db in r.dtype_diffs})
        lines.append(f"  dtype differs on {len(r.dtype_diffs)} tensors ({', '.join(pairs)}): compared after the cast")
    else:
        for k, da, db in r.dtype_diffs[:8]:
            lines.append(f"  dtype differs  {k}: {da} vs {db}")
    for k, d in r.value_diffs[:8]:
        lines.append(f"  value differs  {k}: " + r.nonfinite.get(k, f"max abs diff {d:.3g}"))
    if r.logits_max_abs_diff is not None:
        lines.append(f"  logits max abs diff {r.logits_max_abs_diff:.3g} ({'ok' if r.logits_ok else 'DIFFERENT'})")
    lines.append("  result: " + ("EQUAL" if r.ok else "DIFFERENT"))
    return "\n".join(lines)
