"""Produce a REAL verl FSDP2 checkpoint of a tiny model, on CPU, under torchrun.

    torchrun --nproc_per_node=N --master_addr=127.0.0.1 --master_port=PORT \\
        -m ckpt_bridge.testing.verl_save --model llama[,qwen3_moe,...] --out ROOT \\
        [--mesh N | --mesh AxB] [--shard-dim 1] [--steps 1] [--dtype fp32|bf16] \\
        [--save-steps 1,2] [--no-tokenizer] [--hf-model]
    torchrun --nproc_per_node=2 ... -m ckpt_bridge.testing.verl_save --lora llama,qwen2_rslora --out ROOT
        (PEFT-wrapped LoRA runs, every named LORA_CASES entry in this one job: see lora_main)

What it does, on every rank (gloo process group, CPU device mesh), for each preset
in turn (several presets: each under ``ROOT/<preset>/``, one process group and one
set of imports for all of them):

1. rank 0 writes ``ROOT/base_model`` (the "downloaded" HF model: config,
   generation config, tokenizer, safetensors weights built from the preset with
   a fixed seed); every rank then loads it with ``from_pretrained`` in the
   requested dtype, exactly like verl's actor does (the class its config names:
   causal LM, image-text-to-text), so ``config.name_or_path`` points to it and
   verl copies its ``generation_config.json``.  A critic preset (a
   ``*ForTokenClassification`` architecture) starts from its family's causal LM
   and is loaded as verl 0.9.1's critic loads it: ``num_labels=1`` on the base
   config, ``AutoModelForTokenClassification``; verl saves that config with
   ``architectures: [XForCausalLM]``.
2. shards it with FSDP2 ``fully_shard`` using verl 0.9.1's own ``apply_fsdp2``
   (every decoder layer, plus embed_tokens/lm_head when untied, then the root)
   on a 1-D ``('fsdp',)`` mesh or a 2-D HSDP ``('ddp', 'fsdp')`` mesh;
   ``--shard-dim 1`` passes a ``shard_placement_fn`` giving ``Shard(1)`` to
   every parameter with at least 2 dims whose dim 1 divides by the shard group
   size (torch's FSDP2 refuses uneven sharding on dim > 0; the others, e.g.
   llama's down_proj [64, 173], keep ``Shard(0)``).
3. trains ``--steps`` AdamW steps with verl's cosine-with-warmup LambdaLR on random tokens
   drawn from each rank's own global RNG (ranks are seeded apart); text tokens only
   (below a VLM's image ids), a value regression for a critic.
4. at each save step S: ``FSDPCheckpointManager.save_checkpoint`` into
   ``ROOT/global_step_S/actor`` with ``global_step=S``, then, like verl's
   trainer, ``ROOT/global_step_S/data.pt`` (dataloader state) and
   ``ROOT/latest_checkpointed_iteration.txt``.
5. writes the reference ``ROOT/reference/global_step_S/``:
   ``model.safetensors`` (``get_model_state_dict(full_state_dict=True,
   cpu_offload=True)``; a tied ``lm_head.weight`` is stored as a clone),
   ``keys.json`` (every key of that full state dict, in order), ``tokens.pt`` +
   ``logits.pt`` (a fresh unsharded model of the live class loaded with the full
   state dict, eval, at OMP_NUM_THREADS=1), ``hf/`` (that model's ``save_pretrained``:
   what an export must equal),
   ``meta.json`` (placements, mesh, shapes), and per rank ``rank{R}_state.pt``
   (``lr_scheduler`` state dict, ``rng_cpu`` = ``torch.get_rng_state()``,
   ``rng_numpy``, ``rng_random``) captured right before verl saved.

Finally rank 0 writes ``ROOT/run_info.json`` (arguments, timings) and
``ROOT/COMPLETE``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

SEED = 0
DATA_SEED = 1000  # rank R draws its batches from torch/np/random seeded with DATA_SEED + R
LR = 1e-3
# verl's cosine schedule with warmup: the lr factor is 0.5 at the first step (a plain
# linear warmup from 0 would leave the weights untouched by a 1-step run), 0.75 at
# the second, then decays; every saved lr_scheduler state is distinct.
WARMUP_STEPS, TOTAL_STEPS, INIT_LR_RATIO = 2, 10, 0.5
BATCH, SEQ = 2, 16
REF_TOKENS_SEED, REF_BATCH, REF_SEQ = 1234, 2, 12


def source_fingerprint() -> str:
    """Hash of the files that decide what a run writes (this script and the tiny models)."""
    import hashlib

    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in ("verl_save.py", "tiny_models.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def _set_env_defaults() -> None:
    # Quiet, CPU-friendly defaults (before torch is imported); all overridable.
    for k, v in {
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VERL_LOGGING_LEVEL": "WARN",
    }.items():
        os.environ.setdefault(k, v)


def parse_mesh(mesh: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """``"4"`` -> ((4,), ('fsdp',)); ``"2x2"`` -> ((2, 2), ('ddp', 'fsdp'))."""
    parts = [int(p) for p in str(mesh).lower().split("x")]
    if len(parts) == 1:
        return (parts[0],), ("fsdp",)
    if len(parts) == 2:
        return (parts[0], parts[1]), ("ddp", "fsdp")
    raise ValueError(f"--mesh must be N or AxB, got {mesh!r}")


def mesh_world_size(mesh: str) -> int:
    shape, _ = parse_mesh(mesh)
    n = 1
    for s in shape:
        n *= s
    return n


def _args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ckpt_bridge.testing.verl_save", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama",
                   help="a tiny preset, or a comma list: each is saved in turn under OUT/<preset>/ by this one job")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--mesh", default=None, help="N (1-D fsdp) or AxB (HSDP ddp x fsdp); default: world size")
    p.add_argument("--shard-dim", type=int, default=0)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--save-steps", default=None, help="comma list of steps to save at; default: --steps")
    p.add_argument("--no-tokenizer", action="store_true")
    p.add_argument("--hf-model", action="store_true", help="add 'hf_model' to checkpoint save_contents")
    p.add_argument("--lora", default=None, help="comma list of LORA_CASES: PEFT-wrapped runs, one after another "
                   "in this one job, into OUT/<case>/ (see lora_main)")
    return p.parse_args(argv)


def _log(rank, msg):
    if rank == 0:
        print(f"[verl_save] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = _args(argv)
    _set_env_defaults()
    if args.lora:
        return lora_main(args)

    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    dist.init_process_group(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh_spec = args.mesh or str(world)
    shape, names = parse_mesh(mesh_spec)
    if mesh_world_size(mesh_spec) != world:
        raise SystemExit(f"--mesh {mesh_spec} needs {mesh_world_size(mesh_spec)} processes, torchrun started {world}")
    save_steps = sorted({int(s) for s in args.save_steps.split(",")}) if args.save_steps else [args.steps]
    if not save_steps or save_steps[-1] > args.steps or save_steps[0] < 0:
        raise SystemExit(f"--save-steps {save_steps} must lie within 0..{args.steps}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    timings: dict[str, float] = {}

    t = time.perf_counter()
    import transformers  # noqa: F401 - timed here, used by _run_model
    import verl.utils.checkpoint.fsdp_checkpoint_manager  # noqa: F401

    timings["import_s"] = time.perf_counter() - t

    names_list = [m for m in args.model.split(",") if m]
    out_root: Path = args.out.resolve()
    for name in names_list:
        root = out_root / name if len(names_list) > 1 else out_root
        t0 = time.perf_counter()
        losses, tied, t_model = _run_model(name, root, args, rank, world, mesh_spec, shape, names, save_steps, dtype)
        t_model["total_s"] = time.perf_counter() - (t_start if len(names_list) == 1 else t0)
        if len(names_list) == 1:
            t_model["import_s"] = timings["import_s"]
        if rank == 0:
            _write_run_info(root, args, name, mesh_spec, shape, names, world, save_steps, tied, losses, t_model)
        dist.barrier()
    if rank == 0 and len(names_list) > 1:
        (out_root / "run_info.json").write_text(json.dumps({"models": names_list, "mesh": mesh_spec,
                                                            "fingerprint": source_fingerprint(),
                                                            "total_s": round(time.perf_counter() - t_start, 2)}))
        (out_root / "COMPLETE").write_text("ok\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _run_model(model_name, root, args, rank, world, mesh_spec, shape, names, save_steps, dtype):
    """Steps 1-5 of the module docstring for one preset: base model, FSDP2, training, verl saves, references."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from transformers import AutoTokenizer

    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager
    from verl.utils.fsdp_utils import apply_fsdp2
    from verl.utils.torch_functional import get_cosine_schedule_with_warmup

    args.model = model_name
    timings: dict[str, float] = {}
    base = root / "base_model"
    t = time.perf_counter()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if base.exists():
            shutil.rmtree(base)
        _save_base(base, args.model, tokenizer=not args.no_tokenizer)
    dist.barrier()

    # -- model, exactly as verl's actor / critic gets it: from_pretrained(local_path, dtype) ----------
    model, critic = _load_like_verl(base, args.model, dtype)
    live_class = type(model)  # before fully_shard swaps in its FSDP subclass
    model.train()
    tokenizer = None if args.no_tokenizer else AutoTokenizer.from_pretrained(str(base))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    timings["build_s"] = time.perf_counter() - t

    # -- FSDP2 -------------------------------------------------------------------------------------
    t = time.perf_counter()
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    fsdp_kwargs = {"mesh": mesh, "reshard_after_forward": True}
    if args.shard_dim:
        sd, fsdp_size = args.shard_dim, shape[-1]

        def shard_placement_fn(param):
            # torch 2.13 FSDP2 refuses uneven sharding on a dim > 0
            # (torch/distributed/fsdp/_fully_shard/_fsdp_param.py, _init_sharded_param:
            # "FSDP does not support uneven sharding on dim 1"), so a param whose dim
            # `sd` does not divide by the shard group size keeps the default Shard(0),
            # the same fallback as verl.utils.fsdp_utils.get_shard_placement_fn.
            if param.ndim > sd and param.shape[sd] % fsdp_size == 0:
                return Shard(sd)
            return None  # FSDP's default Shard(0)

        fsdp_kwargs["shard_placement_fn"] = shard_placement_fn
    apply_fsdp2(model, fsdp_kwargs, {})
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.01)
    lr_scheduler = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=WARMUP_STEPS, num_training_steps=max(TOTAL_STEPS, args.steps),
        init_lr_ratio=INIT_LR_RATIO,
    )
    checkpoint_config = {
        "save_contents": ["model", "optimizer", "extra"] + (["hf_model"] if args.hf_model else []),
        "load_contents": ["model", "optimizer", "extra"],
        "async_save": False,
    }
    manager = FSDPCheckpointManager(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        processing_class=tokenizer,
        checkpoint_config=checkpoint_config,
    )
    timings["shard_s"] = time.perf_counter() - t

    # data-parallel ranks draw different data: seed every RNG apart per rank
    torch.manual_seed(DATA_SEED + rank)
    np.random.seed(DATA_SEED + rank)
    random.seed(DATA_SEED + rank)
    dataloader = _dataloader() if rank == 0 else None
    data_iter = iter(dataloader) if dataloader is not None else None

    timings["train_s"] = timings["save_s"] = timings["reference_s"] = 0.0
    losses = []
    for step in range(0, args.steps + 1):
        if step > 0:
            t = time.perf_counter()
            tokens = torch.randint(0, text_token_bound(model.config), (BATCH, SEQ))
            np.random.rand()  # advance numpy/python RNGs too, as a real data pipeline would
            random.random()
            if data_iter is not None:
                next(data_iter)
            if critic:  # a value head: regress every token's value onto 0 (no lm loss exists)
                loss = model(input_ids=tokens).logits.float().pow(2).mean()
            else:  # text-only tokens, also for a VLM
                loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            timings["train_s"] += time.perf_counter() - t
        if step not in save_steps:
            continue

        # -- save, as verl's trainer does --------------------------------------------------------
        t = time.perf_counter()
        ref = root / "reference" / f"global_step_{step}"
        ref.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "rank": rank,
                "world_size": world,
                "global_step": step,
                "lr_scheduler": lr_scheduler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_numpy": np.random.get_state(),
                "rng_random": random.getstate(),
            },
            ref / f"rank{rank}_state.pt",
        )
        step_dir = root / f"global_step_{step}"
        manager.save_checkpoint(
            local_path=str(step_dir / "actor"), hdfs_path=None, global_step=step, max_ckpt_to_keep=None
        )
        dist.barrier()
        if rank == 0:
            torch.save(dataloader.state_dict(), step_dir / "data.pt")
            (root / "latest_checkpointed_iteration.txt").write_text(str(step))
        timings["save_s"] += time.perf_counter() - t

        # -- reference -------------------------------------------------------------------------
        t = time.perf_counter()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        sharded = model.state_dict()
        if rank == 0:
            _write_reference(ref, full, sharded, model.config, live_class, dtype, tied, world, shape, names, step,
                             save_file=save_file, DTensor=DTensor)
        dist.barrier()
        timings["reference_s"] += time.perf_counter() - t
        _log(rank, f"saved global_step_{step} (world {world}, mesh {mesh_spec})")

    return losses, tied, timings


