"""Real saves of the two TorchTitan layouts verl / torchtitan write besides the plain DCP step folder, in ONE
torchrun job (2 FSDP2 gloo ranks), with the HF model's own ``save_pretrained`` of the live weights as reference.

    torchrun --nproc_per_node=2 --master_addr=127.0.0.1 -m ckpt_bridge.testing.titan_engine_save --root ROOT

Per family (torchtitan 0.3.0's ``llama3`` and ``qwen3``, tiny, built from an HF config):

* the HF model (``ROOT/<fam>/hf``: save_pretrained of a seeded model) -> torchtitan's own
  ``StateDictAdapter.from_hf`` -> the torchtitan model, ``fully_shard`` per layer and root -> one AdamW step
  through torchtitan's ``OptimizersContainer`` / ``LRSchedulersContainer``;
* **verl's TorchTitan engine** (``verl/workers/engine/torchtitan/transformer_impl.py``, ``save_checkpoint``):
  torchtitan 0.3.0's ``CheckpointManager`` with the engine's config (``enable=True``, default interval 500),
  ``states={"train_state": ...}`` as torchtitan's Trainer passes itself (verl never advances it: step 0),
  ``sd_adapter``; then exactly ``checkpointer.folder = os.path.dirname(local_path)`` and
  ``checkpointer.save(curr_step=global_step)``, for a PPO save (``local_path = ROOT/<fam>/ppo/global_step_500/actor``,
  plus the ``data.pt`` verl's ray trainer writes beside it) and an SFT save (``local_path =
  ROOT/<fam>/sft/global_step_500``: verl's CheckpointHandler);
* **torch-checkpointing 0.1.1** driven as torchtitan main's ``TorchCheckpointingManager._save`` drives it
  (torchtitan PR branch pr4190, ``torchtitan/components/checkpointer/torch_checkpointing.py``, not in 0.3.0,
  whose manager is a stub): ``manager.save(folder/step-N, _stateful_to_state_dict(states))`` with the items
  model / optimizer / lr_scheduler / dataloader / train_state, and its final HF save
  (``_save_last_step`` with ``last_save_in_hf``: ``adapter.to_hf`` of the model state, written as
  ``step-N/sharded/model_{rank}.safetensors`` and consolidated into ``step-N/`` by the pre-finalize callback).
  Only when ``torch_checkpointing`` imports (the test puts its overlay first on PYTHONPATH).

  What differs from torchtitan's defaults, because this runs on a CPU: the saver is the library's
  ``SyncCheckpointSaverConfig`` (torchtitan uses it for the final save; the async one stages into pinned CUDA
  memory in a subprocess: same writer, same files), the storage is ``LocalFileSystemStorageConfig(
  use_direct_io=False)`` (torchtitan main takes a ``storage_config``; O_DIRECT is off on tmpfs / CPU), the barrier
  is torchtitan's ``TCPStoreBarrierConfig`` on a free port instead of the fixed 43001, and ONE documented
  monkeypatch: ``DefaultMetadataManager._all_gather_pickled_data`` hard-codes ``device="cuda"`` for its size and
  byte tensors (torch_checkpointing 0.1.1 ``metadata_manager.py`` lines 416 and 422); it is replaced for this job
  by ``dist.all_gather_object`` on the gloo group, which returns the same ``{rank: unpickled object}``.

The reference of each save is ``ROOT/<fam>/reference``: ``save_pretrained`` of an HF model into which
``adapter.to_hf`` of the live full state dict (torchtitan's ``ModelWrapper.state_dict()``, each DTensor's ``full_tensor()``) was loaded
with ``strict=True``; nothing of ckpt-bridge's plan code is used to make it.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

FAMILIES = ("llama3", "qwen3")
STEP = 500  # torchtitan's default interval: verl's engine saves only when global_step % 500 == 0


def hf_config(family: str):
    import transformers

    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    if family == "llama3":
        cfg = transformers.LlamaConfig(tie_word_embeddings=False, rope_theta=500000.0, **kw)
        cfg.architectures = ["LlamaForCausalLM"]
    else:
        cfg = transformers.Qwen3Config(tie_word_embeddings=True, head_dim=16, **kw)
        cfg.architectures = ["Qwen3ForCausalLM"]
    return cfg


class _TrainState:
    """What torchtitan's Trainer hands the checkpointer as ``train_state`` (``Trainer.state_dict``)."""

    def __init__(self, step: int):
        self.step, self.ntokens_seen = step, 0

    def state_dict(self):
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, sd):
        self.step, self.ntokens_seen = sd["step"], sd["ntokens_seen"]


