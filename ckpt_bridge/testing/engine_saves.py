"""Real saves of verl's other FSDP-family engines, on CPU, under ONE torchrun job (2 gloo ranks).

    torchrun --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=PORT \\
        -m ckpt_bridge.testing.engine_saves --out ROOT

Each case writes ``ROOT/<case>/global_step_1/actor/...`` (what the engine writes) and
``ROOT/<case>/reference/hf`` (``save_pretrained`` of the live, unsharded model holding the
values that were saved: the oracle an export must equal bit for bit).  ``ROOT/COMPLETE`` last.

``automodel`` - verl's Automodel engine (``verl/workers/engine/automodel/transformer_impl.py``
``save_checkpoint``: ``Checkpointer.save_model(module, local_path)`` then ``save_optimizer(...,
scheduler=[lr_scheduler])``, with ``model_save_format="safetensors"``, ``save_consolidated=True``).
With nemo-automodel importable (the test puts nemo-automodel 0.3.0 first on PYTHONPATH as a --no-deps
overlay) its own ``Checkpointer`` is built with verl's ``CheckpointingConfig`` and called as verl calls it
(``_automodel_checkpointer``).  Without it (no registry), the save path is followed with torch's own writer,
as NeMo Automodel's ``nemo_automodel/components/checkpoint/checkpointing.py`` ``Checkpointer.save_model``
calls it: the model state dict (``ModelState.state_dict()``: FSDP2-sharded DTensors, HF keys) is
``dcp.save``d to ``<local_path>/model`` through the Hugging Face storage writer with
``save_sharded=True`` and the ``fqn_to_file_index_mapping`` (torch's ``HuggingFaceStorageWriter(
save_distributed=True)``: one ``shard-0000R-model-00001-of-00001.safetensors`` per rank, each
tensor's ``saved_offsets`` in the safetensors ``__metadata__``), config and tokenizer go to
``model/.hf_metadata/`` (``ConsolidatedHFAddon.pre_save``) with ``fqn_to_file_index_mapping.json``,
the shards are consolidated into ``model/consolidated/`` by
``consolidate_safetensors_files(input_dir=model_dir, output_dir=consolidated_dir,
fqn_to_index_mapping=...)`` and the metadata files copied beside them (``ConsolidatedHFAddon.post_save``);
``save_optimizer`` ``dcp.save``s ``OptimizerState.state_dict()`` = ``{"optim":
get_optimizer_state_dict(..., flatten_optimizer_state_dict=True), "sched": scheduler.state_dict()}``
to ``<local_path>/optim``.  No rng is saved.

``veomni_ep`` - verl's VeOmni engine (``verl/workers/engine/veomni/transformer_impl.py``: verl's
``FSDPCheckpointManager`` saves the model) with expert parallelism 2 on 2 ranks (``ep_fsdp`` = 1).
With veomni importable (the test puts veomni 0.1.12 first on PYTHONPATH as a --no-deps overlay), veomni
itself builds and parallelizes the model as verl's engine calls it (``_veomni_real``).  Without it, the
expert split is reproduced from VeOmni's
``veomni/distributed/parallel_plan.py`` ``ParallelPlan.apply``: each planned expert parameter
(``mlp.experts.*``, a stacked ``[E, ...]`` tensor) becomes ``DTensor.from_local(param, ep_mesh,
[Replicate()]).redistribute(ep_mesh, [Shard(0)]).to_local()`` - rank ``ep_rank`` keeps experts
``[ep_rank*E/ep, (ep_rank+1)*E/ep)`` as a plain parameter - and the owning experts module is then
``fully_shard``ed on the ``ep_fsdp`` mesh (the inner dim of VeOmni's ``("ep", "ep_fsdp")`` mesh,
``parallel_state``), the rest of the model on the whole ``fsdp`` mesh.  The saved DTensors of an
expert stack therefore record a 1-rank mesh and the local block's shape: nothing says which experts
they are.  The oracle is the full model before the split (every rank builds it from one seed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

CASES = ("automodel", "veomni_ep")
LR = 1e-2
SEED = 0


def _args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", default=",".join(CASES))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _args(argv)
    for k, v in {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
                 "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VERL_LOGGING_LEVEL": "WARN"}.items():
        os.environ.setdefault(k, v)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(backend="gloo")
    out = args.out.resolve()
    for case in [c for c in args.cases.split(",") if c]:
        {"automodel": _automodel, "veomni_ep": _veomni_ep}[case](out / case)
        dist.barrier()
    if dist.get_rank() == 0:
        (out / "COMPLETE").write_text(json.dumps({"cases": args.cases}) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _reference(ref: Path, live_class, config, full) -> None:
    """``save_pretrained`` of a fresh unsharded model holding ``full`` (the live model's values)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        fresh = live_class._from_config(config, dtype=torch.float32)
    fresh.load_state_dict(full, strict=True)
    fresh.save_pretrained(str(ref / "hf"))


def _write_reference(root: Path, rank: int, model, live_class, config, sched, writer: str) -> None:
    """The oracle beside a save, after it: the live model's full state dict through ``save_pretrained``, the
    live lr scheduler, and which writer made the save (every rank gathers; rank 0 writes)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        ref = root / "reference"
        ref.mkdir(parents=True)
        _reference(ref, live_class, config, full)
        torch.save(sched.state_dict(), ref / "sched.pt")
        (ref / "writer.txt").write_text(writer + "\n")
    dist.barrier()


def _has_automodel() -> bool:
    try:
        import nemo_automodel.components.checkpoint.checkpointing  # noqa: F401
    except ImportError:
        return False
    return True


def _automodel_checkpointer(root, actor, model, opt, sched, live_class, config) -> None:
    """nemo-automodel's own Checkpointer, configured and called exactly as verl 0.9.1's AutomodelEngine does
    (``_build_checkpointer`` / ``save_checkpoint``); ``model_repo_id`` is the base model dir (verl passes
    ``model_config.path``)."""
    import torch.distributed as dist
    from nemo_automodel.components.checkpoint.checkpointing import Checkpointer, CheckpointingConfig

    from ckpt_bridge.testing.tiny_models import save_tiny_hf

    rank = dist.get_rank()
    base = root / "base_model"
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        save_tiny_hf(base, "llama", seed=SEED)  # the "downloaded" model verl's config names
    dist.barrier()
    ckpt = Checkpointer(
        config=CheckpointingConfig(enabled=True, checkpoint_dir="checkpoints/", model_save_format="safetensors",
                                   model_cache_dir=str(root / "hf_cache"), model_repo_id=str(base),
                                   save_consolidated=True, is_peft=False),
        dp_rank=rank, tp_rank=0, pp_rank=0, moe_mesh=None)
    ckpt.save_model(model, str(actor))
    ckpt.save_optimizer(opt, model, str(actor), scheduler=[sched])
    dist.barrier()
    _write_reference(root, rank, model, live_class, config, sched, "nemo-automodel Checkpointer")


def _automodel(root: Path) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed._tensor import DTensor  # noqa: F401 - the state dict holds DTensors
    from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from verl.utils.fsdp_utils import apply_fsdp2

    from ckpt_bridge.testing.tiny_models import build_model, save_tiny_tokenizer

    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model("llama", seed=SEED).train()
    live_class, config = type(model), model.config
    # nemo_automodel/_transformers/infrastructure.py (0.3.0, apply_model_infrastructure): the HF keys taken
    # before sharding, hung on the model for the Checkpointer's consolidated index (identity HF adapter here)
    model._pre_shard_hf_state_dict_keys = list(model.state_dict().keys())
    apply_fsdp2(model, {"mesh": init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",)),
                        "reshard_after_forward": True}, {})
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 + 0.25 * s)
    torch.manual_seed(100 + rank)
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    model(input_ids=tokens, labels=tokens).loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)

    actor = root / "global_step_1" / "actor"
    if _has_automodel():
        _automodel_checkpointer(root, actor, model, opt, sched, live_class, config)
        return
    model_dir, optim_dir = actor / "model", actor / "optim"
    meta, consolidated = model_dir / ".hf_metadata", model_dir / "consolidated"
    state = get_model_state_dict(model)  # ModelState.state_dict(): sharded, HF keys
    mapping = {k: 1 for k in state}  # one logical file (the model is small)
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        meta.mkdir(parents=True)
        consolidated.mkdir(parents=True)
        config.save_pretrained(str(meta))
        save_tiny_tokenizer(meta, config.vocab_size)
        (meta / "fqn_to_file_index_mapping.json").write_text(json.dumps(mapping))
    dist.barrier()
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(model_dir), fqn_to_index_mapping=mapping,
                                                            save_distributed=True))
    dist.barrier()
    if rank == 0:
        consolidate_safetensors_files(input_dir=str(model_dir), output_dir=str(consolidated),
                                      fqn_to_index_mapping=mapping)
        for f in meta.iterdir():
            if f.is_file() and f.name != "fqn_to_file_index_mapping.json":
                shutil.copy(f, consolidated / f.name)
    dist.barrier()
    optim_state = {"optim": get_optimizer_state_dict(model, opt, options=StateDictOptions(
        flatten_optimizer_state_dict=True)), "sched": sched.state_dict()}
    dcp.save(optim_state, checkpoint_id=str(optim_dir))
    _write_reference(root, rank, model, live_class, config, sched, "torch HuggingFaceStorageWriter + consolidate_safetensors_files")


def _has_veomni() -> bool:
    try:
        import veomni.distributed.torch_parallelize  # noqa: F401
    except ImportError:
        return False
    return True


def _veomni_real(root: Path) -> None:
    """veomni's own model build and parallelization, as verl 0.9.1's VeOmniEngine calls them
    (``verl/workers/engine/veomni/transformer_impl.py``: ``init_parallel_state(dp_size, dp_replicate_size,
    dp_shard_size, extra_parallel_sizes=(expert_parallel_size,), ...)``, ``_build_model_optimizer``:
    ``build_foundation_model`` + ``build_parallelize_model(init_device="meta", ...,
    broadcast_model_weights_from_rank0=True)``, then ``FSDPCheckpointManager``), EP=2 on CPU with every op eager.
    The oracle is gathered from the live model: dense DTensors with ``full_tensor()``, each expert stack's
    blocks all-gathered over veomni's own ``ep_group`` in ``ep_rank`` order."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers import Qwen3MoeForCausalLM
    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager
    from veomni.arguments import MixedPrecisionConfig, OpsImplementationConfig
    from veomni.distributed import parallel_state
    from veomni.distributed.torch_parallelize import build_parallelize_model
    from veomni.models.auto import build_foundation_model

    from ckpt_bridge.testing.tiny_models import build_tiny_tokenizer, save_tiny_hf

    rank, world = dist.get_rank(), dist.get_world_size()
    base = root / "base_model"
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        save_tiny_hf(base, "qwen3_moe", seed=SEED)
    dist.barrier()
    parallel_state.init_parallel_state(dp_size=world, dp_replicate_size=1, dp_shard_size=world,
                                       extra_parallel_sizes=(world,), ulysses_size=1, dp_mode="fsdp2",
                                       device_type="cpu")
    ops = OpsImplementationConfig(
        attn_implementation="eager", moe_implementation="eager", cross_entropy_loss_implementation="eager",
        rms_norm_implementation="eager", swiglu_mlp_implementation="eager", rotary_pos_emb_implementation="eager",
        load_balancing_loss_implementation="eager")
    module = build_foundation_model(config_path=str(base), weights_path=str(base), torch_dtype="float32",
                                    attn_implementation="eager", ops_implementation=ops, init_device="meta")
    module = build_parallelize_model(
        module, init_device="meta", weights_path=str(base), enable_full_shard=True,
        mixed_precision=MixedPrecisionConfig(enable=False), enable_gradient_checkpointing=False,
        basic_modules=list(set(getattr(module, "_no_split_modules", None) or [])), enable_reentrant=False,
        enable_forward_prefetch=False, broadcast_model_weights_from_rank0=True, fqn_to_index_mapping=None)
    opt = torch.optim.AdamW(module.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    manager = FSDPCheckpointManager(
        model=module, optimizer=opt, lr_scheduler=sched, processing_class=build_tiny_tokenizer(module.config.vocab_size),
        checkpoint_config={"save_contents": ["model", "optimizer", "extra"], "load_contents": ["model"],
                           "async_save": False})
    manager.save_checkpoint(local_path=str(root / "global_step_1" / "actor"), hdfs_path=None, global_step=1,
                            max_ckpt_to_keep=None)
    dist.barrier()
    ps = parallel_state.get_parallel_state()
    full = {}
    for key, v in module.state_dict().items():
        t = v.full_tensor() if isinstance(v, DTensor) else v
        if ".mlp.experts." in key and ps.ep_enabled:  # veomni's own EP group and ranks, not the files'
            blocks = [torch.empty_like(t) for _ in range(ps.ep_size)]
            dist.all_gather(blocks, t.contiguous(), group=ps.ep_group)
            t = torch.cat(blocks)
        full[key] = t.detach().cpu()
    if rank == 0:
        ref = root / "reference"
        ref.mkdir(parents=True)
        _reference(ref, Qwen3MoeForCausalLM, module.config, full)
        (ref / "writer.txt").write_text(f"veomni build_parallelize_model, EP={ps.ep_size}\n")
    dist.barrier()


def _veomni_ep(root: Path) -> None:
    if _has_veomni():
        _veomni_real(root)
        return
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager

    from ckpt_bridge.testing.tiny_models import build_model, build_tiny_tokenizer

    rank, world = dist.get_rank(), dist.get_world_size()
    ep = world
    model = build_model("qwen3_moe", seed=SEED).train()
    live_class, config = type(model), model.config
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        ref = root / "reference"
        ref.mkdir(parents=True)
        _reference(ref, live_class, config, {k: v.detach().clone() for k, v in model.state_dict().items()})
        (ref / "writer.txt").write_text("verl FSDPCheckpointManager, experts split as ParallelPlan.apply does\n")
    dist.barrier()
    # VeOmni's parallel_state: ("ep", "ep_fsdp") with ep outer; the dense model on ("fsdp",) = the world
    ep_mesh = init_device_mesh("cpu", (ep, world // ep), mesh_dim_names=("ep", "ep_fsdp"))
    fsdp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    experts = [m for name, m in model.named_modules() if name.endswith("mlp.experts")]
    assert experts, "qwen3_moe preset has no mlp.experts modules"
    for mod in experts:  # ParallelPlan.apply: Replicate -> Shard(0) on the ep mesh, keep the local block
        for pname, p in list(mod.named_parameters(recurse=False)):
            dt = DTensor.from_local(p.data, device_mesh=ep_mesh["ep"], placements=[Replicate()])
            local = dt.redistribute(device_mesh=ep_mesh["ep"], placements=[Shard(0)]).to_local()
            setattr(mod, pname, torch.nn.Parameter(local.clone(), requires_grad=p.requires_grad))
        fully_shard(mod, mesh=ep_mesh["ep_fsdp"], reshard_after_forward=True)
    for layer in model.model.layers:
        fully_shard(layer, mesh=fsdp_mesh, reshard_after_forward=True)
    fully_shard(model, mesh=fsdp_mesh, reshard_after_forward=True)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    manager = FSDPCheckpointManager(
        model=model, optimizer=opt, lr_scheduler=sched, processing_class=build_tiny_tokenizer(config.vocab_size),
        checkpoint_config={"save_contents": ["model", "optimizer", "extra"], "load_contents": ["model"],
                           "async_save": False})
    manager.save_checkpoint(local_path=str(root / "global_step_1" / "actor"), hdfs_path=None, global_step=1,
                            max_ckpt_to_keep=None)
    dist.barrier()


if __name__ == "__main__":
    raise SystemExit(main())
