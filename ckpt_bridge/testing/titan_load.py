"""The trainer's bootstrap flow, run for real under whatever TorchTitan era is importable, with results as JSON.

    torchrun --nproc_per_node=2 --master_addr=127.0.0.1 -m ckpt_bridge.testing.titan_load \\
        --hf HF_DIR --aux future_predictor --aux action_layer:linear:16 --cache CACHE --out result.json
    python -m ckpt_bridge.testing.titan_load --hf HF_DIR ...        # 1 rank, no process group

Each rank: a config of the installed era built by its own parser
(``titan_eras.new_config``) -> ``set_initial_load`` (rank 0 converts, the
others wait; step-0 eras get the seed placed under the dump folder) -> build
the HF model class on the meta device plus the aux modules -> under torchrun
``fully_shard`` every decoder layer and the root (FSDP2, gloo) -> ``to_empty``
-> that era's own ``CheckpointManager`` (``titan_eras.build_manager``)
``.load(step=checkpoint.load_step)``, as its trainer calls it -> loss on the
corpus *before* ``after_load`` (rotary inv_freq is whatever ``to_empty`` left)
-> ``after_load`` -> loss again.  Rank 0 gathers the full state dict and
compares every tensor with the HF files and the aux modules' seeded init
(torch.equal), and computes the HF model's own loss with ``from_pretrained``.
Nothing here re-implements a load path.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def _compare(full: dict[str, torch.Tensor], hf: str, aux: list[str], seed: int) -> dict[str, Any]:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from ckpt_bridge.plan.aux_modules import as_specs, init_aux
    from ckpt_bridge.formats.hf import weight_files

    cfg = AutoConfig.from_pretrained(hf)
    _, files = weight_files(Path(hf))
    hf_sd = {}
    for f in files:
        hf_sd.update(load_file(f))
    aux_sd = {}
    for s in as_specs(aux):
        module, _ = init_aux(s, cfg, seed)
        aux_sd.update({f"{s.name}.{k}": v for k, v in module.state_dict().items()})
    want = {**hf_sd, **aux_sd}
    return {"keys_in_model": len(full),
            "equal": sorted(k for k in want if k in full and torch.equal(full[k], want[k])),
            "different": sorted(k for k in want if k in full and not torch.equal(full[k], want[k])),
            "not_in_model": sorted(set(want) - set(full)), "not_in_source": sorted(set(full) - set(want)),
            "aux_keys": sorted(aux_sd)}


def _dump_folder(distributed: bool) -> str:
    """One fresh dump folder for every rank: nothing to resume from."""
    box = [tempfile.mkdtemp(prefix="titan-load-") if not distributed or dist.get_rank() == 0 else None]
    if distributed:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def run(hf: str, aux: list[str], seed: int, cache: str, max_tokens: int = 1024) -> dict[str, Any]:
    """The flow above on this process (distributed when a process group is up); rank 0's dict has the checks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ckpt_bridge.plan.aux_modules import attach_aux
    from ckpt_bridge.integrations.torchtitan import after_load, set_initial_load
    from ckpt_bridge.checks.loss import text_loss
    from ckpt_bridge.testing.tiny_olmo2 import corpus_text
    from ckpt_bridge.models.titan_eras import build_manager, installed_era, new_config

    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    cfg = AutoConfig.from_pretrained(hf)
    dump = _dump_folder(distributed)
    config = new_config(dump)  # the era's own config object, as its trainer builds it
    section = getattr(config, "checkpoint", config)
    dcp_dir = set_initial_load(config, hf, aux=aux, seed=seed, cache_dir=cache)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    attach_aux(model, aux, cfg)
    if distributed:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    model.to_empty(device="cpu")
    mgr = build_manager([model], config, dump)
    loaded = mgr.load(step=getattr(section, "load_step", -1))  # the trainers all call load(step=load_step)

    tok = AutoTokenizer.from_pretrained(hf)
    text = corpus_text()
    model.eval()
    loss_before = text_loss(model, tok, text, max_tokens=max_tokens)
    report = after_load(model, hf)
    loss_after = text_loss(model, tok, text, max_tokens=max_tokens)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    era = installed_era() if rank == 0 else None  # a stand-in model: no collective on the sharded one
    result = {"world": world, "loaded": loaded, "dcp": str(dcp_dir), "dump": dump, "era": era and era.name,
              "era_layout": era and era.layout, "era_how": era and era.how, "config_type": type(config).__module__,
              "initial_load_path": getattr(section, "initial_load_path", None),
              "load_step": getattr(section, "load_step", None),
              "loss_before_after_load": loss_before, "loss_after_load": loss_after,
              "recomputed": report.recomputed, "config_checked": report.checked}
    if rank == 0:
        result.update(_compare(full, hf, aux, seed))
        hf_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        result["loss_hf"] = text_loss(hf_model, tok, text, max_tokens=max_tokens)
    mgr.close()
    return result


