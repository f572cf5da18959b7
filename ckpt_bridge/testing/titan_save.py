"""A small real TorchTitan training run with the ckpt-bridge save hook attached, recording what the
exports must equal.  Runs under torchrun (any world size) or in-process on a 1-process group.

    torchrun --nproc_per_node=2 --master_addr=127.0.0.1 -m ckpt_bridge.testing.titan_save \\
        --hf HF_DIR --dump RUN_DIR --out result.json [--steps 4 --interval 2 --async-mode disabled]

Per step, every rank first draws (python, numpy, torch) random numbers, then takes a batch with the
global torch rng (so rng state matters), trains (LM + an aux head), steps torchtitan's optimizer and lr
scheduler containers, and calls ``CheckpointManager.save``.  At each save, rank 0 writes the live
model's full state dict to ``RUN_DIR/reference/step-N.safetensors``.  The result JSON has every rank's
draws per step and the lr after each step: the exported rng state must reproduce the draws of the step
after the save, and a scheduler restored from the export the lr of that step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

AUX = ["future_predictor"]


def draws() -> list:
    return [random.random(), float(np.random.rand()), torch.rand(3).tolist()]


def run(hf: str, dump: str, *, steps: int = 4, interval: int = 2, async_mode: str = "disabled",
        export_config: str | None = None, keep_latest_k: int = 0, aux: list[str] | None = None,
        loss_tokens: int = 0) -> dict:
    """Train ``steps`` steps from ``hf`` with the save hook; ``aux`` heads (the first is trained as a
    next-hidden-state predictor).  ``loss_tokens > 0``: before the first step, the loaded model's loss on
    the shipped corpus and (rank 0) the HF model's own loss on the same tokens are recorded."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
    from torchtitan.components.optimizer.optimizer import ParamGroupConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    from ckpt_bridge.plan.aux_modules import attach_aux
    from ckpt_bridge.integrations.torchtitan import HFExport, after_load, attach, set_initial_load

    aux = list(aux or AUX)
    rank, world = dist.get_rank(), dist.get_world_size()
    random.seed(100 + rank)
    np.random.seed(200 + rank)
    torch.manual_seed(300 + rank)
    cfg = AutoConfig.from_pretrained(hf)
    boot = CheckpointManager.Config(enable=True, initial_load_model_only=False)
    set_initial_load(boot, hf, aux=aux, cache_dir=os.path.join(dump, "bootstrap"))
    ck = CheckpointManager.Config(enable=True, folder="checkpoint", interval=interval, keep_latest_k=keep_latest_k,
                                  async_mode=async_mode, last_save_model_only=False,
                                  initial_load_path=boot.initial_load_path, initial_load_model_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    attach_aux(model, aux, cfg)
    if world > 1:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    model.to_empty(device="cpu")
    opt = OptimizersContainer(
        OptimizersContainer.Config(implementation="for-loop", param_groups=[
            ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3})]),
        model_parts=[model])  # fmt: skip
    sched = LRSchedulersContainer.Config(warmup_steps=2, decay_type="cosine").build(optimizers=opt,
                                                                                   training_steps=steps + 2)
    mgr = CheckpointManager(ck, dataloader=None, model_parts=[model], optimizers=opt, lr_schedulers=sched,
                            states={}, sd_adapter=None, base_folder=dump)
    mgr.load()
    after_load(model, hf)
    hook = attach(mgr, HFExport(hf_config=export_config or hf))

    rec: dict = {"rank": rank, "world": world, "draws": {}, "lr_after_step": {}, "saved": []}
    if loss_tokens:
        rec.update(_first_step_losses(model, hf, loss_tokens, rank))
    for step in range(1, steps + 1):
        rec["draws"][step] = draws()
        ids = torch.randint(0, cfg.vocab_size, (2, 16))  # the global torch rng picks the batch
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        h = out.hidden_states[-1]
        head = getattr(model, aux[0].split(":", 1)[0])
        aux_loss = F.mse_loss(head(h[:, :-1]), h[:, 1:].detach())
        (lm + aux_loss).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        rec["lr_after_step"][step] = opt.optimizers[0].param_groups[0]["lr"]
        last = step == steps
        saved_step = step % interval == 0 or last
        if saved_step:
            # the model as it is at this save, gathered from the shards (every rank takes part)
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                ref = Path(dump) / "reference"
                ref.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in full.items()}, str(ref / f"step-{step}.safetensors"))
        if mgr.save(step, last_step=last):
            rec["saved"].append(step)
    rec["draws"][steps + 1] = draws()
    sched.step()  # what the next step's lr would be, for the restore check of the last save
    rec["lr_after_step"][steps + 1] = opt.optimizers[0].param_groups[0]["lr"]
    mgr.maybe_wait_for_saving()
    results = hook.wait()
    hook.close()
    mgr.close()
    rec["exports"] = [r.__dict__ for r in results]
    rec["folder"] = str(mgr.folder)
    return rec


def _first_step_losses(model, hf: str, max_tokens: int, rank: int) -> dict:
    """The loaded model's loss on the shipped corpus (every rank takes part) and the HF model's own."""
    from transformers import AutoTokenizer

    from ckpt_bridge.checks.loss import text_loss
    from ckpt_bridge.testing.tiny_models import model_class
    from ckpt_bridge.testing.tiny_olmo2 import corpus_text

    tok = AutoTokenizer.from_pretrained(hf)
    out = {"loss_loaded": text_loss(model, tok, corpus_text(), max_tokens=max_tokens)}
    model.train()
    if rank == 0:
        ref = model_class(model.config).from_pretrained(hf, dtype=torch.float32)
        out["loss_hf"] = text_loss(ref, tok, corpus_text(), max_tokens=max_tokens)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--dump", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--interval", type=int, default=2)
    ap.add_argument("--async-mode", default="disabled")
    ap.add_argument("--aux", action="append", help="aux head spec (repeatable; default future_predictor)")
    ap.add_argument("--loss-tokens", type=int, default=0, help="record the first-step loss vs the HF model's")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    rec = run(args.hf, args.dump, steps=args.steps, interval=args.interval, async_mode=args.async_mode,
              aux=args.aux, loss_tokens=args.loss_tokens)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, rec)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(every, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
