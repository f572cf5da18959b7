"""verl's Megatron checkpoints (``MegatronCheckpointManager``) and bare megatron-core ``dist_ckpt`` folders.

Layouts read (see verl 0.9.1 ``megatron_checkpoint_manager.py`` and ``megatron_utils.py``):

* **schema v2** (verl >= 0.9.0): ``ckpt_contents.json`` (written last by rank 0: its presence means the save
  completed) names each content's path: ``model/dist_ckpt`` (Megatron shards, with
  ``use_dist_checkpointing``), ``model/huggingface`` (config + tokenizer; with a bridge, the HF weights),
  ``optimizer/dist_ckpt`` (optimizer; the lr_scheduler in its ``common.pt``), ``extra/dist_ckpt``
  (``rng_state``: one ShardedObject per (pp, tp) rank), ``transformer_config.json``.
* **schema v1** (verl <= 0.8): one ``dist_ckpt/`` and ``huggingface/`` at the actor root.
* a bare ``dist_ckpt`` folder (``metadata.json`` says ``sharded_backend: torch_dist``).

A megatron-core ``dist_ckpt`` is a torch DCP folder, read through :class:`~ckpt_bridge.formats.dcp.DCPReader`
(safe ``.metadata``, chunks copied from the mapped files): megatron-core is never imported.  Its keys are
global and independent of TP/PP/EP; decoder layers are stacked on a leading axis (``decoder.layers.X`` is
``[L, ...]``, PP stages already at their global offsets).  :meth:`MegatronReader.model_tensors` lists one
entry per layer, ``decoder.layers.X[i]`` (shape without the layer axis), and :meth:`MegatronReader.read`
reads only that layer's bytes: a stacked tensor is never read whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointFormatError
from .base import Reader, TensorInfo
from ..confine import confined, is_inside
from ..jsonfiles import MEGATRON_MANIFEST, TRANSFORMER_CONFIG as SIZES, read_json
from .dcp import DCPReader
from .hf import HFReader
from .megatron_extra import extra_state_problem, read_extra_state
from .megatron_fsdp import ENGINE as MEGATRON_FSDP_ENGINE, MegatronFSDPModel, is_megatron_fsdp_dir

MANIFEST = "ckpt_contents.json"
TRANSFORMER_CONFIG = "transformer_config.json"
_SLICE = re.compile(r"^(?P<key>.+)\[(?P<i>\d+)\]$")
STACKED_PREFIXES = ("decoder.layers.", "mtp.layers.")


def slice_key(key: str, i: int) -> str:
    return f"{key}[{i}]"


def parse_slice(key: str) -> tuple[str, int | None]:
    m = _SLICE.match(key)
    return (m.group("key"), int(m.group("i"))) if m else (key, None)


def is_stacked(key: str) -> bool:
    """``decoder.layers.<name>`` (layers on the leading axis), not a per-index ``decoder.layers.<i>.<name>``."""
    for p in STACKED_PREFIXES:
        if key.startswith(p):
            return not key[len(p):].split(".", 1)[0].isdigit()
    return False


def is_dist_ckpt(path: Path) -> bool:
    """A megatron-core dist_ckpt: ``metadata.json`` with ``sharded_backend: torch_dist``."""
    import json

    f = Path(path) / "metadata.json"
    try:
        return f.is_file() and json.loads(f.read_text()).get("sharded_backend") == "torch_dist"
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class Layout:
    """Where each content of one Megatron save sits (absolute paths; None when not saved)."""

    root: Path
    schema: str  # "v2", "v1", "dist_ckpt"
    model_dir: Path | None = None  # the model's dist_ckpt
    model_format: str = "megatron_dist_checkpoint"  # or "huggingface" (bridge-written weights)
    hf_dir: Path | None = None
    extra_dir: Path | None = None  # rng_state
    optimizer_dir: Path | None = None  # optimizer + lr_scheduler
    manifest: dict | None = None
    problems: tuple[str, ...] = ()


def _inside(root: Path, rel: Any, field: str) -> Path:
    if not isinstance(rel, str) or not rel:
        raise CheckpointFormatError(f"{root / MANIFEST}: {field} is {rel!r}, not a path; the manifest is corrupt")
    return confined(root, rel, source=root / MANIFEST, what=field)


def _v2_layout(root: Path) -> Layout:
    m = read_json(root / MANIFEST, MEGATRON_MANIFEST)
    if not isinstance(m, dict) or not isinstance(m.get("contents"), dict):
        raise CheckpointFormatError(f"{root / MANIFEST}: no 'contents' object; not a verl Megatron manifest")
    if m.get("schema_version") != 2:
        raise CheckpointFormatError(f"{root / MANIFEST}: schema_version {m.get('schema_version')!r}; this "
                                    f"ckpt-bridge reads verl's schema 2 (and the v1 layout without a manifest)")
    c = m["contents"]

    def path_of(name: str) -> Path | None:
        entry = c.get(name)
        return _inside(root, entry.get("path"), f"contents.{name}.path") if isinstance(entry, dict) else None

    model = c.get("model") if isinstance(c.get("model"), dict) else {}
    hf = path_of("hf_config") or path_of("hf_model") or (root / "model" / "huggingface")
    fmt = model.get("format", "megatron_dist_checkpoint")
    return Layout(root, "v2", model_dir=path_of("model"), model_format=fmt, hf_dir=hf,
                  extra_dir=path_of("rng_state"), optimizer_dir=path_of("lr_scheduler") or path_of("optimizer"),
                  manifest=m)


def find_layout(path: Path) -> Layout | None:
    """The Megatron save at ``path`` (an actor/critic dir, its ``global_step_N``, or a bare dist_ckpt), or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / MANIFEST).is_file():
        return _v2_layout(path)
    for role in ("actor", "critic"):  # a global_step_N: its actor, else (a critic-only run) its critic
        if (path / role).is_dir() and find_layout(path / role) is not None:
            return find_layout(path / role)
    if is_dist_ckpt(path / "model" / "dist_ckpt") or (path / "model" / "huggingface").is_dir() and \
            (path / TRANSFORMER_CONFIG).is_file():
        return Layout(path, "v2", model_dir=path / "model" / "dist_ckpt", hf_dir=path / "model" / "huggingface",
                      problems=(f"{path}: no {MANIFEST}: the save did not finish (verl's rank 0 writes it last); "
                                f"use an earlier step, or wait for the save to complete",))
    if is_dist_ckpt(path / "dist_ckpt"):
        return Layout(path, "v1", model_dir=path / "dist_ckpt", hf_dir=path / "huggingface",
                      extra_dir=path / "dist_ckpt", optimizer_dir=path / "dist_ckpt")
    if is_dist_ckpt(path):
        return Layout(path, "dist_ckpt", model_dir=path)
    return None


