"""TorchTitan's ``TorchCheckpointingManager`` step folders, written by the ``torch-checkpointing`` package.

What it writes (torch-checkpointing 0.1.1 ``checkpoint_writer.py`` / ``metadata_serialization.py``, driven as
torchtitan main's ``TorchCheckpointingManager._save`` drives it: one item per top-level state, not flattened)::

    step-N/
      metadata.pkl            pickle of plain dicts: {"metadata": {item: {"nested_path_to_metadata": ...,
                              "rank_to_layout_info": {rank: None | {"file_path": ...}}}}, "world_size": W,
                              "version": "2.0"}; written by rank 0 after its own files
      model_{rank}.pt         torch.save of {fqn: DTensor}           (the model's own state dict)
      optimizer_{rank}.pt     torch.save of the flattened optimizer state (DTensors)
      lr_scheduler_{rank}.pt, train_state_{rank}.pt, dataloader_{rank}.pt   plain torch.save dicts

With a write barrier (torchtitan's default) the ranks write into ``tmp_step-N`` and rank 0 renames it to
``step-N`` after every rank passed the barrier, so a ``step-N`` holding ``metadata.pkl`` is complete.

The model files are read like verl's FSDP rank files (:class:`~.verl_fsdp.VerlFSDPReader`: each DTensor's
placements and device mesh as pickled, through :mod:`ckpt_bridge.safeload`'s stand-ins, one key at a time);
``metadata.pkl`` (a trusted pickle to torch-checkpointing itself) is read by an unpickler that admits no global
at all: it names the world size and each rank's file.  The keys are a TorchTitan model's own
(``key_names = "titan"``: the family's ``StateDictAdapter`` names them for an HF export).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

from .. import safeload
from ..compare import deep_equal
from ..confine import confined
from ..errors import CheckpointFormatError, UnsafePickleError
from .base import Reader
from .verl_fsdp import VerlFSDPReader

METADATA = "metadata.pkl"
ITEMS = ("model", "optimizer", "lr_scheduler", "train_state", "dataloader")
_ITEM_FILE = re.compile(r"^(\w+?)_(\d+)\.(pt|safetensors)$")


def is_torch_checkpointing_dir(path: Path) -> bool:
    """A step folder of torch-checkpointing: ``metadata.pkl``, or (an unfinished save) ``model_R.pt`` files."""
    path = Path(path)
    return path.is_dir() and ((path / METADATA).is_file() or any(path.glob("model_[0-9]*.pt")))


def save_problem(step: Path) -> str | None:
    """None when a torch-checkpointing ``step-N`` is complete, else why not.  With torchtitan's write barrier the
    ranks write ``tmp_step-N`` and rank 0 renames it after the barrier, so ``step-N`` appears complete; without
    a barrier each rank writes in place and rank 0 writes ``metadata.pkl`` after its own files: then every rank
    file the metadata names must be there too."""
    step = Path(step)
    if not (step / METADATA).is_file():
        return f"{step}: no {METADATA} yet: the save is still being written (rank 0 writes it last)"
    try:
        TorchCheckpointingReader(step).check()
    except CheckpointFormatError as e:
        return str(e)
    return None


class _PlainData(pickle.Unpickler):
    """metadata.pkl holds dicts, lists, tuples, strings and numbers only: any global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def read_metadata(path: Path, *, trust_pickle: bool = False) -> dict[str, Any]:
    """``metadata.pkl`` as plain data, its shape checked (one line naming the file otherwise)."""
    try:
        with open(path, "rb") as f:
            md = (pickle.Unpickler(f) if trust_pickle else _PlainData(f)).load()
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):
            raise UnsafePickleError(f"{path}: refusing to unpickle {str(e).split('GLOBAL', 1)[1].strip()}: "
                                    f"torch-checkpointing's metadata.pkl holds plain data only; if you trust where "
                                    f"this file came from, rerun with --trust-pickle") from None
        raise CheckpointFormatError(f"{path}: not a readable pickle ({e}); the save is corrupt or truncated: "
                                    f"copy it again") from None
    except (EOFError, ValueError, IndexError, KeyError, MemoryError) as e:
        raise CheckpointFormatError(f"{path}: not a readable pickle ({type(e).__name__}: {e}); the save is corrupt "
                                    f"or truncated: copy it again") from None
    ok = (isinstance(md, dict) and isinstance(md.get("metadata"), dict) and isinstance(md.get("world_size"), int)
          and md["world_size"] > 0 and all(isinstance(v, dict) and isinstance(v.get("rank_to_layout_info"), dict)
                                           for v in md["metadata"].values()))
    if not ok:
        raise CheckpointFormatError(f"{path}: not torch-checkpointing metadata (expected a dict with 'metadata' per "
                                    f"item and an int 'world_size'); version {md.get('version') if isinstance(md, dict) else '?'}"
                                    f" is not one ckpt-bridge knows")
    return md


