"""``to_hf`` for LoRA checkpoints: the merged model and/or the PEFT adapter.

:func:`plan_lora` is the one call ``to_hf`` makes for a LoRA source: it
returns the checked :class:`~ckpt_bridge.plan.core.Plan` of the merged model (folds
+ renames, target names checked against the model class) and the adapter
plan + ``adapter_config.json``.  :func:`export_lora` runs both through the one pipeline (two sinks) into the
export's temporary directory; the rest (config, tokenizer, extra state, the
atomic rename) is ``to_hf``'s.

Output layout by ``--lora``:

* ``merge``:   OUT is a plain Hugging Face model (no ``base_layer``, no ``lora_*``)
* ``adapter``: OUT is a PEFT adapter dir (``adapter_config.json`` + ``adapter_model.safetensors``)
* ``both``:    the merged model in OUT and the adapter in ``OUT/lora_adapter``

A LoRA-only checkpoint (``save_lora_only``) needs the base weights for a
merge: ``--base HF_DIR``.  A base model dir the checkpoint records outside
itself is never read on its own say (a one-line error asks for ``--base``);
without any, ``both`` writes the adapter alone and says so.
"""

from __future__ import annotations

import json
from functools import partial
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..plan import lora
from ..formats.detect import open_reader
from ..dtypes import dominant_float_dtype, out_dtype
from ..errors import BridgeError, KeyPlanError
from ..summary import ExportSummary
from ..formats.base import Reader, TensorInfo
from ..plan.hf_target import ModelExpectation, expected_model, plan_hf_export, value_head
from ..plan.planner import canonicalize
from ..plan.core import Plan, compose
from ..writers.side_files import write_hf_side_files
from ..pipeline.atomic import check_target
from ..writers.safetensors_shards import SafetensorsSink
from ..pipeline.run import Output, run
from ..pipeline.team import Team
from ..formats.memory import WithNamespace
from ..confine import is_inside

ADAPTER_FILE = "adapter_model"


@dataclass
class LoraJob:
    """What a LoRA export writes: the merged plan (or None) and the adapter plan (or None)."""

    checkpoint: lora.LoraCheckpoint
    mode: str
    merged: Plan | None
    key_plan: Plan | None  # the merged model's save rules (model_class, ties, config updates)
    adapter: Plan | None
    adapter_config: dict[str, Any]
    base_reader: Reader | None = None
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """``--dry-run`` text: the fold transforms and renames of both outputs."""
        out = [f"# LoRA: {json.dumps(self.checkpoint.summary())}"] + [f"# {n}" for n in self.notes]
        if self.merged is not None:
            out += ["# merged model:"] + self.merged.lines()
        if self.adapter is not None:
            where = "OUT" if self.mode == "adapter" else f"OUT/{lora.ADAPTER_SUBDIR}"
            out += [f"# PEFT adapter ({where}):"] + self.adapter.lines()
        return out

    def close(self) -> None:
        if self.base_reader is not None:
            self.base_reader.close()