class _RepeatedSlices:
    """Layer slices the plan reads more than once, kept from their first read to their last.

    The plan writes tensors in ``save_pretrained``'s (alphabetical) order, one transform per output, so q, k
    and v of one layer each read the same ``linear_qkv`` slice (gate and up the same ``linear_fc1`` slice),
    interleaved with other reads.  :func:`ckpt_bridge.plan.megatron.plan_megatron_export` tells the reader
    how often each slice is read (:meth:`MegatronReader.expect_reads`); a slice read more than once is kept
    until its last read (at most ``SIZE`` at a time, oldest dropped first: a process of a multi-worker
    export may never run every reader of a slice), instead of being read 3x / 2x.  The split functions never
    modify their input in place."""

    SIZE = 4

    def __init__(self):
        import threading
        from collections import OrderedDict

        self._lock = threading.Lock()  # the export's read-ahead thread and the caller may share a reader
        self._items: OrderedDict = OrderedDict()
        self.left: dict[str, int] = {}  # key -> reads still to come (only keys read more than once)

    def get(self, key: str, load):
        with self._lock:
            left = self.left.get(key, 0)
            if left <= 1:  # read once (or its last read): nothing to keep
                self.left.pop(key, None)
                hit = self._items.pop(key, None)
                if hit is not None:
                    return hit
            else:
                self.left[key] = left - 1
                if key in self._items:
                    return self._items[key]
        t = load()
        if left > 1:
            with self._lock:
                self._items[key] = t
                while len(self._items) > self.SIZE:
                    self._items.popitem(last=False)
        return t


