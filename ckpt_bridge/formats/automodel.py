"""verl's Automodel engine: NeMo Automodel's ``Checkpointer`` layout.

What verl's ``AutomodelEngine.save_checkpoint`` (``verl/workers/engine/automodel/transformer_impl.py``)
leaves in ``global_step_N/actor`` (``Checkpointer.save_model`` / ``save_optimizer``, safetensors format)::

    model/shard-0000S-model-0000k-of-0000n.safetensors   DCP's Hugging Face writer, one per saving rank S:
                                                         each tensor is the rank's piece, its place in the
                                                         full tensor in __metadata__["DCP_SHARDING_INFO"]
                                                         ({key: {"saved_offsets": [...]}})
    model/.hf_metadata/         config.json, tokenizer, fqn_to_file_index_mapping.json
    model/consolidated/         a full HF dir (model-0000k-of-0000n.safetensors + index), when consolidation
                                ran (newer Automodel: final save or offline only); config copied beside it
    optim/                      DCP: {"optim": flattened optimizer state, "sched": lr scheduler state}

No rng state is saved.  The shards are the save; ``consolidated/`` is used only when it holds every
tensor of the shards with the same shape and dtype (a copy that lost one is refused, naming it).
torch's own reader of the shards (``HuggingFaceStorageReader.read_metadata``) takes a tensor's size as the
largest offset + shape it sees, so a missing last shard would silently shrink every tensor: here the
shard numbers must run 1..S without a gap and S must equal the number of ranks that wrote ``optim/``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import CheckpointFormatError
from ..jsonfiles import read_json
from .base import Reader, TensorInfo, verl_global_step
from .chunks import chunks_of_regions, coverage
from .dcp import DCPReader, is_dcp_dir
from .hf import HFReader, SafetensorsFileReader, is_hf_dir

_SHARD = re.compile(r"^shard-(\d+)-model-(\d+)-of-(\d+)\.safetensors$")
SHARDING_KEY = "DCP_SHARDING_INFO"  # torch.distributed.checkpoint._hf_utils.CUSTOM_METADATA_KEY


def _shards(model_dir: Path) -> list[Path]:
    try:
        return sorted(p for p in model_dir.iterdir() if _SHARD.match(p.name))
    except OSError:
        return []


def find_automodel_dir(path: Path) -> Path | None:
    """The actor dir (holding ``model/``) of an Automodel save at ``path``, ``path/actor`` or ``path``=model/."""
    path = Path(path)
    for actor in (path, path / "actor", path.parent if path.name == "model" else None):
        if actor is None:
            continue
        model = actor / "model"
        if model.is_dir() and (_shards(model) or (model / ".hf_metadata").is_dir() or is_hf_dir(model / "consolidated")):
            return actor
    return None


class AutomodelReader(Reader):
    format = "verl-automodel"
    reads_rows = True

    def __init__(self, path: Path, *, trust_pickle: bool = False):
        actor = find_automodel_dir(path)
        if actor is None:
            raise CheckpointFormatError(f"{path}: no model/shard-*.safetensors or model/consolidated here")
        super().__init__(actor)
        self.trust_pickle = trust_pickle
        self.model_dir = actor / "model"
        self.consolidated_dir = self.model_dir / "consolidated"
        self.optim_dir = actor / "optim"
        self.shard_files = _shards(self.model_dir)
        self.evidence.files = [p.name for p in self.shard_files[:4]] + [
            f"model/{n}" for n in (".hf_metadata", "consolidated") if (self.model_dir / n).is_dir()] + (
            ["optim/.metadata"] if (self.optim_dir / ".metadata").is_file() else [])
        self.evidence.notes.append("verl Automodel engine (NeMo Automodel Checkpointer, safetensors): no rng saved")
        self._problems: list[str] = []
        self._chunks: dict[str, list[tuple[SafetensorsFileReader, tuple[int, ...], tuple[int, ...]]]] | None = None
        self._info: dict[str, TensorInfo] | None = None
        self._consolidated: HFReader | None = None
        self._optim: DCPReader | None = None
        self._scan()

    # ------------------------------------------------------------------ scan
    def _scan(self) -> None:
        numbers = sorted(int(_SHARD.match(p.name).group(1)) for p in self.shard_files)
        if numbers:
            gaps = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
            if gaps:
                self._problems.append(f"{self.model_dir}: shard file(s) {gaps} of 1..{numbers[-1]} missing "
                                      f"(shard-{gaps[0]:05d}-model-*.safetensors); copy every rank's shard")
            writers = self._optim_world_size()
            if writers is not None and writers != numbers[-1] and not gaps:
                self._problems.append(
                    f"{self.model_dir}: {numbers[-1]} shard file(s) but {writers} ranks wrote {self.optim_dir}; "
                    f"shard-{numbers[-1] + 1:05d}-model-*.safetensors and later are missing (copy every rank's shard)"
                    if writers > numbers[-1] else
                    f"{self.model_dir}: {numbers[-1]} shard files but {writers} ranks wrote {self.optim_dir}; "
                    f"the folder mixes two saves")
        elif not is_hf_dir(self.consolidated_dir):
            self._problems.append(f"{self.model_dir}: no shard-*-model-*.safetensors files and no consolidated/ "
                                  f"model; the save did not finish")

    def _optim_world_size(self) -> int | None:
        if not is_dcp_dir(self.optim_dir) or not (self.optim_dir / ".metadata").is_file():
            return None
        if self._optim is None:
            self._optim = DCPReader(self.optim_dir, trust_pickle=self.trust_pickle)
        return self._optim.world_size() if not self._optim.problems() else None

    def problems(self) -> list[str]:
        out = list(self._problems)
        if not out:
            try:
                self.tensors()
            except CheckpointFormatError as e:
                out.append(str(e))
        return out

    def check(self) -> None:
        if self._problems:
            raise CheckpointFormatError(self._problems[0])

    # ------------------------------------------------------------- metadata
    def _shard_chunks(self) -> dict[str, list]:
        """key -> [(file reader, offsets, local shape)] from every shard's header (no tensor data read)."""
        if self._chunks is not None:
            return self._chunks
        chunks: dict[str, list] = {}
        for f in self.shard_files:
            try:
                with safe_open(f, framework="pt") as st:
                    meta = st.metadata() or {}
            except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: a bad or truncated file
                raise CheckpointFormatError(f"{f}: not a readable safetensors file ({e}); copy it again") from None
            try:
                info = json.loads(meta[SHARDING_KEY]) if SHARDING_KEY in meta else None
            except ValueError:
                raise CheckpointFormatError(f"{f}: __metadata__ {SHARDING_KEY} is not JSON") from None
            if not isinstance(info, dict):
                raise CheckpointFormatError(f"{f}: no {SHARDING_KEY} in its __metadata__: not a piece of a DCP "
                                            f"Hugging Face save, its tensors cannot be placed")
            part = SafetensorsFileReader(f)
            for key, t in part.tensors().items():
                offsets = (info.get(key) or {}).get("saved_offsets")
                if not isinstance(offsets, list) or len(offsets) != len(t.shape) or \
                        not all(isinstance(o, int) and o >= 0 for o in offsets):
                    raise CheckpointFormatError(f"{f}: key {key!r} has no valid saved_offsets in {SHARDING_KEY}")
                chunks.setdefault(key, []).append((part, tuple(offsets), t.shape, t.dtype))
        self._chunks = chunks
        return chunks

    def _shard_tensors(self) -> dict[str, TensorInfo]:
        out: dict[str, TensorInfo] = {}
        for key, parts in self._shard_chunks().items():
            dtypes = {p[3] for p in parts}
            if len(dtypes) > 1:
                raise CheckpointFormatError(f"{self.model_dir}: key {key!r} has pieces of dtypes {sorted(map(str, dtypes))}")
            shape = tuple(max(off[d] + shp[d] for _, off, shp, _ in parts) for d in range(len(parts[0][1])))
            boxes = chunks_of_regions(tuple(zip(off, (o + s for o, s in zip(off, shp)))) for _, off, shp, _ in parts)
            gap = coverage(shape, boxes).problem(boxes)
            if gap is not None:
                raise CheckpointFormatError(f"{self.model_dir}: key {key!r}: the pieces in the shard files: {gap}; "
                                            f"a shard is missing or from another save")
            out[key] = TensorInfo(key, shape, parts[0][3])
        mapping = self.model_dir / ".hf_metadata" / "fqn_to_file_index_mapping.json"
        if mapping.is_file() and out:
            lost = [k for k in read_json(mapping) if k not in out]
            if lost:
                raise CheckpointFormatError(f"{mapping}: lists {lost[0]!r} but no shard file holds it"
                                            f"{f' (and {len(lost) - 1} more)' if len(lost) > 1 else ''}; "
                                            f"a shard is missing")
        return out

    def tensors(self) -> dict[str, TensorInfo]:
        self.check()
        if self._info is not None:
            return self._info
        shards = self._shard_tensors() if self.shard_files else None
        if is_hf_dir(self.consolidated_dir):
            cons = HFReader(self.consolidated_dir, trust_pickle=self.trust_pickle)
            have = cons.tensors()
            if shards is not None:
                for key, t in shards.items():
                    c = have.get(key)
                    if c is None or c.shape != t.shape or c.dtype != t.dtype:
                        got = "missing" if c is None else f"{tuple(c.shape)} {c.dtype}"
                        raise CheckpointFormatError(
                            f"{self.consolidated_dir}: tensor {key!r} is {got} but the shards hold "
                            f"{tuple(t.shape)} {t.dtype}; the consolidated copy is incomplete: delete "
                            f"{self.consolidated_dir} to export from the shards")
                extra = [k for k in have if k not in shards]
                if extra:
                    raise CheckpointFormatError(f"{self.consolidated_dir}: tensor {extra[0]!r} is in no shard file; "
                                                f"it belongs to another save")
            self._consolidated = cons
            self._info = have
            return have
        self._info = shards or {}
        return self._info

    # ------------------------------------------------------------------ data
    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        info = self.tensors()[key]
        if self._consolidated is not None:
            return self._consolidated.read(key, dtype)
        out = torch.empty(info.shape, dtype=dtype or info.dtype)
        for part, off, shp, _ in self._shard_chunks()[key]:
            part.read(key, out=out[tuple(slice(o, o + s) for o, s in zip(off, shp))])
        return out

    def read_rows(self, key: str, out: torch.Tensor, start: int, stop: int) -> bool:
        self.tensors()
        if self._consolidated is not None:
            return self._consolidated.read_rows(key, out, start, stop)
        pieces = self._shard_chunks()[key]
        if not pieces[0][1]:
            return False  # a 0-dim tensor: read whole
        for part, off, shp, _ in pieces:
            lo, hi = off[0], off[0] + shp[0]
            a, b = max(start, lo), min(stop, hi)
            if a >= b:
                continue
            rest = tuple(slice(o, o + s) for o, s in zip(off[1:], shp[1:]))
            if not part.read_rows(key, out[(slice(a - start, b - start),) + rest], a - lo, b - lo):
                return False
        return True

    # ----------------------------------------------------------- extra state
    @property
    def global_step(self) -> int | None:
        return verl_global_step(self.path)

    def extra_state(self) -> dict[str, Any]:
        """The lr scheduler saved in ``optim/`` ("sched"); Automodel saves no rng."""
        writers = self._optim_world_size()
        if writers is None:
            return {}
        sched = _nested_section(self._optim, "sched")
        return {"lr_scheduler": sched, "rng": {}, "global_step": self.global_step, "world_size": writers,
                "warnings": [f"{self.path}: verl's Automodel engine saves no rng state; a resume draws fresh "
                             f"random numbers"]}

    # ---------------------------------------------------------------- report
    def hf_config_dir(self) -> Path | None:
        for d in (self.consolidated_dir, self.model_dir / ".hf_metadata"):
            if (d / "config.json").is_file():
                return d
        return None

    def source_files(self) -> list[Path]:
        return list(self.shard_files)

    def describe(self) -> dict[str, Any]:
        return {
            "engine": "verl Automodel (NeMo Automodel Checkpointer)",
            "shard_files": len(self.shard_files),
            "consolidated": is_hf_dir(self.consolidated_dir),
            "read_from": "consolidated/" if self._consolidated is not None else "shards",
            "optimizer": (self.optim_dir / ".metadata").is_file(),
            "optimizer_ranks": self._optim_world_size(),
            "rng": "not saved by this engine",
            "global_step": self.global_step,
            "hf_config_dir": str(self.hf_config_dir()) if self.hf_config_dir() else None,
        }

    def close(self) -> None:
        for parts in (self._chunks or {}).values():
            for part, *_ in parts:
                part.close()
        if self._consolidated is not None:
            self._consolidated.close()
        super().close()


