#!/usr/bin/env python
"""Benchmark: merge a Llama-3.2-1B-shaped verl FSDP checkpoint into a Hugging Face dir.

This is a benchmark, not a test. Run from the repo root:

    .venv/bin/python bench/bench_verl_to_hf.py [--workdir DIR] [--keep] [--repeat N]

What it does, in one run:

1. Builds (once; reused while WORKDIR/llama1b/.bench_complete exists) a Llama-3.2-1B-shaped
   fp32 checkpoint (1.24B params, ~4.9 GB) with verl 0.9.1's real FSDPCheckpointManager on
   4 CPU ranks (gloo, torchrun), FSDP2 ``fully_shard`` on a ('fsdp',) mesh. The model is
   built on the meta device and only each rank's shards are materialised, so the 4 ranks
   never hold 4 copies of the full model. Saved contents: model + extra (no optimizer).
2. Measures, sequentially, each as a child process (wall time; peak RSS = ``ru_maxrss`` of
   that child from ``os.wait4``):
     a. ckpt-bridge to-hf CKPT --out OUT --dtype bf16 --quiet
     b. python -m verl.model_merger merge --backend fsdp (writes bf16)
     c. a naive hand-written merge (torch.load every rank file, cat local shards, bf16,
        safetensors save_file)
     d. the I/O floor: read every rank file (64 MiB chunks), write as many bytes as (a)'s
        safetensors total (64 MiB chunks), no fsync.
   The page cache cannot be dropped without root, so before each measured command every
   checkpoint file is read with ``cat > /dev/null`` (warm cache for every tool) and dirty
   pages of the previous step are flushed with ``sync`` (outside the timed region).
   e. reference only: `python -c "import torch, safetensors.torch"` (start-up every torch tool pays).
   Each row also shows the child's CPU time and the machine-wide CPU time used by anything
   else during the run (other processes, kernel writeback): the machine is shared, and a
   flagged (!) row means its wall time was probably inflated by someone else's work.
   --repeat N runs N interleaved rounds and reports each tool's fastest.
3. Prints a markdown table (also written to WORKDIR/results.md).
4. Sanity: (a)'s keys == (b)'s keys, and a few tensors torch.equal between (a) and (b) and
   between (a) and (c). Reported, never fatal.

The parent process deliberately imports only the standard library: on Linux a child's
``ru_maxrss`` includes the RSS of the parent at spawn time (the pre-exec image is counted),
so a parent that had imported torch would inflate every measurement. Everything that needs
torch (build, naive merge, sanity) runs in a child.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import zlib
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV_BIN = Path(sys.executable).parent
PY = sys.executable
CKPT_BRIDGE = VENV_BIN / "ckpt-bridge"
TORCHRUN = VENV_BIN / "torchrun"

WORLD_SIZE = 4
GLOBAL_STEP = 1
CHUNK = 64 * 1024 * 1024

# Tensors compared bit for bit between outputs in the sanity check.
SANITY_KEYS = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.7.self_attn.k_proj.weight",
    "model.layers.15.mlp.down_proj.weight",
    "model.norm.weight",
]


# --------------------------------------------------------------------------------------
# 1. checkpoint build (runs under torchrun, one process per rank)
# --------------------------------------------------------------------------------------


def rank_build(actor_dir: str) -> None:
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

    cfg = build_config("llama_1b")  # the Llama-3.2-1B shape, shared with the test presets
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight, "expected tied embeddings"
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
        print(
            f"[build] rank0: {n_local / 1e6:.1f}M local params, init {t_init:.1f}s, "
            f"save {time.perf_counter() - t1:.1f}s",
            flush=True,
        )
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ckpt_files(actor: Path) -> list[Path]:
    return sorted(actor.glob(f"model_world_size_{WORLD_SIZE}_rank_*.pt")) + sorted(
        actor.glob(f"extra_state_world_size_{WORLD_SIZE}_rank_*.pt")
    )


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def ensure_checkpoint(workdir: Path) -> dict:
    root = workdir / "llama1b"
    actor = root / f"global_step_{GLOBAL_STEP}" / "actor"
    marker = root / ".bench_complete"
    if marker.exists():
        info = json.loads(marker.read_text())
        if len(_ckpt_files(actor)) == 2 * WORLD_SIZE and (actor / "huggingface" / "config.json").exists():
            info["reused"] = True
            return info
        print("[build] marker present but checkpoint incomplete; rebuilding", flush=True)
    if root.exists():
        shutil.rmtree(root)
    actor.parent.mkdir(parents=True)
    cmd = [
        str(TORCHRUN),
        f"--nproc_per_node={WORLD_SIZE}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(Path(__file__).resolve()),
        "--_build-rank",
        str(actor),
    ]
    print(f"[build] {WORLD_SIZE}-rank FSDP2 save of the Llama-3.2-1B-shaped model -> {actor}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", VERL_LOGGING_LEVEL="WARNING")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"[build] torchrun failed with exit code {rc}")
    files = _ckpt_files(actor)
    missing = [] if len(files) == 2 * WORLD_SIZE else ["rank files"]
    for extra in ("fsdp_config.json", "huggingface/config.json"):
        if not (actor / extra).exists():
            missing.append(extra)
    if missing:
        raise SystemExit(f"[build] checkpoint incomplete, missing: {missing}")
    info = {
        "build_wall_s": wall,
        "build_max_rank_rss_kib": ru.ru_maxrss,  # max over torchrun and its (reaped) ranks
        "ckpt_bytes": _dir_bytes(actor),
        "model_files_bytes": sum(f.stat().st_size for f in files if f.name.startswith("model_")),
        "built_at": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    marker.write_text(json.dumps(info, indent=2))
    info["reused"] = False
    return info


# --------------------------------------------------------------------------------------
# 2c. naive merge (child process)
# --------------------------------------------------------------------------------------


def naive_merge(actor_dir: str, out_dir: str) -> None:
    """What people hand-write today: load every rank file, cat shards on dim 0, bf16, save."""
    import torch
    from safetensors.torch import save_file

    actor = Path(actor_dir)
    with open(actor / "fsdp_config.json") as f:
        world = json.load(f)["world_size"]
    sds = [
        torch.load(actor / f"model_world_size_{world}_rank_{r}.pt", map_location="cpu", weights_only=False)
        for r in range(world)
    ]
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


# --------------------------------------------------------------------------------------
# 2d. I/O floor (child process, stdlib only)
# --------------------------------------------------------------------------------------


def floor_io(out_bytes: int, out_file: str, files: list[str]) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    read = 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                read += n
    left = out_bytes
    with open(out_file, "wb", buffering=0) as f:
        while left > 0:
            n = min(left, CHUNK)
            f.write(view[:n])
            left -= n
    print(json.dumps({"read": read, "written": out_bytes}))


# --------------------------------------------------------------------------------------
# 4. sanity (child process)
# --------------------------------------------------------------------------------------


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
    res = {
        "keys_equal": set(a) == set(b),
        "n_keys": [len(a), len(b)],
        "only_in_ref": sorted(set(a) - set(b))[:5],
        "only_in_other": sorted(set(b) - set(a))[:5],
        "tensors": {},
    }
    for k in SANITY_KEYS:
        if k not in a or k not in b:
            res["tensors"][k] = "missing"
            continue
        with safe_open(str(a[k]), framework="pt") as ha, safe_open(str(b[k]), framework="pt") as hb:
            ta, tb = ha.get_tensor(k), hb.get_tensor(k)
        ok = ta.dtype == tb.dtype == torch.bfloat16 and ta.shape == tb.shape and torch.equal(ta, tb)
        res["tensors"][k] = "equal" if ok else f"DIFFERENT ({ta.dtype}{list(ta.shape)} vs {tb.dtype}{list(tb.shape)})"
    print(json.dumps(res))


# --------------------------------------------------------------------------------------
# measurement harness (parent, stdlib only)
# --------------------------------------------------------------------------------------


def _self_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


NCPU = len(os.sched_getaffinity(0))
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _busy_cpu_s() -> float:
    """Machine-wide non-idle CPU seconds since boot (/proc/stat, all CPUs)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # exclude guest/guest_nice (already counted in user/nice)
    return (total - idle) / _CLK_TCK