class MegatronReader(Reader):
    format = "verl-megatron"
    key_names = "megatron"
    # Unstacked tensors (the embedding, the output layer, the final norm) and bridge-written HF weights copy row
    # ranges from their chunks: a 1 GB embedding split over TP ranks moves in pieces, never whole.
    reads_rows = True

    def __init__(self, path: Path, *, trust_pickle: bool = False):
        super().__init__(path)
        layout = find_layout(self.path)
        if layout is None:
            raise CheckpointFormatError(f"{path}: not a verl Megatron checkpoint (no {MANIFEST}, model/dist_ckpt "
                                        f"or dist_ckpt/)")
        self.layout, self.trust_pickle = layout, trust_pickle
        self.path = layout.root
        self.evidence.files = [p.name for p in (layout.root / MANIFEST, layout.root / TRANSFORMER_CONFIG)
                               if p.is_file()] + [str(layout.model_dir.relative_to(layout.root)) if layout.model_dir
                                                  and layout.model_dir != layout.root else "."]
        self.evidence.notes.append(f"layout {layout.schema}")
        self._problems = list(layout.problems)
        self.dcp = None
        self.bridge_hf = None  # the HF reader of bridge-written weights (model/huggingface)
        peft = self._peft_refusal()
        if peft:
            self._problems.append(peft)
        elif layout.model_format == "huggingface" and not self._problems:
            self._open_bridge_weights()
        elif layout.model_format != "megatron_dist_checkpoint":
            self._problems.append(f"{layout.root / MANIFEST}: contents.model.format is {layout.model_format!r}, "
                                  f"not one ckpt-bridge reads (megatron_dist_checkpoint, huggingface)")
        elif layout.model_dir is None or not layout.model_dir.is_dir():
            self._problems.append(f"{layout.root}: the manifest names no model dist_ckpt (saved contents: "
                                  f"{(layout.manifest or {}).get('save_contents')}); nothing to export")
        elif not self._problems and is_megatron_fsdp_dir(layout.model_dir):
            # Megatron-FSDP: model, optimizer, lr_scheduler and rng in this one DCP (formats/megatron_fsdp.py)
            self.dcp = MegatronFSDPModel(layout.model_dir, trust_pickle=trust_pickle)
            self.evidence.notes.append(MEGATRON_FSDP_ENGINE)
            self._problems += self.dcp.problems()
        elif not self._problems:
            self.dcp = DCPReader(layout.model_dir, trust_pickle=trust_pickle)
            self._problems += self.dcp.problems()
        self._unstacked: dict[str, TensorInfo] | None = None
        self._repeats = _RepeatedSlices()

    def _peft_refusal(self) -> str | None:
        """A LoRA run (manifest ``backend.peft``): its adapter is Megatron-Bridge PEFT shards, which this reader
        does not fold yet; say so in one line, naming where the adapter is, instead of exporting the base."""
        m = self.layout.manifest or {}
        backend = m.get("backend") if isinstance(m.get("backend"), dict) else {}
        contents = m.get("contents") if isinstance(m.get("contents"), dict) else {}
        if not backend.get("peft") and "peft_adapters" not in contents:
            return None
        hf_adapter = self.layout.root / "model" / "huggingface" / "adapter"
        where = [str(self.layout.root / "model" / "dist_ckpt") + " (Megatron-Bridge PEFT shards)"]
        if hf_adapter.is_dir():
            where.append(f"{hf_adapter} (HF PEFT adapter: load it with peft on the base model)")
        return (f"{self.layout.root / MANIFEST}: backend.peft is true (a LoRA run); its adapter is in "
                f"{' and '.join(where)}, and ckpt-bridge cannot fold Megatron LoRA adapters yet (their per-linear "
                f"layout: rank, alpha, which fused qkv / fc1 rows each adapter covers, is not read); nothing written")

    def _open_bridge_weights(self) -> None:
        """verl's bridge (mbridge / Megatron-Bridge) wrote the HF weights into model/huggingface: read them there;
        the plan checks them against the model class (megatron_plan.plan_bridge_export)."""
        d = self.layout.model_dir
        if d is None or not d.is_dir():
            self._problems.append(f"{self.layout.root / MANIFEST}: the model is bridge-written HF weights in {d}, "
                                  f"which does not exist; copy the whole checkpoint folder again")
            return
        try:
            self.bridge_hf = HFReader(d, trust_pickle=self.trust_pickle)
        except CheckpointFormatError:
            self._problems.append(f"{d}: the manifest says the bridge wrote the model's weights here, but there is "
                                  f"no model.safetensors or index: the save is incomplete")
            return
        self.evidence.notes.append("bridge-written HF weights")
        self._problems += self.bridge_hf.problems()

    @property
    def has_bridge_weights(self) -> bool:
        return self.bridge_hf is not None

    # ---------------------------------------------------------------- checks
    def problems(self) -> list[str]:
        """What is wrong, from metadata: the model's (which :meth:`check` refuses), then the extra state's (a
        lost rng rank), which ``to-hf`` refuses when it writes the training state (``inspect`` shows both; the
        same check, :func:`~.megatron_extra.extra_state_problem`)."""
        if self._problems:
            return list(self._problems)
        if isinstance(self.dcp, MegatronFSDPModel):  # its rng is in the model DCP; the manifest's extra/ is empty
            return []
        extra = extra_state_problem(self.layout, trust_pickle=self.trust_pickle)
        return [extra] if extra else []

    def check(self) -> None:
        if self._problems:
            raise CheckpointFormatError(self._problems[0])

    # ---------------------------------------------------------------- tensors
    def tensors(self) -> dict[str, TensorInfo]:
        """The global tensors as stored (stacked layers included), without ``_extra_state`` bytes entries."""
        self.check()
        return self.bridge_hf.tensors() if self.bridge_hf is not None else self.dcp.tensors()

    def skipped_entries(self) -> list[str]:
        """Non-tensor entries of the model dist_ckpt (``_extra_state`` bytes of each linear): not weights."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        self.check()
        if self.dcp is None:
            return []
        if isinstance(self.dcp, MegatronFSDPModel):
            return self.dcp.skipped_entries()
        return [k for k, md in self.dcp.metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)]

    def model_tensors(self, exclude_sections: tuple[str, ...] = ()) -> dict[str, TensorInfo]:
        """One entry per layer of every stacked tensor (``key[i]``, the layer axis dropped); others as stored."""
        if self._unstacked is None:
            out: dict[str, TensorInfo] = {}
            for k, info in self.tensors().items():
                if is_stacked(k) and info.shape:
                    for i in range(info.shape[0]):
                        s = slice_key(k, i)
                        out[s] = TensorInfo(s, tuple(info.shape[1:]), info.dtype)
                else:
                    out[k] = info
            self._unstacked = out
        return self._unstacked

    def read(self, key: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """A stored tensor, or (``key[i]``) layer ``i`` of a stacked one: only that layer's bytes are read."""
        self.check()
        if self.bridge_hf is not None:
            return self.bridge_hf.read(key, dtype, out=out)
        base, i = parse_slice(key)
        if i is None:
            return self.dcp.read(key, dtype, out=out)
        if out is not None:  # a rename into the caller's buffer: read once by construction
            return self.dcp.read_layer(base, i, dtype, out=out)
        if dtype is not None:
            return self.dcp.read_layer(base, i, dtype)
        return self._repeats.get(key, lambda: self.dcp.read_layer(base, i, dtype))

    def read_rows(self, key: str, out: torch.Tensor, start: int, stop: int) -> bool:
        """Rows [start, stop) of an unstacked tensor (or of a bridge-written HF weight) into ``out``; False for a
        layer slice ``key[i]`` (read whole, one layer: :meth:`read`)."""
        self.check()
        if self.bridge_hf is not None:
            return self.bridge_hf.read_rows(key, out, start, stop)
        if parse_slice(key)[1] is not None:
            return False
        return self.dcp.read_rows(key, out, start, stop)

    def held_state(self) -> list[str]:
        lay = self.layout  # (a v1 save keeps them in the model's own dist_ckpt: not told apart here)
        apart = [d for d in (lay.optimizer_dir, lay.extra_dir) if d is not None and d != lay.model_dir and d.is_dir()]
        return ((["optimizer", "lr_scheduler"] if lay.optimizer_dir in apart else [])
                + (["rng"] if lay.extra_dir in apart else []))

    def expect_reads(self, counts: dict[str, int]) -> None:
        """How many times the plan reads each key (as stored, ``dtype=None``): repeats are kept in between."""
        self._repeats.left = {k: n for k, n in counts.items() if n > 1}

    # ---------------------------------------------------------------- configs and extra state
    def transformer_config(self) -> dict | None:
        """``transformer_config.json`` of the save (Megatron's TransformerConfig as verl dumped it), if any."""
        f = self.layout.root / TRANSFORMER_CONFIG
        if self.layout.schema == "dist_ckpt" or not f.is_file():
            return None
        d = read_json(f, SIZES)
        if not isinstance(d, dict):
            raise CheckpointFormatError(f"{f}: not a JSON object; the save is corrupt")
        return d

    def hf_config_dir(self) -> Path | None:
        d = self.layout.hf_dir
        if d is not None and (d / "config.json").is_file() and is_inside(self.layout.root, d / "config.json"):
            return d
        return None

    def extra_state(self) -> dict[str, Any]:
        """Every (pp, tp) rank's rng (``extra/dist_ckpt`` ``rng_state``), the lr_scheduler, the step."""
        if isinstance(self.dcp, MegatronFSDPModel):  # all in the model DCP; the manifest's extra/ is empty
            return self.dcp.extra_state(self.layout.manifest)
        return read_extra_state(self.layout, trust_pickle=self.trust_pickle)

    def describe(self) -> dict[str, Any]:
        tc = self.transformer_config() if not self._problems else None
        tc = tc or {}
        m = self.layout.manifest or {}
        d: dict[str, Any] = {
            "layout": self.layout.schema,
            "schema_version": m.get("schema_version"),
            "role": m.get("role"),
            "arch": m.get("arch"),
            "global_step": m.get("global_step"),
            "world_size": m.get("world_size"),
            "backend": m.get("backend"),
            "save_contents": m.get("save_contents"),
            "model_dir": str(self.layout.model_dir) if self.layout.model_dir else None,
            "hf_config_dir": str(self.hf_config_dir()) if self.hf_config_dir() else None,
            "parallel_as_saved": {k: tc.get(f) for k, f in (("tp", "tensor_model_parallel_size"),
                                                            ("pp", "pipeline_model_parallel_size"),
                                                            ("vpp", "virtual_pipeline_model_parallel_size"),
                                                            ("ep", "expert_model_parallel_size"),
                                                            ("etp", "expert_tensor_parallel_size"),
                                                            ("cp", "context_parallel_size"))},
            "num_layers": tc.get("num_layers"),
            "num_moe_experts": tc.get("num_moe_experts"),
            "multi_latent_attention": bool(tc.get("multi_latent_attention")),
            "extra_dir": str(self.layout.extra_dir) if self.layout.extra_dir else None,
            "optimizer_dir": str(self.layout.optimizer_dir) if self.layout.optimizer_dir else None,
        }
        d["bridge_weights"] = self.bridge_hf is not None
        if isinstance(self.dcp, MegatronFSDPModel):  # rng (and optimizer) live in the model DCP, not extra/
            d["engine"] = MEGATRON_FSDP_ENGINE
            d["extra_dir"] = d["optimizer_dir"] = d["model_dir"]
        if (self.dcp is not None or self.bridge_hf is not None) and not self._problems:
            d["stored_tensors"] = len(self.tensors())
            d["per_layer_tensors"] = len(self.model_tensors())
            d["skipped_extra_state_entries"] = len(self.skipped_entries())
        return d
