"""``to_hf``: any readable checkpoint -> a Hugging Face model directory.

reader -> plan of transforms (:mod:`ckpt_bridge.plan`, planned by
:func:`ckpt_bridge.keys.plan_hf_export`: renames, and transformers' own
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
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config_fit import read_fitting_config
from .confine import is_inside
from .detect import open_reader
from .errors import BridgeError, CheckpointFormatError, KeyPlanError
from .export_marker import write_marker
from .formats.base import Reader
from .hf_models import with_legacy_fields
from .keys import canonicalize, expected_model, plan_hf_export, value_head
from .plan import Plan, Transform, execute, rename
from .lora import is_lora
from .lora_export import export_lora
from .pieces import stream_pieces
from .progress import Progress
from .team import Team, split, team_output
from .writers.atomic import check_target
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
    config: str = ""
    plan_lines: list[str] = field(default_factory=list)  # --dry-run: the checked key plan
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
    """(directory holding config.json, explicit config.json file or None).

    Without ``config`` the checkpoint's own config dir is used, and every file
    we would read or copy from it (config, generation config, tokenizer) must
    resolve inside the checkpoint folder (see :mod:`ckpt_bridge.confine`).
    """
    if config is None:
        d = reader.hf_config_dir()
        # An HF model dir is the user's own choice (and a hub cache snapshot is all links into ../../blobs);
        # a config dir a trainer checkpoint carries must not pull files from elsewhere into the export.
        if d is not None and reader.format != "hf":
            root = reader.path if reader.path.is_dir() else reader.path.parent
            for f in [d / "config.json", d / "generation_config.json", *_tokenizer_files(d)]:
                if f.exists() and not is_inside(root, f):
                    raise CheckpointFormatError(
                        f"{f}: resolves outside the checkpoint folder {root} (a symlink?); refused; pass "
                        f"--config/--tokenizer explicitly to use files from elsewhere")
        return d, None
    p = Path(config)
    if p.is_dir() and (p / "config.json").is_file():
        return p, None
    if p.is_file():
        return p.parent, p
    raise BridgeError(f"--config {p}: neither a config.json file nor a directory containing one")


def _with_titan_hint(e: KeyPlanError, reader: Reader, cfg_dir: Path, titan_model: str | None) -> KeyPlanError:
    """``e``, plus the ``--titan-model`` that maps these keys when the checkpoint holds a TorchTitan model's own
    names (torchtitan's native saves name no model; that family's adapter is tried on the keys)."""
    from .formats.adapted import AdaptedReader
    from .titan_models import working_titan_model

    if titan_model is not None or isinstance(reader, AdaptedReader):
        return e
    name = working_titan_model(reader, cfg_dir)
    if name is None:
        return e
    return KeyPlanError(f"{e}; these are TorchTitan {name} names: pass --titan-model {name}")


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
        recorded = reader.recorded_config_dir() if hasattr(reader, "recorded_config_dir") else None
        hint = (f"its manifest records the source {recorded}, which is outside the checkpoint and not followed: "
                f"pass --config {recorded} to use it" if recorded
                else "pass --config PATH (a config.json or a model dir)")
        raise KeyPlanError(f"{reader.path}: no config.json found; {hint}")
    read_fitting_config(cfg_dir, infos)  # structure, model_type, sizes against the tensors: before any build
    return infos, cfg_dir


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
        exp = expected_model(cfg_dir, value_head(canonicalize(infos, where), cfg_dir))
        known = {k.split(".", 1)[0] for k in [*exp.shapes, *exp.disk_shapes]}  # in-memory and on-disk names
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
    titan_model: str | None = None,
    lora: str = "both",
    lora_config: str | Path | None = None,
    overwrite: bool = False,
    trust_pickle: bool = False,
    progress: bool | None = None,
    allow_missing_rng: bool = False,
    dry_run: bool = False,
    team: Team | None = None,
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
    weights).  ``titan_model``: the checkpoint holds a TorchTitan model's
    own names (``llama3``, ``qwen3``; default: what the to-dcp manifest
    recorded); its adapter's ``to_hf`` maps them back.  ``lora``: for a LoRA
    checkpoint, ``merge`` / ``adapter`` / ``both`` (see
    :mod:`ckpt_bridge.lora_export`); ``lora_config``: the run's
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
    (:mod:`ckpt_bridge.team`; default: alone).
    """
    t0 = time.perf_counter()
    team = team or Team()
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
    with open_reader(src, trust_pickle=trust_pickle) as reader:
        reader.allow_missing_rng = allow_missing_rng  # DCP: a rank without rng is a warning, not an error
        if config is None and base_dir is not None and reader.hf_config_dir() is None:
            config = base_dir  # the checkpoint has no config of its own: the base's describes it
        from .titan_models import hf_view

        reader = hf_view(reader, config, titan_model)  # a TorchTitan-native DCP through its adapter's to_hf
        all_infos, cfg_dir = _checked_source(reader, config, others)
        if base_dir is not None and cfg_dir != base_dir:
            same_model(cfg_dir, base_dir)
        if team.size > 1 and (dry_run or is_lora(all_infos)):
            raise BridgeError("--workers/--distributed: a LoRA export and --dry-run run in one process; "
                              "drop the option")
        if is_lora(all_infos):  # LoRA (issue 11): its own plan of folds + renames and a PEFT adapter
            return export_lora(reader, all_infos, cfg_dir, src, out, mode=lora, lora_config=lora_config, cast=cast,
                               shard_bytes=shard_bytes, tokenizer=tok_dir, base=base_dir, overwrite=overwrite,
                               progress=progress, t0=t0, dry_run=dry_run)
        where = str(reader.path)
        if reader.format == "verl-megatron":  # its own name rules first, then transformers' save rules
            from .megatron_plan import plan_megatron_export

            aux_keys, plan = {}, plan_megatron_export(reader, cfg_dir, where=where)
        else:
            infos, aux_keys = split_aux(all_infos, reader, cfg_dir, aux_prefixes, where)
            try:
                plan = plan_hf_export(infos, cfg_dir, where=where)
            except KeyPlanError as e:
                raise _with_titan_hint(e, reader, cfg_dir, titan_model) from None
        other_plans = []
        for name in others:  # planned and checked in full before any output exists
            sec = reader.section_tensors(name)
            if not sec:
                raise KeyPlanError(f"{where}: --models {name}: no section {name!r} in this checkpoint "
                                   f"(model sections: {', '.join(reader.model_sections()) or 'none'})")
            other_plans.append((name, plan_hf_export(sec, cfg_dir, where=f"{where} [{name}]")))
        summary = ExportSummary(str(src), reader.format, str(out), aux=aux_keys, aux_mode=aux)
        aux_tf = [rename(k, k, all_infos[k], f"aux module {name}") for name, keys in aux_keys.items() for k in keys]
        if aux == "drop":
            summary.dropped += [(t.inputs[0], f"aux module {t.inputs[0].split('.', 1)[0]} (--aux drop)")
                                for t in aux_tf]
        main_tf = list(plan.transforms) + (aux_tf if aux == "inline" else [])
        sep_tf = aux_tf if aux == "separate" else []
        out_dt = _out_dtype(cast)
        protect = tuple(p for p in (Path(src), reader.path, cfg_dir, tok_dir, base_dir) if p is not None)
        if dry_run:  # everything the real run reads before writing, minus tensor data
            check_target(out, overwrite=overwrite, protect=protect)
            extra = reader.extra_state()
            summary.model_class, summary.extra_state = plan.model_class, bool(extra)
            summary.warnings += (extra or {}).get("warnings", [])
            aux_lines = [] if aux == "drop" else [f"{t.inputs[0]}  [{t.rule}, --aux {aux}]" for t in aux_tf]
            summary.plan_lines = (plan.lines() + aux_lines + [f"{k} -> (dropped: {why})" for k, why in summary.dropped]
                                  + [f"# {n}" for n in plan.notes])
            summary.config = str(cfg_dir / "config.json")
            return summary
        writer = ShardedSafetensorsWriter(Path(), _planned(main_tf, out_dt), shard_bytes, create=False)
        team.fit(len(main_tf))  # no more processes than transforms
        mine = my_share(main_tf, writer, out_dt, team)  # all of it, unless several processes split the work
        writer.only({o.key for t in mine for o in t.outputs})
        aux_writer = ShardedSafetensorsWriter(Path(), _planned(sep_tf, out_dt), shard_bytes, prefix=AUX_FILE,
                                              create=False) if sep_tf and team.leader else None
        with team_output(out, team, overwrite=overwrite, protect=protect,
                         create=[w for w in (writer, aux_writer) if w is not None]) as tmp:
            error = None
            try:
                _stream(reader, mine + (sep_tf if team.leader else []), writer, aux_writer, out_dt, summary,
                        progress)
                if not team.leader:  # its own files flushed: rank 0 may be on another node
                    writer.close(index=False, sync=True)
            except BaseException as e:  # noqa: BLE001 - every process learns whether all the others succeeded
                error = e
            team.finish(error)
            if not team.leader:  # the coordinator writes the index, configs and the rest
                summary.seconds = time.perf_counter() - t0
                return summary
            if team.size > 1:  # count every process's share, not only ours
                done = [o for t in main_tf + sep_tf for o in t.outputs]
                summary.tensors, summary.parameters = len(done), sum(o.numel for o in done)
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
            for name, p_other in other_plans:
                summary.files += _write_section(reader, name, p_other, tmp, out_dt, shard_bytes)
            written = _dominant_float_dtype(plan, out_dt)
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
                summary.warnings += extra.get("warnings", [])
            summary.files.append(write_marker(
                tmp, source=reader.path, source_format=reader.format,
                parts=["model"] + (["extra_state"] if extra else []),
                rng_ranks=sorted(extra.get("rng", {})) if extra else [], warnings=summary.warnings))
    summary.seconds = time.perf_counter() - t0
    return summary


