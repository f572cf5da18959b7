#!/usr/bin/env python
"""Benchmark (issues 12, 20: speed and memory): merge a Llama-shaped verl FSDP checkpoint (fp32, 4 ranks) into a
Hugging Face dir (bf16).  Not a test.  Run from the repo root:

    .venv/bin/python bench/bench_verl_to_hf.py [--size 1b|1b_x2|8b_w2|both|all|A,B] [--repeat N] [--layers K]
                                               [--workdir DIR] [--keep]

Per size (``1b`` = preset llama_1b, 16 layers, 1.24B params, 4.9 GB fp32; ``1b_x2`` = llama_1b_x2, 32
layers, 2.21B params, 8.8 GB; ``8b_w2`` = Llama-3.1-8B widths with 2 layers, untied, 1.49B params, 6.0 GB),
in WORKDIR/<size>/:

1. Builds (once; reused while verl/.bench_complete matches the preset and layer count) the fp32
   checkpoint with verl 0.9.1's real FSDPCheckpointManager on 4 CPU ranks (gloo, torchrun), FSDP2
   ``fully_shard`` on a ('fsdp',) mesh; the model is built on the meta device and only each rank's shards
   are materialised.  Saved contents: model + extra (no optimizer).
2. Measures, one after the other, each as a child process (wall time; from the child's rusage via
   ``os.wait4``: user and sys CPU, peak RSS = ``ru_maxrss``, major / minor page faults, voluntary /
   involuntary context switches; the CPU of everything else on the machine):
     cb        ckpt-bridge to-hf CKPT --out OUT --dtype bf16 --quiet
     cb_w2     the same with --workers 2 (2 local processes split the output files).  Until the engine
               has the flag this row fails; it is reported with its first error line and the rest goes on.
               Its output must be byte-identical to cb's (filecmp of every file but the timestamped
               ckpt_bridge_export.json; the files compared are listed)
     verl      python -m verl.model_merger merge --backend fsdp (writes bf16)
     naive     torch.load every rank file, cat the local shards, bf16, safetensors save_file
     floor     read every rank file (64 MiB chunks), write as many bytes as cb's safetensors (64 MiB
               chunks), no fsync: the I/O floor of the issue
     floor_flush  the same, then one fsync of the written file (ckpt-bridge flushes its output once
               before the final rename); context only, ratios are against the plain floor
     startup   `python -c "import torch, safetensors.torch"`: the start-up every torch tool pays; context
   Before every measured command its input files are read with ``cat > /dev/null`` (the page cache cannot
   be dropped without root: every tool reads from a warm cache) and ``sync`` flushes earlier dirty pages,
   outside the timing: no tool pays for another's write-back.  ``--repeat N`` (default 3) runs N interleaved
   rounds and reports each tool's median round, with min and max, and every round.
3. Sanity (first round, never fatal): cb's keys == verl's, sampled tensors torch.equal between cb and
   verl and between cb and naive.

Printed at the end and written to WORKDIR/results.md: the per-tool rows of every size, the summary of the
issue's targets per size on the medians (speed-up vs verl merger >= 3.5x, (wall - torch start-up) / floor
<= 2x, peak RSS < 1.5 GB, each met / NOT met, plus CPU vs the merger, plain wall / floor, the flush row and
--workers 2 as context) and a per-size
table of seconds per GB written and peak RSS, with their growth from 1b to 1b_x2 (flat or not).

``--layers K`` is for development: 1b gets K layers and 1b_x2 gets 2K (``--layers 2``: ~0.5B params,
mostly the embedding; seconds to build and run).  Its work dirs are WORKDIR/1b-L2 etc.

The parent imports only the standard library and bench/common.py (a child's ``ru_maxrss`` counts the
parent's image at fork); build, naive merge and sanity run in children.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402 - stdlib only

ME = str(Path(__file__).resolve())
TORCHRUN = str(C.BIN / "torchrun")
WORLD_SIZE = 4
GLOBAL_STEP = 1

LABELS = {
    "cb": "ckpt-bridge to-hf --dtype bf16",
    "cb_w2": "ckpt-bridge to-hf --dtype bf16 --workers 2",
    "verl": "verl.model_merger merge (bf16)",
    "naive": "naive (torch.load all ranks, cat, bf16, save_file)",
    "floor": "floor (read all rank files, write cb's bytes)",
    "floor_flush": "floor + one flush (fsync at the end)",
    "startup": "(reference) `python -c 'import torch, safetensors.torch'`",
}


# ------------------------------------------------------------------------------------------------
# 1. checkpoint build (under torchrun, one process per rank)
# ------------------------------------------------------------------------------------------------


def rank_build(actor_dir: str, preset: str, config_json: str) -> None:
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from ckpt_bridge.testing.tiny_models import build_config, build_tiny_tokenizer

    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t0 = time.perf_counter()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))

    # the Llama-3.2-1B widths shared with the test presets, with the size's layer count and overrides
    cfg = C.apply_config(build_config(preset), config_json)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == cfg.tie_word_embeddings, f"tied embeddings {tied}, config says {cfg.tie_word_embeddings}"
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")

    n_local = 0
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied params appear once
            local = p._local_tensor if hasattr(p, "_local_tensor") else p
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}|{rank}".encode()))
            local.normal_(mean=0.0, std=0.02, generator=g)
            n_local += local.numel()
    t_init = time.perf_counter() - t0

    # A trivial scheduler so extra_state carries a real lr_scheduler state dict.
    dummy = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([dummy], lr=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    opt.step()
    sched.step()

    mgr = FSDPCheckpointManager(
        model=model,
        optimizer=None,
        lr_scheduler=sched,
        processing_class=build_tiny_tokenizer(),
        checkpoint_config=OmegaConf.create(
            {"save_contents": ["model", "extra"], "load_contents": ["model", "extra"]}
        ),
    )
    t1 = time.perf_counter()
    mgr.save_checkpoint(actor_dir, global_step=GLOBAL_STEP, max_ckpt_to_keep=None)
    dist.barrier()
    if rank == 0:
        root = Path(actor_dir).parent.parent
        (root / "latest_checkpointed_iteration.txt").write_text(str(GLOBAL_STEP))
        print(f"[build] rank0: {n_local / 1e6:.1f}M local params, init {t_init:.1f}s, "
              f"save {time.perf_counter() - t1:.1f}s", flush=True)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def actor_dir(size: C.Size) -> Path:
    return size.dir / "verl" / f"global_step_{GLOBAL_STEP}" / "actor"


def ckpt_files(actor: Path) -> list[Path]:
    return sorted(actor.glob(f"model_world_size_{WORLD_SIZE}_rank_*.pt")) + sorted(
        actor.glob(f"extra_state_world_size_{WORLD_SIZE}_rank_*.pt"))


def _complete(actor: Path) -> bool:
    return len(ckpt_files(actor)) == 2 * WORLD_SIZE and all(
        (actor / f).exists() for f in ("fsdp_config.json", "huggingface/config.json"))


def ensure_checkpoint(size: C.Size) -> dict | None:
    """The size's verl checkpoint: reused if its marker matches, else built.  None: not enough disk."""
    root, actor = size.dir / "verl", actor_dir(size)
    marker = root / ".bench_complete"
    want = {"preset": size.preset, "layers": size.layers, "config": size.config_json()}
    if marker.exists():
        info = json.loads(marker.read_text())
        if {k: info.get(k) for k in want} == want and _complete(actor):
            return {**info, "reused": True}
        print("[build] marker does not match or checkpoint incomplete; rebuilding", flush=True)
    C.rm(root)
    if not C.disk_ok(size.dir, size.est_fp32_bytes(), f"build of {size.tag}"):
        return None
    actor.parent.mkdir(parents=True)
    cmd = [TORCHRUN, f"--nproc_per_node={WORLD_SIZE}", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           ME, "--_build-rank", str(actor), size.preset, size.config_json()]
    print(f"[build] {WORLD_SIZE}-rank FSDP2 save of {size.describe()} -> {actor}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1", VERL_LOGGING_LEVEL="WARNING"),
                            cwd=C.REPO)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"[build] torchrun failed with exit code {os.waitstatus_to_exitcode(status)}")
    if not _complete(actor):
        raise SystemExit(f"[build] checkpoint incomplete in {actor}")
    files = ckpt_files(actor)
    info = {
        **want,
        "build_wall_s": wall,
        "build_max_rank_rss_kib": ru.ru_maxrss,  # max over torchrun and its (reaped) ranks
        "ckpt_bytes": sum(f.stat().st_size for f in actor.rglob("*") if f.is_file()),
        "model_files_bytes": sum(f.stat().st_size for f in files if f.name.startswith("model_")),
        "built_at": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    marker.write_text(json.dumps(info, indent=2))
    return {**info, "reused": False}


def build_line(size: C.Size, info: dict) -> str:
    return (f"checkpoint {size.tag}: {size.describe()}, {actor_dir(size)} ({info['ckpt_bytes'] / 1e9:.2f} GB on "
            f"disk, {WORLD_SIZE} ranks fp32); " + ("reused, " if info["reused"] else "")
            + f"built in {info['build_wall_s']:.1f} s (4-rank torchrun, max per-process RSS "
            f"{C.gb_kib(info['build_max_rank_rss_kib']):.2f} GB) at {info['built_at']}")


# ------------------------------------------------------------------------------------------------
# children that need torch: naive merge, sanity
# ------------------------------------------------------------------------------------------------


def naive_merge(actor_dir: str, out_dir: str) -> None:
    """What people hand-write today: load every rank file, cat shards on dim 0, bf16, save."""
    import torch
    from safetensors.torch import save_file

    actor = Path(actor_dir)
    with open(actor / "fsdp_config.json") as f:
        world = json.load(f)["world_size"]
    sds = [torch.load(actor / f"model_world_size_{world}_rank_{r}.pt", map_location="cpu", weights_only=False)
           for r in range(world)]
    with open(actor / "huggingface" / "config.json") as f:
        tied = json.load(f).get("tie_word_embeddings", False)
    merged = {}
    for key in list(sds[0].keys()):
        if tied and key == "lm_head.weight":  # same tensor as embed_tokens; HF drops it
            continue
        parts = [sd[key] for sd in sds]
        parts = [p._local_tensor if hasattr(p, "_local_tensor") else p for p in parts]
        if parts[0].dim() == 0:
            merged[key] = parts[0].to(torch.bfloat16)
        else:
            merged[key] = torch.cat(parts, dim=0).to(torch.bfloat16).contiguous()
    os.makedirs(out_dir, exist_ok=True)
    shutil.copy(actor / "huggingface" / "config.json", Path(out_dir) / "config.json")
    save_file(merged, str(Path(out_dir) / "model.safetensors"), metadata={"format": "pt"})


def sanity_keys(n_layers: int) -> list[str]:
    """Tensors compared bit for bit: embedding, final norm, and projections of the first, middle, last layer."""
    first, mid, last = 0, max(0, n_layers // 2 - 1), n_layers - 1
    return ["model.embed_tokens.weight", f"model.layers.{first}.self_attn.q_proj.weight",
            f"model.layers.{mid}.self_attn.k_proj.weight", f"model.layers.{last}.mlp.down_proj.weight",
            "model.norm.weight"]


def sanity(ref_dir: str, other_dir: str) -> None:
    import torch
    from safetensors import safe_open

    def index(d):
        where = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    where[k] = f
        return where

    a, b = index(ref_dir), index(other_dir)
    n_layers = json.loads((Path(ref_dir) / "config.json").read_text())["num_hidden_layers"]
    res = {"keys_equal": set(a) == set(b), "n_keys": [len(a), len(b)], "only_in_ref": sorted(set(a) - set(b))[:5],
           "only_in_other": sorted(set(b) - set(a))[:5], "tensors": {}}
    for k in sanity_keys(n_layers):
        if k not in a or k not in b:
            res["tensors"][k] = "missing"
            continue
        with safe_open(str(a[k]), framework="pt") as ha, safe_open(str(b[k]), framework="pt") as hb:
            ta, tb = ha.get_tensor(k), hb.get_tensor(k)
        same = ta.dtype == tb.dtype == torch.bfloat16 and ta.shape == tb.shape and torch.equal(ta, tb)
        res["tensors"][k] = "equal" if same else f"DIFFERENT ({ta.dtype}{list(ta.shape)} vs {tb.dtype}{list(tb.shape)})"
    print(json.dumps(res))


def run_sanity(label: str, ref: Path, other: Path) -> str:
    p = subprocess.run([C.PY, ME, "--_sanity", str(ref), str(other)], capture_output=True, text=True, cwd=C.REPO)
    if p.returncode != 0:
        line = f"{label}: check crashed ({p.stderr.strip().splitlines()[-1:]})"
    else:
        res = json.loads(p.stdout.strip().splitlines()[-1])
        n_eq = sum(v == "equal" for v in res["tensors"].values())
        line = (f"{label}: keys {'equal' if res['keys_equal'] else 'DIFFER'} ({res['n_keys'][0]} vs "
                f"{res['n_keys'][1]}); {n_eq}/{len(res['tensors'])} sampled tensors torch.equal (bf16)")
        if not res["keys_equal"]:
            line += f"; only in ckpt-bridge: {res['only_in_ref']}; only in other: {res['only_in_other']}"
        bad = {k: v for k, v in res["tensors"].items() if v != "equal"}
        if bad:
            line += f"; mismatches: {bad}"
    print("[sanity] " + line, flush=True)
    return line


# ------------------------------------------------------------------------------------------------
# 2. one round of measurements (parent)
# ------------------------------------------------------------------------------------------------


def run_round(size: C.Size, first: bool, keep: bool, reps: dict[str, list], notes: dict) -> None:
    actor, logs = actor_dir(size), size.logdir
    inputs = ckpt_files(actor)
    out = {k: size.dir / f"out_{k}" for k in ("cb", "cb_w2", "verl", "naive")}
    floor_file = size.dir / "floor.bin"
    for p in [*out.values(), floor_file]:
        C.rm(p)  # the previous round's / an earlier --keep run's outputs

    def step(key: str, cmd: list[str], out_dir: Path | None) -> dict:
        r = C.measure(key, cmd, inputs, logs)
        r["out_bytes"] = C.weight_bytes(out_dir) if out_dir else 0
        r["out_files"] = len(C.weight_files(out_dir)) if out_dir else 0
        reps[key].append(r)
        return r

    to_hf = [*C.CLI, "to-hf", str(actor), "--dtype", "bf16", "--quiet", "--out"]
    cb = step("cb", to_hf + [str(out["cb"])], out["cb"])
    w2 = step("cb_w2", to_hf + [str(out["cb_w2"]), "--workers", "2"], out["cb_w2"])
    if first:
        notes["identity"] = C.compare_outputs(out["cb"], out["cb_w2"]) if C.ok(cb) and C.ok(w2) else None
    C.rm(out["cb_w2"])

    verl = step("verl", [C.PY, "-m", "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir", str(actor),
                         "--target_dir", str(out["verl"])], out["verl"])
    if first:
        notes["sanity"].append(run_sanity("ckpt-bridge vs verl merger", out["cb"], out["verl"])
                               if C.ok(cb) and C.ok(verl) else "ckpt-bridge vs verl merger: skipped (a tool failed)")
    if not keep:
        C.rm(out["verl"])

    naive = step("naive", [C.PY, ME, "--_naive", str(actor), str(out["naive"])], out["naive"])
    if first and C.ok(cb) and C.ok(naive):
        notes["sanity"].append(run_sanity("ckpt-bridge vs naive", out["cb"], out["naive"]))
    if not keep:
        C.rm(out["naive"])
        C.rm(out["cb"])

    C.floor_rows(step, cb["out_bytes"] or verl["out_bytes"] or (sum(f.stat().st_size for f in inputs) // 2),
                 floor_file, inputs)


def bench_size(size: C.Size, args) -> dict | None:
    """Build (or reuse) the size's checkpoint, run the rounds; the combined results, or None if skipped."""
    info = ensure_checkpoint(size)
    if info is None:
        return None
    print("[build] " + build_line(size, info), flush=True)
    out_bf16 = info["model_files_bytes"] // 2
    if not C.disk_ok(size.dir, 2 * out_bf16 + (out_bf16 if args.keep else 0), f"outputs of {size.tag}"):
        return None
    reps = {k: [] for k in LABELS}
    notes = {"sanity": [], "identity": None}
    for rnd in range(args.repeat):
        print(f"\n===== {size.tag}: round {rnd + 1}/{args.repeat} =====", flush=True)
        run_round(size, rnd == 0, args.keep and rnd == args.repeat - 1, reps, notes)
    results = {k: C.combine(v) for k, v in reps.items()}
    return {"size": size, "info": info, "results": results, **notes}


# ------------------------------------------------------------------------------------------------
# 3. report
# ------------------------------------------------------------------------------------------------


def checks_of(run: dict) -> list[tuple[str, str, str]]:
    return C.direction_checks({**run["results"], "identity": run["identity"]}, other="verl",
                              other_label="verl merger", speedup_target=3.5, rss_target_gb=1.5)


def report(runs: list[dict], args) -> str:
    md = C.header_lines("ckpt-bridge benchmark: verl FSDP (fp32, 4 ranks) -> Hugging Face (bf16)")
    for run in runs:
        size, results = run["size"], run["results"]
        md += ["", f"## {size.tag}: {size.describe()}", "", f"- {build_line(size, run['info'])}"]
        md.append(f"- {args.repeat} interleaved round(s); every number is the median of the rounds, wall also "
                  "[min-max], peak RSS the max (every round: the table after the sanity lines)")
        md += ["", *C.row_table(results, LABELS, "floor"), ""]
        md += [f"- sanity: {s}" for s in run["sanity"]]
        md.append(f"- --workers 2 vs --workers 1 output: {C.identity_line(run['identity'])}")
        if C.files_note(results["cb"]):
            md.append(f"- {C.files_note(results['cb'])}")
        md += ["", "Every round:", "", *C.rounds_table(results, LABELS)]
    md += ["", "## Summary (issue 20 targets, on the medians)", ""]
    md += C.summary_table("verl fp32 4 ranks -> HF bf16", {r["size"].tag: checks_of(r) for r in runs})
    md += ["", "The floor target takes the torch start-up off ckpt-bridge's wall (issue 20: \"within 2x of its floor "
           "after start-up\"); \"floor + one flush\" is the same I/O plus one fsync of the written file, for "
           "context: ckpt-bridge flushes its output once before the final rename.",
           "", *C.scaling_lines("verl -> HF", {r["size"].tag: {**r["results"], "params": C.params_of(r["size"])}
                                              for r in runs}), ""]
    return "\n".join(md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=C.HERE / "out", help="default: bench/out (gitignored)")
    ap.add_argument("--keep", action="store_true", help="keep every tool's output of the last round")
    C.add_size_args(ap)
    args = ap.parse_args()
    runs = C.run_sizes(args, bench_size, report, args.workdir.resolve(), "results.md", "logs")
    if runs is None:
        return 1
    return 0 if all(C.ok(r["results"]["cb"]) for r in runs) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("--_"):
        mode, rest = sys.argv[1], sys.argv[2:]
        if mode == "--_build-rank":
            rank_build(rest[0], rest[1], rest[2])
        elif mode == "--_naive":
            naive_merge(rest[0], rest[1])
        elif mode == "--_sanity":
            sanity(rest[0], rest[1])
        else:
            raise SystemExit(f"unknown internal mode {mode}")
        sys.exit(0)
    sys.exit(main())