def warm_cache(actor: Path) -> float:
    files = [str(f) for f in _ckpt_files(actor)] + [str(f) for f in actor.glob("*.json")]
    t0 = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    os.sync()  # flush the previous step's dirty pages outside the timed region
    return time.perf_counter() - t0


def measure(name: str, cmd: list[str], actor: Path, logdir: Path, warm_up: bool = True) -> dict:
    warm = warm_cache(actor) if warm_up else 0.0
    print(f"\n[{name}] warm-up cat+sync {warm:.1f}s; running: {' '.join(cmd)}", flush=True)
    out_log, err_log = logdir / f"{name}.stdout", logdir / f"{name}.stderr"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(out_log, "wb") as so, open(err_log, "wb") as se:
        busy0 = _busy_cpu_s()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=env, cwd=REPO)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        busy = _busy_cpu_s() - busy0
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    cpu = ru.ru_utime + ru.ru_stime
    res = {
        "name": name,
        "rc": rc,
        "wall_s": wall,
        "rss_kib": ru.ru_maxrss,
        "utime_s": ru.ru_utime,
        "stime_s": ru.ru_stime,
        "cpu_s": cpu,
        # machine-wide busy CPU time minus the child's: other people's processes (and kernel
        # writeback) competing with the measured tool on this 2-core box.
        "foreign_cpu_s": max(0.0, busy - cpu),
        "stdout": out_log,
        "stderr": err_log,
    }
    print(
        f"[{name}] rc={rc} wall={wall:.2f}s peak_rss={ru.ru_maxrss * 1024 / 1e9:.2f} GB "
        f"cpu={ru.ru_utime:.1f}u+{ru.ru_stime:.1f}s other_cpu={res['foreign_cpu_s']:.1f}s",
        flush=True,
    )
    if rc != 0:
        tail = err_log.read_text(errors="replace").splitlines()[-25:]
        print(f"[{name}] FAILED, stderr tail:\n  " + "\n  ".join(tail), flush=True)
    return res


