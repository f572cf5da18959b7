"""TorchTitan / flame entry points for training scripts.

    from ckpt_bridge.integrations.torchtitan import set_initial_load, after_load

    set_initial_load(config, "/models/OLMo-2-1B", aux=["future_predictor", "action_layer:linear:16"])
    ...build model (meta) -> parallelize -> to_empty -> CheckpointManager(config.checkpoint, ...).load()
    after_load(model_parts, "/models/OLMo-2-1B")

``set_initial_load`` converts the Hugging Face model once (cached by the
content of its files plus every option that changes the output) and points
the trainer's checkpoint config at the result; ``after_load`` recomputes the
non-persistent buffers no checkpoint holds (rotary ``inv_freq``) and refuses
a model whose config differs from the HF one.  The conversion itself is
:func:`ckpt_bridge.dcp_export.to_dcp`; nothing format-specific lives here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from ckpt_bridge.auxiliary import as_specs
from ckpt_bridge.dcp_export import MANIFEST, to_dcp
from ckpt_bridge.errors import BridgeError
from ckpt_bridge.formats.hf import weight_files
from ckpt_bridge.model_fixups import AfterLoadReport, ConfigMismatchError, after_load  # noqa: F401 - re-exported
from ckpt_bridge.trainer_keys import torchtitan_version

log = logging.getLogger("ckpt_bridge")

__all__ = ["set_initial_load", "after_load", "AfterLoadReport", "ConfigMismatchError", "cache_root"]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("CKPT_BRIDGE_CACHE") or Path.home() / ".cache" / "ckpt-bridge") / "dcp"


def _file_digest(path: Path, memo: dict[str, str]) -> str:
    """sha256 of a file, memoised by (path, size, mtime) so a restart does not re-read gigabytes."""
    st = path.stat()
    tag = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if tag not in memo:
        with open(path, "rb") as f:
            memo[tag] = hashlib.file_digest(f, "sha256").hexdigest()
    return memo[tag]


def source_digest(hf_dir: str | Path, memo_file: Path | None = None) -> str:
    """One digest of the weights and config of a Hugging Face model dir (content, not paths)."""
    hf = Path(hf_dir)
    kind, files = weight_files(hf)
    if not kind or not (hf / "config.json").is_file():
        raise BridgeError(f"{hf}: not a Hugging Face model dir (needs config.json and model weights)")
    memo: dict[str, str] = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except ValueError:
            memo = {}
    h = hashlib.sha256()
    for f in sorted(set(files) | {hf / "config.json"}):
        h.update(f.name.encode() + b"\0" + _file_digest(f, memo).encode() + b"\0")
    if memo_file is not None:
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(memo))
            tmp.replace(memo_file)
        except OSError:
            pass  # no memo on a read-only cache: we just hash again next time
    return h.hexdigest()


def _checkpoint_section(config: Any) -> Any:
    """The checkpoint config: ``config.checkpoint`` of a job/trainer config, or the section itself."""
    section = getattr(config, "checkpoint", config)
    if not hasattr(section, "initial_load_path"):
        raise BridgeError(f"set_initial_load: {type(config).__name__} has no checkpoint.initial_load_path; pass the "
                          f"trainer config (or its checkpoint section)")
    return section


def _dist_rank() -> tuple[bool, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank()
    return False, 0


def set_initial_load(config: Any, hf_dir: str | Path, *, aux: Any = None, seed: int = 0, dtype: str = "fp32",
                     layout: str = "auto", aux_from: str | Path | None = None,
                     model: nn.Module | list[nn.Module] | None = None,
                     cache_dir: str | Path | None = None) -> Path:
    """Convert ``hf_dir`` once and make the trainer's first load read it (model only).

    Sets ``checkpoint.initial_load_path`` (absolute, as torchtitan 0.3.0
    requires) and ``initial_load_model_only=True`` (and ``initial_load_in_hf``
    off) on ``config``; returns the DCP folder.  Under ``torch.distributed``,
    rank 0 converts while the others wait at a barrier (the cache must be on a
    filesystem every rank sees).  The cache key is the content of the weight
    files and config, the aux specs, seed, dtype, layout and the trainer
    version; a finished conversion is reused, an interrupted one is redone.
    """
    section = _checkpoint_section(config)
    root = cache_root(cache_dir)
    specs = as_specs(aux)
    if any(s.factory is not None for s in specs) and model is None:
        log.info("aux factories are cached by their qualified names; change the name when the module changes")
    key_parts = {
        "source": source_digest(hf_dir, root / "file-hashes.json"),
        "aux": [s.describe() for s in specs],
        "aux_from": str(Path(aux_from).absolute()) if aux_from else None,
        "seed": seed, "dtype": dtype, "layout": layout, "torchtitan": torchtitan_version(),
        "model_keys": sorted(k for p in ([model] if isinstance(model, nn.Module) else model or [])
                             for k in p.state_dict()),
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    out = (root / digest).absolute()
    distributed, rank = _dist_rank()
    failure = ""
    if rank == 0 and not ((out / ".metadata").is_file() and (out / MANIFEST).is_file()):
        log.info("ckpt-bridge: converting %s -> %s", hf_dir, out)
        try:
            to_dcp(hf_dir, out, layout=layout, dtype=dtype, aux=specs, seed=seed, aux_from=aux_from, model=model,
                   overwrite=out.exists(), progress=False)
        except BridgeError as e:
            if not distributed:
                raise
            failure = str(e)
    if distributed:
        # Rank 0's outcome goes to every rank, so a failed conversion stops all of them (no hang at a barrier).
        import torch.distributed as dist

        box = [failure]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            raise BridgeError(f"set_initial_load (rank 0): {box[0]}")
    if not (out / ".metadata").is_file():
        raise BridgeError(f"set_initial_load: {out} is not visible on rank {rank}; put cache_dir on storage every "
                          f"rank shares")
    section.initial_load_path = str(out)
    section.initial_load_model_only = True
    if hasattr(section, "initial_load_in_hf"):
        section.initial_load_in_hf = False
    return out
