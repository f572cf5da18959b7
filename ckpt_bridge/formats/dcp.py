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

from ..confine import confined, is_inside, names_inside
from ..errors import BridgeError, CheckpointFormatError, one_line, root_cause
from .base import Reader, TensorInfo
from .dcp_files import RNG_DIR, read_manifest, rng_files
from .. import safeload
from .dcp_checks import metadata_problems
from .dcp_direct import DirectChunks

TRAINING_SECTIONS = ("optimizer", "lr_scheduler", "dataloader", "train_state")


def is_dcp_dir(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / ".metadata").is_file() or any(path.glob("*.distcp")))


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeMetadataReader(FileSystemReader):
        """DCP's FileSystemReader with ``.metadata`` read by our restricted unpickler, once.

        torch's own ``read_metadata`` is a plain ``pickle.load`` (code execution from a hostile file) and
        ``dcp.load`` asks for it on every call.  Everything we hand to ``dcp.load`` uses this reader.
        """

        def __init__(self, path: str, metadata):
            super().__init__(path)
            self._md = metadata

        def read_metadata(self, *args: Any, **kwargs: Any):
            if self._md.storage_meta is None:  # what torch's read_metadata fills in
                self._md.storage_meta = StorageMeta()
            return self._md

    return SafeMetadataReader


def safe_storage_reader(path: str | Path, *, trust_pickle: bool = False, metadata=None):
    """A DCP ``StorageReader`` for ``path`` whose metadata went through :func:`safeload.load_dcp_metadata`;
    pass it as ``dcp.load(..., storage_reader=...)`` instead of ``checkpoint_id=path``."""
    if metadata is None:
        metadata = safeload.load_dcp_metadata(Path(path) / ".metadata", trust_pickle=trust_pickle)
    return _safe_reader_class()(str(path), metadata)


