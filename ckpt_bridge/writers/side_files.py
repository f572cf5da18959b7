"""The files an HF export carries besides the weights, and where they come from: the config dir, config.json
and generation_config.json as written, the tokenizer / processor side files (ONE rule,
:func:`ckpt_bridge.formats.config_files.is_side_file`, for what is copied into an export, kept in a to-dcp
folder and hashed in its manifest), the components of a ``--base`` model, and the trainer's extra state.

Used by ``to_hf`` (:mod:`ckpt_bridge.commands.to_hf`), LoRA exports (:mod:`ckpt_bridge.commands.to_hf_lora`), ``to_dcp``
(:mod:`ckpt_bridge.commands.to_dcp`) and ``verify-dcp``; it imports none of them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..dtypes import dtype_name
from ..errors import BridgeError
from ..formats.base import Reader
from ..models.hf import with_legacy_fields
from ..jsonfiles import check_config, read_json
from ..formats.config_files import side_files
from ..safeload import plain_data
from .marker import write_marker



_WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def copy_base(tmp: Path, base: Path) -> list[str]:
    """Every component of ``base`` the export does not write itself (VAE files, processor configs, ...)."""
    return copy_new([p for p in sorted(base.iterdir())
                     if p.name not in _WEIGHT_NAMES and not p.name.startswith(("model-0", "pytorch_model-0", "."))],
                    tmp)


def copy_new(paths: list[Path], dst: Path) -> list[str]:
    """Copy each file or folder of ``paths`` into ``dst`` unless ``dst`` has one of that name; the names copied."""
    copied = []
    for p in paths:
        if (dst / p.name).exists() or not (p.is_dir() or p.is_file()):
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)
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
    return check_config(read_json(cfg_dir / "config.json"), cfg_dir / "config.json")


def write_configs(tmp: Path, cfg_dir: Path, plan: Any, written: torch.dtype) -> list[str]:
    cfg = read_config(cfg_dir)
    if not cfg.get("architectures") and plan.model_class:
        cfg["architectures"] = [plan.model_class]
    cfg.update(plan.config_updates)  # e.g. a critic's value head: XForTokenClassification, num_labels
    # The config must describe the tensors actually written (verl's own hf_model
    # save writes fp32 tensors under a config that says bf16).  transformers 5
    # reads "dtype", 4.x reads "torch_dtype": keep both in step.
    name = dtype_name(written)
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


def copy_side_files(tmp: Path, cfg_dir: Path, warnings: list[str]) -> list[str]:
    """Copy every tokenizer / processor file and folder beside the config (see
    :func:`~ckpt_bridge.formats.config_files.is_side_file`)."""
    copied = copy_new(side_files(cfg_dir), tmp)
    if not any(n.startswith("tokenizer") for n in copied):
        warnings.append(
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
    # plain data only (safeload.plain_data): the file loads with weights_only=True (numpy's rng classes allowed)
    notes: list[str] = []
    torch.save(plain_data(payload, where=f"{source}: extra state", notes=notes), tmp / "extra_state_merged.pt")
    extra["warnings"] = [*extra.get("warnings", []), *notes]
    readable = {
        "global_step": extra.get("global_step"),
        "world_size": extra.get("world_size"),
        "ranks_with_rng": sorted(extra.get("rng", {})),
        "lr_scheduler": jsonable(extra.get("lr_scheduler")),
        "source": source,
    }
    (tmp / "lr_scheduler_state.json").write_text(json.dumps(readable, indent=2) + "\n")
    trainer = {
        "global_step": extra.get("global_step"),
        "world_size": extra.get("world_size"),
        "train_state": jsonable(extra.get("train_state")),
        "dataloader_state_saved": extra.get("dataloader") is not None,
        "rng_saved_for_ranks": sorted(extra.get("rng", {})),
        "lr_scheduler": jsonable(extra.get("lr_scheduler")),
        "restore": "plain data: torch.load('extra_state_merged.pt', weights_only=True) inside "
                   "torch.serialization.safe_globals(ckpt_bridge.safeload.numpy_rng_globals()) (numpy's rng "
                   "state), i.e. ckpt_bridge.safeload.load_plain(path); rng[rank] holds python/numpy/torch (and "
                   "cuda) states",
        "source": source,
        "warnings": extra.get("warnings", []),
    }
    (tmp / "trainer_state.json").write_text(json.dumps(trainer, indent=2) + "\n")
    return ["extra_state_merged.pt", "lr_scheduler_state.json", "trainer_state.json"]


def jsonable(obj: Any) -> Any:
    """``obj`` as JSON can hold it: small tensors as lists, big ones and other objects by description."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() <= 64 else f"<tensor {tuple(obj.shape)} {obj.dtype}>"
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def write_hf_side_files(tmp: Path, *, reader: Reader, summary: Any, cfg_dir: Path, key_plan: Any | None,
                        written: torch.dtype | None, tokenizer: Path | None, base: Path | None,
                        write: Any = None) -> list[str]:
    """Everything an HF export carries besides the weights, for every kind of export (a model, a LoRA merge, an
    adapter alone: ``key_plan`` None): the configs saying ``written`` (and the plan's config updates), the
    tokenizer / processor files, ``--base`` components, the training extra state, and last the marker that says
    ckpt-bridge wrote it.  ``summary`` (an ExportSummary) records the dtype, step and warnings.  ``write``: the
    config writer (default :func:`write_configs`; to_hf passes its own name for it, where tests hold an export)."""
    files: list[str] = []
    if key_plan is not None:
        summary.dtype = dtype_name(written)
        files += (write or write_configs)(tmp, cfg_dir, key_plan, written)
        files += copy_side_files(tmp, tokenizer or cfg_dir, summary.warnings)
        if base is not None:
            files += copy_base(tmp, base)
    extra = reader.extra_state()
    if extra:
        files += write_extra_state(tmp, extra, source=str(reader.path))
        summary.extra_state = True
        summary.global_step = extra.get("global_step")
        summary.warnings += extra.get("warnings", [])
    files.append(write_marker(
        tmp, source=reader.path, source_format=reader.format, parts=["model"] + (["extra_state"] if extra else []),
        rng_ranks=sorted(extra.get("rng", {})) if extra else [], warnings=summary.warnings))
    return files
