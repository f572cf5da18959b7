"""verl's Megatron-FSDP save (``use_megatron_fsdp``, Megatron's ``fsdp_dtensor`` checkpoint format).

verl 0.9.1's ``MegatronCheckpointManager._save_megatron_fsdp_checkpoint`` hands one combined state dict to
Megatron-Bridge's ``save_fsdp_dtensor_checkpoint``, which writes it with plain ``torch.distributed.checkpoint``
(a ``FileSystemWriter``: ``.metadata`` + ``__R_0.distcp``, no megatron ``metadata.json`` / ``common.pt``) into
``model/dist_ckpt``.  The manifest (``ckpt_contents.json``) still names ``extra/dist_ckpt`` for the rng and
``optimizer/dist_ckpt`` for the optimizer, which stay empty: everything is in the one DCP, so this reader trusts
the keys of its ``.metadata``, not the manifest's paths.  What the DCP holds (the flattened state dict):

* ``model.<name>``: the state dict of megatron-core's ``FullyShardedDataParallel`` wrapper, so ``<name>`` is
  ``module.`` (one more per inner wrapper, e.g. ``Float16Module`` under bf16) + the GPTModel's own name, with
  per-index layers (``decoder.layers.{i}.*``, not stacked), every tensor a DTensor at its global shape (uneven
  chunks).  megatron-core's ``handle_swiglu_in_state_dict`` has split each SwiGLU ``linear_fc1.weight`` into
  ``linear_fc1.weight_w`` (gate) and ``linear_fc1.weight_v`` (up), each at its global (TP-gathered) shape;
  ``_extra_state`` entries are dropped.
* ``optimizer.*`` and ``lr_scheduler.*`` when saved; ``rng_state.(<pp>, <tp>).<dp>.<field>`` per (pp, tp) rank.

:class:`MegatronFSDPModel` is the model part of that DCP under Megatron names (the wrapper prefixes dropped), read
through :class:`~ckpt_bridge.formats.dcp.DCPReader`; :func:`extra_state` rebuilds the rng / lr_scheduler from the
DCP's own ``planner_data`` (the original nesting of every flattened key).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointFormatError
from .base import TensorInfo
from .dcp import DCPReader

ENGINE = "verl Megatron-FSDP (use_megatron_fsdp, fsdp_dtensor)"
_WRAPPER = "module."
_RNG_KEY = re.compile(r"^\((\d+), (\d+)\)$")


def is_megatron_fsdp_dir(model_dir: Path) -> bool:
    """A plain DCP (``.metadata``, no megatron ``metadata.json``) in a verl Megatron ``model/dist_ckpt``: only the
    Megatron-FSDP path writes one there (megatron's dist_checkpointing always writes ``metadata.json``)."""
    d = Path(model_dir)
    return (d / ".metadata").is_file() and not (d / "metadata.json").exists()


def megatron_name(key: str) -> str | None:
    """``model.module.[module.]decoder.…`` -> ``decoder.…``; None for a key outside the model section."""
    if not key.startswith("model."):
        return None
    name = key[len("model."):]
    while name.startswith(_WRAPPER):
        name = name[len(_WRAPPER):]
    return name


class MegatronFSDPModel:
    """The model entries of a Megatron-FSDP combined DCP, under Megatron names (what ``MegatronReader.dcp`` is for
    a dist_checkpointing save: ``tensors`` / ``read`` / ``read_rows``)."""

    def __init__(self, model_dir: Path, *, trust_pickle: bool = False):
        self.path = Path(model_dir)
        self.dcp = DCPReader(self.path, trust_pickle=trust_pickle)
        self._problems = list(self.dcp.problems())
        self._stored: dict[str, str] = {}  # megatron name -> key in the DCP
        if self._problems:
            return
        sections = sorted({k.split(".", 1)[0] for k in self.dcp.metadata.state_dict_metadata})
        vpp = [s for s in sections if re.fullmatch(r"model\d+", s)]
        if vpp:  # verl's manager saves model[0] only under Megatron-FSDP; model0/model1 would be another writer
            self._problems.append(f"{self.path}: sections {vpp} (virtual-pipeline model chunks) in a Megatron-FSDP "
                                  f"DCP; ckpt-bridge reads verl's single 'model' section only")
            return
        for k in self.dcp.tensors():
            name = megatron_name(k)
            if name is None:
                continue
            if name in self._stored:
                self._problems.append(f"{self.path}: {self._stored[name]!r} and {k!r} are both the model's {name!r}; "
                                      f"not one save")
                return
            self._stored[name] = k
        stages = sorted({int(m.group(1)) for k in self.dcp.metadata.state_dict_metadata
                         for m in [re.match(r"^rng_state\.\((\d+), \d+\)\.", k)] if m})
        if len(stages) > 1:
            # the model state dict of each PP stage numbers its layers from 0 (no global offset in the keys):
            # stages could share keys, and DCP keeps one writer per key.  No such save was seen: refuse, not guess
            self._problems.append(f"{self.path}: a Megatron-FSDP save of {len(stages)} pipeline stages (rng_state of "
                                  f"pp ranks {stages}); ckpt-bridge reads Megatron-FSDP saves with PP = 1 only "
                                  f"(its per-stage layer numbering is unverified); nothing written")
            return
        if not self._stored:
            self._problems.append(f"{self.path}: a DCP without 'model.*' tensors (sections {sections}); not a "
                                  f"Megatron-FSDP model save (save_contents without 'model'?)")

    @property
    def metadata(self):
        return self.dcp.metadata

    def problems(self) -> list[str]:
        return list(self._problems)

    def _check(self) -> None:
        if self._problems:
            raise CheckpointFormatError(self._problems[0])

    def tensors(self) -> dict[str, TensorInfo]:
        self._check()
        stored = self.dcp.tensors()
        return {n: TensorInfo(n, stored[k].shape, stored[k].dtype) for n, k in self._stored.items()}

    def skipped_entries(self) -> list[str]:
        """Non-tensor model entries (none: the bridge drops ``_extra_state`` before saving)."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        self._check()
        return [k for k, md in self.dcp.metadata.state_dict_metadata.items()
                if isinstance(md, BytesStorageMetadata) and megatron_name(k) is not None]

    def read(self, name: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check()
        return self.dcp.read(self._stored[name], dtype, out=out)

    def read_rows(self, name: str, out: torch.Tensor, start: int, stop: int) -> bool:
        self._check()
        return self.dcp.read_rows(self._stored[name], out, start, stop)

    def read_layer(self, name: str, i: int, dtype=None, out=None):  # no stacked tensors in this layout
        raise CheckpointFormatError(f"{self.path}: {name!r} is not a stacked tensor in a Megatron-FSDP save")

    def extra_state(self, manifest: dict | None) -> dict[str, Any]:
        """``{"rng": {"pp{p}_tp{t}": state}, "lr_scheduler": …, "global_step": N}`` from the DCP's rng_state /
        lr_scheduler sections (the manifest's ``extra/`` and ``optimizer/`` paths are not used: they are empty)."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        self._check()
        nest = self.dcp.nesting()
        tensors = self.dcp.tensors()
        tree: dict[str, Any] = {}
        for k, md in self.dcp.metadata.state_dict_metadata.items():
            path = nest.get(k, tuple(k.split(".")))
            if path[0] not in ("rng_state", "lr_scheduler"):
                continue
            value = self.dcp._bytes_entry(k) if isinstance(md, BytesStorageMetadata) else \
                self.dcp.read(k) if k in tensors else None
            node = tree
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        out: dict[str, Any] = {}
        rng = {}
        for key, per_dp in (tree.get("rng_state") or {}).items():
            m = _RNG_KEY.match(str(key))
            if not m:
                raise CheckpointFormatError(f"{self.path}: rng_state entry {key!r} is not a '(pp, tp)' rank; "
                                            f"not what verl's Megatron-FSDP save writes")
            # verl saves a list with one state per data-parallel rank (only with data_parallel_random_init more
            # than one); DCP flattens it into {0: state, …}
            states = [per_dp[i] for i in sorted(per_dp, key=int)] if isinstance(per_dp, dict) else per_dp
            rng[f"pp{m.group(1)}_tp{m.group(2)}"] = states[0] if len(states) == 1 else states
        listed = "rng_state" in ((manifest or {}).get("contents") or {})
        if listed and not rng:
            raise CheckpointFormatError(f"{self.path}: ckpt_contents.json lists an rng_state but this Megatron-FSDP "
                                        f"DCP holds none; the save is incomplete or another save's: copy the whole "
                                        f"folder again")
        if rng:
            out["rng"] = rng
            out["world_size"] = (manifest or {}).get("world_size")
        if "lr_scheduler" in tree:
            out["lr_scheduler"] = tree["lr_scheduler"]
        if out:
            out["global_step"] = (manifest or {}).get("global_step")
        return out
