#!/usr/bin/env python
"""Benchmark (issues 17, 20): a verl Megatron checkpoint (megatron-core dist_ckpt, fp32, TP2) of the
Llama-3.2-1B shape -> Hugging Face (bf16), against the I/O floor.  Not a test.  Run from the repo root:

    .venv/bin/python bench/bench_megatron.py [--size 1b|...] [--repeat N] [--layers K] [--workdir DIR]

Per size, in WORKDIR/<size>/megatron/:

1. Builds (once; reused while .bench_complete matches the size) the checkpoint with the test-only producer
   ``ckpt_bridge.testing.megatron_save`` (needs megatron-core, test-only in requirements.lock): megatron-core's
   own ``GPTModel`` (local spec, CPU) at TP=2 on 2 gloo ranks under torchrun, each rank's parameters filled
   from a generator seeded by (name, rank) (no HF model is built: at 1.24B one per rank would not fit next to
   the Megatron model), saved by verl 0.9.1's own ``MegatronCheckpointManager`` (``use_dist_checkpointing=True``,
   contents model + extra): ``global_step_1/actor`` in verl's schema v2.
2. Measures, one after the other, each as a child (the same measurement as bench_verl_to_hf.py: wall, user /
   sys CPU, peak RSS, faults, context switches from ``os.wait4``; inputs warmed with ``cat``, then ``sync``):
     cb           ckpt-bridge to-hf ACTOR --config BASE --out OUT --dtype bf16 --quiet   (python -m ckpt_bridge;
                  BASE = the config + tokenizer dir the run started from: without "hf_model" in its save
                  contents or a bridge, verl writes no config.json)
     cb_w2        the same with --workers 2; its output must be byte-identical to cb's
     floor        read every .distcp file of model/dist_ckpt, write as many bytes as cb's safetensors
     floor_flush  the same, then one fsync (context)
     startup      `python -c "import torch, safetensors.torch"` (context)
   verl's own Megatron merger (``python -m verl.model_merger merge --backend megatron``) is not run: it needs
   GPUs and an NCCL process group (it rebuilds the model at TP=1 and lets dist_checkpointing.load reshard) and
   always writes bf16.  The report says so in the peer row.
3. Sanity (first round): ``model.embed_tokens.weight``, ``model.norm.weight`` and layer 0's ``down_proj`` of cb's
   output equal, in bf16, the global tensors ``embedding.word_embeddings.weight``,
   ``decoder.final_layernorm.weight`` and ``decoder.layers.mlp.linear_fc2.weight[0]`` that torch's own DCP
   loader reads from the dist_ckpt (the exact mapping is proven by the tests; this only catches a broken run).

Written to WORKDIR/results_megatron.md.  The parent imports only the standard library and bench/common.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_verl_to_hf as V  # noqa: E402 - stdlib only at import time
import common as C  # noqa: E402

ME = str(Path(__file__).resolve())
TP = 2
LABELS = {
    "cb": "ckpt-bridge to-hf --dtype bf16",
    "cb_w2": "ckpt-bridge to-hf --dtype bf16 --workers 2",
    "floor": "floor (read the .distcp files, write cb's bytes)",
    "floor_flush": "floor + one flush (fsync at the end)",
    "startup": "(reference) `python -c 'import torch, safetensors.torch'`",
}
NO_PEER = ("not run: verl's Megatron merger needs GPUs and an NCCL process group (it rebuilds the model at TP=1 "
           "and reshards through megatron-core's dist_checkpointing.load) and always writes bf16")


# ------------------------------------------------------------------------------------------------
# 1. checkpoint build (under torchrun, TP ranks)
# ------------------------------------------------------------------------------------------------


def rank_build(root: str, preset: str, config_json: str) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from ckpt_bridge.testing import megatron_save as M
    from ckpt_bridge.testing.tiny_models import build_config, generation_config_for, save_tiny_tokenizer

    from verl.utils.checkpoint.megatron_checkpoint_manager import MegatronCheckpointManager

    torch.set_num_threads(1)
    M._cpu_stand_ins()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    t0 = time.perf_counter()
    base = Path(root) / "base_model"  # config + tokenizer only: verl copies them into model/huggingface
    cfg = C.apply_config(build_config(preset), config_json)
    if rank == 0:
        cfg.save_pretrained(base)
        generation_config_for(cfg).save_pretrained(base)
        save_tiny_tokenizer(base)
    dist.barrier()
    ps.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    tf_config = M.transformer_config(cfg, dist.get_world_size(), 1, 1)
    tf_config.perform_initialization = False  # filled below, shard by shard (no full master weight per rank)
    model = M.build_megatron(cfg, tf_config)
    n_local = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}|{rank}".encode()))
            p.normal_(mean=0.0, std=0.02, generator=g)
            n_local += p.numel()
    t_init = time.perf_counter() - t0
    contents = ["model", "extra"]
    manager = MegatronCheckpointManager(
        config=OmegaConf.create({"model": {"path": str(base)}, "megatron": {}}),
        checkpoint_config=OmegaConf.create({"save_contents": contents, "load_contents": contents,
                                            "async_save": False}),
        model_config=cfg, transformer_config=tf_config, role="actor", model=[model], arch=cfg.architectures[0],
        hf_config=cfg, param_dtype=torch.float32, share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        processing_class=AutoTokenizer.from_pretrained(base), optimizer=None, optimizer_scheduler=None,
        use_distributed_optimizer=False, use_dist_checkpointing=True, bridge=None)
    t1 = time.perf_counter()
    manager.save_checkpoint(str(Path(root) / "global_step_1" / "actor"), global_step=1)
    dist.barrier()
    if rank == 0:
        print(f"[build] rank0: {n_local / 1e6:.1f}M local params, init {t_init:.1f}s, "
              f"save {time.perf_counter() - t1:.1f}s", flush=True)
    dist.destroy_process_group()


def actor_dir(size: C.Size) -> Path:
    return size.dir / "megatron" / "global_step_1" / "actor"


def distcp_files(size: C.Size) -> list[Path]:
    return sorted((actor_dir(size) / "model" / "dist_ckpt").glob("*.distcp"))


def ensure_checkpoint(size: C.Size) -> dict | None:
    """The size's Megatron checkpoint: reused if its marker matches, else built.  None: not enough disk."""
    root, actor = size.dir / "megatron", actor_dir(size)
    marker = root / ".bench_complete"
    want = {"preset": size.preset, "layers": size.layers, "config": size.config_json(), "tp": TP}
    if marker.exists():
        info = json.loads(marker.read_text())
        if {k: info.get(k) for k in want} == want and (actor / "ckpt_contents.json").is_file():
            return {**info, "reused": True}
        print("[build] marker does not match or checkpoint incomplete; rebuilding", flush=True)
    C.rm(root)
    if not C.disk_ok(size.dir, size.est_fp32_bytes(), f"Megatron build of {size.tag}"):
        return None
    root.mkdir(parents=True)
    cmd = [V.TORCHRUN, f"--nproc_per_node={TP}", "--master_addr=127.0.0.1", f"--master_port={V._free_port()}",
           ME, "--_build-rank", str(root), size.preset, size.config_json()]
    print(f"[build] TP{TP} megatron-core GPTModel, verl MegatronCheckpointManager save of {size.describe()} -> "
          f"{actor}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1", VERL_LOGGING_LEVEL="WARNING",
                                          OMP_NUM_THREADS="1"), cwd=C.REPO)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"[build] torchrun failed with exit code {os.waitstatus_to_exitcode(status)}")
    if not (actor / "ckpt_contents.json").is_file():
        raise SystemExit(f"[build] checkpoint incomplete in {actor}: no ckpt_contents.json")
    info = {**want, "build_wall_s": wall, "build_max_rank_rss_kib": ru.ru_maxrss,
            "ckpt_bytes": sum(f.stat().st_size for f in actor.rglob("*") if f.is_file()),
            "model_files_bytes": sum(f.stat().st_size for f in distcp_files(size)),
            "built_at": datetime.datetime.now().isoformat(timespec="seconds")}
    marker.write_text(json.dumps(info, indent=2))
    return {**info, "reused": False}


