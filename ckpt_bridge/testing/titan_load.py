"""torchrun entry: the trainer's bootstrap flow, run for real, with results as JSON.

    torchrun --nproc_per_node=2 --master_addr=127.0.0.1 -m ckpt_bridge.testing.titan_load \\
        --hf HF_DIR --aux future_predictor --aux action_layer:linear:16 --cache CACHE --out result.json

Each rank: ``set_initial_load`` (rank 0 converts, the others wait) -> build the
HF model class on the meta device plus the aux modules -> ``fully_shard``
every decoder layer and the root (FSDP2, gloo) -> ``to_empty`` -> torchtitan
0.3.0's own ``CheckpointManager.load()`` (initial_load_path, model only) ->
loss on the corpus *before* ``after_load`` (rotary inv_freq is whatever
``to_empty`` left) -> ``after_load`` -> loss again.  Rank 0 gathers the full
state dict and compares every tensor with the HF files and the aux modules'
seeded init (torch.equal), and computes the HF model's own loss with
``from_pretrained``.  Nothing here re-implements a load path.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--aux", action="append", default=[])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-tokens", type=int, default=1024)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1234 + rank)  # to_empty's memory is not ours to predict; rng only for completeness

    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torchtitan.components.checkpoint import CheckpointManager
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ckpt_bridge.auxiliary import as_specs, attach_aux, init_aux
    from ckpt_bridge.formats.hf import weight_files
    from ckpt_bridge.integrations.torchtitan import after_load, set_initial_load
    from ckpt_bridge.loss import text_loss
    from ckpt_bridge.testing.tiny_olmo2 import corpus_text

    cfg = AutoConfig.from_pretrained(args.hf)
    ck_config = CheckpointManager.Config(enable=True, folder="checkpoint", keep_latest_k=0,
                                         initial_load_model_only=False)  # set_initial_load turns it on
    dcp_dir = set_initial_load(ck_config, args.hf, aux=args.aux, seed=args.seed, cache_dir=args.cache)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    attach_aux(model, args.aux, cfg)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")

    dump = tempfile.mkdtemp(prefix="titan-load-") if rank == 0 else None
    box = [dump]
    dist.broadcast_object_list(box, src=0)  # one fresh dump folder for every rank: nothing to resume from
    mgr = CheckpointManager(ck_config, dataloader=None, model_parts=[model], optimizers=None, lr_schedulers=None,
                            states={}, sd_adapter=None, base_folder=box[0])
    loaded = mgr.load()

    tok = AutoTokenizer.from_pretrained(args.hf)
    text = corpus_text()
    model.eval()
    loss_before = text_loss(model, tok, text, max_tokens=args.max_tokens)
    report = after_load(model, args.hf)
    loss_after = text_loss(model, tok, text, max_tokens=args.max_tokens)

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    result = {"world": world, "loaded": loaded, "dcp": str(dcp_dir), "initial_load_path": ck_config.initial_load_path,
              "loss_before_after_load": loss_before, "loss_after_load": loss_after,
              "recomputed": report.recomputed, "config_checked": report.checked}
    if rank == 0:
        _, files = weight_files(Path(args.hf))
        hf_sd = {}
        for f in files:
            hf_sd.update(load_file(f))
        aux_sd = {}
        for s in as_specs(args.aux):
            module, _ = init_aux(s, cfg, args.seed)
            aux_sd.update({f"{s.name}.{k}": v for k, v in module.state_dict().items()})
        want = {**hf_sd, **aux_sd}
        result["keys_in_model"] = len(full)
        result["equal"] = sorted(k for k in want if k in full and torch.equal(full[k], want[k]))
        result["different"] = sorted(k for k in want if k in full and not torch.equal(full[k], want[k]))
        result["not_in_model"] = sorted(set(want) - set(full))
        result["not_in_source"] = sorted(set(full) - set(want))
        result["aux_keys"] = sorted(aux_sd)
        hf_model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
        result["loss_hf"] = text_loss(hf_model, tok, text, max_tokens=args.max_tokens)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.out)
    mgr.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
