"""``torch.distributed.checkpoint`` folders (TorchTitan / flame ``step-N``).

Keys are the flattened state-dict paths DCP stored.  ``planner_data`` in the
``.metadata`` file keeps the original nesting of each key, which is how we tell
a nested ``{"model": {...}}`` checkpoint (torchtitan before 2025-06 / flame's
older pins) from a flat one (torchtitan >= 0.1.0 model-only, >= 0.2.0 full)
without guessing from names.  Tensors are read one at a time through DCP's own
reader, so no more than the requested tensor is in memory.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointFormatError
from .base import Reader, TensorInfo

TRAINING_SECTIONS = ("optimizer", "lr_scheduler", "dataloader", "train_state")


def is_dcp_dir(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / ".metadata").is_file() or any(path.glob("*.distcp")))


class DCPReader(Reader):
    format = "dcp"

    def __init__(self, path: Path):
        super().__init__(path)
        self.evidence.files = sorted(p.name for p in self.path.iterdir() if p.suffix == ".distcp" or p.name == ".metadata")[:6]
        self._problems: list[str] = []
        self.metadata = None
        meta = self.path / ".metadata"
        if not meta.is_file():
            n = len(list(self.path.glob("*.distcp")))
            self._problems.append(
                f"{self.path}: has {n} .distcp file(s) but no .metadata: the save did not finish "
                f"(DCP writes .metadata last); use an earlier step"
            )
            return
        from torch.distributed.checkpoint import FileSystemReader

        try:
            self.metadata = FileSystemReader(str(self.path)).read_metadata()
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
            self._problems.append(f"{meta}: cannot be read ({type(e).__name__}: {e}); the save is corrupt")
            return
        needed = {getattr(info, "relative_path", None) for info in (self.metadata.storage_data or {}).values()}
        for rel in sorted(n for n in needed if n):
            if not (self.path / rel).is_file():
                self._problems.append(f"{self.path / rel}: referenced by .metadata but missing; copy every .distcp file")

    def problems(self) -> list[str]:
        return list(self._problems)

    def _check(self) -> None:
        if self._problems:
            raise CheckpointFormatError(self._problems[0])

    def tensors(self) -> dict[str, TensorInfo]:
        self._check()
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        out = {}
        for k, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                out[k] = TensorInfo(k, tuple(md.size), md.properties.dtype)
        return out

    def nesting(self) -> dict[str, tuple[str, ...]]:
        """Original state-dict path of every key (from planner_data)."""
        pd = self.metadata.planner_data if self.metadata is not None else None
        return {k: tuple(v) for k, v in (pd or {}).items()}

    def layout(self) -> str:
        """"nested" if model tensors sit under a top-level "model" dict, "flat" if at the top, else "unknown"."""
        nest = self.nesting()
        tops = {path[0] for k, path in nest.items() if k in self.tensors() and path}
        model_tops = tops - set(TRAINING_SECTIONS)
        if not nest or not model_tops:
            return "unknown"
        if model_tops == {"model"} and any(len(p) > 1 and p[0] == "model" for p in nest.values()):
            return "nested"
        return "flat"

    def sections(self) -> list[str]:
        """Which training-state sections are present besides the model."""
        nest = self.nesting()
        present = {p[0] for p in nest.values() if p} | {k.split(".", 1)[0] for k in self.metadata.state_dict_metadata}
        return [s for s in TRAINING_SECTIONS if s in present]

    def model_keys(self) -> list[str]:
        return [k for k in self.tensors() if k.split(".", 1)[0] not in TRAINING_SECTIONS]

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        info = self.tensors()[key]
        out = torch.empty(info.shape, dtype=info.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load({key: out}, checkpoint_id=str(self.path), no_dist=True)
        return out if dtype is None or dtype == out.dtype else out.to(dtype)

    def describe(self) -> dict[str, Any]:
        if self.metadata is None:
            return {"metadata": False}
        tensors = self.tensors()
        model = self.model_keys()
        return {
            "layout": self.layout(),
            "model_only": not self.sections(),
            "sections": self.sections(),
            "model_tensors": len(model),
            "distcp_files": len(list(self.path.glob("*.distcp"))),
            "non_tensor_entries": len(self.metadata.state_dict_metadata) - len(tensors),
        }