def _write_run_info(root, args, model_name, mesh_spec, shape, names, world, save_steps, tied, losses, timings):
    info = {
        "model": model_name,
        "mesh": mesh_spec,
        "mesh_shape": list(shape),
        "mesh_dim_names": list(names),
        "world_size": world,
        "shard_dim": args.shard_dim,
        "steps": args.steps,
        "save_steps": save_steps,
        "dtype": args.dtype,
        "tokenizer": not args.no_tokenizer,
        "hf_model": args.hf_model,
        "tied": tied,
        "fingerprint": source_fingerprint(),
        "losses_rank0": losses,
        "timings_rank0": {k: round(v, 3) for k, v in timings.items()},
        "versions": _versions(),
    }
    (root / "run_info.json").write_text(json.dumps(info, indent=2))
    (root / "COMPLETE").write_text("ok\n")
    print(f"[verl_save] {model_name}: done in {timings['total_s']:.1f}s: "
          + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()), file=sys.stderr, flush=True)


def _dataloader():
    """A StatefulDataLoader like verl's trainer uses; its state_dict becomes global_step_S/data.pt."""
    import torch
    from torch.utils.data import RandomSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    data = list(range(64))
    gen = torch.Generator()
    gen.manual_seed(SEED)
    return StatefulDataLoader(data, batch_size=BATCH, sampler=RandomSampler(data, generator=gen), num_workers=0,
                              drop_last=True)