def _hf_dir(root: Path, family: str) -> Path:
    from transformers import AutoModelForCausalLM

    hf = root / family / "hf"
    if dist.get_rank() == 0:
        torch.manual_seed(sum(map(ord, family)))
        model = AutoModelForCausalLM.from_config(hf_config(family))
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.uniform_(0.5, 1.5)  # norms start at 1.0: weights a mix-up would show
        model.save_pretrained(hf)
    dist.barrier()
    return hf


def _trained_model(family: str, hf: Path):
    """The torchtitan model from the HF weights via torchtitan's own adapter, FSDP2-sharded, one AdamW step."""
    from safetensors.torch import load_file
    from torch.distributed.fsdp import fully_shard
    from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
    from torchtitan.components.optimizer.optimizer import ParamGroupConfig

    from ckpt_bridge.models.titan import titan_after_load, titan_model

    tm = titan_model(family, hf)
    model = tm.build("meta")
    model.to_empty(device="cpu")
    titan_after_load(model, hf, check_config=False)  # the RoPE cache, by the module's own code
    missing, unexpected = model.load_state_dict(tm.adapter.from_hf(load_file(str(hf / "model.safetensors"))),
                                                strict=False)
    assert not unexpected and all("freqs" in k or "rope" in k for k in missing), (missing, unexpected)
    for layer in (model.layers.values() if isinstance(model.layers, torch.nn.ModuleDict) else model.layers):
        fully_shard(layer)
    fully_shard(model)
    opt = OptimizersContainer(
        OptimizersContainer.Config(implementation="for-loop", param_groups=[
            ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-2})]),
        model_parts=[model])  # fmt: skip
    sched = LRSchedulersContainer.Config(warmup_steps=2, decay_type="cosine").build(optimizers=opt, training_steps=8)
    # FlexAttention (torchtitan 0.3.0's only LM attention) has no backward on CPU: the step's gradients are
    # 0.01 * W per parameter (DTensor arithmetic on each rank's shard), so AdamW moves every weight and fills its
    # moments as a real step does.
    with torch.no_grad():
        for p in model.parameters():
            p.grad = p.detach() * 0.01
    opt.step()
    opt.zero_grad()
    sched.step()
    return tm, model, opt, sched


def _reference(root: Path, family: str, hf: Path, tm, model) -> None:
    """save_pretrained of the HF model holding ``adapter.to_hf`` of the live full state dict."""
    from torch.distributed.tensor import DTensor
    from torchtitan.components.checkpoint import ModelWrapper
    from transformers import AutoModelForCausalLM

    # the state dict torchtitan's checkpointer saves (its ModelWrapper: the fused-QKV split hooks ran), gathered
    full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in ModelWrapper([model]).state_dict().items()}
    if dist.get_rank() == 0:
        ref = AutoModelForCausalLM.from_config(hf_config(family))
        ref.load_state_dict(tm.adapter.to_hf(dict(full)), strict=not ref.config.tie_word_embeddings)
        if ref.config.tie_word_embeddings:
            ref.tie_weights()
        ref.save_pretrained(root / family / "reference")
    dist.barrier()


def _verl_engine_saves(root: Path, family: str, tm, model, opt, sched) -> None:
    """torchtitan 0.3.0's CheckpointManager, configured and called as verl's TorchTitan engine does."""
    from torchtitan.components.checkpoint import CheckpointManager

    cfg = CheckpointManager.Config(enable=True, initial_load_in_hf=True, initial_load_model_only=True)
    mgr = CheckpointManager(cfg, dataloader=None, model_parts=[model], optimizers=opt, lr_schedulers=sched,
                            states={"train_state": _TrainState(0)}, sd_adapter=tm.adapter, base_folder="")
    for local_path in (root / family / "ppo" / f"global_step_{STEP}" / "actor",
                       root / family / "sft" / f"global_step_{STEP}"):
        mgr.folder = os.path.dirname(str(local_path))  # transformer_impl.py save_checkpoint
        assert mgr.save(curr_step=STEP), "the engine's save wrote nothing"
        dist.barrier()
    if dist.get_rank() == 0:  # what verl's ray trainer / SFT CheckpointHandler write next to the engine's save
        torch.save({"sampler": {"epoch": 0}}, root / family / "ppo" / f"global_step_{STEP}" / "data.pt")
        (root / family / "sft" / f"global_step_{STEP}").mkdir()
        torch.save({"sampler": {"epoch": 0}}, root / family / "sft" / f"global_step_{STEP}" / "data_0.pt")
    mgr.close()


def _cpu_metadata_all_gather() -> None:
    """The one monkeypatch (see the module docstring): the same {rank: object} through gloo, not cuda tensors."""
    from torch_checkpointing.metadata_manager import DefaultMetadataManager

    def all_gather(self, data, process_group=None):
        out = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(out, data, group=process_group)
        return dict(enumerate(out))

    DefaultMetadataManager._all_gather_pickled_data = all_gather