def _stream(reader: Reader, transforms: list[Transform], writer: ShardedSafetensorsWriter,
            aux_writer: ShardedSafetensorsWriter | None, out_dt, summary: ExportSummary, progress: bool | None) -> None:
    """Run ``transforms`` and write their outputs (aux modules kept apart go to ``aux_writer``)."""
    aux_keys = set(aux_writer.weight_map) if aux_writer is not None else set()
    total = sum(o.nbytes if out_dt(o) == o.dtype else o.numel * out_dt(o).itemsize
                for t in transforms for o in t.outputs)
    bar = Progress(total, "to-hf", enabled=progress)
    sizes = {o.key: (o.numel, o.numel * out_dt(o).itemsize) for t in transforms for o in t.outputs}
    try:
        for p in stream_pieces(transforms, reader, out_dt):  # in planned order: the writer checks it
            (aux_writer if p.key in aux_keys else writer).write_at(p.key, p.tensor, p.offset)
            nbytes = p.tensor.numel() * p.tensor.element_size()
            if p.offset + nbytes == sizes[p.key][1]:  # the tensor's last piece
                summary.tensors += 1
                summary.parameters += sizes[p.key][0]
            bar.update(nbytes, p.key)
            del p
    finally:
        bar.close()


def my_share(transforms: list[Transform], writer: ShardedSafetensorsWriter, out_dt, team: Team) -> list[Transform]:
    """The transforms this process runs: a contiguous run balanced by output bytes (see :func:`team.split`)."""
    if team.size == 1:
        return list(transforms)
    sizes = [sum(o.numel * out_dt(o).itemsize for o in t.outputs) for t in transforms]
    files = [writer.file_of(t.outputs[0].key) if t.outputs else 0 for t in transforms]
    return [transforms[i] for i in split(sizes, files, team.size)[team.rank]]


