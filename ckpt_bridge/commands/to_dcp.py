"""``to_dcp``: a Hugging Face model directory -> the DCP folder a TorchTitan /
flame model-only load accepts, with auxiliary modules and a manifest.

This module only assembles the pipeline (:func:`ckpt_bridge.pipeline.run.run`): the reader of the HF dir
(seen through a TorchTitan adapter when the trainer's model is TorchTitan's own), the plan against the keys
the trainer will request (:mod:`ckpt_bridge.plan.trainer_target`), the DCP sink (:mod:`ckpt_bridge.writers.dcp`:
DCP's own ``FileSystemWriter`` and planner; a large tensor stored as row chunks, so memory is a few pieces) and
the manifest as the side file.

Everything checkable (keys both ways, shapes, aux sources) is checked before
the output directory is created; the output is written under a temporary name
and renamed at the end.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..dtypes import nbytes, out_dtype, parse_dtype
from ..errors import BridgeError, KeyPlanError, few
from ..formats.base import Reader, TensorInfo
from ..formats.dcp import DCPReader
from ..formats.dcp_files import HF_CONFIG_DIR, MANIFEST, read_manifest, write_manifest
from ..formats.detect import open_reader
from ..formats.memory import WithTensors
from ..models.config_fit import read_fitting_config
from ..models.custom_code import code_scope, record_for_manifest
from ..models.hf import quiet_transformers, tie_groups
from ..models.titan import adapter_record, titan_model as build_titan_model
from ..models.titan_eras import seed_flags
from ..pipeline.run import Output, run
from ..options import ToDCP, resolve
from ..pipeline.team import Team
from ..plan.aux_modules import AuxSpec, as_specs, attach_aux, init_aux, parse_aux, tensor_sha256
from ..plan.conversions import Conversions
from ..plan.core import Plan, compose, rename
from ..plan.hf_target import build_meta_model
from ..plan.planner import canonical_key
from ..plan.state_dict_adapter import from_hf_plan
from ..plan.trainer_expectation import trainer_expectation
from ..plan.trainer_keys import RequestedKeys, requested_keys
from ..plan.trainer_target import DCPPlan, plan_dcp
from ..summary import DCPExportSummary
from ..version import __version__
from ..writers.dcp import DCPSink
from ..writers.dcp_manifest import hash_files, keep_hf_files, source_files_of, versions
from ..writers.side_files import config_dir, jsonable, read_config

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


def _titan_names(reader: Reader, cfg_dir: Path, model: Any, sd_adapter: Any, titan_model: str | None
                 ) -> tuple[Plan | None, Any, str | None, dict | None]:
    """(the plan naming the HF tensors as the trainer model's, or None; trainer model; titan model name for the
    manifest; what the manifest says about a ``model`` + ``sd_adapter`` conversion).

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
        return from_hf_plan(reader, tm.adapter), tm.build("meta"), titan_model, None
    if model is None:
        raise BridgeError("sd_adapter= needs model= (the TorchTitan model, meta is fine) to ask for its keys")

    record = adapter_record(sd_adapter, model, cfg_dir)
    return from_hf_plan(reader, sd_adapter), model, record["family"], record


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
                   *, titan_native: bool, built_by_us: bool) -> _Trainer:
    """The config's HF class plus aux modules (remembered per config: :mod:`~ckpt_bridge.plan.trainer_expectation`),
    or the model (parts) given: a user's, or the TorchTitan model we built (``built_by_us``: aux go on it)."""
    if model is None:
        exp = trainer_expectation(cfg_dir, specs, layout, hf_config)
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


