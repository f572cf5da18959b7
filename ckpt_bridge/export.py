"""``to_hf``: any readable checkpoint -> a Hugging Face model directory.

reader -> key plan -> tensor stream -> sharded safetensors writer, with config,
generation config, tokenizer and training extra state alongside.  Everything
that can be checked from metadata (rank files, placements, keys, shapes) is
checked before the output directory is created; the directory is written
under a temporary name and renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .detect import open_reader
from .errors import BridgeError, KeyPlanError
from .formats.base import Reader
from .keys import KeyPlan, PlanEntry, confirm_plan, expected_model, plan_hf_export, provisional_hf_plan
from .lora import is_lora
from .lora_export import export_lora
from .progress import Progress
from .stream import read_ahead
from .writers.atomic import AtomicDir
from .writers.safetensors_shards import ShardedSafetensorsWriter, parse_size

log = logging.getLogger("ckpt_bridge")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TORCH_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32",
                      torch.float64: "float64"}  # fmt: skip

# Tokenizer / processor files that travel with a model (matched by name prefix).
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat_template",
                      "spiece", "sentencepiece", "preprocessor_config", "processor_config")  # fmt: skip


@dataclass
class ExportSummary:
    source: str
    source_format: str
    out: str
    tensors: int = 0
    parameters: int = 0
    bytes_written: int = 0
    dtype: str = ""
    files: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    model_class: str | None = None
    extra_state: bool = False
    global_step: int | None = None
    aux: dict[str, list[str]] = field(default_factory=dict)  # aux module -> keys
    aux_mode: str = "separate"
    lora: dict[str, Any] | None = None  # LoRA source: mode, r, alpha, targets, notes (see ckpt_bridge.lora)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def target_dtype(dtype: str) -> torch.dtype | None:
    if dtype == "keep":
        return None
    if dtype not in DTYPES:
        raise BridgeError(f"--dtype {dtype!r}: choose one of keep, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _config_dir(reader: Reader, config: str | Path | None) -> tuple[Path | None, Path | None]:
    """(directory holding config.json, explicit config.json file or None)."""
    if config is None:
        return reader.hf_config_dir(), None
    p = Path(config)
    if p.is_dir() and (p / "config.json").is_file():
        return p, None
    if p.is_file():
        return p.parent, p
    raise BridgeError(f"--config {p}: neither a config.json file nor a directory containing one")


def _checked_source(reader: Reader, config: str | Path | None, other_models: tuple[str, ...] = ()
                    ) -> tuple[dict, Path]:
    """Structure and per-key layouts (metadata only), and the config directory."""
    if hasattr(reader, "check"):
        reader.check()
    if other_models and not hasattr(reader, "section_tensors"):
        raise BridgeError(f"--models {','.join(('main',) + other_models)}: several models in one checkpoint are read "
                          f"from DCP folders (sections saved next to the model); {reader.path} is {reader.format}")
    infos = (reader.model_tensors(other_models) if other_models else reader.model_tensors()) \
        if hasattr(reader, "model_tensors") else reader.tensors()
    if reader.format == "verl-fsdp":
        for key in infos:  # placements and shard shapes of every key, on every rank
            reader.layout(key)
    cfg_dir, cfg_file = _config_dir(reader, config)
    if cfg_file is not None and cfg_file.name != "config.json":
        raise BridgeError(f"--config {cfg_file}: pass a file named config.json or the directory holding it")
    if cfg_dir is None:
        raise KeyPlanError(f"{reader.path}: no config.json found; pass --config PATH (a config.json or a model dir)")
    return infos, cfg_dir


def plan_export(reader: Reader, config: str | Path | None = None, aux_prefixes: list[str] | None = None
                ) -> tuple[KeyPlan, Path]:
    """Everything checkable before writing: structure, per-key layouts, the checked key plan (aux split off)."""
    infos, cfg_dir = _checked_source(reader, config)
    infos, aux = split_aux(infos, reader, cfg_dir, aux_prefixes, str(reader.path))
    plan = plan_hf_export(infos, cfg_dir, where=str(reader.path))
    plan.notes += [f"aux module {name}: {len(keys)} tensor(s) ({', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''})"
                   for name, keys in aux.items()]
    return plan, cfg_dir


AUX_MODES = ("separate", "drop", "inline")
AUX_FILE = "aux_modules"


def split_aux(infos: dict, reader: Reader, cfg_dir: Path, names: list[str] | None, where: str
              ) -> tuple[dict, dict[str, list[str]]]:
    """(main tensors, {aux module: keys}).

    Aux modules are the prefixes a to-dcp manifest names, the ones passed in
    ``names``, and any top-level prefix the HF model class does not have
    (``future_predictor.weight`` next to ``model.*`` / ``lm_head.*``): they
    would make ``from_pretrained`` warn about unexpected keys, or fail.
    """
    wanted = set(names or [])
    manifest = reader.manifest() if hasattr(reader, "manifest") else None
    wanted |= {a["name"] for a in (manifest or {}).get("aux", [])}
    tops = {k.split(".", 1)[0] for k in infos}
    if tops - wanted - {"model", "lm_head"}:  # only then is the model class needed to decide
        known = {k.split(".", 1)[0] for k in expected_model(cfg_dir).shapes}
        wanted |= tops - known
    aux: dict[str, list[str]] = {}
    main = {}
    for k, info in infos.items():
        top = k.split(".", 1)[0]
        if top in wanted:
            aux.setdefault(top, []).append(k)
        else:
            main[k] = info
    missing = sorted(n for n in (names or []) if n not in aux)
    if missing:
        raise KeyPlanError(f"{where}: --aux-prefix {missing[0]!r}: no keys start with {missing[0] + '.'!r}")
    return main, aux


def to_hf(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str = "keep",
    max_shard_size: str | int = "5GB",
    config: str | Path | None = None,
    tokenizer: str | Path | None = None,
    aux: str = "separate",
    aux_prefixes: list[str] | None = None,
    models: list[str] | None = None,
    base: str | Path | None = None,
    lora: str = "both",
    lora_config: str | Path | None = None,
    overwrite: bool = False,
    trust_pickle: bool = False,
    progress: bool | None = None,
) -> ExportSummary:
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
    weights).  ``lora``: for a LoRA checkpoint, ``merge`` / ``adapter`` /
    ``both`` (see :mod:`ckpt_bridge.lora_export`); ``lora_config``: the
    run's adapter_config.json when the checkpoint lacks it.  Returns a
    summary; raises a :class:`~ckpt_bridge.errors.BridgeError` subclass on bad
    input, leaving no ``out`` behind.

    The key plan is checked against the model class the config names.  Building
    that class on the meta device means importing transformers (seconds), so it
    runs in a thread while tensors already stream under the plan the config
    JSON gives; the two must agree before the output is committed, and a
    disagreement aborts with nothing left behind.
    """
    t0 = time.perf_counter()
    cast = target_dtype(dtype)
    if aux not in AUX_MODES:
        raise BridgeError(f"--aux {aux!r}: choose one of {', '.join(AUX_MODES)}")
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise BridgeError(f"--max-shard-size: {e}") from None
    tok_dir = Path(tokenizer) if tokenizer is not None else None
    if tok_dir is not None and not tok_dir.is_dir():
        raise BridgeError(f"--tokenizer {tok_dir}: not a directory")
    models = list(models or ["main"])
    if models[0] != "main" or len(set(models)) != len(models):
        raise BridgeError(f"--models {','.join(models)}: list main first, then the other sections (e.g. main,ema)")
    others = tuple(models[1:])
    base_dir = Path(base) if base is not None else None
    if base_dir is not None and not (base_dir / "config.json").is_file():
        raise BridgeError(f"--base {base_dir}: not a model directory (no config.json)")
    if config is None and base_dir is not None:
        config = base_dir
    with open_reader(src, trust_pickle=trust_pickle) as reader, ThreadPoolExecutor(1) as pool:
        all_infos, cfg_dir = _checked_source(reader, config, others)
        if is_lora(all_infos):  # LoRA (issue 11): its own plan of folds + renames and a PEFT adapter
            return export_lora(reader, all_infos, cfg_dir, src, out, mode=lora, lora_config=lora_config, cast=cast,
                               shard_bytes=shard_bytes, tokenizer=tok_dir, base=base_dir, overwrite=overwrite,
                               progress=progress, t0=t0)
        where = str(reader.path)
        infos, aux_keys = split_aux(all_infos, reader, cfg_dir, aux_prefixes, where)
        expectation = pool.submit(expected_model, cfg_dir)
        other_plans = []
        for name in others:  # planned and checked in full before any output exists
            sec = reader.section_tensors(name)
            if not sec:
                raise KeyPlanError(f"{where}: --models {name}: no section {name!r} in this checkpoint "
                                   f"(model sections: {', '.join(reader.model_sections()) or 'none'})")
            other_plans.append((name, sec, plan_hf_export(sec, cfg_dir, where=f"{where} [{name}]",
                                                          expectation=expectation.result())))
        plan = provisional_hf_plan(infos, read_config(cfg_dir), where=where)
        confirmed = plan is None
        if plan is None:
            plan = plan_hf_export(infos, cfg_dir, where=where, expectation=expectation.result())
        summary = ExportSummary(str(src), reader.format, str(out), aux=aux_keys, aux_mode=aux)
        aux_entries = [PlanEntry(k, k, all_infos[k]) for keys in aux_keys.values() for k in keys]
        if aux == "drop":
            summary.dropped += [(e.source, f"aux module {e.source.split('.', 1)[0]} (--aux drop)") for e in aux_entries]
        main_entries = list(plan.entries) + (aux_entries if aux == "inline" else [])
        sep_entries = aux_entries if aux == "separate" else []

        def out_dt(e: PlanEntry) -> torch.dtype:
            return cast if cast is not None and e.info.dtype.is_floating_point else e.info.dtype

        out_dtype = {e.target: out_dt(e) for e in main_entries + sep_entries}
        sep_ids = {id(e) for e in sep_entries}
        protect = tuple(p for p in (Path(src), reader.path, cfg_dir, tok_dir, base_dir) if p is not None)
        with AtomicDir(out, overwrite=overwrite, protect=protect) as tmp:
            writer = ShardedSafetensorsWriter(
                tmp, [(e.target, e.info.shape, out_dtype[e.target]) for e in main_entries], shard_bytes
            )
            aux_writer = ShardedSafetensorsWriter(
                tmp, [(e.target, e.info.shape, out_dtype[e.target]) for e in sep_entries], shard_bytes,
                prefix=AUX_FILE) if sep_entries else None
            total = writer.total_size + (aux_writer.total_size if aux_writer else 0)
            bar = Progress(total, "to-hf", enabled=progress)
            try:
                stream = read_ahead(main_entries + sep_entries,
                                    lambda e: reader.read(e.source, out_dtype[e.target]))
                for e, t in stream:
                    if not confirmed and expectation.done():  # fail early if the model disagrees
                        plan = confirm_plan(plan, infos, cfg_dir, expectation.result(), where=where)
                        confirmed = True
                    (aux_writer if id(e) in sep_ids else writer).write(e.target, t)
                    summary.tensors += 1
                    summary.parameters += t.numel()
                    bar.update(t.numel() * t.element_size(), e.target)
                    del t
            finally:
                bar.close()
            if not confirmed:
                plan = confirm_plan(plan, infos, cfg_dir, expectation.result(), where=where)
            summary.model_class = plan.model_class
            summary.dropped = list(plan.dropped) + summary.dropped
            summary.files = writer.close()
            summary.bytes_written = writer.total_size
            if aux_writer is not None:
                summary.files += aux_writer.close()
                summary.bytes_written += aux_writer.total_size
                (tmp / f"{AUX_FILE}.json").write_text(json.dumps({
                    "modules": {name: {k: list(all_infos[k].shape) for k in keys} for name, keys in aux_keys.items()},
                    "note": "auxiliary modules kept out of the main weights so from_pretrained loads cleanly; "
                            "load with safetensors.torch.load_file and model.add_module / load_state_dict",
                }, indent=2) + "\n")
                summary.files.append(f"{AUX_FILE}.json")
            for name, sec, p_other in other_plans:
                summary.files += _write_section(reader, name, sec, p_other, tmp, cast, shard_bytes)
            written = _dominant_float_dtype(plan, out_dtype)
            summary.dtype = _TORCH_DTYPE_NAMES.get(written, str(written))
            summary.files += _write_configs(tmp, cfg_dir, plan, written)
            summary.files += _copy_tokenizer(tmp, tok_dir or cfg_dir, summary)
            if base_dir is not None:
                summary.files += _copy_base(tmp, base_dir)
            extra = reader.extra_state()
            if extra:
                summary.files += write_extra_state(tmp, extra, source=str(reader.path))
                summary.extra_state = True
                summary.global_step = extra.get("global_step")
    summary.seconds = time.perf_counter() - t0
    return summary


