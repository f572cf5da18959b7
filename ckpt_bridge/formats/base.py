"""The one small interface every on-disk format implements.

A reader lists tensors (key, global shape, dtype) without reading tensor data,
reads one tensor at a time on request, and exposes the training extra state
(lr_scheduler, rng, step) when the format has any.  It never holds more than
the tensor it was asked for.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..dtypes import nbytes


_VERL_STEP_DIR = re.compile(r"^global_step_(\d+)$")


def verl_global_step(path: Path) -> int | None:
    """N of verl's ``global_step_N`` folder: ``path`` itself or its parent (the role dir, ``actor``)."""
    for p in (path, path.parent):
        m = _VERL_STEP_DIR.match(p.name)
        if m:
            return int(m.group(1))
    return None


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


@dataclass
class Evidence:
    """Why a path was recognised as a format: the files that decided it."""

    format: str
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Reader(ABC):
    """Base class of all readers.  Subclasses set ``format`` and fill ``evidence``."""

    format: str = "?"
    # What a reader can do beyond tensors()/read(), declared by the class instead of probed by the pipeline:
    reads_rows: bool = False  # read_rows() can copy a row range of a tensor (large renames stream in pieces)
    has_sections: bool = False  # other models saved next to the main one (to-hf --models; DCP)
    # The config / tokenizer files of hf_config_dir() must resolve inside the checkpoint folder (False for an HF
    # model dir: the user's own choice, and a hub cache snapshot is all links into ../../blobs).
    confines_config: bool = True
    # The names its keys follow: "hf" (transformers' names, on disk or in memory, maybe under trainer wrappers)
    # or "megatron" (megatron-core's GPTModel names): which planner turns them into an HF export
    # (plan.export_plan.plan_export); "titan": a TorchTitan model's own names, which its family's
    # StateDictAdapter maps to HF names first (models.titan.hf_names).
    key_names: str = "hf"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.evidence = Evidence(self.format)

    @abstractmethod
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor key in file order, with its global shape and dtype (no data read)."""

    @abstractmethod
    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full tensor for ``key`` (cast to ``dtype`` when given), read on demand."""

    def extra_state(self) -> dict[str, Any]:
        """lr_scheduler / rng / step state, if the format stores any."""
        return {}

    def held_state(self) -> list[str]:
        """What the checkpoint holds beyond the model weights (``optimizer``, ``lr_scheduler``, ``rng``, ...),
        from its file listing or metadata alone: a model-only export names what it leaves behind."""
        return []

    def problems(self) -> list[str]:
        """Everything wrong that can be seen without reading tensor data."""
        return []

    def describe(self) -> dict[str, Any]:
        """Format-specific facts for ``inspect`` (world size, layout, ...)."""
        return {}

    def hf_config_dir(self) -> Path | None:
        """A directory with the Hugging Face config.json (and tokenizer), if the checkpoint has one."""
        return None

    def check(self) -> None:
        """Raise (one line) on a structural problem that makes the checkpoint unconvertible; default: none."""

    def model_tensors(self, exclude_sections: tuple[str, ...] = ()) -> dict[str, TensorInfo]:
        """The main model's tensors (without training state or other sections); default: :meth:`tensors`."""
        return self.tensors()

    def check_keys(self, keys) -> None:
        """Raise (one line) if the stored layout of one of ``keys`` cannot be read (metadata only): called on
        every key of an export before its output exists; default: nothing beyond :meth:`check`."""

    def aux_file(self) -> Path | None:
        """A file of auxiliary modules kept beside the model (an HF export's ``aux_modules.safetensors``)."""
        return None

    def read_rows(self, key: str, out: torch.Tensor, start: int, stop: int) -> bool:
        """Rows [start, stop) of ``key`` into ``out``; False: read the whole tensor instead (see ``reads_rows``)."""
        return False

    def manifest(self) -> dict[str, Any] | None:
        """The ckpt-bridge manifest the checkpoint carries (a to-dcp output), if any."""
        return None

    def recorded_config_dir(self) -> str | None:
        """An HF config dir the checkpoint records but that is not followed (outside it), for error hints."""
        return None

    def source_files(self) -> list[Path]:
        """The weight files the tensors come from (hashed in a to-dcp manifest); default: the path if a file."""
        return [self.path] if self.path.is_file() else []

    def close(self) -> None:
        pass

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

