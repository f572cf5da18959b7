"""``to_hf``: any readable checkpoint -> a Hugging Face model directory.

reader -> plan of transforms (:mod:`ckpt_bridge.plan.core`, planned by
:func:`ckpt_bridge.plan.hf_target.plan_hf_export`: renames, and transformers' own
save-time conversions such as per-expert splits of fused MoE weights) -> the
plan executed one transform at a time -> sharded safetensors writer, with config,
generation config, tokenizer and training extra state alongside.  Everything
that can be checked from metadata (rank files, placements, keys, shapes) is
checked before the output directory is created; the directory is written
under a temporary name and renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any


from ..dtypes import DTYPES, dominant_float_dtype, out_dtype, parse_dtype
from ..errors import BridgeError, KeyPlanError
from ..formats.base import Reader, TensorInfo
from ..formats.detect import open_reader
from ..models.config_fit import read_fitting_config
from ..models.custom_code import code_scope
from ..plan.titan_names import hf_names, working_titan_model
from ..pipeline.run import Output, run
from ..options import ToHF, resolve
from ..pipeline.team import Team
from ..plan.aux_modules import AUX_MODES
from ..plan.core import Plan, compose, reading_from, rename
from ..plan.hf_target import plan_hf_export
from ..plan.lora import is_lora
from ..plan.export_plan import plan_export
from ..summary import ExportSummary
from ..pipeline.atomic import check_target
from ..writers.safetensors_shards import SafetensorsSink, parse_size
from ..formats.config_files import config_dir
from ..formats.hf import AUX_FILE
from ..writers.side_files import same_model, write_hf_side_files
from ..writers.side_files import write_configs as _write_configs  # a module global: tests hold the export between steps
from .to_hf_lora import export_lora

log = logging.getLogger("ckpt_bridge")

def _with_titan_hint(e: KeyPlanError, reader: Reader, cfg_dir: Path, titan_model: str | None,
                     adapted: bool) -> KeyPlanError:
    """``e``, plus the ``--titan-model`` that maps these keys when the checkpoint holds a TorchTitan model's own
    names (torchtitan's native saves name no model; that family's adapter is tried on the keys)."""
    if titan_model is not None or adapted:
        return e
    name = working_titan_model(reader, cfg_dir)
    if name is None:
        return e
    return KeyPlanError(f"{e}; these are TorchTitan {name} names: pass --titan-model {name}")


def _checked_source(reader: Reader, config: str | Path | None, other_models: tuple[str, ...] = (),
                    names: Plan | None = None) -> tuple[dict, Path]:
    """Structure and per-key layouts (metadata only), and the config directory.  ``names``: the plan that
    renames a TorchTitan-native checkpoint's tensors to HF names (its adapter's); the tensors returned are
    its targets."""
    reader.check()
    if other_models and not reader.has_sections:
        raise BridgeError(f"--models {','.join(('main',) + other_models)}: several models in one checkpoint are read "
                          f"from DCP folders (sections saved next to the model); {reader.path} is {reader.format}")
    infos = reader.model_tensors(other_models) if names is None else names.targets()
    reader.check_keys(infos)  # every key's stored layout (a verl shard's placements on every rank), metadata only
    cfg_dir, cfg_file = config_dir(reader, config)
    if cfg_file is not None and cfg_file.name != "config.json":
        raise BridgeError(f"--config {cfg_file}: pass a file named config.json or the directory holding it")
    if cfg_dir is None:
        recorded = reader.recorded_config_dir()
        hint = (f"its manifest records the source {recorded}, which is outside the checkpoint and not followed: "
                f"pass --config {recorded} to use it" if recorded
                else "pass --config PATH (a config.json or a model dir)")
        raise KeyPlanError(f"{reader.path}: no config.json found; {hint}")
    read_fitting_config(cfg_dir, infos)  # structure, model_type, sizes against the tensors: before any build
    return infos, cfg_dir


def to_hf(src: str | Path, out: str | Path, options: "ToHF | None" = None, *, team: Team | None = None,
          **kwargs: Any) -> ExportSummary:
    """Export the checkpoint at ``src`` to a Hugging Face directory ``out``.

    ``dtype`` is ``keep`` (the trained dtype) or one of bf16/fp16/fp32 (floating
    tensors are cast, integer buffers kept).  Auxiliary modules (see
    :func:`split_aux`) go to ``aux_modules.safetensors`` (``aux="separate"``),
    nowhere (``"drop"``) or into the main weights (``"inline"``).  ``models``:
    ``["main", "ema"]`` also writes each named section of a DCP checkpoint (an
    EMA copy saved as ``{"ema": state_dict}``) as ``ema.safetensors`` beside
    ``model.safetensors``.  ``base``: a base model directory whose other
    components (a VAE file, processor configs, ...) are copied unchanged; it is
    never written to (for a LoRA-only checkpoint it also supplies the base
    weights).  ``titan_model``: the checkpoint holds a TorchTitan model's
    own names (``llama3``, ``qwen3``; default: what the to-dcp manifest
    recorded); its adapter's ``to_hf`` maps them back.  ``lora``: for a LoRA
    checkpoint, ``merge`` / ``adapter`` / ``both`` (see
    :mod:`ckpt_bridge.commands.to_hf_lora`); ``lora_config``: the run's
    adapter_config.json when the checkpoint lacks it.  Returns a
    summary; raises a :class:`~ckpt_bridge.errors.BridgeError` subclass on bad
    input, leaving no ``out`` behind.

    The plan is checked against the model class the config names (built on
    the meta device; its keys, shapes and conversion groups are cached per
    config.json and transformers version, so a warm run never imports
    transformers unless a conversion has to run) before ``out`` exists.

    ``dry_run``: every check the real run makes on its input and output
    location - structure, per-key layouts, the confirmed key plan, config and
    tokenizer, the full extra state (every rank's rng and lr_scheduler) - and
    no tensor data read, nothing written; ``summary.plan_lines`` holds the plan.
    ``allow_missing_rng``: a DCP step whose hook-saved rng lacks a rank
    exports with a warning recorded in the output instead of failing.
    ``team``: this process's place among several writing the same export
    (:mod:`ckpt_bridge.pipeline.team`; default: alone).
    """
    o = resolve(ToHF, options, kwargs, "to_hf")  # the same options from Python and from the CLI
    t0 = time.perf_counter()
    team = team or Team()
    checked = _Checked.of(o)  # every option checked before anything is read
    # allow_missing_rng, DCP: a rank without rng is a warning, not an error
    with code_scope(o.custom_import, o.trust_remote_code), \
            open_reader(src, trust_pickle=o.trust_pickle, allow_missing_rng=o.allow_missing_rng) as reader:
        job = _assemble(src, out, reader, o, checked, team, t0)
        if isinstance(job, ExportSummary):  # a LoRA export (its own command) or --dry-run: done
            return job
        _run(job, out, o, team)
    job.summary.seconds = time.perf_counter() - t0
    return job.summary


@dataclass(frozen=True)
class _Checked:
    """The options turned into what the export uses, each refused in one line before anything is read."""

    cast: Any
    shard_bytes: int
    tok_dir: Path | None
    others: tuple[str, ...]  # the sections besides main (--models)
    base_dir: Path | None

    @classmethod
    def of(cls, o: ToHF) -> "_Checked":
        cast = parse_dtype(o.dtype, ", ".join(["keep", *DTYPES]))
        if o.aux not in AUX_MODES:
            raise BridgeError(f"--aux {o.aux!r}: choose one of {', '.join(AUX_MODES)}")
        try:
            shard_bytes = parse_size(o.max_shard_size)
        except ValueError as e:
            raise BridgeError(f"--max-shard-size: {e}") from None
        tok_dir = Path(o.tokenizer) if o.tokenizer is not None else None
        if tok_dir is not None and not tok_dir.is_dir():
            raise BridgeError(f"--tokenizer {tok_dir}: not a directory")
        models = list(o.models or ["main"])
        if models[0] != "main" or len(set(models)) != len(models):
            raise BridgeError(f"--models {','.join(models)}: list main first, then the other sections (e.g. main,ema)")
        base_dir = Path(o.base) if o.base is not None else None
        if base_dir is not None and not (base_dir / "config.json").is_file():
            raise BridgeError(f"--base {base_dir}: not a model directory (no config.json)")
        return cls(cast, shard_bytes, tok_dir, tuple(models[1:]), base_dir)


@dataclass
class _Export:
    """One assembled export: what ``run`` needs (reader, plan, sinks, side files) and the summary it fills."""

    reader: Reader
    main_tf: list
    sep_tf: list
    section_tf: list
    sinks: list
    side: list
    protect: tuple
    summary: ExportSummary


def _assemble(src: str | Path, out: str | Path, reader: Reader, o: ToHF, c: _Checked, team: Team, t0: float
              ) -> "_Export | ExportSummary":
    """Reader -> checked plan -> sinks and side files; a LoRA source goes to its own command, --dry-run stops
    here with the plan in the summary."""
    config = o.config
    if config is None and c.base_dir is not None and reader.hf_config_dir() is None:
        config = c.base_dir  # the checkpoint has no config of its own: the base's describes it

    names = hf_names(reader, config, o.titan_model)  # a TorchTitan-native DCP: its adapter's to_hf, as transforms
    all_infos, cfg_dir = _checked_source(reader, config, c.others, names)
    if c.base_dir is not None and cfg_dir != c.base_dir:
        same_model(cfg_dir, c.base_dir)
    if team.size > 1 and (o.dry_run or is_lora(all_infos)):
        raise BridgeError("--workers/--distributed: a LoRA export and --dry-run run in one process; "
                          "drop the option")
    if is_lora(all_infos):  # LoRA (issue 11): its own plan of folds + renames and a PEFT adapter
        return export_lora(reader, all_infos, cfg_dir, src, out, mode=o.lora,
                           lora_config=o.lora_config, cast=c.cast, shard_bytes=c.shard_bytes, tokenizer=c.tok_dir,
                           base=c.base_dir, overwrite=o.overwrite, progress=o.progress, t0=t0, dry_run=o.dry_run)
    where = str(reader.path)
    try:
        plan, aux_keys = plan_export(reader, all_infos, cfg_dir, aux_prefixes=o.aux_prefixes, where=where)
    except KeyPlanError as e:
        raise _with_titan_hint(e, reader, cfg_dir, o.titan_model, names is not None) from None
    other_plans = []
    for name in c.others:  # planned and checked in full before any output exists
        sec = reader.section_tensors(name)
        if not sec:
            raise KeyPlanError(f"{where}: --models {name}: no section {name!r} in this checkpoint "
                               f"(model sections: {', '.join(reader.model_sections()) or 'none'})")
        other_plans.append((name, plan_hf_export(sec, cfg_dir, where=f"{where} [{name}]")))
    summary = ExportSummary(str(src), reader.format, str(out), aux=aux_keys, aux_mode=o.aux)
    aux_tf = [rename(k, k, all_infos[k], f"aux module {name}") for name, keys in aux_keys.items() for k in keys]
    if o.aux == "drop":
        summary.dropped += [(t.inputs[0], f"aux module {t.inputs[0].split('.', 1)[0]} (--aux drop)")
                            for t in aux_tf]
    main_tf = list(plan.transforms) + (aux_tf if o.aux == "inline" else [])
    sep_tf = aux_tf if o.aux == "separate" else []
    out_dt = out_dtype(c.cast)
    protect = tuple(p for p in (Path(src), reader.path, cfg_dir, c.tok_dir, c.base_dir) if p is not None)
    if o.dry_run:  # everything the real run reads before writing, minus tensor data
        check_target(out, overwrite=o.overwrite, protect=protect)
        extra = reader.extra_state()
        summary.model_class, summary.extra_state = plan.model_class, bool(extra)
        summary.warnings += (extra or {}).get("warnings", [])
        aux_lines = [] if o.aux == "drop" else [f"{t.inputs[0]}  [{t.rule}, --aux {o.aux}]" for t in aux_tf]
        summary.plan_lines = (plan.lines() + aux_lines + [f"{k} -> (dropped: {why})" for k, why in summary.dropped]
                              + [f"# {n}" for n in plan.notes])
        summary.config = str(cfg_dir / "config.json")
        return summary
    if names is not None:  # read the native keys: the adapter's renames compose with the export's
        main_tf = compose(names, Plan(transforms=main_tf), where=where).transforms
        sep_tf = compose(names, Plan(transforms=sep_tf), where=where).transforms
    main = SafetensorsSink(main_tf, out_dt, c.shard_bytes)
    sinks = [main] + ([SafetensorsSink(sep_tf, out_dt, c.shard_bytes, prefix=AUX_FILE, shared=False)]
                      if sep_tf else [])
    section_tf = []
    for name, p_other in other_plans:  # another model of the checkpoint (the EMA) as NAME.safetensors
        fqn_to_key = reader.section_fqns(name)
        tfs = [reading_from(t, fqn_to_key) for t in p_other.transforms]
        section_tf += tfs
        sinks.append(SafetensorsSink(tfs, out_dt, c.shard_bytes, prefix=name, shared=False))
    side = [partial(_aux_index, aux_keys, all_infos)] if sep_tf else []
    side.append(partial(write_hf_side_files, reader=reader, summary=summary, cfg_dir=cfg_dir, key_plan=plan,
                        written=dominant_float_dtype(plan.targets().values(), out_dt), tokenizer=c.tok_dir,
                        base=c.base_dir, write=_write_configs))
    summary.model_class = plan.model_class
    summary.dropped = list(plan.dropped) + summary.dropped
    return _Export(reader, main_tf, sep_tf, section_tf, sinks, side, protect, summary)


def _run(job: _Export, out: str | Path, o: ToHF, team: Team) -> None:
    """The one pipeline run: every sink's transforms streamed, side files after, renamed into place."""
    result = run(job.reader, Plan(transforms=job.main_tf + job.sep_tf + job.section_tf), job.sinks, job.side, team,
                 output=Output(Path(out), overwrite=o.overwrite, protect=job.protect), label="to-hf",
                 progress=o.progress)
    if result.leader:
        done = [t for tf in job.main_tf + job.sep_tf for t in tf.outputs]  # the model and its aux modules
        job.summary.tensors, job.summary.parameters = len(done), sum(t.numel for t in done)
        job.summary.files = result.files
        job.summary.bytes_written = sum(sink.total_size for sink in job.sinks[:1 + bool(job.sep_tf)])


def _aux_index(aux_keys: dict[str, list[str]], infos: dict[str, TensorInfo], tmp: Path) -> list[str]:
    """``aux_modules.safetensors.json``: which modules the aux file holds and how to load them."""
    (tmp / f"{AUX_FILE}.json").write_text(json.dumps({
        "modules": {name: {k: list(infos[k].shape) for k in keys} for name, keys in aux_keys.items()},
        "note": "auxiliary modules kept out of the main weights so from_pretrained loads cleanly; "
                "load with safetensors.torch.load_file and model.add_module / load_state_dict",
    }, indent=2) + "\n")
    return [f"{AUX_FILE}.json"]