def text_token_bound(config) -> int:
    """Token ids below this are plain text: the text vocab, stopping short of a VLM's image/video ids
    (a text-only step must not contain an image token without pixels)."""
    special = [getattr(config, a, None) for a in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                  "vision_end_token_id", "vision_token_id")]
    return min([config.get_text_config().vocab_size] + [i for i in special if isinstance(i, int)])


def _save_base(base: Path, name: str, tokenizer: bool) -> None:
    """The "downloaded" HF model.  A critic starts, as in verl, from the causal LM of its family."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ckpt_bridge.testing import tiny_models

    cfg = tiny_models.build_config(name)
    if cfg.architectures[0].endswith("ForTokenClassification"):
        lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg.model_type]
        orig = tiny_models.PRESETS[name]
        tiny_models.PRESETS[name] = lambda: _with_arch(orig(), lm)
        try:
            tiny_models.save_tiny_hf(base, name, seed=SEED, tokenizer=tokenizer)
        finally:
            tiny_models.PRESETS[name] = orig
        return
    tiny_models.save_tiny_hf(base, name, seed=SEED, tokenizer=tokenizer)


def _with_arch(cfg, arch: str):
    cfg.architectures = [arch]
    return cfg


def _load_like_verl(base: Path, name: str, dtype):
    """(model, is_critic).  The actor: the class the config names, ``from_pretrained(base, dtype)``.

    The critic: verl 0.9.1's FSDP engine (workers/engine/fsdp/transformer_impl.py) sets
    ``num_labels=1`` and zero dropouts on the base model's config and calls
    ``verl.utils.model.load_valuehead_model``, i.e.
    ``AutoModelForTokenClassification.from_pretrained(base, config=that config)`` (its
    ``attn_implementation="flash_attention_2"`` is left out: CPU).  The config keeps
    ``architectures: [XForCausalLM]``, and verl saves it as is.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForTokenClassification

    from ckpt_bridge.testing import tiny_models

    if tiny_models.build_config(name).architectures[0].endswith("ForTokenClassification"):
        cfg = AutoConfig.from_pretrained(str(base))
        cfg.num_labels = 1
        cfg.classifier_dropout = 0.0
        cfg.hidden_dropout = "0"
        cfg.summary_dropout_prob = 0.0
        return AutoModelForTokenClassification.from_pretrained(str(base), dtype=dtype, config=cfg), True
    cfg = AutoConfig.from_pretrained(str(base))
    return getattr(transformers, cfg.architectures[0]).from_pretrained(str(base), dtype=dtype), False


