"""``to_dcp``: a Hugging Face model directory -> the DCP folder a TorchTitan /
flame model-only load accepts, with auxiliary modules and a manifest.

reader -> key plan (against the keys the trainer will request) -> tensor
stream -> DCP's own ``FileSystemWriter``.  We hand DCP a state dict of *meta*
tensors (shape and dtype only) and a planner whose ``resolve_data`` reads each
tensor from the source at the moment DCP writes it, so one tensor is in memory
at a time and the files are exactly what ``dcp.save`` writes (DCP's metadata,
``planner_data`` nesting and storage layout: nothing re-implemented).

Everything checkable (keys both ways, shapes, aux sources) is checked before
the output directory is created; the output is written under a temporary name
and renamed at the end.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..plan.aux_modules import AuxSpec, as_specs, attach_aux, init_aux, parse_aux
from ..pipeline.buffers import Recycled
from ..formats.detect import open_reader
from ..errors import BridgeError, KeyPlanError, few, writing
from ..models.config_fit import read_fitting_config
from ..dtypes import nbytes, out_dtype, parse_dtype
from ..writers.side_files import config_dir, copy_new, jsonable, read_config, side_files
from ..models.hf import quiet_transformers, tie_groups
from ..formats.base import Reader, TensorInfo
from ..formats.dcp_files import HF_CONFIG_DIR, MANIFEST, read_manifest, write_manifest  # noqa: F401 - MANIFEST re-exported
from ..plan.conversions import Conversions, Group
from ..plan.hf_target import drop_reason, gap_error, build_meta_model, canonical_key, canonicalize
from ..plan.core import Plan, Transform, derive, execute, rename
from ..progress import Progress
from ..models.titan_eras import seed_flags
from ..plan.trainer_keys import RequestedKeys, requested_keys
from ..pipeline.team import Team, team_output
from ..version import __version__
from ..writers.atomic import flush_tree
from ..writers.dcp_parts import merge_parts, part_dir
from ..plan.state_dict_adapter import from_hf_reader
from ..formats.dcp import DCPReader
from ..models.titan import adapter_record, titan_model as build_titan_model

log = logging.getLogger("ckpt_bridge")



@dataclass
class DCPPlan(Plan):
    """The plan of one to-dcp export: transforms whose targets are the DCP keys the trainer requests.

    ``aux`` maps the DCP keys of auxiliary modules (made fresh or copied, not
    read from the source) to their shape and dtype.
    """

    requested: RequestedKeys | None = None
    aux: dict[str, TensorInfo] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return super().lines() + [f"(aux {k.split('.', 1)[0]}) -> {k}" for k in self.aux]


@dataclass
class DCPExportSummary:
    source: str
    out: str
    layout: str = ""
    trainer: str = ""
    reason: str = ""
    tensors: int = 0
    from_source: int = 0
    aux_tensors: int = 0
    bytes_written: int = 0
    dtype: str = ""
    aux: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    manifest: str = ""
    seconds: float = 0.0
    seed_flags: list[str] = field(default_factory=list)  # in the installed era's words (titan_eras.seed_flags)
    titan_model: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "seed_flags"}

    def flags(self) -> list[str]:
        """How to point a trainer at this checkpoint (absolute paths: torchtitan 0.3.0 requires them)."""
        return self.seed_flags or seed_flags(str(Path(self.out).absolute()), None, self.layout)


# ---------------------------------------------------------------- aux sources


def _aux_from_manifest(path: Path) -> list[AuxSpec]:
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is None:
        raise BridgeError(f"--aux-from {path}: no --aux names given and {path} has no {MANIFEST} naming them; "
                          f"pass --aux NAME for each module to copy")
    specs = []
    for i, a in enumerate(manifest.get("aux", [])):
        if a.get("kind") == "factory":
            raise BridgeError(f"--aux-from {path}: aux {a['name']!r} was built by a Python factory; "
                              f"pass it to to_dcp(aux={{...}}) from Python")
        specs.append(parse_aux(a["spec"], origin=f"{path / MANIFEST} aux[{i}].spec"))
    return specs


def _aux_tensors_from(path: Path, specs: list[AuxSpec], want: dict[str, TensorInfo],
                      trust_pickle: bool) -> dict[str, tuple[torch.Tensor, str]]:
    """Copy every aux fqn in ``want`` from an existing checkpoint (any readable format)."""
    out: dict[str, tuple[torch.Tensor, str]] = {}
    with open_reader(path, trust_pickle=trust_pickle) as r:
        infos = r.tensors()
        strip = "model." if isinstance(r, DCPReader) and r.layout() == "nested" else ""
        by_fqn = {}
        for k in infos:
            c = canonical_key(k[len(strip):] if strip and k.startswith(strip) else k)
            by_fqn.setdefault(c, k)
        names = {s.name for s in specs}
        missing = [f for f in want if f not in by_fqn]
        if missing:
            raise KeyPlanError(f"--aux-from {path}: has no {few(missing)} (aux modules {', '.join(sorted(names))}); "
                               f"it holds {few(sorted(k for k in by_fqn if k.split('.', 1)[0] in names)) or 'none of them'}")
        extra = sorted(k for k in by_fqn if k.split(".", 1)[0] in names and k not in want)
        if extra:
            raise KeyPlanError(f"--aux-from {path}: has aux keys the target module does not: {few(extra)}; "
                               f"the --aux type/size differs from the one that wrote it")
        for fqn, info in want.items():
            src = by_fqn[fqn]
            if tuple(infos[src].shape) != tuple(info.shape):
                raise KeyPlanError(f"--aux-from {path}: {src!r} has shape {tuple(infos[src].shape)}, the aux module "
                                   f"wants {tuple(info.shape)} for {fqn!r}; match the --aux type and size")
            out[fqn] = (r.read(src), f"{Path(path).absolute()}:{src}")
    return out


def tensor_sha256(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------- the plan


def plan_dcp(src: dict[str, TensorInfo], req: RequestedKeys, aux_fqns: set[str], groups: list[list[str]],
             *, where: str, model_class: str = "", conversions: Conversions | None = None) -> DCPPlan:
    """The checked plan that gives every key the trainer requests exactly one producer (or an aux module).

    Source keys are first brought to the in-memory names of the HF model the
    way ``from_pretrained`` does (``conversions``: transformers' load-time
    mapping, e.g. per-expert MoE weights fused into ``experts.gate_up_proj``;
    None: the names are taken as they are), then matched to the requested
    keys through the wrapper rules and tied weights.  Gaps either way are
    refused before anything is written.
    """
    canon = canonicalize(src, where)
    source_of = {canonical_key(k): k for k in src}
    plan = DCPPlan(model_class=model_class, requested=req)
    for c in canon:
        why = drop_reason(c)
        if why:
            plan.dropped.append((source_of[c], why))
    kept = [c for c in canon if source_of[c] not in {k for k, _ in plan.dropped}]
    producers = _load_groups(kept, canon, source_of, conversions)  # [(Group, {in-memory key: info}, fn)]
    alias: dict[str, list[str]] = {}
    for g in groups:
        g = [canonical_key(n) for n in g]
        for n in g:
            alias[n] = [m for m in g if m != n]
    wanted, missing = _assign(plan, req, aux_fqns, producers, alias, source_of, where)
    unexpected = []
    made_by = {m: i for i, (_, outs, _) in enumerate(producers) for m in outs}
    for i, (g, outs, fn) in enumerate(producers):
        got = wanted.get(i, {})
        if not got:
            tied = next((a for m in outs for a in alias.get(m, []) if a in made_by and made_by[a] in wanted), None)
            for k in g.inputs:
                if tied:
                    plan.dropped.append((source_of[k], f"tied to {tied}"))
                else:
                    unexpected.append(source_of[k])
        elif g.is_rename:  # a tied source feeds every name the trainer requests for it
            plan.transforms += [rename(source_of[g.inputs[0]], k, outs[g.target], _rule(g, conversions))
                                for k in got[g.target]]
        elif [m for m in outs if m not in got] or any(len(v) > 1 for v in got.values()):
            raise KeyPlanError(f"{where}: transformers converts {_inputs_of(producers[i], source_of)} into "
                               f"{', '.join(outs)}, but the trainer requests "
                               f"{few(sorted(k for v in got.values() for k in v))}")
        else:
            plan.transforms.append(_renamed(g, outs, got, fn, source_of, conversions))
    if missing or unexpected:
        hint = ("; the trainer's model differs from the config's (an aux module not passed with --aux?)"
                if missing and not unexpected else "")
        raise gap_error(where, missing, "the trainer requests are not in the source", unexpected,
                        "the trainer does not request", hint + f" (layout: {req.layout}, {req.trainer})")
    # Written in the trainer's request order, each transform's outputs together: DCP's writer still holds the
    # previous tensor while it asks for the next, so two large tensors of one source (a tied embedding and
    # lm_head) must not be written back to back (2 GB instead of 1 for a 1B model's fp32 embedding).
    pos = {k: i for i, k in enumerate(req.fqn_of)}
    plan.transforms.sort(key=lambda t: min(pos.get(k, len(pos)) for k in t.targets))
    return plan.check(src, where=where)


def _assign(plan: DCPPlan, req: RequestedKeys, aux_fqns: set[str], producers, alias: dict[str, list[str]],
            source_of: dict[str, str], where: str) -> tuple[dict[int, dict[str, list[str]]], list[str]]:
    """Each requested DCP key -> the producer of its in-memory name (or of a tied alias), or an aux module.

    Returns ({producer index: {in-memory key: [DCP keys]}}, [requested keys nothing produces]).
    """
    made_by = {m: i for i, (_, outs, _) in enumerate(producers) for m in outs}
    wanted: dict[int, dict[str, list[str]]] = {}
    missing, shape_errors = [], []
    for key, fqn in req.fqn_of.items():
        want = req.info[key]
        c = canonical_key(fqn)
        if c in aux_fqns:
            plan.aux[key] = want
            continue
        found = c if c in made_by else next((a for a in alias.get(c, []) if a in made_by), None)
        if found is None:
            missing.append(key)
            continue
        i = made_by[found]
        info = producers[i][1][found]
        if tuple(info.shape) != tuple(want.shape):
            shape_errors.append(f"{_inputs_of(producers[i], source_of)} gives {tuple(info.shape)} but the trainer's "
                                f"{key!r} is {tuple(want.shape)}")
            continue
        if found != c:
            plan.notes.append(f"{key} <- {found} (tied weights)")
        wanted.setdefault(i, {}).setdefault(found, []).append(key)
    if shape_errors:
        raise KeyPlanError(f"{where}: shapes differ from the trainer's model: {'; '.join(shape_errors[:3])}"
                           f"{' ...' if len(shape_errors) > 3 else ''}; wrong config for these weights")
    return wanted, missing


def _load_groups(keys: list[str], canon: dict[str, TensorInfo], source_of: dict[str, str],
                 conversions: Conversions | None) -> list[tuple[Group, dict[str, TensorInfo], Any]]:
    """Each group of source keys with the in-memory keys it produces (learned on meta tensors) and its function."""
    if conversions is None or conversions.empty:
        return [(Group(c, (c,), None, c), {c: TensorInfo(c, canon[c].shape, canon[c].dtype)}, None) for c in keys]
    out = []
    for g in conversions.groups(keys):
        if g.is_rename:
            out.append((g, {g.target: TensorInfo(g.target, canon[g.inputs[0]].shape, canon[g.inputs[0]].dtype)}, None))
            continue
        fn = partial(_run_group, conversions, g)
        t = derive("fuse", {c: canon[c] for c in g.inputs}, fn, conversions.describe(g))
        out.append((g, {o.key: o for o in t.outputs}, fn))
    return out


def _run_group(conversions: Conversions, group: Group, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return conversions.run(group, tensors)


def _renamed(g: Group, outs: dict[str, TensorInfo], got: dict[str, list[str]], fn, source_of: dict[str, str],
             conversions: Conversions) -> Transform:
    """A converter group as a transform reading source keys and producing the trainer's DCP keys."""
    dcp_of = {m: v[0] for m, v in got.items()}
    canon_of = {source_of[c]: c for c in g.inputs}

    def run(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        res = fn({canon_of[k]: v for k, v in tensors.items()})
        return {dcp_of[m]: v for m, v in res.items()}

    n_in, n_out = len(g.inputs), len(outs)
    op = "fuse" if n_in > n_out else "split" if n_in < n_out else "convert"
    return Transform(op, tuple(source_of[c] for c in g.inputs),
                     tuple(TensorInfo(dcp_of[m], i.shape, i.dtype) for m, i in outs.items()), run,
                     conversions.describe(g))


def _rule(g: Group, conversions: Conversions | None) -> str:
    if conversions is None or g.target == g.inputs[0]:
        return ""
    return f"transformers {type(conversions.model).__name__} load: rename"


def _inputs_of(producer, source_of: dict[str, str]) -> str:
    return few([source_of[c] for c in producer[0].inputs], 2)


# ---------------------------------------------------------------- TorchTitan's own models


def _titan_source(reader: Reader, cfg_dir: Path, model: Any, sd_adapter: Any, titan_model: str | None
                  ) -> tuple[Reader, Any, str | None, dict | None]:
    """(source reader under the trainer model's names, trainer model, titan model name for the manifest, what
    the manifest says about a ``model`` + ``sd_adapter`` conversion).

    A TorchTitan model (``titan_model`` name, or ``model`` + ``sd_adapter``) sees
    the HF weights through its adapter's ``from_hf``, applied as plan transforms.
    The manifest names the ``titan_model`` that rebuilds the adapter from the HF
    config, so to-hf / verify need no flag: given, or found for the adapter
    passed (its class is the family's registered one and the model's config is
    the HF config's; :func:`~ckpt_bridge.models.titan.adapter_record`).
    """
    if titan_model is None and sd_adapter is None:
        return reader, model, None, None
    if titan_model is not None:
        if sd_adapter is not None or model is not None:
            raise BridgeError("titan_model= builds the model and adapter itself; pass it alone, or model= + sd_adapter=")

        tm = build_titan_model(titan_model, cfg_dir)
        return from_hf_reader(reader, tm.adapter), tm.build("meta"), titan_model, None
    if model is None:
        raise BridgeError("sd_adapter= needs model= (the TorchTitan model, meta is fine) to ask for its keys")

    record = adapter_record(sd_adapter, model, cfg_dir)
    return from_hf_reader(reader, sd_adapter), model, record["family"], record


# ---------------------------------------------------------------- writing


def streaming_planner(fetch):
    """DCP's DefaultSavePlanner, except that tensor data is ``fetch(key)``-ed when the writer asks for it.

    Built in a function so importing this module does not import torch.distributed.checkpoint.
    """
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class StreamingSavePlanner(DefaultSavePlanner):
        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.TENSOR:
                return fetch(write_item.index.fqn)
            return super().resolve_data(write_item)

    return StreamingSavePlanner(dedup_save_to_lowest_rank=False)


class _Fetcher:
    """DCP's writer asks for one key at a time; the plan produces a transform's outputs together.

    Runs the plan (:func:`ckpt_bridge.plan.core.execute`, no read-ahead: DCP's
    fsync'd writes bound the run, and a read-ahead would keep one more group
    alive) up to the transform that makes the asked key, hands that key out
    and keeps the transform's other outputs until they are asked for.
    """

    def __init__(self, plan: DCPPlan, transforms: list, source: Reader, out_dt, aux_values, bar: Progress, summary):
        # DCP's writer (one thread, one file per tensor) has written tensor k to its file before it asks for
        # k+1, though it still holds k: the buffer of k-1 is free again when k+1 is read.
        self.arenas = Recycled(2)
        self.stream = execute(transforms, source.read, out_dt, ahead=False, buffer=self.arenas.take)
        self.pending: dict[str, torch.Tensor] = {}
        self.plan, self.out_dt, self.aux_values, self.bar, self.summary = plan, out_dt, aux_values, bar, summary
        self.fqn_of = plan.requested.fqn_of

    def __call__(self, key: str) -> torch.Tensor:
        if key in self.plan.aux:
            info = self.plan.aux[key]
            t = self.aux_values[canonical_key(self.fqn_of[key])][0].to(self.out_dt(info))
            self.summary.aux_tensors += 1
        else:
            while key not in self.pending:
                # Tensors read ahead of their turn must not sit in an arena the next reads reuse (DCP asks in
                # plan order, so this does not happen; if it did, it would cost a copy, not a wrong byte).
                self.pending = {k: v.clone() if self.arenas.owns(v) else v for k, v in self.pending.items()}
                _, outs = next(self.stream)
                self.pending.update(outs)
            t = self.pending.pop(key)
            self.summary.from_source += 1
        self.bar.update(t.numel() * t.element_size(), key)
        return t.contiguous()


def _hash_files(paths: list[Path], cfg_dir: Path) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        with open(p, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        name = p.relative_to(cfg_dir).as_posix() if p.is_relative_to(cfg_dir) else p.name
        out.append({"name": name, "bytes": p.stat().st_size, "sha256": digest})
    return out


def _source_files(reader: Reader, cfg_dir: Path) -> list[Path]:
    """The files the manifest hashes: the weights, the configs, and every side file kept beside them in
    ``HF_CONFIG_DIR`` (the one rule of :func:`ckpt_bridge.writers.side_files.side_files`: what is kept is hashed)."""
    files = sorted(reader.source_files())
    configs = [cfg_dir / n for n in ("config.json", "generation_config.json", "model.safetensors.index.json")]
    for p in [*configs, *side_files(cfg_dir)]:
        inside = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else []
        files += [q for q in inside if q not in files]
    return files


def to_dcp(
    src: str | Path,
    out: str | Path,
    *,
    layout: str = "auto",
    dtype: str = "fp32",
    aux: Any = None,
    seed: int = 0,
    aux_from: str | Path | None = None,
    model: nn.Module | list[nn.Module] | None = None,
    sd_adapter: Any = None,
    titan_model: str | None = None,
    config: str | Path | None = None,
    overwrite: bool = False,
    trust_pickle: bool = False,
    progress: bool | None = None,
    dry_run: bool = False,
    team: Team | None = None,
) -> DCPExportSummary | DCPPlan:
    """Write the DCP folder a model-only load of the trainer's model accepts.

    ``layout``: ``auto`` asks the installed torchtitan which keys it requests;
    ``nested`` / ``flat`` force one.  ``aux``: ``["future_predictor:mlp", ...]``
    or ``{name: factory(config) -> nn.Module}``; fresh weights seeded by ``seed``
    or copied from ``aux_from``.  ``model``: the trainer's own model (or model
    parts, meta is fine) when it is not the plain HF class plus aux modules, e.g.
    per-block ``torch.compile`` (``_orig_mod.`` in its keys).  ``sd_adapter``: for
    TorchTitan's own model definitions (pass ``model=`` too), the model's
    ``StateDictAdapter``; HF keys go through its ``from_hf`` group by group
    (:mod:`ckpt_bridge.plan.state_dict_adapter`).  ``titan_model``: a TorchTitan model
    name (``llama3``, ``qwen3``) built from the HF config, model and adapter
    both (:mod:`ckpt_bridge.models.titan`).  ``dtype``: of
    floating tensors written (fp32, the usual master-weight dtype; ``keep``).
    With ``dry_run`` the checked plan is returned and nothing is written.
    ``team``: this process's place among several writing the same export
    (:mod:`ckpt_bridge.pipeline.team`, :mod:`ckpt_bridge.writers.dcp_parts`; default: alone).
    """
    t0 = time.perf_counter()
    team = team or Team()
    cast = parse_dtype(dtype, "fp32 (default), bf16, fp16, keep")
    specs = as_specs(aux)
    if aux_from is not None and not specs:
        specs = _aux_from_manifest(Path(aux_from))
    with open_reader(src, trust_pickle=trust_pickle) as reader, ThreadPoolExecutor(1) as pool:
        where = str(reader.path)
        reader.check()
        cfg_dir, _ = config_dir(reader, config)
        if cfg_dir is None:
            raise KeyPlanError(f"{where}: no config.json found; pass --config PATH (a config.json or a model dir)")
        # structure, model_type and sizes against the tensors, before transformers parses it
        read_fitting_config(cfg_dir, reader.tensors())
        source, model, titan, adapter_rec = _titan_source(reader, cfg_dir, model, sd_adapter, titan_model)
        infos = source.tensors()
        hashes = pool.submit(_hash_files, _source_files(reader, cfg_dir), cfg_dir) if not dry_run and team.leader else None

        from transformers import AutoConfig

        with quiet_transformers():
            hf_config = AutoConfig.from_pretrained(str(cfg_dir))
        if model is None:
            target = build_meta_model(cfg_dir)
            clash = [s.name for s in specs if hasattr(target, s.name)]
            if clash:
                raise BridgeError(f"--aux {clash[0]!r}: {type(target).__name__} already has a child of that name")
            attach_aux(target, specs, hf_config)
            parts = [target]
        else:
            parts = [model] if isinstance(model, nn.Module) else list(model)
            if titan is not None and specs:  # the model we built: its aux modules go on it like on the HF class
                attach_aux(parts[0], specs, hf_config)
        model_class = type(parts[0]).__name__
        req = requested_keys(parts, layout)
        aux_names = {s.name for s in specs}
        aux_want = {canonical_key(f): req.info[k] for k, f in req.fqn_of.items()
                    if canonical_key(f).split(".", 1)[0] in aux_names}
        absent = sorted(n for n in aux_names if not any(f.split(".", 1)[0] == n for f in aux_want))
        if absent:
            raise KeyPlanError(f"aux module {absent[0]!r} is not in the trainer model's state dict; attach it "
                               f"(ckpt_bridge.plan.aux_modules.attach_aux) before asking for its keys")
        groups = [g for p in parts for g in tie_groups(p)]
        # transformers' load-time conversions of the HF class (not of a TorchTitan model: its adapter converts)
        titan_native = sd_adapter is not None or titan is not None
        hf_model = None if titan_native else (parts[0] if model is None else build_meta_model(cfg_dir))
        conversions = Conversions(hf_model, "load") if hf_model is not None else None
        plan = plan_dcp(infos, req, set(aux_want), groups, where=where, model_class=model_class,
                        conversions=conversions)
        plan.dropped += getattr(source, "dropped", [])
        if titan is not None or sd_adapter is not None:  # --dry-run shows what the adapter does, group by group
            plan.notes += [line for line in source.plan.lines() if "(dropped" not in line]
        if dry_run:
            return plan

        # Aux values: small, made (or copied) up front so a bad --aux-from fails before any output exists.
        aux_values: dict[str, tuple[torch.Tensor, str]] = {}
        aux_records = []
        if aux_from is not None:
            aux_values = _aux_tensors_from(Path(aux_from), specs, aux_want, trust_pickle)
        for s in specs:
            rec: dict[str, Any] = {"name": s.name, "spec": s.describe(), "kind": s.kind,
                                   "out": s.out if s.factory is None else None, "seed": seed}
            if aux_from is None:
                module, how = init_aux(s, hf_config, seed)
                for k, v in module.state_dict().items():
                    aux_values[f"{s.name}.{k}"] = (v, "init")
                rec["init"] = how
            else:
                rec["init"] = f"copied from {Path(aux_from).absolute()}"
            keys = sorted(f for f in aux_want if f.split(".", 1)[0] == s.name)
            missing = [k for k in keys if k not in aux_values]
            if missing:
                raise KeyPlanError(f"aux {s.name!r}: the module built for the trainer has {few(missing)} but the "
                                   f"freshly built one does not; build both from the same spec")
            rec["keys"] = {k: list(aux_values[k][0].shape) for k in keys}
            rec["sha256"] = tensor_sha256([aux_values[k][0] for k in keys])
            aux_records.append(rec)

        out_dt = out_dtype(cast)
        targets = {**plan.targets(), **plan.aux}
        total = sum(nbytes(i.shape, out_dt(i)) for i in targets.values())
        bar = Progress(total, "to-dcp", enabled=progress)
        summary = DCPExportSummary(str(src), str(Path(out).absolute()), req.layout, req.trainer, req.reason)
        summary.seed_flags = seed_flags(summary.out, req.era, req.layout)
        summary.titan_model = titan
        # In plan order, so DCP's writer (one file per item, in state-dict order) asks for a multi-output
        # transform's outputs one after the other and only one group is ever held.
        dcp_key = (lambda k: f"model.{req.fqn_of[k]}") if req.layout == "nested" else (lambda k: k)
        order = [dcp_key(k) for k in targets]  # the flattened keys DCP stores, in state-dict order
        groups = [list(t.targets) for t in plan.transforms] + [[k] for k in plan.aux]
        team.fit(len(groups))  # no more processes than groups to write
        # whole transforms per process (a group is never split between processes)
        mine = {k for g in team.mine(groups, [sum(nbytes(targets[k].shape, out_dt(targets[k])) for k in g)
                                             for g in groups]) for k in g}
        fetch = _Fetcher(plan, [t for t in plan.transforms if t.targets[0] in mine], source, out_dt, aux_values,
                         bar, summary)
        meta_sd = {(req.fqn_of[k] if req.layout == "nested" else k): torch.empty(i.shape, dtype=out_dt(i),
                                                                                   device="meta")
                   for k, i in targets.items() if k in mine}
        state = {"model": meta_sd} if req.layout == "nested" else meta_sd
        protect = tuple(p for p in (Path(src), reader.path, cfg_dir, Path(aux_from) if aux_from else None) if p)
        import torch.distributed.checkpoint as dcp

        with team_output(out, team, overwrite=overwrite, protect=protect, create=[]) as tmp, writing(tmp, total):
            # writing(): DCP wraps a full disk, a Ctrl-C or our own read errors in a CheckpointException
            # (a BaseException carrying a traceback as its message); this re-raises the real cause.
            error = None
            try:
                part_dir(tmp, team.rank).mkdir()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
                    # One .distcp file per tensor: DCP's writer keeps a reference to every tensor it has written
                    # to a file until that file is closed (torch 2.13 filesystem.py, tensor_dict), so a single
                    # file would hold the whole model in memory by the end.
                    # sync_files=False: no fsync per file; AtomicDir flushes the whole output once before
                    # the rename (per-file fsync stalled the stream on the disk 147 times: 20 s -> 11 s, 1.24B).
                    # Each process saves its share alone; merge_parts makes one folder of them (dcp_parts).
                    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(part_dir(tmp, team.rank)),
                                                                        single_file_per_rank=False, thread_count=1,
                                                                        sync_files=False),
                             planner=streaming_planner(fetch), no_dist=True)
                if not team.leader:  # its own files flushed: rank 0 may be on another node
                    flush_tree(part_dir(tmp, team.rank))
            except BaseException as e:  # noqa: BLE001 - every process learns whether all the others succeeded
                error = e
            finally:
                bar.close()
            team.finish(error)
            if not team.leader:
                summary.seconds = time.perf_counter() - t0
                return summary
            merge_parts(tmp, team.size, order)
            summary.tensors = len(targets)
            summary.bytes_written = total
            dts = {out_dt(i) for i in targets.values() if i.dtype.is_floating_point}
            summary.dtype = ", ".join(sorted(str(d).replace("torch.", "") for d in dts))
            summary.aux = [s.describe() for s in specs]
            summary.dropped = list(plan.dropped)
            manifest = {
                "tool": f"ckpt-bridge {_version()}",
                "command": "to-dcp",
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "source": {"path": str(Path(src).absolute()), "format": reader.format,
                           "config_dir": str(cfg_dir.absolute()), "files": hashes.result()},
                "hf_config_dir": _keep_hf_files(cfg_dir, tmp / HF_CONFIG_DIR),
                "hf_config": read_config(cfg_dir),
                "model_class": model_class,
                "titan_model": titan,
                **({"titan_adapter": adapter_rec} if adapter_rec is not None else {}),
                "layout": req.as_dict(),
                "dtype": summary.dtype,
                "tensors": summary.tensors,
                "aux": aux_records,
                "dropped": [list(d) for d in plan.dropped],
                "notes": plan.notes,
                "versions": _versions(),
            }
            write_manifest(tmp, jsonable(manifest))
            summary.manifest = str(Path(out).absolute() / MANIFEST)
    summary.seconds = time.perf_counter() - t0
    return summary


def _keep_hf_files(cfg_dir: Path, dst: Path) -> str:
    dst.mkdir()
    copy_new([cfg_dir / "config.json", cfg_dir / "generation_config.json", *side_files(cfg_dir)], dst)
    return HF_CONFIG_DIR


def _version() -> str:
    return __version__


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for pkg in ("torch", "transformers", "torchtitan", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


