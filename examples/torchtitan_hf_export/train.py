"""TorchTitan training on CPU (FSDP2, gloo) whose every checkpoint save also writes a Hugging Face export.

    torchrun --nproc_per_node=2 --master_addr=127.0.0.1 examples/torchtitan_hf_export/train.py \\
        --hf HF_DIR --dump RUN_DIR [--steps 10 --interval 5]

The one ckpt-bridge line is ``attach(manager, HFExport(hf_config=HF_DIR))``: after each save every rank
stores its rng state next to the DCP files (torchtitan saves none), and rank 0 waits for the save and runs
``ckpt-bridge to-hf`` in a background process into ``RUN_DIR/checkpoint/hf/step-N``: the merged weights,
the aux head in ``aux_modules.safetensors``, and extra_state_merged.pt / trainer_state.json with the
lr_scheduler and every rank's rng.  Training never waits for it and never sees its errors.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf", required=True)
    ap.add_argument("--dump", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--interval", type=int, default=5)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)

    from torch.distributed.fsdp import fully_shard
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
    from torchtitan.components.optimizer.optimizer import ParamGroupConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    from ckpt_bridge.plan.aux_modules import attach_aux
    from ckpt_bridge.integrations.torchtitan import HFExport, after_load, attach, set_initial_load

    hf = os.path.abspath(args.hf)
    aux = ["future_predictor"]
    ck = CheckpointManager.Config(enable=True, folder="checkpoint", interval=args.interval, keep_latest_k=0,
                                  initial_load_model_only=False, last_save_model_only=False)
    set_initial_load(ck, hf, aux=aux, cache_dir=os.path.join(args.dump, "bootstrap"))
    cfg = AutoConfig.from_pretrained(hf)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    attach_aux(model, aux, cfg)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    opt = OptimizersContainer(
        OptimizersContainer.Config(implementation="for-loop", param_groups=[
            ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3})]),
        model_parts=[model])  # fmt: skip
    sched = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=opt, training_steps=args.steps)
    mgr = CheckpointManager(ck, dataloader=None, model_parts=[model], optimizers=opt, lr_schedulers=sched,
                            states={}, sd_adapter=None, base_folder=args.dump)
    mgr.load()
    after_load(model, hf)

    hook = attach(mgr, HFExport(hf_config=hf))  # <- every save also exports

    for step in range(1, args.steps + 1):
        ids = torch.randint(0, cfg.vocab_size, (2, 32))
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        h = out.hidden_states[-1]
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + \
            F.mse_loss(model.future_predictor(h[:, :-1]), h[:, 1:].detach())
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        mgr.save(step, last_step=(step == args.steps))
        if rank == 0:
            print(f"step {step:3d}  loss {float(loss):.4f}", flush=True)

    results = hook.wait()  # only the end of the run waits for the exports
    hook.close()
    mgr.close()
    if rank == 0:
        for r in results:
            print(f"export step {r.step}: {'ok' if r.ok else 'FAILED'} {r.out} ({r.seconds:.1f}s) {r.message}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