def _write_section(reader: Reader, name: str, sec: dict, plan: KeyPlan, tmp: Path, cast: torch.dtype | None,
                   shard_bytes: int) -> list[str]:
    """Another model of the checkpoint (e.g. the EMA) as ``NAME.safetensors`` (sharded like the main weights)."""
    fqn_to_key = reader.section_fqns(name)
    dt = {e.target: (cast if cast is not None and e.info.dtype.is_floating_point else e.info.dtype)
          for e in plan.entries}
    writer = ShardedSafetensorsWriter(tmp, [(e.target, e.info.shape, dt[e.target]) for e in plan.entries],
                                      shard_bytes, prefix=name)
    for e, t in read_ahead(plan.entries, lambda e: reader.read(fqn_to_key[e.source], dt[e.target])):
        writer.write(e.target, t)
        del t
    return writer.close()


_WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _copy_base(tmp: Path, base: Path) -> list[str]:
    """Every component of ``base`` the export does not write itself (VAE files, processor configs, ...)."""
    copied = []
    for p in sorted(base.iterdir()):
        if p.name in _WEIGHT_NAMES or p.name.startswith(("model-0", "pytorch_model-0", ".")) or (tmp / p.name).exists():
            continue
        if p.is_dir():
            shutil.copytree(p, tmp / p.name)
        else:
            shutil.copy2(p, tmp / p.name)
        copied.append(p.name)
    return copied