def plan_lora(reader: Reader, infos: dict[str, TensorInfo], cfg_dir: Path, *, mode: str = "both",
              base: Path | None = None, lora_config: str | Path | None = None,
              expectation: ModelExpectation | None = None) -> LoraJob:
    """Parse the LoRA structure and plan both outputs; nothing is read or written."""
    if mode not in lora.LORA_MODES:
        raise BridgeError(f"--lora {mode!r}: choose one of {', '.join(lora.LORA_MODES)}")
    where = str(reader.path)
    ck = lora.parse(infos, lora.find_settings(reader.path, lora_config), where=where)
    job = LoraJob(ck, mode, None, None, None, {})
    if Path(ck.settings.source).name == lora.META_FILE:
        job.notes.append(f"scale alpha/r from {lora.META_FILE} (verl records no rsLoRA or rank patterns; pass "
                         f"--lora-config ADAPTER_DIR if the run started from an adapter that used them)")
    base_dir = base
    if base_dir is None and not ck.base_inside and mode != "adapter":
        base_dir = _recorded_base(reader, cfg_dir, ck, job)
    base_infos = None
    if base_dir is not None and not ck.base_inside:
        job.base_reader = open_reader(base_dir)
        base_infos = job.base_reader.tensors()
    if expectation is None:  # the model class: which modules are Conv1D, which modules PEFT could match
        expectation = expected_model(cfg_dir, value_head(canonicalize(lora.merged_names(ck, base_infos), where),
                                                         cfg_dir))
    view = lora.ModelView.of(ck, expectation)
    lora.check_targets(ck, view)
    lora.trained_biases(ck, where)  # a bias mode whose trained biases are not in the checkpoint is refused here
    if mode in ("merge", "both"):
        if ck.base_inside or base_infos is not None:
            job.merged, job.key_plan, transposed = _checked_merge(ck, base_infos, cfg_dir, where, expectation)
            linear = [m for m, mod in ck.modules.items() if mod.kind == "linear" and m not in transposed]
            if ck.settings.fan_in_fan_out and linear:
                job.notes.append(f"fan_in_fan_out=true in {ck.settings.source} does not apply to nn.Linear modules "
                                 f"({linear[0]}, ...): PEFT turns it off for them (and on for Conv1D), and so does "
                                 f"the fold")
        elif mode == "merge":
            raise KeyPlanError(f"{where}: a LoRA-only checkpoint (save_lora_only): the base weights are not in it; "
                               f"pass --base HF_DIR (the model the run started from)")
        else:
            job.notes.append("LoRA-only checkpoint and no base model: wrote the adapter alone "
                             "(pass --base HF_DIR for the merged model)")
            job.mode = "adapter"
    if job.mode in ("adapter", "both"):
        job.adapter = lora.peft_adapter_plan(ck, base_infos, where=where)
        job.adapter_config = lora.adapter_config(ck, str(base_dir) if base_dir is not None else None, view)
    return job


def _recorded_base(reader: Reader, cfg_dir: Path, ck: lora.LoraCheckpoint, job: LoraJob) -> Path | None:
    """The base model dir a LoRA-only checkpoint records, if it lies inside the checkpoint.  A recorded path
    elsewhere is never read unless the user passes it (``--base``): the checkpoint does not choose what we read."""

    found = lora.recorded_base(cfg_dir, ck.settings)
    if found is None:
        return None
    path, named_by = found
    if not is_inside(reader.path, path):
        raise KeyPlanError(f"{reader.path}: a LoRA-only checkpoint (save_lora_only) whose {named_by} names its base "
                           f"model {path}, outside the checkpoint: recorded paths are not followed; pass --base "
                           f"{path} to merge onto it (or --lora adapter for the adapter alone)")
    job.notes.append(f"base weights from {path} (inside the checkpoint; named by {named_by})")
    return path


def _checked_merge(ck: lora.LoraCheckpoint, base_infos, cfg_dir: Path, where: str,
                   expectation: ModelExpectation) -> tuple[Plan, Plan, set[str]]:
    """The merge plan (folds and renames) followed by the model class's own save rules (ties, inv_freq,
    transformers' conversions), composed into one plan over the checkpoint's keys.

    The model class also decides which deltas are transposed (PEFT's rule: a ``Conv1D`` module's, never an
    ``nn.Linear``'s)."""
    transposed = set(expectation.transposed)
    folds = lora.merge_plan(ck, base_infos, where=where, transposed=transposed)
    save = plan_hf_export(folds.targets(), cfg_dir, where=where, expectation=expectation)
    return compose(folds, save, where=where), save, transposed