def _out_dtype(cast: torch.dtype | None):
    """The dtype a target is written in: ``cast`` for floating tensors, else as produced."""
    return lambda info: cast if cast is not None and info.dtype.is_floating_point else info.dtype


def _planned(transforms: list[Transform], out_dt) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(o.key, o.shape, out_dt(o)) for t in transforms for o in t.outputs]


def _write_section(reader: Reader, name: str, plan: Plan, tmp: Path, out_dt, shard_bytes: int) -> list[str]:
    """Another model of the checkpoint (e.g. the EMA) as ``NAME.safetensors`` (sharded like the main weights)."""
    fqn_to_key = reader.section_fqns(name)
    writer = ShardedSafetensorsWriter(tmp, _planned(plan.transforms, out_dt), shard_bytes, prefix=name)
    for t, outs in execute(plan, lambda k, dt: reader.read(fqn_to_key[k], dt), out_dt):
        for o in t.outputs:
            writer.write(o.key, outs.pop(o.key))
        del outs
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


# config.json fields that make two models different architectures (compared when both configs have them)
_MODEL_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "num_local_experts",
                 "num_experts", "moe_intermediate_size")


def same_model(cfg_dir: Path, base_dir: Path) -> None:
    """``--base`` must be the model the checkpoint's own config describes: a base of another architecture or
    size would silently lend its config, tokenizer and (for a LoRA-only save) weights to the export."""
    ours, theirs = read_config(cfg_dir), read_config(base_dir)
    for f in ("architectures",) + _MODEL_FIELDS:
        a, b = ours.get(f), theirs.get(f)
        if f == "architectures":
            a, b = (a or [None])[0], (b or [None])[0]
            if a is None or b is None or a.endswith("ForCausalLM") != b.endswith("ForCausalLM"):
                continue  # a verl critic keeps its causal-LM architectures; a head class is not a mismatch
        if a is not None and b is not None and a != b:
            raise BridgeError(f"--base {base_dir}: its config.json has {f} {b!r} but the checkpoint's "
                              f"{cfg_dir / 'config.json'} has {a!r}: not the model this checkpoint was trained "
                              f"from; pass the base model the run started from")