def load_cases(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """``--cases FILE``: existing DCP folders, each loaded model-only by torchtitan's own ``CheckpointManager``
    (initial_load_path = the folder) into the HF class of ``hf`` plus the aux modules ``aux`` (``attach_aux``
    specs), every decoder layer and the root ``fully_shard``-ed under torchrun.  Rank 0 compares the gathered
    full state dict with ``hf``'s files (``aux_modules.safetensors`` included: the aux modules it holds) and the
    ``fresh`` specs' seeded init.  One job for many sources: {case name: checks}."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torchtitan.components.checkpoint import CheckpointManager
    from transformers import AutoConfig, AutoModelForCausalLM

    from ckpt_bridge.formats.hf import AUX_FILE
    from ckpt_bridge.plan.aux_modules import as_specs, attach_aux, init_aux
    from ckpt_bridge.plan.planner import canonical_key

    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    out = {}
    for case in cases:
        cfg = AutoConfig.from_pretrained(case["hf"])
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        attach_aux(model, case["aux"], cfg)
        if distributed:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        model.to_empty(device="cpu")
        with torch.no_grad():  # nothing may survive the load
            for p in model.parameters():
                p.fill_(7.0)
        dump = _dump_folder(distributed)
        mc = CheckpointManager.Config(enable=True, folder="checkpoint", keep_latest_k=0,
                                      initial_load_path=str(Path(case["dcp"]).absolute()), initial_load_model_only=True)
        mgr = CheckpointManager(mc, dataloader=None, model_parts=[model], optimizers=None, lr_schedulers=None,
                                states={}, sd_adapter=None, base_folder=dump)
        loaded = mgr.load()
        mgr.close()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            from ckpt_bridge.formats.hf import weight_files

            want = {}
            for f in weight_files(Path(case["hf"]))[1]:
                want.update(load_file(f))
            aux_file = Path(case["hf"]) / f"{AUX_FILE}.safetensors"
            if aux_file.is_file():
                want.update(load_file(aux_file))
            for s in as_specs(case.get("fresh", [])):
                module, _ = init_aux(s, cfg, case.get("seed", 0))
                want.update({f"{s.name}.{k}": v for k, v in module.state_dict().items()})
            got = {canonical_key(k): v for k, v in full.items()}
            if cfg.tie_word_embeddings and "lm_head.weight" not in want:
                want["lm_head.weight"] = want["model.embed_tokens.weight"]
            out[case["name"]] = {
                "loaded": loaded, "keys_in_model": len(got),
                "equal": sorted(k for k in want if k in got and torch.equal(got[k], want[k].float())),
                "different": sorted(k for k in want if k in got and not torch.equal(got[k], want[k].float())),
                "not_in_model": sorted(set(want) - set(got)), "not_in_source": sorted(set(got) - set(want))}
            import shutil

            shutil.rmtree(dump, ignore_errors=True)
        if distributed:
            dist.barrier()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", help="a JSON list of {name, dcp, hf, aux, fresh, seed}: load each existing DCP "
                    "(load_cases); --hf / --cache are then not used")
    ap.add_argument("--hf")
    ap.add_argument("--aux", action="append", default=[])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-tokens", type=int, default=1024)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    distributed = "WORLD_SIZE" in os.environ  # under torchrun; plain python is the 1-rank trainer
    if distributed:
        dist.init_process_group("gloo")
    torch.manual_seed(1234 + (dist.get_rank() if distributed else 0))  # to_empty's memory is not ours to predict
    if args.cases:
        result = load_cases(json.loads(Path(args.cases).read_text()))
        if not distributed or dist.get_rank() == 0:
            Path(args.out).write_text(json.dumps(result, indent=2))
        if distributed:
            dist.barrier()
            dist.destroy_process_group()
        return
    result = run(args.hf, args.aux, args.seed, args.cache, args.max_tokens)
    if not distributed or dist.get_rank() == 0:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.out)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    if not distributed or int(os.environ.get("RANK", "0")) == 0:
        import shutil

        shutil.rmtree(result["dump"], ignore_errors=True)  # ours (mkdtemp); the seed in it is hard links


if __name__ == "__main__":
    main()