def lora_sinks(job: LoraJob, cast: torch.dtype | None, shard_bytes: int) -> list[SafetensorsSink]:
    """The merged model (sharded like any export, cast as asked) and the PEFT adapter (one file, as trained;
    in ``adapter/`` beside the merged model, or at the top when it is the whole export).  Like any export, a
    large renamed tensor (a weight no adapter touches) streams in row pieces; folds are computed whole."""
    sinks = []
    if job.merged is not None:
        sinks.append(SafetensorsSink(job.merged.transforms, out_dtype(cast), shard_bytes))
    if job.adapter is not None:
        sinks.append(SafetensorsSink(job.adapter.transforms, lambda o: o.dtype, None, prefix=ADAPTER_FILE,
                                     subdir="" if job.mode == "adapter" else lora.ADAPTER_SUBDIR, shared=False))
    return sinks


def _adapter_config(job: LoraJob, tmp: Path) -> list[str]:
    adir = tmp if job.mode == "adapter" else tmp / lora.ADAPTER_SUBDIR
    (adir / lora.ADAPTER_CONFIG).write_text(json.dumps(job.adapter_config, indent=2, sort_keys=True) + "\n")
    return [lora.ADAPTER_CONFIG if job.mode == "adapter" else f"{lora.ADAPTER_SUBDIR}/{lora.ADAPTER_CONFIG}"]


def export_lora(reader: Reader, infos: dict[str, TensorInfo], cfg_dir: Path, src: str | Path, out: str | Path, *,
                mode: str, lora_config: str | Path | None, cast: torch.dtype | None, shard_bytes: int,
                tokenizer: Path | None, base: Path | None, overwrite: bool, progress: bool | None, t0: float,
                dry_run: bool = False):
    """``to_hf`` of a LoRA checkpoint (called from :func:`ckpt_bridge.commands.to_hf.to_hf`; same summary, same rules:
    ``dry_run`` checks the input, the extra state and ``out`` and returns the plan lines; the export carries
    the same marker as every export, so watch and the callbacks treat LoRA runs alike)."""
    job = plan_lora(reader, infos, cfg_dir, mode=mode, base=base, lora_config=lora_config)
    try:
        summary = ExportSummary(str(src), reader.format, str(out))
        summary.warnings += [n for n in job.notes if "adapter alone" in n]
        protect = tuple(p for p in (Path(src), reader.path, cfg_dir, tokenizer, base,
                                    job.base_reader.path if job.base_reader else None) if p is not None)
        if dry_run:
            check_target(out, overwrite=overwrite, protect=protect)
            extra = reader.extra_state()
            summary.extra_state = bool(extra)
            summary.model_class = job.key_plan.model_class if job.merged is not None else "PEFT adapter"
            summary.config = str(cfg_dir / "config.json")
            summary.plan_lines = job.lines()
            summary.lora = {"mode": job.mode, **job.checkpoint.summary(), "notes": job.notes}
            return summary
        sinks = lora_sinks(job, cast, shard_bytes)
        side = [partial(_adapter_config, job)] if job.adapter is not None else []
        merged = job.merged
        if merged is not None:
            summary.model_class, summary.dropped = job.key_plan.model_class, list(merged.dropped)
        else:
            summary.model_class = "PEFT adapter"
        side.append(partial(write_hf_side_files, reader=reader, summary=summary, cfg_dir=cfg_dir,
                            key_plan=job.key_plan if merged is not None else None,
                            written=dominant_float_dtype(merged.targets().values(), out_dtype(cast)) if merged else None,
                            tokenizer=tokenizer, base=base))
        plans = [p for p in (job.merged, job.adapter) if p is not None]
        source = reader if job.base_reader is None else WithNamespace(reader, lora.BASE_NS, job.base_reader)
        result = run(source, Plan(transforms=[t for p in plans for t in p.transforms]), sinks, side, Team(),
                     output=Output(Path(out), overwrite=overwrite, protect=protect), label="to-hf", progress=progress)
        done = [o for p in plans for t in p.transforms for o in t.outputs]
        summary.tensors, summary.parameters = len(done), sum(o.numel for o in done)
        summary.files, summary.bytes_written = result.files, sum(s.total_size for s in sinks)
        summary.lora = {"mode": job.mode, **job.checkpoint.summary(), "notes": job.notes}
    finally:
        job.close()
    summary.seconds = time.perf_counter() - t0
    return summary