def to_dcp(src: str | Path, out: str | Path, options: "ToDCP | None" = None, *, team: Team | None = None,
          **kwargs: Any) -> "DCPExportSummary | DCPPlan":
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
    o = resolve(ToDCP, options, kwargs, "to_dcp")  # the same options from Python and from the CLI
    layout, dtype, aux, seed = o.layout, o.dtype, o.aux, o.seed
    aux_from, model, sd_adapter, titan_model = o.aux_from, o.model, o.sd_adapter, o.titan_model
    config, overwrite, trust_pickle, progress = o.config, o.overwrite, o.trust_pickle, o.progress
    dry_run = o.dry_run
    t0 = time.perf_counter()
    team = team or Team()
    cast = parse_dtype(dtype, "fp32 (default), bf16, fp16, keep")
    specs = as_specs(aux)
    if aux_from is not None and not specs:
        specs = _aux_from_manifest(Path(aux_from))
    with code_scope(o.custom_import, o.trust_remote_code), open_reader(src, trust_pickle=trust_pickle) as reader, \
            ThreadPoolExecutor(1) as pool:
        where = str(reader.path)
        reader.check()
        cfg_dir, _ = config_dir(reader, config)
        if cfg_dir is None:
            raise KeyPlanError(f"{where}: no config.json found; pass --config PATH (a config.json or a model dir)")
        # structure, model_type and sizes against the tensors, before transformers parses it
        read_fitting_config(cfg_dir, reader.tensors())
        names, model, titan, adapter_rec = _titan_names(reader, cfg_dir, model, sd_adapter, titan_model)
        infos = reader.tensors() if names is None else names.targets()
        hashes = pool.submit(hash_files, source_files_of(reader, cfg_dir), cfg_dir) if not dry_run and team.leader else None

        hf_config = _hf_config(cfg_dir)
        trainer = _trainer_model(cfg_dir, specs, layout, hf_config, model, titan_native=titan is not None
                                 or sd_adapter is not None, built_by_us=titan is not None)
        req, model_class = trainer.requested, trainer.model_class
        aux_names = {s.name for s in specs}
        aux_want = {canonical_key(f): req.info[k] for k, f in req.fqn_of.items()
                    if canonical_key(f).split(".", 1)[0] in aux_names}
        absent = sorted(n for n in aux_names if not any(f.split(".", 1)[0] == n for f in aux_want))
        if absent:
            raise KeyPlanError(f"aux module {absent[0]!r} is not in the trainer model's state dict; attach it "
                               f"(ckpt_bridge.plan.aux_modules.attach_aux) before asking for its keys")
        plan = plan_dcp(infos, req, set(aux_want), trainer.tie_groups, where=where, model_class=model_class,
                        load=trainer.load, known=trainer.known)
        if names is not None:  # --dry-run shows what the adapter does, group by group
            plan.dropped += names.dropped
            plan.notes += [line for line in names.lines() if "(dropped" not in line]
        if dry_run:
            return plan

        # Aux values: small, made (or copied) up front so a bad --aux-from fails before any output exists.
        aux_values, aux_records = _aux_values(specs, aux_want, trainer.aux_config() if specs else None, seed=seed,
                                              aux_from=aux_from,
                                              trust_pickle=trust_pickle)

        out_dt = out_dtype(cast)
        summary = DCPExportSummary(str(src), str(Path(out).absolute()), req.layout, req.trainer, req.reason)
        summary.seed_flags = seed_flags(summary.out, req.era, req.layout)
        summary.titan_model = titan
        # The aux modules' values enter the stream as in-memory source tensors, renamed like any other; written
        # after the source's, in the state-dict order DCP stores.
        aux_tf = [rename(f"{AUX_SOURCE}{canonical_key(req.fqn_of[k])}", k, info, "aux module")
                  for k, info in plan.aux.items()]
        # read the HF keys: the adapter's transforms compose with the plan's
        from_reader = (plan.transforms if names is None
                       else compose(names, Plan(transforms=plan.transforms), where=where).transforms)
        stream_plan = Plan(transforms=list(from_reader) + aux_tf)
        source: Reader = reader
        if aux_tf:
            source = WithTensors(source, {t.inputs[0]: aux_values[t.inputs[0][len(AUX_SOURCE):]][0] for t in aux_tf})
        targets = {o.key: TensorInfo(o.key, o.shape, out_dt(o)) for t in stream_plan.transforms for o in t.outputs}
        # DCP's writer asks for the items in state-dict order, which is the plan's: it takes each from the piece
        # stream as it comes (writers/dcp.RowFeed), a large tensor as several row chunks.
        sink = DCPSink(targets, nested=req.layout == "nested", fqn_of=req.fqn_of, out_dt=out_dt)
        protect = tuple(p for p in (Path(src), reader.path, cfg_dir, Path(aux_from) if aux_from else None) if p)

        def manifest_file(tmp: Path) -> list[str]:
            summary.tensors = len(targets)
            summary.from_source, summary.aux_tensors = len(targets) - len(aux_tf), len(aux_tf)
            summary.bytes_written = sum(nbytes(i.shape, i.dtype) for i in targets.values())
            planned = stream_plan.targets()  # before the cast: which targets are floating
            dts = {i.dtype for k, i in targets.items() if planned[k].dtype.is_floating_point}
            summary.dtype = ", ".join(sorted(str(d).replace("torch.", "") for d in dts))
            summary.aux = [s.describe() for s in specs]
            summary.dropped = list(plan.dropped)
            manifest = {
                "tool": f"ckpt-bridge {__version__}",
                "command": "to-dcp",
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "source": {"path": str(Path(src).absolute()), "format": reader.format,
                           "config_dir": str(cfg_dir.absolute()), "files": hashes.result()},
                "hf_config_dir": keep_hf_files(cfg_dir, tmp / HF_CONFIG_DIR),
                "hf_config": read_config(cfg_dir),
                "model_class": model_class,
                "titan_model": titan,
                "model_code": record_for_manifest(read_config(cfg_dir).get("model_type")),
                **({"titan_adapter": adapter_rec} if adapter_rec is not None else {}),
                "layout": req.as_dict(),
                "dtype": summary.dtype,
                "tensors": summary.tensors,
                "aux": aux_records,
                "dropped": [list(d) for d in plan.dropped],
                "notes": plan.notes,
                "versions": versions(),
            }
            write_manifest(tmp, jsonable(manifest))
            summary.manifest = str(Path(out).absolute() / MANIFEST)
            return [MANIFEST, HF_CONFIG_DIR]

        run(source, stream_plan, [sink], [manifest_file], team,
            output=Output(Path(out), overwrite=overwrite, protect=protect), label="to-dcp",
            progress=progress)
    summary.seconds = time.perf_counter() - t0
    return summary


