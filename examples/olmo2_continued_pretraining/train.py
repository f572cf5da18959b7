"""Continued pretraining of a (tiny) OLMo-2 from its Hugging Face weights, flame-style, on CPU.

    torchrun --nproc_per_node=2 --master_addr=127.0.0.1 examples/olmo2_continued_pretraining/train.py \\
        --hf HF_DIR --dump RUN_DIR [--steps 20]

What a flame/torchtitan trainer does, in ~100 lines, with the two ckpt-bridge calls it needs:

1. ``set_initial_load(checkpoint_config, HF_DIR, aux=...)``: rank 0 converts the HF model once (cached)
   into the DCP layout the installed torchtitan requests, with the aux heads freshly initialised, and
   points ``checkpoint.initial_load_path`` at it (model only).
2. Build the HF model class on the meta device, attach the same aux heads, ``fully_shard`` (FSDP2),
   ``to_empty``, then torchtitan's own ``CheckpointManager.load()``.
3. ``after_load(model, HF_DIR)``: rotary ``inv_freq`` is in no checkpoint and ``to_empty`` left it as
   garbage; this recomputes it and refuses a config that differs from the HF one.
4. Train (LM loss + the aux heads' losses), save with the CheckpointManager.

Rank 0 prints the first-step LM loss next to the HF model's loss on the same batch: they must match.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

AUX = ["future_predictor", "action_layer:linear:16"]  # predicts h[t+1]; classifies the next byte mod 16


def batches(tokens: torch.Tensor, seq_len: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)  # every rank draws the same windows, then takes its slice
    while True:
        starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch,), generator=g)
        yield tokens[starts[:, None] + torch.arange(seq_len)]


def losses(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    h = out.hidden_states[-1]
    future = F.mse_loss(model.future_predictor(h[:, :-1]), h[:, 1:].detach())
    action = F.cross_entropy(model.action_layer(h[:, :-1]).flatten(0, 1), (ids[:, 1:] % 16).flatten())
    return lm, future + action


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf", required=True, help="Hugging Face model dir (config, weights, tokenizer)")
    ap.add_argument("--dump", required=True, help="run directory (checkpoints under DUMP/checkpoint)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="global batch (split over ranks)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    from torch.distributed.fsdp import fully_shard
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
    from torchtitan.components.optimizer.optimizer import ParamGroupConfig
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ckpt_bridge.plan.aux_modules import attach_aux
    from ckpt_bridge.integrations.torchtitan import after_load, set_initial_load

    hf_dir = os.path.abspath(args.hf)
    ck_cfg = CheckpointManager.Config(enable=True, folder="checkpoint", interval=10, keep_latest_k=0,
                                      initial_load_model_only=False, last_save_model_only=False)
    dcp_dir = set_initial_load(ck_cfg, hf_dir, aux=AUX, cache_dir=os.path.join(args.dump, "bootstrap-cache"))

    # The trainer's model: HF class from the HF config (never a hand-built config), aux heads, FSDP2.
    cfg = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    attach_aux(model, AUX, cfg)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")

    opt = OptimizersContainer(
        OptimizersContainer.Config(implementation="for-loop", param_groups=[
            ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 3e-4, "weight_decay": 0.0})
        ]),
        model_parts=[model],
    )  # fmt: skip
    sched = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=opt, training_steps=args.steps)
    mgr = CheckpointManager(ck_cfg, dataloader=None, model_parts=[model], optimizers=opt, lr_schedulers=sched,
                            states={}, sd_adapter=None, base_folder=args.dump)
    mgr.load()  # a fresh run: the initial load (model only) from dcp_dir; a restart: the latest step
    report = after_load(model, hf_dir)

    tok = AutoTokenizer.from_pretrained(hf_dir)
    from ckpt_bridge.testing.tiny_olmo2 import corpus_text

    tokens = torch.tensor(tok(corpus_text(), add_special_tokens=False)["input_ids"])
    per_rank = args.batch // world
    stream = batches(tokens, args.seq_len, args.batch, seed=0)
    model.train()
    first = None
    for step in range(1, args.steps + 1):
        ids = next(stream)
        mine = ids[rank * per_rank:(rank + 1) * per_rank]
        lm, aux = losses(model, mine)
        (lm + 0.1 * aux).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        lm_all = lm.detach().clone()
        dist.all_reduce(lm_all)
        lm_all /= world
        if step == 1:
            first = (ids, float(lm_all))
        if rank == 0 and (step == 1 or step % 5 == 0):
            print(f"step {step:3d}  lm loss {float(lm_all):.4f}  aux loss {float(aux):.4f}", flush=True)
        mgr.save(step, last_step=(step == args.steps))
    mgr.close()

    if rank == 0:
        # The HF model itself, from_pretrained, on the same first batch (each rank's slice, averaged).
        ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        ids, lm_first = first
        with torch.no_grad():
            parts = [F.cross_entropy(ref(input_ids=ids[r * per_rank:(r + 1) * per_rank]).logits[:, :-1]
                                     .flatten(0, 1).float(), ids[r * per_rank:(r + 1) * per_rank, 1:].flatten())
                     for r in range(world)]
        hf_loss = float(sum(parts) / world)
        print(f"bootstrap checkpoint: {dcp_dir}")
        print("after_load: " + "; ".join(report.lines()))
        print(f"first-step loss  trainer {lm_first:.6f}   HF model {hf_loss:.6f}   |diff| "
              f"{abs(lm_first - hf_loss):.1e}")
        print(f"checkpoints: {sorted(os.listdir(os.path.join(args.dump, 'checkpoint')))}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