def _write_reference(ref: Path, full, sharded, config, live_class, dtype, tied, world, shape, names, step, *,
                     save_file, DTensor):
    import torch

    keys = list(full)
    (ref / "keys.json").write_text(json.dumps(keys, indent=1))
    # safetensors refuses tensors sharing storage (tied lm_head/embed): store clones
    seen: set[int] = set()
    to_save = {}
    for k, v in full.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            v = v.clone()
        seen.add(ptr)
        to_save[k] = v.contiguous()
    save_file(to_save, str(ref / "model.safetensors"), metadata={"format": "pt"})

    # logits of an unsharded model of the live class holding exactly the full state dict (RNG untouched);
    # its save_pretrained (ref/hf) is what an export must equal, key for key and bit for bit
    with torch.random.fork_rng(devices=[]):
        fresh = live_class._from_config(config, dtype=dtype)
    fresh.load_state_dict(full, strict=True)
    fresh.eval()
    fresh.save_pretrained(ref / "hf")
    gen = torch.Generator()
    gen.manual_seed(REF_TOKENS_SEED)
    tokens = torch.randint(0, text_token_bound(config), (REF_BATCH, REF_SEQ), generator=gen)
    with torch.no_grad():
        logits = fresh(input_ids=tokens).logits
    torch.save(tokens, ref / "tokens.pt")
    torch.save(logits, ref / "logits.pt")

    entries = {}
    for k, v in sharded.items():
        if isinstance(v, DTensor):
            entries[k] = {
                "dtensor": True,
                "shape": list(v.shape),
                "dtype": str(v.dtype).removeprefix("torch."),
                "placements": [repr(p) for p in v.placements],
                "mesh_dim_names": list(v.device_mesh.mesh_dim_names or ()),
                "rank0_local_shape": list(v.to_local().shape),
            }
        else:
            entries[k] = {"dtensor": False, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
    meta = {
        "global_step": step,
        "world_size": world,
        "mesh_shape": list(shape),
        "mesh_dim_names": list(names),
        "dtype": str(dtype).removeprefix("torch."),
        "tied": tied,
        "full_state_dict_keys": keys,
        "rank_file_keys": list(sharded),
        "entries": entries,
    }
    (ref / "meta.json").write_text(json.dumps(meta, indent=1))


def _versions():
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "verl", "tokenizers", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------------------------------------------------------
# LoRA runs (--lora CASE,...): the actor is a PEFT model, as verl builds it (get_peft_model(model,
# LoraConfig(task_type=CAUSAL_LM, r, lora_alpha, target_modules, bias="none"))), sharded with apply_fsdp2 and
# saved by FSDPCheckpointManager.  Several cases run in one torchrun job (one process-group start-up).

_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_CASES: dict[str, dict] = {
    # LoRA on attention + MLP projections (llama: biased q/k/v/o base layers) + a modules_to_save lm_head copy
    "llama": {"model": "llama", "lora": {"r": 4, "lora_alpha": 8, "target_modules": _PROJ,
                                         "modules_to_save": ["lm_head"]}},
    # rsLoRA (alpha/sqrt(r)); verl gets it from an adapter it starts from (model.lora_adapter_path), whose
    # adapter_config.json the harness writes to OUT/<case>/init_adapter
    "qwen2_rslora": {"model": "qwen2_tied", "lora": {"r": 4, "lora_alpha": 8, "target_modules": _PROJ, "use_rslora": True},
                     "init_adapter": True},
    # an embedding target, on a tied model: verl 0.9.1's apply_fsdp2 cannot shard an UNTIED model whose
    # embed_tokens is a PEFT lora.Embedding (fully_shard: "'FSDPEmbedding' object layout differs from 'Embedding'")
    "qwen2_embed": {"model": "qwen2_tied", "lora": {"r": 4, "lora_alpha": 8, "target_modules": _PROJ + ["embed_tokens"]}},
    # checkpoint.save_lora_only=True: rank files hold the lora_ tensors only
    "qwen2_lora_only": {"model": "qwen2_tied", "lora": {"r": 4, "lora_alpha": 8, "target_modules": _PROJ},
                        "save_lora_only": True},
}
LORA_STEPS = 2  # PEFT starts B at zero, so A gets no gradient at step 1: two steps train both


def lora_main(args) -> int:
    """Each case: base_model -> PEFT -> FSDP2 -> LORA_STEPS AdamW steps -> verl save + reference."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    dist.init_process_group(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t0 = time.perf_counter()
    for name in args.lora.split(","):
        _lora_case(args.out.resolve() / name, LORA_CASES[name], rank, world)
        _log(rank, f"lora case {name} saved")
    if rank == 0:
        (args.out / "run_info.json").write_text(json.dumps({"lora": args.lora, "fingerprint": source_fingerprint(),
                                                            "seconds": time.perf_counter() - t0}))
        (args.out / "COMPLETE").write_text("ok\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _lora_case(root: Path, case: dict, rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, TaskType, get_peft_model
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager
    from verl.utils.fsdp_utils import apply_fsdp2

    from ckpt_bridge.testing.tiny_models import save_tiny_hf

    base = root / "base_model"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        save_tiny_hf(base, case["model"], seed=SEED)
    dist.barrier()
    torch.manual_seed(SEED)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, bias="none", **case["lora"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), config)
    if case.get("init_adapter") and rank == 0:
        model.save_pretrained(str(root / "init_adapter"))  # what verl's lora_adapter_path would point at
    model.train()
    apply_fsdp2(model, {"mesh": init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",)),
                        "reshard_after_forward": True}, {})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    manager = FSDPCheckpointManager(
        model=model, optimizer=optimizer, lr_scheduler=None, processing_class=AutoTokenizer.from_pretrained(str(base)),
        checkpoint_config={"save_contents": ["model", "optimizer", "extra"], "load_contents": ["model"],
                           "async_save": False, "save_lora_only": bool(case.get("save_lora_only"))})
    torch.manual_seed(DATA_SEED + rank)
    for _ in range(LORA_STEPS):
        tokens = torch.randint(0, model.config.vocab_size, (BATCH, SEQ))
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    manager.save_checkpoint(local_path=str(root / f"global_step_{LORA_STEPS}" / "actor"), hdfs_path=None,
                            global_step=LORA_STEPS, max_ckpt_to_keep=None)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        ref = root / "reference"
        ref.mkdir(parents=True, exist_ok=True)
        seen: set[int] = set()
        to_save = {}
        for k, v in full.items():  # safetensors refuses shared storage (tied weights): clones
            v = v.detach()
            to_save[k] = (v.clone() if v.untyped_storage().data_ptr() in seen else v).contiguous()
            seen.add(v.untyped_storage().data_ptr())
        save_file(to_save, str(ref / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(ref / "peft_config"))
        # logits of the live (unmerged) PEFT model: a fresh unsharded copy holding the full state dict
        with torch.random.fork_rng(devices=[]):
            fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), config)
        fresh.load_state_dict(full, strict=True)
        fresh.eval()
        gen = torch.Generator()
        gen.manual_seed(REF_TOKENS_SEED)
        tokens = torch.randint(0, fresh.config.vocab_size, (REF_BATCH, REF_SEQ), generator=gen)
        with torch.no_grad():
            torch.save({"tokens": tokens, "logits": fresh(input_ids=tokens).logits}, ref / "logits.pt")
    dist.barrier()


if __name__ == "__main__":
    sys.exit(main())