def read_config(cfg_dir: Path) -> dict[str, Any]:
    """config.json, checked (UTF-8, an object, field types, a model_type transformers has built in)."""
    from .jsonfiles import check_config, read_json

    return check_config(read_json(cfg_dir / "config.json"), cfg_dir / "config.json")


def _dominant_float_dtype(plan: Plan, out_dt) -> torch.dtype:
    by_bytes: dict[torch.dtype, int] = {}
    for info in plan.targets().values():
        d = out_dt(info)
        if d.is_floating_point:
            by_bytes[d] = by_bytes.get(d, 0) + info.numel
    return max(by_bytes, key=by_bytes.__getitem__) if by_bytes else torch.float32


def _write_configs(tmp: Path, cfg_dir: Path, plan: Plan, written: torch.dtype) -> list[str]:
    cfg = read_config(cfg_dir)
    if not cfg.get("architectures") and plan.model_class:
        cfg["architectures"] = [plan.model_class]
    cfg.update(plan.config_updates)  # e.g. a critic's value head: XForTokenClassification, num_labels
    # The config must describe the tensors actually written (verl's own hf_model
    # save writes fp32 tensors under a config that says bf16).  transformers 5
    # reads "dtype", 4.x reads "torch_dtype": keep both in step.
    name = _TORCH_DTYPE_NAMES.get(written, str(written).replace("torch.", ""))
    cfg["dtype"] = name
    cfg["torch_dtype"] = name
    # Read the same by both majors: 5.x writes only rope_parameters, which 4.x ignores (rope_theta 10000),
    # and only the new names of renamed fields (num_local_experts), which 4.x does not know.
    cfg = with_legacy_fields(cfg)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = cfg_dir / "generation_config.json"
    if gen.is_file():
        shutil.copy2(gen, tmp / "generation_config.json")
    else:
        keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
        g = {"_from_model_config": True, **{k: cfg[k] for k in keys if cfg.get(k) is not None}}
        (tmp / "generation_config.json").write_text(json.dumps(g, indent=2) + "\n")
    return ["config.json", "generation_config.json"]


# What is not a processor / tokenizer file: weights and their indexes in any format, trainer state, and
# the files an export writes itself.  Everything else beside the config travels (tokenizer, processor,
# video / image preprocessor, chat templates and additional_chat_templates/, README / LICENSE, ...), so a
# new processor file needs no change here.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".distcp",
                    ".index.json", ".npz", ".pkl")
_WRITTEN_HERE = ("config.json", "generation_config.json", "lr_scheduler_state.json", "trainer_state.json",
                 "ckpt_bridge_manifest.json", f"{AUX_FILE}.json")


def _is_side_file(p: Path) -> bool:
    if p.name.startswith(".") or p.name in _WRITTEN_HERE or p.name.endswith(_WEIGHT_SUFFIXES):
        return False
    if p.is_dir():  # e.g. additional_chat_templates/; a folder holding weights is a checkpoint, not a processor
        return not any(q.is_file() and (q.name.endswith(_WEIGHT_SUFFIXES) or q.name == ".metadata")
                       for q in p.rglob("*"))
    return p.is_file()


def _tokenizer_files(d: Path) -> list[Path]:
    return [p for p in sorted(d.iterdir()) if _is_side_file(p)]


def _copy_tokenizer(tmp: Path, cfg_dir: Path, summary: ExportSummary) -> list[str]:
    """Copy every tokenizer / processor file and folder beside the config (see ``_is_side_file``)."""
    copied = []
    for p in _tokenizer_files(cfg_dir):
        if (tmp / p.name).exists():
            continue
        if p.is_dir():
            shutil.copytree(p, tmp / p.name)
        else:
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
        "warnings": extra.get("warnings", []),
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