def build_line(size: C.Size, info: dict) -> str:
    return (f"checkpoint {size.tag}: {size.describe()}, {actor_dir(size)} ({info['ckpt_bytes'] / 1e9:.2f} GB on disk, "
            f"megatron-core dist_ckpt, TP{TP}, fp32); " + ("reused, " if info["reused"] else "")
            + f"built in {info['build_wall_s']:.1f} s ({TP}-rank torchrun, max per-process RSS "
            f"{C.gb_kib(info['build_max_rank_rss_kib']):.2f} GB) at {info['built_at']}")


# ------------------------------------------------------------------------------------------------
# sanity (child: torch)
# ------------------------------------------------------------------------------------------------

SANITY = {"model.embed_tokens.weight": ("embedding.word_embeddings.weight", None),
          "model.norm.weight": ("decoder.final_layernorm.weight", None),
          "model.layers.0.mlp.down_proj.weight": ("decoder.layers.mlp.linear_fc2.weight", 0)}


def sanity(dist_ckpt: str, out: str) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open

    meta = dcp.FileSystemReader(dist_ckpt).read_metadata().state_dict_metadata
    want = {src: torch.empty(meta[src].size, dtype=meta[src].properties.dtype)
            for src, _ in SANITY.values() if src in meta}
    dcp.load(want, checkpoint_id=dist_ckpt, no_dist=True)  # torch's own loader reassembles the TP chunks
    where = {}
    for f in sorted(Path(out).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            where.update({k: f for k in h.keys()})
    res = {}
    for key, (src, layer) in SANITY.items():
        if src not in want or key not in where:
            res[key] = f"missing ({src} in dist_ckpt: {src in want}; {key} in output: {key in where})"
            continue
        ref = want[src] if layer is None else want[src][layer]
        with safe_open(str(where[key]), framework="pt") as h:
            got = h.get_tensor(key)
        res[key] = "equal" if got.dtype == torch.bfloat16 and torch.equal(got, ref.to(torch.bfloat16)) else \
            f"DIFFERENT ({got.dtype}{list(got.shape)} vs {list(ref.shape)})"
    print(json.dumps(res))


def run_sanity(dist_ckpt: Path, out: Path) -> str:
    p = subprocess.run([C.PY, ME, "--_sanity", str(dist_ckpt), str(out)], capture_output=True, text=True, cwd=C.REPO)
    if p.returncode != 0:
        line = f"check crashed: {p.stderr.strip().splitlines()[-1:]}"
    else:
        res = json.loads(p.stdout.strip().splitlines()[-1])
        line = ", ".join(f"{k} {v}" for k, v in res.items())
    line = f"cb's output vs torch DCP's load of the dist_ckpt (bf16): {line}"
    print("[sanity] " + line, flush=True)
    return line


# ------------------------------------------------------------------------------------------------
# 2. rounds (parent)
# ------------------------------------------------------------------------------------------------


def run_round(size: C.Size, first: bool, reps: dict, notes: dict) -> None:
    actor, logs = actor_dir(size), size.dir / "megatron-logs"
    inputs = distcp_files(size)
    out = {k: size.dir / f"out_megatron_{k}" for k in ("cb", "cb_w2")}
    floor_file = size.dir / "floor_megatron.bin"
    for p in [*out.values(), floor_file]:
        C.rm(p)

    def step(key: str, cmd: list[str], out_dir: Path | None) -> dict:
        r = C.measure(f"megatron_{key}", cmd, inputs, logs)
        r["out_bytes"] = C.weight_bytes(out_dir) if out_dir else 0
        r["out_files"] = len(C.weight_files(out_dir)) if out_dir else 0
        reps[key].append(r)
        return r

    # verl writes model/huggingface/config.json only with save_contents "hf_model" or a bridge (not its default):
    # the run's starting model dir is passed as --config, as a user does
    to_hf = [*C.CLI, "to-hf", str(actor), "--config", str(size.dir / "megatron" / "base_model"), "--dtype", "bf16",
             "--quiet", "--out"]
    cb = step("cb", to_hf + [str(out["cb"])], out["cb"])
    w2 = step("cb_w2", to_hf + [str(out["cb_w2"]), "--workers", "2"], out["cb_w2"])
    if first:
        notes["identity"] = C.compare_outputs(out["cb"], out["cb_w2"]) if C.ok(cb) and C.ok(w2) else None
        notes["sanity"] = run_sanity(actor / "model" / "dist_ckpt", out["cb"]) if C.ok(cb) else "skipped (cb failed)"
    C.rm(out["cb_w2"])
    C.rm(out["cb"])
    C.floor_rows(step, cb["out_bytes"] or sum(f.stat().st_size for f in inputs) // 2, floor_file, inputs)


def bench_size(size: C.Size, args) -> dict | None:
    info = ensure_checkpoint(size)
    if info is None:
        return None
    print("[build] " + build_line(size, info), flush=True)
    if not C.disk_ok(size.dir, info["model_files_bytes"], f"outputs of {size.tag}"):
        return None
    reps = {k: [] for k in LABELS}
    notes = {"sanity": "not run", "identity": None}
    for rnd in range(args.repeat):
        print(f"\n===== {size.tag} Megatron: round {rnd + 1}/{args.repeat} =====", flush=True)
        run_round(size, rnd == 0, reps, notes)
    return {"size": size, "info": info, "results": {k: C.combine(v) for k, v in reps.items()}, **notes}


def report(runs: list[dict], args) -> str:
    md = C.header_lines(f"ckpt-bridge benchmark: verl Megatron (megatron-core dist_ckpt, fp32, TP{TP}) -> Hugging Face "
                        "(bf16)")
    md.append(f"- peer: {NO_PEER}")
    for run in runs:
        size, results = run["size"], run["results"]
        md += ["", f"## {size.tag}: {size.describe()}", "", f"- {build_line(size, run['info'])}",
               f"- {args.repeat} interleaved round(s); every number is the median of the rounds, wall also [min-max], "
               "peak RSS the max", "", *C.row_table(results, LABELS, "floor"), "",
               f"- sanity: {run['sanity']}", f"- --workers 2 vs --workers 1 output: {C.identity_line(run['identity'])}",
               "", "Every round:", "", *C.rounds_table(results, LABELS)]
    md += ["", "## Summary (issue 20 targets, on the medians)", ""]
    md += C.summary_table(f"verl Megatron fp32 TP{TP} -> HF bf16",
                          {r["size"].tag: C.direction_checks({**r["results"], "identity": r["identity"]}, other=None,
                                                             other_label=NO_PEER, speedup_target=None,
                                                             rss_target_gb=1.5) for r in runs})
    return "\n".join(md + [""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=C.HERE / "out", help="default: bench/out (gitignored)")
    C.add_size_args(ap)
    args = ap.parse_args()
    runs = C.run_sizes(args, bench_size, report, args.workdir.resolve(), "results_megatron.md", "megatron-logs")
    if runs is None:
        return 1
    return 0 if all(C.ok(r["results"]["cb"]) for r in runs) else 1


if __name__ == "__main__":  # a guard megatron's save machinery needs: its writer processes re-import this module
    if len(sys.argv) > 1 and sys.argv[1].startswith("--_"):
        mode, rest = sys.argv[1], sys.argv[2:]
        if mode == "--_build-rank":
            rank_build(*rest)
        elif mode == "--_sanity":
            sanity(*rest)
        else:
            raise SystemExit(f"unknown internal mode {mode}")
        sys.exit(0)
    sys.exit(main())