def _tc_config(port: int):
    """torchtitan main's ``_default_backend_config()``, with the CPU settings of the module docstring."""
    from torch_checkpointing.barriers import TCPStoreBarrierConfig
    from torch_checkpointing.checkpoint_manager import CheckpointManager as Backend
    from torch_checkpointing.checkpoint_writer import CheckpointWriterConfig
    from torch_checkpointing.config import SyncCheckpointSaverConfig
    from torch_checkpointing.default_resharder import DefaultResharder
    from torch_checkpointing.schema import ItemSpec
    from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

    resharder = DefaultResharder()
    writer = CheckpointWriterConfig(
        checkpoint_write_barrier_timeout_sec=600,
        barrier_config=TCPStoreBarrierConfig(master_address=os.environ.get("MASTER_ADDR", "localhost"),
                                             tcpstore_port=port, timeout_barrier_init_sec=60,
                                             use_checkpoint_barrier_tcpstore_libuv=True))
    return Backend.Config(
        items={"model": ItemSpec(requires_copy=True, resharder=resharder, required=False),
               "optimizer": ItemSpec(requires_copy=True, resharder=resharder, required=False)},
        default=ItemSpec(requires_copy=False), save=SyncCheckpointSaverConfig(writer_config=writer,
                                                                             wait_timeout_secs=600),
        storage_config=LocalFileSystemStorageConfig(use_direct_io=False))


def _port() -> int:
    """A free TCP port picked by rank 0 for the barrier's TCPStore (torchtitan's fixed 43001 may be taken)."""
    from ckpt_bridge.testing.harness import free_port

    box = [free_port() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _torch_checkpointing_saves(root: Path, family: str, tm, model, opt, sched) -> None:
    from dataclasses import replace

    from torch.distributed.checkpoint.state_dict_saver import _stateful_to_state_dict
    from torch_checkpointing.checkpoint_layout import LayoutInfo, SafetensorsSerialization
    from torch_checkpointing.hf.consolidation import consolidate_hf_safetensors_checkpoint
    from torch_checkpointing.schema import ItemSpec
    from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig
    from torchtitan.components.checkpoint import ModelWrapper

    folder = root / family / "tc" / "checkpoint"
    states = {"train_state": _TrainState(STEP), "model": ModelWrapper([model]), "optimizer": opt,
              "dataloader": _TrainState(3), "lr_scheduler": sched}  # a Stateful dataloader state
    # _save: the resumable save of step N
    manager = _tc_config(_port()).build()
    try:
        fut = manager.save(str(folder / f"step-{STEP}"), _stateful_to_state_dict(states))
        if fut is not None:
            fut.result(timeout=600)
    finally:
        manager.close()
    dist.barrier()
    # _save_last_step with last_save_in_hf: the HF final save of step N+1
    final = str(folder / f"step-{STEP + 1}")
    config = _tc_config(_port())
    items = dict(config.items)
    items["model"] = replace(items["model"], layout=LayoutInfo("model_{rank}.safetensors", SafetensorsSerialization()))
    # torch-checkpointing 0.1.1 calls the callback with one CallbackArgs (torchtitan's branch: (path, logger)), on
    # every rank BEFORE its write barrier, and the consolidation (distributed: each rank writes some output files)
    # reads metadata.pkl, which rank 0 writes after its own shards: a barrier first makes them all visible.
    config = replace(config, items=items, pre_finalize_callback=lambda args: (
        dist.barrier(), consolidate_hf_safetensors_checkpoint(args.path, output_dir=final, item_key="model",
                                              fqn_to_index_mapping=tm.adapter.fqn_to_index_mapping,
                                              storage_config=LocalFileSystemStorageConfig(use_direct_io=False))))
    manager = config.build()
    try:
        hf_states = {"model": tm.adapter.to_hf(states["model"].state_dict())}
        manager.save(str(Path(final) / "sharded"), _stateful_to_state_dict(hf_states))
    finally:
        manager.close()
    dist.barrier()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--families", default=",".join(FAMILIES))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    root = Path(args.root)
    try:
        import torch_checkpointing  # noqa: F401 - a test-only overlay

        _cpu_metadata_all_gather()
        have_tc = True
    except ImportError:
        have_tc = False
    done = {}
    for family in args.families.split(","):
        hf = _hf_dir(root, family)
        tm, model, opt, sched = _trained_model(family, hf)
        _reference(root, family, hf, tm, model)
        _verl_engine_saves(root, family, tm, model, opt, sched)
        if have_tc:
            _torch_checkpointing_saves(root, family, tm, model, opt, sched)
        done[family] = {"torch_checkpointing": have_tc}
    if dist.get_rank() == 0:
        (root / "result.json").write_text(json.dumps(done, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