def item_files(step: Path, md: dict[str, Any]) -> dict[str, dict[int, Path]]:
    """{item: {rank: file}} as the metadata lays them out (a rank with no layout: ``{item}_{rank}.pt``)."""
    out: dict[str, dict[int, Path]] = {}
    for item, imd in md["metadata"].items():
        for rank, layout in imd["rank_to_layout_info"].items():
            name = layout.get("file_path") if isinstance(layout, dict) else None
            name = name if isinstance(name, str) and name else f"{item}_{int(rank)}.pt"
            out.setdefault(str(item), {})[int(rank)] = confined(step, name, source=step / METADATA, what="item file")
    return out


class TorchCheckpointingReader(VerlFSDPReader):
    """A ``step-N`` folder of torch-checkpointing (see the module docstring)."""

    format = "torch-checkpointing"
    key_names = "titan"

    def __init__(self, path: Path, *, trust_pickle: bool = False):
        Reader.__init__(self, Path(path))  # not VerlFSDPReader's: the files are named by metadata.pkl
        self.requested = self.path
        self.trust_pickle = trust_pickle
        self._sds, self._offsets, self._fds, self._layouts, self._mesh_cache = {}, {}, {}, {}, {}
        self._scan()

    def _scan(self) -> None:
        self._problems: list[str] = []
        self.files: dict[str, dict[int, dict[int, Path]]] = {"model": {}, "optim": {}, "extra_state": {}}
        self.items: dict[str, dict[int, Path]] = {}
        self.fsdp_config = None
        self.metadata: dict[str, Any] | None = None
        self.evidence.files = sorted(p.name for p in self.path.iterdir()
                                     if p.name == METADATA or _ITEM_FILE.match(p.name))[:6]
        meta = self.path / METADATA
        if not meta.is_file():
            self.world_size = 0
            self._problems.append(f"{self.path}: rank files but no {METADATA}: the save did not finish "
                                  f"(torch-checkpointing writes it last); use an earlier step")
            return
        self.metadata = read_metadata(meta, trust_pickle=self.trust_pickle)
        W = self.world_size = self.metadata["world_size"]
        self.items = item_files(self.path, self.metadata)
        # items without a resharder (lr_scheduler, train_state, dataloader) are not in metadata.pkl: the writer
        # names them by its default layout, {item}_{rank}.pt
        for p in self.path.iterdir():
            m = _ITEM_FILE.match(p.name)
            if m and m.group(3) == "pt" and m.group(1) not in self.items:
                self.items[m.group(1)] = {r: self.path / f"{m.group(1)}_{r}.pt" for r in range(W)}
        self.evidence.notes.append(f"{METADATA}: world size {W}, items {', '.join(sorted(self.items))} "
                                   f"(TorchTitan's TorchCheckpointingManager)")
        if any(f.suffix == ".safetensors" for f in self.items.get("model", {}).values()):
            self._problems.append(f"{self.path}: the rank shards of TorchTitan's HF final save (model_R.safetensors, "
                                  f"consolidated into {self.path.parent}); export {self.path.parent} with --config")
        if "model" not in self.items:
            self._problems.append(f"{meta}: no 'model' item (items: {', '.join(sorted(self.items)) or 'none'}); "
                                  f"nothing to export")
        for item, ranks in sorted(self.items.items()):
            missing = [f.name for r, f in sorted(ranks.items()) if not f.is_file()]
            if missing:
                self._problems.append(f"{self.path}: missing {', '.join(missing[:4])} ({len(ranks) - len(missing)} of "
                                      f"{len(ranks)} {item} files present); copy every rank's file")
            if sorted(ranks) != list(range(W)):
                self._problems.append(f"{meta}: item {item!r} names ranks {sorted(ranks)} for world size {W}")
        self.files["model"] = {W: self.items.get("model", {})}
        self.files["optim"] = {W: self.items["optimizer"]} if "optimizer" in self.items else {}

    def model_file(self, rank: int) -> Path:
        return self.items["model"][rank]

    def tensors(self):
        infos = super().tensors()
        want = {tuple(json_path) for json_path in _nested_paths(self.metadata["metadata"]["model"])}
        have = {(k,) for k in infos}
        if want and want != have:
            odd = sorted(want ^ have)[0]
            raise CheckpointFormatError(f"{self.model_file(0)}: key {'.'.join(odd)!r} is in one of it and "
                                        f"{self.path / METADATA} but not the other: the files come from different saves")
        return infos

    def check_keys(self, keys) -> None:
        """Every stored layout the export reads: the model's own keys (an export asks by HF names, which its
        adapter's plan makes from these)."""
        own = self.tensors()
        super().check_keys([k for k in keys if k in own] or list(own))

    @property
    def global_step(self) -> int | None:
        m = re.fullmatch(r"step-(\d+)", self.path.name)
        return int(m.group(1)) if m else None

    def _item(self, item: str) -> dict[int, Any]:
        return {r: safeload.load(f, mmap=False, allow_numpy=True, trust_pickle=self.trust_pickle,
                                 saved_dtensors=True) for r, f in sorted(self.items.get(item, {}).items())}

    def extra_state(self) -> dict[str, Any]:
        """lr_scheduler and train_state (the same on every rank: checked), dataloader per rank, the step."""
        self.check()
        out: dict[str, Any] = {}
        for item in ("lr_scheduler", "train_state"):
            per_rank = self._item(item)
            if not per_rank:
                continue
            first = per_rank[min(per_rank)]
            for r, v in per_rank.items():
                if not deep_equal(v, first):
                    raise CheckpointFormatError(f"{self.items[item][r]}: {item} on rank {r} differs from rank "
                                                f"{min(per_rank)}'s; the files come from different saves")
            out[item] = first
        if "dataloader" in self.items:
            out["dataloader"] = self._item("dataloader")
        if not out:
            return {}
        ts = out.get("train_state")
        step = ts.get("step") if isinstance(ts, dict) else None
        out["global_step"] = int(step) if isinstance(step, int) else self.global_step
        out["world_size"] = self.world_size
        return out

    def hf_config_dir(self) -> Path | None:
        return None  # torchtitan keeps no HF config in its step folders: to-hf needs --config

    def describe(self) -> dict[str, Any]:
        if not getattr(self, "metadata", None):
            return {}
        return {"writer": "TorchTitan TorchCheckpointingManager (torch-checkpointing)",
                "world_size": self.world_size, "items": sorted(self.items),
                "metadata_version": self.metadata.get("version"), "global_step": self.global_step,
                "rng": "none saved (torchtitan saves no rng state)"}


def _nested_paths(item_md: dict[str, Any]) -> list[list[str]]:
    import json

    out = []
    for key in item_md.get("nested_path_to_metadata", {}):
        try:
            path = json.loads(key) if isinstance(key, str) else list(key)
        except ValueError:
            continue
        if isinstance(path, list) and all(isinstance(p, str) for p in path):
            out.append(path)
    return out
