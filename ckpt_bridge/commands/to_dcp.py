"""``to_dcp``: any checkpoint ``to-hf`` reads -> the DCP folder a TorchTitan /
flame model-only load accepts, with auxiliary modules and a manifest.

This module only assembles the pipeline (:func:`ckpt_bridge.pipeline.run.run`), then runs it: the reader
(:func:`_open_source`: the source's names - Megatron's, a TorchTitan-native DCP's - brought to HF names by the
plan ``to-hf`` composes before its target, aux modules it holds set apart), the plan against the keys the
trainer will request (:func:`_plan_job`, :mod:`ckpt_bridge.plan.trainer_target`; seen through a TorchTitan
adapter when the trainer's model is TorchTitan's own), the DCP sink (:mod:`ckpt_bridge.writers.dcp`: DCP's own
``FileSystemWriter`` and planner; a large tensor stored as row chunks, so memory is a few pieces) and the
manifest as the side file (:func:`_run_job`).

Everything checkable (keys both ways, shapes, aux sources) is checked before
the output directory is created; the output is written under a temporary name
and renamed at the end.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..dtypes import nbytes, out_dtype, parse_dtype
from ..errors import BridgeError, KeyPlanError, few
from ..formats.base import Reader, TensorInfo
from ..formats.dcp import DCPReader
from ..formats.dcp_files import EXTRA_STATE_DIR, HF_CONFIG_DIR, MANIFEST, read_manifest, write_manifest
from ..formats.detect import open_reader
from ..formats.hf import SafetensorsFileReader
from ..formats.megatron import MegatronReader
from ..formats.memory import WithNamespace, WithTensors
from ..models.config_fit import read_fitting_config
from ..models.custom_code import code_scope, record_for_manifest
from ..models.hf import quiet_transformers, tie_groups
from ..models.titan import adapter_record, titan_model as build_titan_model
from ..plan.titan_names import hf_names, working_titan_model
from ..models.titan_eras import seed_flags
from ..pipeline.run import Output, run
from ..options import ToDCP, resolve
from ..pipeline.team import Team
from ..plan.aux_modules import (KINDS, AuxSpec, as_specs, attach_aux, build_aux, init_aux, parse_aux, split_aux,
                                tensor_sha256)
from ..plan.conversions import Conversions
from ..plan.core import Plan, compose, rename
from ..plan.hf_target import build_meta_model
from ..plan.planner import canonical_key
from ..plan.lora import is_lora
from ..plan.megatron import expect_reads as megatron_expect_reads, megatron_names
from ..plan.state_dict_adapter import adapter_plan
from ..plan.trainer_expectation import trainer_expectation
from ..plan.trainer_keys import NEST, RequestedKeys, requested_keys
from ..plan.trainer_target import DCPPlan, plan_dcp
from ..summary import DCPExportSummary
from ..version import __version__
from ..writers.dcp import DCPSink
from ..writers.dcp_manifest import hash_files, keep_hf_files, left_behind, provenance, source_files_of, versions
from ..formats.config_files import config_dir
from ..writers.side_files import jsonable, read_config, write_extra_state

log = logging.getLogger("ckpt_bridge")

# the source keys under which an aux module's values (made here, not read from the checkpoint) enter the stream
AUX_SOURCE = "<aux>."


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


# ---------------------------------------------------------------- TorchTitan's own models


def _titan_names(infos: dict[str, TensorInfo], where: str, cfg_dir: Path, model: Any, sd_adapter: Any,
                 titan_model: str | None) -> tuple[Plan | None, Any, str | None, dict | None]:
    """(the plan naming the HF tensors ``infos`` as the trainer model's, or None; trainer model; titan model name
    for the manifest; what the manifest says about a ``model`` + ``sd_adapter`` conversion).

    A TorchTitan model (``titan_model`` name, or ``model`` + ``sd_adapter``) sees
    the HF weights through its adapter's ``from_hf``, applied as plan transforms.
    The manifest names the ``titan_model`` that rebuilds the adapter from the HF
    config, so to-hf / verify need no flag: given, or found for the adapter
    passed (its class is the family's registered one and the model's config is
    the HF config's; :func:`~ckpt_bridge.models.titan.adapter_record`).
    """
    if titan_model is None and sd_adapter is None:
        return None, model, None, None
    if titan_model is not None:
        if sd_adapter is not None or model is not None:
            raise BridgeError("titan_model= builds the model and adapter itself; pass it alone, or model= + sd_adapter=")

        tm = build_titan_model(titan_model, cfg_dir)
        return _from_hf(infos, tm.adapter, where), tm.build("meta"), titan_model, None
    if model is None:
        raise BridgeError("sd_adapter= needs model= (the TorchTitan model, meta is fine) to ask for its keys")

    record = adapter_record(sd_adapter, model, cfg_dir)
    return _from_hf(infos, sd_adapter, where), model, record["family"], record


def _from_hf(infos: dict[str, TensorInfo], adapter: Any, where: str) -> Plan:
    return adapter_plan(infos, adapter.from_hf, f"{type(adapter).__name__}.from_hf", where=where, renames=True)


def _aux_values(specs: list[AuxSpec], aux_want: dict[str, TensorInfo], hf_config: Any, *, seed: int,
                aux_from: str | Path | None, trust_pickle: bool) -> tuple[dict[str, tuple[torch.Tensor, str]], list]:
    """({aux fqn: (value, where it came from)}, the manifest's record of each module): fresh weights seeded by
    ``seed``, or copied from ``aux_from``; every key the trainer's module has must be made."""
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
    return aux_values, aux_records


def _hf_config(cfg_dir: Path) -> Callable[[], Any]:
    """The parsed HF config, when first asked (only aux modules need it: a remembered plan imports no
    transformers)."""
    parsed: list[Any] = []

    def get() -> Any:
        if not parsed:
            from transformers import AutoConfig

            with quiet_transformers():
                parsed.append(AutoConfig.from_pretrained(str(cfg_dir)))
        return parsed[0]

    return get


@dataclass
class _Trainer:
    """The trainer's model as the plan sees it; ``load()``: transformers' load-time conversions of the HF class
    (None for a TorchTitan model: its adapter converts), built only when the source's names need them."""

    model_class: str
    requested: RequestedKeys
    tie_groups: list[list[str]]
    known: frozenset[str]
    load: Callable[[], Conversions | None] | None
    aux_config: Callable[[], Any]  # what the aux modules are built from


def _trainer_model(cfg_dir: Path, specs: list[AuxSpec], layout: str, hf_config: Callable[[], Any], model: Any,
                   *, titan_native: bool, built_by_us: bool, source: Any = None) -> _Trainer:
    """The config's HF class plus aux modules (remembered per config: :mod:`~ckpt_bridge.plan.trainer_expectation`),
    or the model (parts) given: a user's, or the TorchTitan model we built (``built_by_us``: aux go on it)."""
    if model is None:
        exp = trainer_expectation(cfg_dir, specs, layout, hf_config, source)  # source: checks a remembered entry
        # a factory is handed the real config; linear / mlp heads are built from the fields they read
        fields_only = all(s.factory is None for s in specs)
        return _Trainer(exp.model_class, exp.requested, exp.tie_groups, exp.known, lambda: Conversions(exp.model(),
                        "load"), (lambda: exp.aux_config) if fields_only else hf_config)
    parts = [model] if isinstance(model, nn.Module) else list(model)
    if built_by_us and specs:  # the model we built: its aux modules go on it like on the HF class
        attach_aux(parts[0], specs, hf_config())
    groups = [g for p in parts for g in tie_groups(p)]
    if titan_native:
        return _Trainer(type(parts[0]).__name__, requested_keys(parts, layout), groups, frozenset(), None,
                        hf_config)
    conv = Conversions(build_meta_model(cfg_dir), "load")
    return _Trainer(type(parts[0]).__name__, requested_keys(parts, layout), groups, frozenset(conv.meta_sd),
                    lambda: conv, hf_config)


# ---------------------------------------------------------------- the source, as the trainer target sees it


@dataclass
class _Source:
    """A checkpoint of any kind ``to-hf`` reads, named the way the trainer target plans (HF / in-memory names).

    ``names``: the plan from the stored keys to those names (megatron-core's: :func:`~ckpt_bridge.plan.megatron.
    megatron_names`; a TorchTitan model's own: its adapter's ``to_hf``), composed before the trainer target, as
    ``to-hf`` composes it before the HF target; None: the stored keys are taken as they are.  ``infos``: the
    model's tensors under those names, aux modules apart.  ``aux``: the aux modules the source holds
    ({module: {fqn: info}}), carried unchanged; ``aux_key``: the key the stream reads each one under;
    ``aux_spec``: the spec a module was built from, when the source's manifest records it."""

    reader: Reader
    cfg_dir: Path
    names: Plan | None
    infos: dict[str, TensorInfo]
    aux: dict[str, dict[str, TensorInfo]]
    aux_key: dict[str, str]
    aux_spec: dict[str, str]
    aux_reader: Reader | None  # an HF export's aux_modules.safetensors, read under AUX_FILE_SOURCE

    def stream_reader(self) -> Reader:
        if self.aux_reader is None:
            return self.reader
        return WithNamespace(self.reader, AUX_FILE_SOURCE, self.aux_reader)


# the source keys under which an HF export's aux_modules.safetensors enters the stream
AUX_FILE_SOURCE = "<aux-file>."


def _open_source(reader: Reader, o: ToDCP, stack: ExitStack) -> _Source:
    """Checks (structure, config, every key's stored layout: metadata only) and the source's names."""
    where = str(reader.path)
    reader.check()
    names = hf_names(reader, o.config, o.source_titan_model)  # a TorchTitan-native DCP: its adapter's to_hf
    sections = tuple(reader.model_sections()) if reader.has_sections else ()  # to-dcp writes the main model
    infos = reader.model_tensors(sections) if names is None else names.targets()
    if is_lora(infos):
        raise BridgeError(f"{where}: a LoRA run; to-dcp does not fold adapters: write the merged model first "
                          f"(ckpt-bridge to-hf {where} --lora merge --out MERGED), then to-dcp MERGED")
    cfg_dir, _ = config_dir(reader, o.config)
    if cfg_dir is None:
        raise KeyPlanError(f"{where}: no config.json found; pass --config PATH (a config.json or a model dir)")
    read_fitting_config(cfg_dir, infos)  # structure, model_type and sizes, before transformers parses it
    if names is None:
        reader.check_keys(infos)
    aux: dict[str, dict[str, TensorInfo]] = {}
    aux_key: dict[str, str] = {}
    aux_reader = None
    if reader.key_names == "megatron":  # megatron-core's names -> the HF model's in-memory names
        names, infos = megatron_names(reader, cfg_dir, where=where)
        infos = infos if names is None else names.targets()
    elif names is None:
        infos, modules = split_aux(infos, reader, cfg_dir, None, where)
        full = reader.model_tensors(sections)
        for name, keys in modules.items():
            aux[name] = {canonical_key(k): full[k] for k in keys}
            aux_key.update({canonical_key(k): k for k in keys})
        if reader.aux_file() is not None:  # an HF export keeps its aux modules apart: aux_modules.safetensors
            aux_reader = stack.enter_context(SafetensorsFileReader(reader.aux_file()))
            for k, info in aux_reader.tensors().items():
                name = k.split(".", 1)[0]
                if name in aux and canonical_key(k) in aux[name]:
                    raise KeyPlanError(f"{reader.aux_file()}: {k!r} is also in the model weights; one of them is stale")
                aux.setdefault(name, {})[canonical_key(k)] = info
                aux_key[canonical_key(k)] = AUX_FILE_SOURCE + k
    m = reader.manifest() or {}
    specs = {a["name"]: a["spec"] for a in m.get("aux", []) if isinstance(a, dict) and isinstance(a.get("spec"), str)
             and a.get("kind") != "factory"}
    return _Source(reader, cfg_dir, names, infos, aux, aux_key, {n: specs[n] for n in aux if n in specs}, aux_reader)


def _carried_spec(name: str, infos: dict[str, TensorInfo], config: Any) -> str | None:
    """The ``--aux`` spec whose module has exactly these keys and shapes, or None: what a trainer passes to
    ``attach_aux`` to request them (and ``verify --against`` to rebuild them)."""
    shapes = {f[len(name) + 1:]: tuple(i.shape) for f, i in infos.items()}
    w = shapes.get("weight") or shapes.get("down.weight")
    if not w:
        return None
    words = {int(_cfg_field(config, "hidden_size") or -1): "hidden", int(_cfg_field(config, "vocab_size") or -1): "vocab"}
    for kind in KINDS:
        try:
            spec = parse_aux(f"{name}:{kind}:{words.get(w[0], w[0])}")
            with torch.device("meta"):
                module = build_aux(spec, config)
        except (BridgeError, TypeError, ValueError):
            continue
        if {k: tuple(v.shape) for k, v in module.state_dict().items()} == shapes:
            return spec.describe()
    return None


def _cfg_field(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def _with_carried(req: RequestedKeys, carried: dict[str, TensorInfo]) -> tuple[RequestedKeys, dict[str, str]]:
    """The trainer's request plus the source's aux modules, under the key its model asks for (its own, when the
    model given has them; else the fqn at the request's layout); {fqn: DCP key}."""
    by_fqn = {canonical_key(f): k for k, f in req.fqn_of.items()}
    fqn_of, info, key_of = dict(req.fqn_of), dict(req.info), {}
    for f, i in carried.items():
        k = by_fqn.get(f)
        if k is None:
            k = f"{NEST}.{f}" if req.layout == "nested" else f
            fqn_of[k], info[k] = f, TensorInfo(k, tuple(i.shape), i.dtype)
        elif tuple(req.info[k].shape) != tuple(i.shape):
            raise KeyPlanError(f"aux {f!r}: the source's is {tuple(i.shape)}, the trainer's model asks for "
                               f"{tuple(req.info[k].shape)}; build the trainer's aux module from the source's spec")
        key_of[f] = k
    return dataclasses.replace(req, fqn_of=fqn_of, info=info), key_of


def _titan_hint(e: KeyPlanError, src: _Source, o: ToDCP) -> KeyPlanError:
    """``e``, plus the flag that maps the source's keys when they are a TorchTitan model's own names."""
    if src.names is not None or o.source_titan_model is not None:
        return e
    name = working_titan_model(src.reader, src.cfg_dir)
    return e if name is None else KeyPlanError(f"{e}; the source holds TorchTitan {name} names: pass "
                                               f"--source-titan-model {name}")


# ---------------------------------------------------------------- the command


def to_dcp(src: str | Path, out: str | Path, options: "ToDCP | None" = None, *, team: Team | None = None,
          **kwargs: Any) -> "DCPExportSummary | DCPPlan":
    """Write the DCP folder a model-only load of the trainer's model accepts, from any checkpoint ``to-hf``
    reads (an HF dir, verl FSDP / Megatron saves, DCP step folders of every era, TorchTitan-native DCPs, torch
    files; a LoRA run is refused with the command that merges it first).

    ``layout``: ``auto`` asks the installed torchtitan which keys it requests;
    ``nested`` / ``flat`` force one.  ``aux``: ``["future_predictor:mlp", ...]``
    or ``{name: factory(config) -> nn.Module}``; fresh weights seeded by ``seed``
    or copied from ``aux_from``.  Aux modules the source holds (its manifest's, or
    top-level prefixes the HF class lacks) are carried unchanged; one also given
    in ``aux`` is an error.  ``model``: the trainer's own model (or model
    parts, meta is fine) when it is not the plain HF class plus aux modules, e.g.
    per-block ``torch.compile`` (``_orig_mod.`` in its keys).  ``sd_adapter``: for
    TorchTitan's own model definitions (pass ``model=`` too), the model's
    ``StateDictAdapter``; HF keys go through its ``from_hf`` group by group
    (:mod:`ckpt_bridge.plan.state_dict_adapter`).  ``titan_model``: a TorchTitan model
    name (``llama3``, ``qwen3``) built from the HF config, model and adapter
    both (:mod:`ckpt_bridge.models.titan`).  ``source_titan_model``: the source
    holds such a model's names (default: what its manifest recorded).  ``dtype``: of
    floating tensors written (fp32, the usual master-weight dtype; ``keep``).
    ``extra_state``: copy the source's lr_scheduler / rng / step beside the weights
    (``source_extra_state/``, the files to-hf writes); the manifest and summary
    always name what the source held beyond the weights.
    With ``dry_run`` the checked plan is returned and nothing is written.
    ``team``: this process's place among several writing the same export
    (:mod:`ckpt_bridge.pipeline.team`, :mod:`ckpt_bridge.writers.dcp_parts`; default: alone).
    """
    o = resolve(ToDCP, options, kwargs, "to_dcp")  # the same options from Python and from the CLI
    t0 = time.perf_counter()
    team = team or Team()
    cast = parse_dtype(o.dtype, "fp32 (default), bf16, fp16, keep")
    specs = as_specs(o.aux)
    if o.aux_from is not None and not specs:
        specs = _aux_from_manifest(Path(o.aux_from))
    with code_scope(o.custom_import, o.trust_remote_code), ExitStack() as stack, ThreadPoolExecutor(1) as pool:
        reader = stack.enter_context(open_reader(src, trust_pickle=o.trust_pickle))
        source = _open_source(reader, o, stack)
        job = _plan_job(source, o, specs)
        if o.dry_run:
            return job.plan
        hashes = pool.submit(hash_files, source_files_of(reader, source.cfg_dir),
                             source.cfg_dir) if team.leader else None
        summary = _run_job(src, out, o, source, job, specs, hashes, team, cast)
    summary.seconds = time.perf_counter() - t0
    return summary


@dataclass
class _Job:
    """The checked plan of one export and what its manifest records about the trainer."""

    plan: DCPPlan  # targets: the DCP keys; for --dry-run
    reads: Plan  # the same, reading the source's stored keys (names composed first)
    trainer: _Trainer
    req: RequestedKeys
    fresh: dict[str, TensorInfo]  # DCP key -> info, for --aux modules made here
    carried: dict[str, str]  # DCP key -> the key the stream reads a source aux tensor under
    aux_want: dict[str, TensorInfo]  # fqn -> info of every --aux key
    titan: str | None
    adapter_rec: dict | None


def _plan_job(source: _Source, o: ToDCP, specs: list[AuxSpec]) -> _Job:
    """Every key the trainer requests, given one producer: the source's tensors (through its names), the aux
    modules it holds, and the fresh ones; checked before anything exists."""
    where = str(source.reader.path)
    clash = sorted(s.name for s in specs if s.name in source.aux)
    if clash:
        raise KeyPlanError(f"--aux {clash[0]}: the source already holds an aux module {clash[0]!r} "
                           f"({len(source.aux[clash[0]])} tensors), carried into the DCP unchanged; drop --aux "
                           f"{clash[0]} (or name the new module differently)")
    trainer_names, model, titan, adapter_rec = _titan_names(source.infos, where, source.cfg_dir, o.model,
                                                             o.sd_adapter, o.titan_model)
    infos = source.infos if trainer_names is None else trainer_names.targets()
    hf_config = _hf_config(source.cfg_dir)
    trainer = _trainer_model(source.cfg_dir, specs, o.layout, hf_config, model, titan_native=titan is not None
                             or o.sd_adapter is not None, built_by_us=titan is not None, source=infos)
    aux_names = {s.name for s in specs}
    req = trainer.requested
    aux_want = {canonical_key(f): req.info[k] for k, f in req.fqn_of.items()
                if canonical_key(f).split(".", 1)[0] in aux_names}
    absent = sorted(n for n in aux_names if not any(f.split(".", 1)[0] == n for f in aux_want))
    if absent:
        raise KeyPlanError(f"aux module {absent[0]!r} is not in the trainer model's state dict; attach it "
                           f"(ckpt_bridge.plan.aux_modules.attach_aux) before asking for its keys")
    carried_infos = {f: i for mod in source.aux.values() for f, i in mod.items()}
    req, carried_key = _with_carried(req, carried_infos)
    try:
        plan = plan_dcp(infos, req, set(aux_want) | set(carried_infos), trainer.tie_groups, where=where,
                        model_class=trainer.model_class, load=trainer.load, known=trainer.known)
    except KeyPlanError as e:
        raise _titan_hint(e, source, o) from None
    reads = Plan(transforms=plan.transforms)
    for first in (trainer_names, source.names):  # read the stored keys: each naming plan composes before
        if first is not None:
            reads = compose(first, reads, where=where)
            plan.dropped += first.dropped
            plan.notes += [line for line in first.lines() if "(dropped" not in line]
    if isinstance(source.reader, MegatronReader):
        megatron_expect_reads(source.reader, reads)
    carried = {carried_key[f]: source.aux_key[f] for f in carried_infos}
    fresh = {k: i for k, i in plan.aux.items() if k not in carried}
    return _Job(plan, reads, trainer, req, fresh, carried, aux_want, titan, adapter_rec)


def _run_job(src: str | Path, out: str | Path, o: ToDCP, source: _Source, job: _Job, specs: list[AuxSpec],
             hashes: Any, team: Team, cast: Any) -> DCPExportSummary:
    """The stream: the source's tensors, its aux modules, the fresh ones -> one DCP sink; the manifest (and
    with ``extra_state`` the source's training state) as side files; renamed into place when all succeeded."""
    reader, req, where = source.reader, job.req, str(source.reader.path)
    # Aux values: small, made (or copied) up front so a bad --aux-from fails before any output exists.
    aux_values, aux_records = _aux_values(specs, job.aux_want, job.trainer.aux_config() if specs else None,
                                          seed=o.seed, aux_from=o.aux_from, trust_pickle=o.trust_pickle)
    held = reader.held_state()
    extra = reader.extra_state() if o.extra_state else None  # read before any output exists: a bad one fails here
    if o.extra_state and not extra:
        raise BridgeError(f"--extra-state: {where} holds no training extra state to copy "
                          f"({', '.join(held) or 'nothing beyond the weights'}); drop the flag")
    out_dt = out_dtype(cast)
    summary = DCPExportSummary(str(src), str(Path(out).absolute()), req.layout, req.trainer, req.reason)
    summary.seed_flags = seed_flags(summary.out, req.era, req.layout)
    summary.titan_model = job.titan
    summary.source_format = reader.format
    summary.left_behind = list(held)
    # The aux modules' values enter the stream as in-memory source tensors, renamed like any other; the source's
    # own aux modules are read from it; written after the model's, in the state-dict order DCP stores.
    aux_tf = [rename(f"{AUX_SOURCE}{canonical_key(req.fqn_of[k])}", k, info, "aux module") for k, info in job.fresh.items()]
    carried_tf = [rename(s, k, job.plan.aux[k], f"aux module {canonical_key(req.fqn_of[k]).split('.', 1)[0]} "
                  f"(carried from the source)") for k, s in job.carried.items()]
    stream_plan = Plan(transforms=list(job.reads.transforms) + carried_tf + aux_tf)
    stream: Reader = source.stream_reader()
    if aux_tf:
        stream = WithTensors(stream, {t.inputs[0]: aux_values[t.inputs[0][len(AUX_SOURCE):]][0] for t in aux_tf})
    targets = {t.key: TensorInfo(t.key, t.shape, out_dt(t)) for tf in stream_plan.transforms for t in tf.outputs}
    # DCP's writer asks for the items in state-dict order, which is the plan's: it takes each from the piece
    # stream as it comes (writers/dcp.RowFeed), a large tensor as several row chunks.
    sink = DCPSink(targets, nested=req.layout == "nested", fqn_of=req.fqn_of, out_dt=out_dt)
    protect = tuple(p for p in (Path(src), reader.path, source.cfg_dir, Path(o.aux_from) if o.aux_from else None,
                                source.aux_reader.path if source.aux_reader else None) if p)
    carried_records = [_carried_record(name, fqns, source, job, stream, out_dt)
                       for name, fqns in source.aux.items()]

    def manifest_file(tmp: Path) -> list[str]:
        summary.tensors = len(targets)
        summary.aux_tensors = len(aux_tf) + len(carried_tf)
        summary.from_source = len(targets) - len(aux_tf)
        summary.bytes_written = sum(nbytes(i.shape, i.dtype) for i in targets.values())
        planned = stream_plan.targets()  # before the cast: which targets are floating
        dts = {i.dtype for k, i in targets.items() if planned[k].dtype.is_floating_point}
        summary.dtype = ", ".join(sorted(str(d).replace("torch.", "") for d in dts))
        summary.aux = [s.describe() for s in specs] + [f"{r['name']} (carried)" for r in carried_records]
        summary.dropped = list(job.plan.dropped)
        files = [MANIFEST, HF_CONFIG_DIR]
        if extra:
            (tmp / EXTRA_STATE_DIR).mkdir()
            write_extra_state(tmp / EXTRA_STATE_DIR, extra, source=str(reader.path))
            files.append(EXTRA_STATE_DIR)
            summary.extra_state = EXTRA_STATE_DIR
        chain = provenance(reader)
        manifest = {
            "tool": f"ckpt-bridge {__version__}",
            "command": "to-dcp",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"path": str(Path(src).absolute()), "format": reader.format, "key_names": reader.key_names,
                       "config_dir": str(source.cfg_dir.absolute()), "files": hashes.result(),
                       **({"record_sha256": chain[-1]["record_sha256"]} if "record_sha256" in chain[-1] else {})},
            "provenance": chain,
            "left_behind": left_behind(held, bool(extra)),
            "hf_config_dir": keep_hf_files(source.cfg_dir, tmp / HF_CONFIG_DIR),
            "hf_config": read_config(source.cfg_dir),
            "model_class": job.trainer.model_class,
            "titan_model": job.titan,
            "model_code": record_for_manifest(read_config(source.cfg_dir).get("model_type")),
            **({"titan_adapter": job.adapter_rec} if job.adapter_rec is not None else {}),
            "layout": req.as_dict(),
            "dtype": summary.dtype,
            "tensors": summary.tensors,
            "aux": aux_records + carried_records,
            "dropped": [list(d) for d in job.plan.dropped],
            "notes": job.plan.notes,
            "versions": versions(),
        }
        write_manifest(tmp, jsonable(manifest))
        summary.manifest = str(Path(out).absolute() / MANIFEST)
        return files

    run(stream, stream_plan, [sink], [manifest_file], team,
        output=Output(Path(out), overwrite=o.overwrite, protect=protect), label="to-dcp", progress=o.progress)
    return summary


def _carried_record(name: str, fqns: dict[str, TensorInfo], source: _Source, job: _Job, stream: Reader,
                    out_dt: Any) -> dict[str, Any]:
    """The manifest's record of an aux module carried from the source: its spec (recorded by the source, or the
    one whose module has exactly its keys and shapes), keys, and the sha256 of the values as written (read one
    at a time: a head is small)."""
    spec = source.aux_spec.get(name) or _carried_spec(name, fqns, job.trainer.aux_config())
    keys = sorted(fqns)
    h = hashlib.sha256()
    for f in keys:
        info = fqns[f]
        t = stream.read(source.aux_key[f], out_dt(info) if info.dtype.is_floating_point else None)
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        del t
    return {"name": name, "spec": spec, "kind": "carried", "out": None, "seed": None,
            "init": f"carried from the source {source.reader.path}",
            "keys": {f: list(fqns[f].shape) for f in keys}, "sha256": h.hexdigest()}