def _nested_section(reader: DCPReader, name: str) -> Any:
    """The top-level entry ``name`` of a DCP save, nested back as saved (DCP flattens dicts and lists)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    nest = reader.nesting()
    tensors = reader.tensors()
    root: dict[Any, Any] = {}
    for k, md in reader.metadata.state_dict_metadata.items():
        path = nest.get(k, tuple(k.split(".")))
        if not path or path[0] != name:
            continue
        value = reader._bytes_entry(k) if isinstance(md, BytesStorageMetadata) else reader.read(k) if k in tensors \
            else None
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return _lists(root.get(name))


def _lists(node: Any) -> Any:
    """{0: a, 1: b} (how DCP's flattening names list items) back to [a, b]."""
    if not isinstance(node, dict):
        return node
    out = {k: _lists(v) for k, v in node.items()}
    if out and all(isinstance(k, int) for k in out) and sorted(out) == list(range(len(out))):
        return [out[i] for i in range(len(out))]
    return out


# ------------------------------------------------------------ save completion (watch, the verl callback)
WAITING = ("waiting for optim/.metadata (the Automodel engine saves the model shards, then the optimizer and lr "
           "scheduler; DCP writes .metadata last, after every rank's part); exported once it appears")


def is_automodel_save(role_dir: Path) -> bool:
    """A ``global_step_N/<role>`` written by verl's Automodel engine, finished or still being written."""
    d = Path(role_dir) / "model"
    return d.is_dir() and (bool(_shards(d)) or (d / ".hf_metadata").is_dir())


def is_complete(role_dir: Path) -> bool:
    """The last file the engine writes is there: ``optim/.metadata``; without an optimizer (a model-only
    save), the consolidated index, which consolidation writes after every tensor."""
    d = Path(role_dir)
    if (d / "optim").is_dir():
        return (d / "optim" / ".metadata").is_file()
    return (d / "model" / "consolidated" / "model.safetensors.index.json").is_file()


def save_problem(role_dir: Path) -> str | None:
    """None when the Automodel save at ``role_dir`` is complete and readable, else why not (one line)."""
    if not is_complete(role_dir):
        return f"{role_dir}: {WAITING}"
    try:
        with AutomodelReader(Path(role_dir)) as r:
            problems = r.problems()
    except CheckpointFormatError as e:
        return str(e)
    return problems[0] if problems else None


def saved_parts(role_dir: Path) -> set[str]:
    """The parts an export of this save carries: the model, and the extra state when optim/ holds it."""
    return {"model"} | ({"extra_state"} if (Path(role_dir) / "optim" / ".metadata").is_file() else set())