def read_config(cfg_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((cfg_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise BridgeError(f"{cfg_dir / 'config.json'}: cannot be read as JSON ({e})") from None


def _dominant_float_dtype(plan: KeyPlan, out_dtype: dict[str, torch.dtype]) -> torch.dtype:
    by_bytes: dict[torch.dtype, int] = {}
    for e in plan.entries:
        d = out_dtype[e.target]
        if d.is_floating_point:
            by_bytes[d] = by_bytes.get(d, 0) + e.info.numel
    return max(by_bytes, key=by_bytes.__getitem__) if by_bytes else torch.float32


def _write_configs(tmp: Path, cfg_dir: Path, plan: KeyPlan, written: torch.dtype) -> list[str]:
    cfg = read_config(cfg_dir)
    if not cfg.get("architectures") and plan.model_class:
        cfg["architectures"] = [plan.model_class]
    # The config must describe the tensors actually written (verl's own hf_model
    # save writes fp32 tensors under a config that says bf16).  transformers 5
    # reads "dtype", 4.x reads "torch_dtype": keep both in step.
    name = _TORCH_DTYPE_NAMES.get(written, str(written).replace("torch.", ""))
    cfg["dtype"] = name
    cfg["torch_dtype"] = name
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = cfg_dir / "generation_config.json"
    if gen.is_file():
        shutil.copy2(gen, tmp / "generation_config.json")
    else:
        keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
        g = {"_from_model_config": True, **{k: cfg[k] for k in keys if cfg.get(k) is not None}}
        (tmp / "generation_config.json").write_text(json.dumps(g, indent=2) + "\n")
    return ["config.json", "generation_config.json"]


def _copy_tokenizer(tmp: Path, cfg_dir: Path, summary: ExportSummary) -> list[str]:
    copied = []
    for p in sorted(cfg_dir.iterdir()):
        if p.is_file() and p.name.startswith(TOKENIZER_PREFIXES):
            shutil.copy2(p, tmp / p.name)
            copied.append(p.name)
    if not any(n.startswith("tokenizer") for n in copied):
        summary.warnings.append(
            f"no tokenizer files in {cfg_dir}; the export has weights and config only "
            f"(copy a tokenizer in, or pass --config a model dir that has one)"
        )
    return copied


def write_extra_state(tmp: Path, extra: dict[str, Any], *, source: str) -> list[str]:
    """``extra_state_merged.pt`` + readable ``lr_scheduler_state.json`` and ``trainer_state.json``.

    The same three files for every source: verl (lr_scheduler, rng of every
    rank, step) and TorchTitan/flame (lr_scheduler, train_state, dataloader,
    and rng of every rank when the ckpt-bridge hook saved it).
    """
    payload = {
        "lr_scheduler": extra.get("lr_scheduler"),
        "rng": extra.get("rng", {}),  # {rank: rng state}; both trainers restore rng per rank
        "global_step": extra.get("global_step"),
        "world_size": extra.get("world_size"),
        "train_state": extra.get("train_state"),
        "dataloader": extra.get("dataloader"),
        "source": source,
    }
    torch.save(payload, tmp / "extra_state_merged.pt")
    readable = {
        "global_step": extra.get("global_step"),
        "world_size": extra.get("world_size"),
        "ranks_with_rng": sorted(extra.get("rng", {})),
        "lr_scheduler": _jsonable(extra.get("lr_scheduler")),
        "source": source,
    }
    (tmp / "lr_scheduler_state.json").write_text(json.dumps(readable, indent=2) + "\n")
    trainer = {
        "global_step": extra.get("global_step"),
        "world_size": extra.get("world_size"),
        "train_state": _jsonable(extra.get("train_state")),
        "dataloader_state_saved": extra.get("dataloader") is not None,
        "rng_saved_for_ranks": sorted(extra.get("rng", {})),
        "lr_scheduler": _jsonable(extra.get("lr_scheduler")),
        "restore": "torch.load('extra_state_merged.pt', weights_only=False) is trusted output of ckpt-bridge; "
                   "rng[rank] holds python/numpy/torch (and cuda) states",
        "source": source,
    }
    (tmp / "trainer_state.json").write_text(json.dumps(trainer, indent=2) + "\n")
    return ["extra_state_merged.pt", "lr_scheduler_state.json", "trainer_state.json"]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() <= 64 else f"<tensor {tuple(obj.shape)} {obj.dtype}>"
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)