def safetensors_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors")) if d.exists() else 0


def run_child_json(args: list[str]) -> dict | None:
    p = subprocess.run([PY, str(Path(__file__).resolve()), *args], capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        print(f"  (check crashed: {p.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def print_sanity(label: str, res: dict | None) -> str:
    if res is None:
        line = f"{label}: check crashed"
    else:
        n_eq = sum(v == "equal" for v in res["tensors"].values())
        line = (
            f"{label}: keys {'equal' if res['keys_equal'] else 'DIFFER'} ({res['n_keys'][0]} vs {res['n_keys'][1]})"
            f"; {n_eq}/{len(res['tensors'])} sampled tensors torch.equal (bf16)"
        )
        if not res["keys_equal"]:
            line += f"; only in ckpt-bridge: {res['only_in_ref']}; only in other: {res['only_in_other']}"
        bad = {k: v for k, v in res["tensors"].items() if v != "equal"}
        if bad:
            line += f"; mismatches: {bad}"
    print("[sanity] " + line, flush=True)
    return line


def rm(d: Path, keep: bool) -> None:
    if keep or not d.exists():
        return
    if d.is_dir():
        shutil.rmtree(d)
    else:
        d.unlink()


def _ver(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "?"


def _mem_total_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    return 0.0


def _git_rev() -> str:
    p = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
    return (p.stdout.strip() or "?") + (" + uncommitted changes" if dirty.stdout.strip() else "")


def _combine(reps: list[dict]) -> dict:
    """Best (min-wall) successful repetition; peak RSS is the max over repetitions."""
    ok = [r for r in reps if r["rc"] == 0]
    if not ok:
        return reps[-1]
    best = dict(min(ok, key=lambda r: r["wall_s"]))
    best["rss_kib"] = max(r["rss_kib"] for r in ok)
    best["walls"] = [r["wall_s"] for r in ok]
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=HERE / "out", help="default: bench/out (gitignored)")
    ap.add_argument("--keep", action="store_true", help="keep every tool's output")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of a,b,c,d (interleaved); the table shows each tool's fastest round (default 1)",
    )
    args = ap.parse_args()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    logdir = workdir / "logs"
    logdir.mkdir(exist_ok=True)

    info = ensure_checkpoint(workdir)
    actor = workdir / "llama1b" / f"global_step_{GLOBAL_STEP}" / "actor"
    ckpt_gb = info["ckpt_bytes"] / 1e9
    build_line = (
        f"checkpoint: {actor} ({ckpt_gb:.2f} GB on disk, {WORLD_SIZE} ranks fp32); "
        + ("reused, " if info["reused"] else "")
        + f"built in {info['build_wall_s']:.1f} s (4-rank torchrun, max per-process RSS "
        f"{info['build_max_rank_rss_kib'] * 1024 / 1e9:.2f} GB) at {info['built_at']}"
    )
    print("[build] " + build_line, flush=True)

    outs = {k: workdir / f"out_{k}" for k in ("ckpt_bridge", "verl", "naive")}
    floor_file = workdir / "floor.bin"
    me = str(Path(__file__).resolve())
    parent_rss = _self_rss_kib()
    reps = {k: [] for k in "abcde"}
    sanity_lines = []
    a_out_bytes = 0

    for rnd in range(args.repeat):
        if args.repeat > 1:
            print(f"\n===== round {rnd + 1}/{args.repeat} =====", flush=True)
        last = rnd == args.repeat - 1
        for d in [*outs.values(), floor_file]:
            rm(d, keep=False)  # previous round / stale outputs of an earlier --keep run

        # a. ckpt-bridge
        r = measure(
            "ckpt-bridge",
            [str(CKPT_BRIDGE), "to-hf", str(actor), "--out", str(outs["ckpt_bridge"]), "--dtype", "bf16", "--quiet"],
            actor,
            logdir,
        )
        r["out_bytes"] = a_out_bytes = safetensors_bytes(outs["ckpt_bridge"]) or a_out_bytes
        reps["a"].append(r)
        if r["rc"] != 0:
            print(f"[ckpt-bridge] exact error: see {r['stderr']} (tail above)", flush=True)

        # b. verl's model merger
        r = measure(
            "verl-merger",
            [PY, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
             "--local_dir", str(actor), "--target_dir", str(outs["verl"])],
            actor,
            logdir,
        )
        r["out_bytes"] = safetensors_bytes(outs["verl"])
        reps["b"].append(r)
        if rnd == 0:
            if reps["a"][-1]["rc"] == 0 and r["rc"] == 0:
                sanity_lines.append(
                    print_sanity(
                        "ckpt-bridge vs verl merger",
                        run_child_json(["--_sanity", str(outs["ckpt_bridge"]), str(outs["verl"])]),
                    )
                )
            else:
                sanity_lines.append("ckpt-bridge vs verl merger: skipped (a tool failed)")
                print("[sanity] " + sanity_lines[-1])
        rm(outs["verl"], args.keep and last)

        # c. naive
        r = measure("naive", [PY, me, "--_naive", str(actor), str(outs["naive"])], actor, logdir)
        r["out_bytes"] = safetensors_bytes(outs["naive"])
        reps["c"].append(r)
        if rnd == 0 and reps["a"][-1]["rc"] == 0 and r["rc"] == 0:
            sanity_lines.append(
                print_sanity(
                    "ckpt-bridge vs naive", run_child_json(["--_sanity", str(outs["ckpt_bridge"]), str(outs["naive"])])
                )
            )
        rm(outs["naive"], args.keep and last)
        rm(outs["ckpt_bridge"], args.keep and last)

        # d. floor
        out_bytes = a_out_bytes or reps["b"][-1]["out_bytes"] or info["model_files_bytes"] // 2
        r = measure(
            "floor",
            [PY, me, "--_floor", str(out_bytes), str(floor_file), *[str(f) for f in _ckpt_files(actor)]],
            actor,
            logdir,
        )
        r["out_bytes"] = out_bytes
        reps["d"].append(r)
        rm(floor_file, args.keep and last)

        # e. reference only: interpreter + torch start-up, paid by every torch-based tool (a, b, c)
        r = measure("startup", [PY, "-c", "import torch, safetensors.torch"], actor, logdir, warm_up=False)
        r["out_bytes"] = 0
        reps["e"].append(r)

    results = {k: _combine(v) for k, v in reps.items()}

    # ---- report
    floor = results["d"]["wall_s"] if results["d"]["rc"] == 0 else None
    labels = {
        "a": "ckpt-bridge to-hf --dtype bf16",
        "b": "verl.model_merger merge (bf16)",
        "c": "naive (torch.load all ranks, cat, bf16, save_file)",
        "d": "floor (read all rank files, write same bytes as (a))",
        "e": "(reference) `python -c 'import torch, safetensors.torch'`",
    }
    rows = [
        "| tool | wall s | peak RSS GB | wall / floor | CPU s (user+sys) | other CPU s during run | output GB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    noisy = []
    for k in "abcde":
        r = results[k]
        if r["rc"] != 0:
            rows.append(f"| {labels[k]} | FAILED (exit {r['rc']}) | {r['rss_kib'] * 1024 / 1e9:.2f} | - | - | - | - |")
            continue
        ratio = f"{r['wall_s'] / floor:.2f}x" if floor else "-"
        wall = f"{r['wall_s']:.2f}"
        if len(r.get("walls", [])) > 1:
            wall += " (" + ", ".join(f"{w:.1f}" for w in r["walls"]) + ")"
        flag = ""
        if r["foreign_cpu_s"] > max(1.0, 0.10 * r["wall_s"] * NCPU):
            flag = " (!)"
            noisy.append(labels[k])
        rows.append(
            f"| {labels[k]} | {wall} | {r['rss_kib'] * 1024 / 1e9:.2f} | {ratio} | "
            f"{r['cpu_s']:.1f} ({r['utime_s']:.1f}+{r['stime_s']:.1f}) | {r['foreign_cpu_s']:.1f}{flag} | "
            + (f"{r['out_bytes'] / 1e9:.2f} |" if r["out_bytes"] else "- |")
        )

    a, b = results["a"], results["b"]
    lines = []
    if args.repeat > 1:
        lines.append(f"- {args.repeat} interleaved rounds; wall = fastest round (all rounds in brackets), RSS = max")
    if noisy:
        lines.append(
            "- (!) other processes on this machine used noticeable CPU during: "
            + "; ".join(noisy)
            + " -- those wall times are likely inflated; rerun (or use --repeat) on a quiet machine"
        )
    if a["rc"] == 0 and b["rc"] == 0:
        lines.append(
            f"- ckpt-bridge vs verl merger speed-up: **{b['wall_s'] / a['wall_s']:.2f}x** "
            f"({b['wall_s']:.2f} s -> {a['wall_s']:.2f} s)"
        )
    if a["rc"] == 0:
        rss_gb = a["rss_kib"] * 1024 / 1e9
        rel = (
            f", {b['rss_kib'] / a['rss_kib']:.1f}x less than verl merger ({b['rss_kib'] * 1024 / 1e9:.2f} GB)"
            if b["rc"] == 0
            else ""
        )
        lines.append(f"- ckpt-bridge RSS: **{rss_gb:.2f} GB**{rel}")
        if floor:
            lines.append(f"- ckpt-bridge wall / floor: **{a['wall_s'] / floor:.2f}x**")
            if results["e"]["rc"] == 0:
                st = results["e"]["wall_s"]
                lines.append(
                    f"- for context (not a target): ckpt-bridge wall / (floor + torch import {st:.2f} s) = "
                    f"{a['wall_s'] / (floor + st):.2f}x"
                )
        tgt = [
            f"peak RSS < 1.5 GB: {'met' if rss_gb < 1.5 else 'NOT met'}",
            f"wall <= 1.5x floor: {'met' if floor and a['wall_s'] <= 1.5 * floor else 'NOT met'}",
        ]
        if b["rc"] == 0:
            tgt.append(f">= 3x faster than verl merger: {'met' if b['wall_s'] >= 3 * a['wall_s'] else 'NOT met'}")
        lines.append("- targets: " + "; ".join(tgt))
    else:
        lines.append(f"- ckpt-bridge FAILED (exit {a['rc']}); see {a['stderr']}")

    machine = (
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {_mem_total_gib():.1f} GiB RAM, "
        f"{platform.platform()}, Python {platform.python_version()}"
    )
    md = "\n".join(
        [
            "# ckpt-bridge benchmark: verl FSDP -> Hugging Face (Llama-3.2-1B shape)",
            "",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- machine: {machine}",
            f"- versions: torch {_ver('torch')}, transformers {_ver('transformers')}, verl {_ver('verl')}, "
            f"safetensors {_ver('safetensors')}, ckpt-bridge {_ver('ckpt-bridge')} (git {_git_rev()})",
            f"- {build_line}",
            "- model: LlamaForCausalLM, 1.24B params, tied embeddings, fp32 -> bf16 output",
            "- page cache: warm. The cache cannot be dropped without root, so before every measured command all "
            "checkpoint files were read with `cat > /dev/null` and `sync` flushed earlier dirty pages; every tool "
            "therefore reads from a warm page cache. Writes are not fsynced by any tool.",
            "- peak RSS: `ru_maxrss` of the child from `os.wait4` (includes reaped descendants); "
            f"GB = 10^9 bytes; the stdlib-only parent was {parent_rss / 1024:.0f} MiB at spawn.",
            "",
            *rows,
            "",
            *lines,
            "",
            "Sanity:",
            *[f"- {s}" for s in sanity_lines],
            "",
        ]
    )
    print("\n" + md)
    (workdir / "results.md").write_text(md)
    print(f"written to {workdir / 'results.md'}; logs in {logdir}")
    return 0 if a["rc"] == 0 else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("--_"):
        mode, rest = sys.argv[1], sys.argv[2:]
        if mode == "--_build-rank":
            rank_build(rest[0])
        elif mode == "--_naive":
            naive_merge(rest[0], rest[1])
        elif mode == "--_floor":
            floor_io(int(rest[0]), rest[1], rest[2:])
        elif mode == "--_sanity":
            sanity(rest[0], rest[1])
        else:
            raise SystemExit(f"unknown internal mode {mode}")
        sys.exit(0)
    sys.exit(main())
