"""Path -> reader, with the evidence (the files that decided it)."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointFormatError
from .automodel import AutomodelReader, find_automodel_dir
from .base import Reader
from .dcp import DCPReader, is_dcp_dir
from .hf import HFReader, SafetensorsFileReader, is_hf_dir
from .megatron import MegatronReader, find_layout as find_megatron_layout
from .torch_file import TorchFileReader
from .titan_engine import TitanEngineReader, find_engine_step, unsaved_step_hint
from .torch_checkpointing import TorchCheckpointingReader, is_torch_checkpointing_dir
from .verl_fsdp import VerlFSDPReader, find_actor_dir


def detect_format(path: str | Path) -> str:
    """Name of the format at ``path``; raises :class:`CheckpointFormatError` if none fits."""
    path = Path(path)
    if not path.exists() and find_engine_step(path) is None:  # verl's TorchTitan engine never creates actor/
        raise CheckpointFormatError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
            return "torch-file"
        if path.suffix == ".safetensors":
            return "safetensors-file"
        raise CheckpointFormatError(f"{path}: a file, but neither torch-save (.pt/.pth/.bin/.ckpt) nor .safetensors")
    if find_actor_dir(path) is not None:
        return "verl-fsdp"
    if find_automodel_dir(path) is not None:  # verl's Automodel engine: model/shard-*.safetensors, optim/
        return "verl-automodel"
    if find_megatron_layout(path) is not None:  # before DCP: a bare megatron dist_ckpt is a DCP folder too
        return "verl-megatron"
    if find_engine_step(path) is not None:  # verl's TorchTitan engine: torchtitan's step-N beside/inside
        return "verl-torchtitan"
    if is_torch_checkpointing_dir(path):  # TorchTitan's TorchCheckpointingManager: metadata.pkl + item_R.pt
        return "torch-checkpointing"
    if is_hf_dir(path):
        return "hf"
    if is_dcp_dir(path):
        return "dcp"
    seen = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
    raise CheckpointFormatError(
        f"{path}: not a recognised checkpoint (saw {seen}); expected a verl global_step_N[/actor], "
        f"a Hugging Face model dir, a DCP step folder or a torch-save file{unsaved_step_hint(path) or ''}"
    )


def open_reader(path: str | Path, *, trust_pickle: bool = False, allow_missing_rng: bool = False) -> Reader:
    """The reader of the checkpoint at ``path``; ``allow_missing_rng`` goes to the DCP reader (see there)."""
    fmt = detect_format(path)
    path = Path(path)
    if fmt == "verl-fsdp":
        return VerlFSDPReader(path, trust_pickle=trust_pickle)
    if fmt == "verl-automodel":
        return AutomodelReader(path, trust_pickle=trust_pickle)
    if fmt == "verl-megatron":
        return MegatronReader(path, trust_pickle=trust_pickle)
    if fmt == "hf":
        return HFReader(path, trust_pickle=trust_pickle)
    if fmt == "verl-torchtitan":
        return TitanEngineReader(path, trust_pickle=trust_pickle, allow_missing_rng=allow_missing_rng)
    if fmt == "torch-checkpointing":
        return TorchCheckpointingReader(path, trust_pickle=trust_pickle)
    if fmt == "dcp":
        return DCPReader(path, trust_pickle=trust_pickle, allow_missing_rng=allow_missing_rng)
    if fmt == "safetensors-file":
        return SafetensorsFileReader(path)
    return TorchFileReader(path, trust_pickle=trust_pickle)