class DCPReader(Reader):
    format = "dcp"
    reads_rows = True
    has_sections = True

    def __init__(self, path: Path, *, trust_pickle: bool = False, allow_missing_rng: bool = False):
        super().__init__(path)
        self.trust_pickle = trust_pickle
        self.allow_missing_rng = allow_missing_rng  # a rank without a hook-saved rng: a warning, not an error
        self.evidence.files = sorted(p.name for p in self.path.iterdir() if p.suffix == ".distcp" or p.name == ".metadata")[:6]
        self._problems: list[str] = []
        self.metadata = None
        self._direct = None
        self._tensors: dict[str, TensorInfo] | None = None
        self._fqns: dict[tuple[str, ...], dict[str, str]] = {}
        meta = self.path / ".metadata"
        if not meta.is_file():
            n = len(list(self.path.glob("*.distcp")))
            self._problems.append(
                f"{self.path}: has {n} .distcp file(s) but no .metadata: the save did not finish "
                f"(DCP writes .metadata last); use an earlier step"
            )
            return

        # An unsafe or unreadable .metadata raises here (one line): nothing else of the folder can be trusted.
        self.metadata = safeload.load_dcp_metadata(meta, trust_pickle=trust_pickle)
        self._problems += metadata_problems(self.path, self.metadata)
        if not self._problems:
            self._storage = safe_storage_reader(self.path, metadata=self.metadata)

            self._direct = DirectChunks(self.path, self.metadata, trust_pickle=trust_pickle)

    def storage_reader(self):
        """The DCP StorageReader to pass to ``dcp.load`` for this folder (safe, already-checked metadata)."""
        self._check()
        return self._storage

    def problems(self) -> list[str]:
        missing = self.missing_rng_ranks() if self.metadata is not None else []
        rng = [f"{self.path / RNG_DIR}: no rng file for rank(s) {missing} of world size {self.world_size()}; "
               f"to-hf refuses it (or exports without it under --allow-missing-rng)"] if missing else []
        return list(self._problems) + rng

    def _check(self) -> None:
        if self._problems:
            raise CheckpointFormatError(self._problems[0])

    def tensors(self) -> dict[str, TensorInfo]:
        self._check()
        if self._tensors is None:  # the metadata never changes; read() asks for this once per tensor
            from torch.distributed.checkpoint.metadata import TensorStorageMetadata

            self._tensors = {k: TensorInfo(k, tuple(md.size), md.properties.dtype)
                             for k, md in self.metadata.state_dict_metadata.items()
                             if isinstance(md, TensorStorageMetadata)}
        return self._tensors

    def nesting(self) -> dict[str, tuple[str, ...]]:
        """Original state-dict path of every key (from planner_data)."""
        pd = self.metadata.planner_data if self.metadata is not None else None
        return {k: tuple(v) for k, v in (pd or {}).items()}

    def layout(self) -> str:
        """"nested" if model tensors sit under a top-level "model" dict, "flat" if at the top, else "unknown".

        Other nested sections (optimizer, lr_scheduler, an "ema" copy of the model) do not decide it.
        """
        nest = self.nesting()
        paths = [nest[k] for k in self.tensors() if k in nest]
        model_paths = [p for p in paths if p and p[0] not in TRAINING_SECTIONS]
        if any(len(p) == 1 for p in model_paths):
            return "flat"
        if any(len(p) > 1 and p[0] == "model" for p in model_paths):
            return "nested"
        return "unknown"

    def sections(self) -> list[str]:
        """Which training-state sections are present besides the model."""
        nest = self.nesting()
        present = {p[0] for p in nest.values() if p} | {k.split(".", 1)[0] for k in self.metadata.state_dict_metadata}
        return [s for s in TRAINING_SECTIONS if s in present]

    def held_state(self) -> list[str]:
        """The training sections saved beside the model, other model sections (an EMA), the hook's rng."""
        return self.sections() + [f"model section {s}" for s in self.model_sections()] + \
            (["rng"] if rng_files(self.path) else [])

    def model_sections(self) -> list[str]:
        """Nested sections that are neither the model nor training state (e.g. an "ema" copy)."""
        return sorted({p[0] for p in self.nesting().values() if len(p) > 1 and p[0] not in TRAINING_SECTIONS
                       and p[0] != "model"})

    def model_keys(self) -> list[str]:
        return [k for k in self.tensors() if k.split(".", 1)[0] not in TRAINING_SECTIONS]

    def section_fqns(self, name: str) -> dict[str, str]:
        """fqn -> DCP key of a named model section (``{"ema": state_dict}`` saved next to the model)."""
        nest = self.nesting()
        out = {}
        for k in self.tensors():
            path = nest.get(k)
            if path and len(path) > 1 and path[0] == name:
                out[".".join(path[1:])] = k
            elif not path and k.startswith(name + "."):
                out[k[len(name) + 1:]] = k
        return out

    def model_fqns(self, exclude_sections: tuple[str, ...] = ()) -> dict[str, str]:
        """model fqn -> DCP key: the model's tensors under this checkpoint's layout (``model.`` of a nested
        checkpoint stripped; optimizer, other training sections and ``exclude_sections`` left out)."""
        if exclude_sections not in self._fqns:
            nested = self.layout() == "nested"
            skip = {k for name in exclude_sections for k in self.section_fqns(name).values()}
            self._fqns[exclude_sections] = {(k[len("model."):] if nested and k.startswith("model.") else k): k
                                            for k in self.model_keys() if k not in skip}
        return self._fqns[exclude_sections]

    def model_tensors(self, exclude_sections: tuple[str, ...] = ()) -> dict[str, TensorInfo]:
        infos = self.tensors()
        return {f: TensorInfo(f, infos[k].shape, infos[k].dtype)
                for f, k in self.model_fqns(exclude_sections).items()}

    def section_tensors(self, name: str) -> dict[str, TensorInfo]:
        infos = self.tensors()
        return {f: TensorInfo(f, infos[k].shape, infos[k].dtype) for f, k in self.section_fqns(name).items()}

    def read(self, key: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor (in ``dtype``; into ``out`` when given), assembled from every chunk of every rank.

        ``key`` is a DCP key or a model fqn from :meth:`model_tensors`.  The
        metadata is parsed once per reader, not once per tensor.  Chunks
        stored the way DCP's FileSystemWriter stores them (a plain
        ``torch.save`` of a contiguous tensor, no stream transforms) are copied
        straight from the mapped file into their place in the result, with the
        cast on the way; anything else goes through DCP's own loader, which
        reads each chunk into a buffer, unpickles it into a second one and
        copies it into a third.
        """
        self._check()
        infos = self.tensors()
        if key not in infos:
            key = self.model_fqns().get(key, key)
        info = infos[key]
        spans = self._direct.spans(key, info) if self._direct is not None else None
        if spans is not None:
            if out is None:
                out = torch.empty(info.shape, dtype=dtype or info.dtype)
            self._direct.copy_into(out, spans, info)
            return out
        got = self._dcp_load(key, info)
        if out is None:
            return got if dtype is None or dtype == got.dtype else got.to(dtype)
        out.copy_(got)
        return out

    def read_rows(self, key: str, out: torch.Tensor, start: int, stop: int) -> bool:
        """Rows [start, stop) of ``key`` into ``out``, from chunks read directly; False otherwise."""
        self._check()
        infos = self.tensors()
        if key not in infos:
            key = self.model_fqns().get(key, key)
        spans = self._direct.spans(key, infos[key]) if self._direct is not None else None
        if spans is None:
            return False
        self._direct.copy_rows(out, spans, infos[key], start, stop)
        return True

    def read_layer(self, key: str, i: int, dtype: torch.dtype | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """``key[i]``: one index of the leading axis (a Megatron layer of a stacked tensor), in ``dtype``.

        Chunks stored the plain way are copied for that index only (the other layers' bytes are never
        touched); otherwise DCP's loader reads the whole tensor and the index is taken from it.
        """
        self._check()
        info = self.tensors()[key]
        if not info.shape or not 0 <= i < info.shape[0]:
            raise CheckpointFormatError(f"{self.path}: {key!r} has no index {i} on its leading axis {info.shape}")
        spans = self._direct.spans(key, info) if self._direct is not None else None
        if out is None:
            out = torch.empty(info.shape[1:], dtype=dtype or info.dtype)
        if spans is not None:
            self._direct.copy_rows(out.unsqueeze(0), spans, info, i, i + 1)
            return out
        out.copy_(self._dcp_load(key, info)[i])
        return out

    def _dcp_load(self, key: str, info: TensorInfo) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        out = torch.empty(info.shape, dtype=info.dtype)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load({key: out}, storage_reader=self._storage, no_dist=True)
        except BaseException as e:  # noqa: BLE001 - DCP wraps everything in CheckpointException (a BaseException)
            cause = root_cause(e)
            if isinstance(cause, (KeyboardInterrupt, BridgeError, MemoryError)):
                raise cause from None
            files = sorted({v.relative_path for k, v in self.metadata.storage_data.items() if k.fqn == key})
            raise CheckpointFormatError(f"{self.path}: tensor {key!r} cannot be read from {', '.join(files)} "
                                        f"({one_line(cause)}); the file is corrupt: copy it again") from None
        return out

    def _bytes_entry(self, key: str) -> Any:
        """A non-tensor entry (lr_scheduler, train_state, dataloader state), unpickled weights-only."""
        import io

        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.metadata.storage_data[MetadataIndex(key)]

        with open(confined(self.path, info.relative_path, source=self.path / ".metadata", what="data file"), "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        return safeload.load_bytes(io.BytesIO(blob), where=f"{self.path / info.relative_path} entry {key!r}",
                                   trust_pickle=self.trust_pickle)

    def extra_state(self) -> dict[str, Any]:
        """lr_scheduler / train_state / dataloader sections, nested back as saved; ``global_step``."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        self._check()
        nest = self.nesting()
        infos = self.tensors()
        out: dict[str, Any] = {}
        for k, md in self.metadata.state_dict_metadata.items():
            path = nest.get(k, tuple(k.split(".", 1)))
            if path[0] not in ("lr_scheduler", "train_state", "dataloader"):
                continue
            value = self._bytes_entry(k) if isinstance(md, BytesStorageMetadata) else self.read(k) if k in infos else None
            node = out
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        step = None
        ts = out.get("train_state")
        if isinstance(ts, dict) and ts.get("step") is not None:
            step = int(ts["step"])
        else:
            import re

            m = re.search(r"step-(\d+)", self.path.name)
            step = int(m.group(1)) if m else None
        rng, missing = self.rng_states(), self.missing_rng_ranks()
        if rng or missing:
            out["rng"] = rng
            out["world_size"] = self.world_size()
        if missing:
            out["rng_missing_ranks"] = missing
            out["warnings"] = [f"{self.path / RNG_DIR}: no rng state for rank(s) {missing} of world size "
                               f"{self.world_size()} (--allow-missing-rng); those ranks cannot resume their rng"]
        if out:
            out["global_step"] = step
        return out

    def world_size(self) -> int:
        """How many ranks wrote this save, from the DCP itself: ``__R_N.distcp`` files the metadata references."""
        import re

        names = [Path(getattr(info, "relative_path", "") or "").name
                 for info in ((self.metadata.storage_data or {}).values() if self.metadata is not None else ())]
        names += [p.name for p in self.path.glob("__*.distcp")]  # a rank with nothing to write leaves an empty file
        ranks = {int(m.group(1)) for n in names if (m := re.fullmatch(r"__(\d+)_\d+\.distcp", n))}
        return max(ranks) + 1 if ranks else 1

    def _rng_files(self) -> dict[int, Path]:
        return rng_files(self.path)

    def missing_rng_ranks(self) -> list[int]:
        """Ranks of this save with no rng file, when the hook saved rng for any (else [])."""
        found = self._rng_files()
        return sorted(set(range(self.world_size())) - set(found)) if found else []

    def rng_states(self) -> dict[int, Any]:
        """Every rank's rng state, when the ckpt-bridge save hook stored it (``RNG_DIR/rank_R.pt``).

        The ranks must be exactly those of the DCP save (:meth:`world_size`): a
        missing one is an error, unless ``allow_missing_rng`` (then
        :meth:`extra_state` records a warning that travels into the export).
        """
        found = self._rng_files()
        if not found:
            return {}
        d, world = self.path / RNG_DIR, self.world_size()
        extra = sorted(set(found) - set(range(world)))
        if extra:
            raise CheckpointFormatError(f"{d}: rng files for rank(s) {extra}, but the DCP save has world size {world} "
                                        f"(from its .distcp files); the folder mixes two saves")
        missing = self.missing_rng_ranks()
        if missing and not self.allow_missing_rng:
            raise CheckpointFormatError(
                f"{d}: rank_{missing[0]}.pt missing (rng for {len(found)} of {world} ranks; the save was interrupted "
                f"or the files were not all copied); copy it, or pass --allow-missing-rng to export without it")
        return {r: safeload.load(found[r], mmap=False, allow_numpy=True, trust_pickle=self.trust_pickle)
                for r in sorted(found)}

    def manifest(self) -> dict[str, Any] | None:
        return read_manifest(self.path)

    def recorded_config_dir(self) -> str | None:
        """The HF dir a to-dcp manifest says the weights came from (as recorded; not checked or followed)."""
        m = self.manifest() or {}
        src = m.get("source") if isinstance(m, dict) else None
        d = src.get("config_dir") if isinstance(src, dict) else None
        return d if isinstance(d, str) and d else None

    def hf_config_dir(self) -> Path | None:
        """A config dir inside this folder: the copy to-dcp keeps (``hf_config/``), one the manifest names
        inside the folder, or the folder itself.

        A manifest's recorded source outside the folder is not followed: the
        user passes it with ``--config`` (the to-hf error names it).
        """
        m = self.manifest() or {}
        kept = m.get("hf_config_dir") if isinstance(m, dict) else None
        rec = self.recorded_config_dir()
        names = [n for n in (kept, rec) if isinstance(n, str) and n and names_inside(n)]
        for d in [self.path / n for n in names] + [self.path]:
            if (d / "config.json").is_file() and is_inside(self.path, d / "config.json"):
                return d
        return None

    def describe(self) -> dict[str, Any]:
        if self.metadata is None or self._problems:  # the problems are listed once, by problems()
            return {"metadata": self.metadata is not None}
        tensors = self.tensors()
        model = self.model_keys()
        return {
            "layout": self.layout(),
            "model_only": not self.sections(),
            "sections": self.sections(),
            "model_tensors": len(model),
            "distcp_files": len(list(self.path.glob("*.distcp"))),
            "non_tensor_entries": len(self.metadata.state_dict_metadata) - len(tensors),
            "other_model_sections": self.model_sections(),
            "world_size": self.world_size(),
            "rng_saved_for_ranks": sorted(self._rng_files()),
            "to_dcp_manifest": {"source": m.get("source", {}).get("path"), "layout": m.get("layout"),
                                "aux": [a.get("spec") for a in m.get("aux", [])]} if (m := self.manifest()) else None,
        }
