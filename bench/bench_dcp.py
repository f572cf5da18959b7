#!/usr/bin/env python
"""Benchmark: HF <-> DCP on a Llama-3.2-1B-shaped model (1.24B params), both directions, one run.

    .venv/bin/python bench/bench_dcp.py [--workdir DIR] [--repeat N]

Source: the bf16 HF export of bench_verl_to_hf.py's checkpoint (built first if missing, 2.5 GB).
Measured, each as a child process (wall time; peak RSS from os.wait4), warm page cache:

  HF -> DCP (fp32, 4.9 GB written)
    a. ckpt-bridge to-dcp HF --out DCP                          (streams through DCP's own writer)
    b. flame-style convert_hf_to_dcp: from_pretrained, then dcp.save({"model": state_dict})
    c. I/O floor: read the HF files, write 4.9 GB (no torch)
  DCP -> HF (fp32)
    d. ckpt-bridge to-hf DCP --out HF2                          (one tensor at a time through DCP's reader)
    e. flame-style convert_dcp_to_hf: dcp_to_torch_save, torch.load, load_state_dict, save_pretrained
  Rank 0 alone vs all ranks (the torchtitan save hook's choice):
    f1. one process exports every tensor of the DCP to safetensors
    f2. two processes at once, each exporting half the tensors to its own files

The parent imports only the standard library (a child's ru_maxrss counts the parent's image at fork).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))
import bench_verl_to_hf as V  # noqa: E402 - stdlib-only at import time


def child_naive_hf_to_dcp(hf: str, out: str) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    dcp.save({"model": model.state_dict()}, checkpoint_id=out, no_dist=True)


def child_naive_dcp_to_hf(dcp_dir: str, hf: str, out: str) -> None:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoConfig, AutoModelForCausalLM

    tmp = Path(out + ".pt")
    dcp_to_torch_save(dcp_dir, str(tmp))
    sd = torch.load(tmp, weights_only=False)
    tmp.unlink()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf), dtype=torch.float32)
    model.load_state_dict(sd, strict=False)
    model.save_pretrained(out)


def child_export_part(dcp_dir: str, out: str, part: int, parts: int) -> None:
    """The hook's work, split by key: this process writes keys[part::parts] to its own safetensors files."""
    from ckpt_bridge.formats.dcp import DCPReader
    from ckpt_bridge.writers.safetensors_shards import ShardedSafetensorsWriter

    r = DCPReader(Path(dcp_dir))
    infos = r.model_tensors()
    keys = sorted(infos)[part::parts]
    Path(out).mkdir(parents=True, exist_ok=True)
    w = ShardedSafetensorsWriter(Path(out), [(k, infos[k].shape, infos[k].dtype) for k in keys], 5 << 30,
                                 prefix=f"part{part}")
    from ckpt_bridge.stream import read_ahead

    for k, t in read_ahead(keys, r.read):  # the same one-tensor read-ahead as ckpt-bridge to-hf
        w.write(k, t)
    w.close()


def child_trainer(seconds_of_work: str, out: str) -> None:
    """Stands in for one training rank: a fixed amount of single-threaded matmul work; writes its wall time."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(384, 384)
    t0 = time.perf_counter()
    n = 0
    while n < int(seconds_of_work):
        for _ in range(200):
            a = torch.tanh(a @ a.T / 384)
        n += 1
    Path(out).write_text(str(time.perf_counter() - t0))


def child_sanity(a: str, b: str) -> None:
    import torch

    from ckpt_bridge.detect import open_reader
    from ckpt_bridge.keys import canonical_key

    with open_reader(a) as ra, open_reader(b) as rb:
        ta = {canonical_key(k): k for k in (ra.model_tensors() if hasattr(ra, "model_tensors") else ra.tensors())}
        tb = {canonical_key(k): k for k in (rb.model_tensors() if hasattr(rb, "model_tensors") else rb.tensors())}
        common = sorted(set(ta) & set(tb))
        sample = common[:: max(1, len(common) // 6)]
        eq = all(torch.equal(ra.read(ta[k]), rb.read(tb[k])) for k in sample)
    print(json.dumps({"keys_a": len(ta), "keys_b": len(tb), "common": len(common), "sampled_equal": eq}))


def measure(name: str, cmd: list[str], warm: list[Path], logdir: Path) -> dict:
    for f in warm:
        subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL, check=False)
    subprocess.run(["sync"], check=False)
    print(f"\n[{name}] {' '.join(cmd)}", flush=True)
    with open(logdir / f"{name}.log", "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    print(f"[{name}] rc={rc} wall={wall:.2f}s peak_rss={ru.ru_maxrss * 1024 / 1e9:.2f} GB", flush=True)
    if rc:
        print((logdir / f"{name}.log").read_text(errors="replace")[-3000:])
    return {"name": name, "rc": rc, "wall_s": wall, "rss_gb": ru.ru_maxrss * 1024 / 1e9}


def measure_parallel(name: str, cmds: list[list[str]], warm: list[Path], logdir: Path) -> dict:
    for f in warm:
        subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL, check=False)
    subprocess.run(["sync"], check=False)
    print(f"\n[{name}] {len(cmds)} processes at once", flush=True)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=open(logdir / f"{name}.{i}.log", "wb"), stderr=subprocess.STDOUT, cwd=REPO)
             for i, c in enumerate(cmds)]
    rss, rc = 0.0, 0
    for p in procs:
        _, status, ru = os.wait4(p.pid, 0)
        rc = rc or os.waitstatus_to_exitcode(status)
        rss = max(rss, ru.ru_maxrss * 1024 / 1e9)
    wall = time.perf_counter() - t0
    print(f"[{name}] rc={rc} wall={wall:.2f}s peak_rss(max of children)={rss:.2f} GB", flush=True)
    return {"name": name, "rc": rc, "wall_s": wall, "rss_gb": rss}


def files_of(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=str(HERE / "out"))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--trainer-work", type=int, default=12, help="units of work per stand-in training rank")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = globals()[f"child_{args.child[0]}"]
        fn(*[int(a) if a.isdigit() else a for a in args.child[1:]])
        return 0

    work = Path(args.workdir)
    logdir = work / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    V.ensure_checkpoint(work)
    actor = work / "llama1b" / "global_step_1" / "actor"
    hf = work / "llama1b-hf-bf16"
    if not (hf / ".bench_complete").is_file():
        shutil.rmtree(hf, ignore_errors=True)
        subprocess.run([str(BIN / "ckpt-bridge"), "to-hf", str(actor), "--out", str(hf), "--dtype", "bf16",
                        "--quiet"], check=True)
        (hf / ".bench_complete").write_text("ok")
    me = [PY, str(Path(__file__).resolve()), "--workdir", str(work), "--child"]
    rows: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        outs = {n: work / n for n in ("dcp-cb", "dcp-naive", "floor.bin", "hf-back", "hf-naive", "split1", "split2")}
        for p in outs.values():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        hf_files = files_of(hf)
        r = [measure("a_to_dcp", [str(BIN / "ckpt-bridge"), "to-dcp", str(hf), "--out", str(outs["dcp-cb"]),
                                  "--quiet"], hf_files, logdir)]
        dcp_bytes = sum(p.stat().st_size for p in files_of(outs["dcp-cb"]))
        r.append(measure("b_flame_hf_to_dcp", me + ["naive_hf_to_dcp", str(hf), str(outs["dcp-naive"])], hf_files,
                         logdir))
        r.append(measure("c_floor_hf_to_dcp", [PY, "-c", "import sys; sys.path.insert(0, %r); import bench_verl_to_hf as V;"
                                               " V.floor_io(%d, %r, %r)" % (str(HERE), dcp_bytes, str(outs["floor.bin"]),
                                                                           [str(f) for f in hf_files])],
                         hf_files, logdir))
        outs["floor.bin"].unlink(missing_ok=True)
        shutil.rmtree(outs["dcp-naive"], ignore_errors=True)
        dcp_files = files_of(outs["dcp-cb"])
        r.append(measure("d_to_hf_from_dcp", [str(BIN / "ckpt-bridge"), "to-hf", str(outs["dcp-cb"]), "--out",
                                              str(outs["hf-back"]), "--quiet"], dcp_files, logdir))
        r.append(measure("e_flame_dcp_to_hf", me + ["naive_dcp_to_hf", str(outs["dcp-cb"]), str(hf),
                                                    str(outs["hf-naive"])], dcp_files, logdir))
        sanity = subprocess.run(me + ["sanity", str(outs["dcp-cb"]), str(outs["hf-back"])], capture_output=True,
                                text=True, cwd=REPO).stdout.strip()
        shutil.rmtree(outs["hf-naive"], ignore_errors=True)
        shutil.rmtree(outs["hf-back"], ignore_errors=True)
        r.append(measure("f1_export_one_process", me + ["export_part", str(outs["dcp-cb"]), str(outs["split1"]), "0",
                                                        "1"], dcp_files, logdir))
        shutil.rmtree(outs["split1"], ignore_errors=True)
        r.append(measure_parallel("f2_export_two_processes",
                                  [me + ["export_part", str(outs["dcp-cb"]), str(outs["split2"]), str(i), "2"]
                                   for i in range(2)], dcp_files, logdir))
        shutil.rmtree(outs["split2"], ignore_errors=True)
        # g. the export next to a busy trainer: 2 "ranks" of fixed work, alone / with 1 export process /
        # with the export split over 2 processes.  What matters is how much the ranks slow down.
        for label, parts in (("g0_trainers_alone", 0), ("g1_trainers_with_one_exporter", 1),
                             ("g2_trainers_with_two_exporters", 2)):
            cmds = [me + ["trainer", str(args.trainer_work), str(work / f"trainer{i}.txt")] for i in range(2)]
            cmds += [me + ["export_part", str(outs["dcp-cb"]), str(outs["split2"]), str(i), str(parts)]
                     for i in range(parts)]
            row = measure_parallel(label, cmds, dcp_files, logdir)
            row["trainer_s"] = max(float((work / f"trainer{i}.txt").read_text()) for i in range(2))
            print(f"[{label}] slowest trainer {row['trainer_s']:.2f}s", flush=True)
            r.append(row)
            shutil.rmtree(outs["split2"], ignore_errors=True)
        shutil.rmtree(outs["dcp-cb"], ignore_errors=True)
        for row in r:
            rows.setdefault(row["name"], []).append(row)
    best = {n: min(v, key=lambda x: x["wall_s"]) for n, v in rows.items()}
    lines = [f"HF <-> DCP, Llama-3.2-1B shape (1.24B params), fp32 DCP (4.9 GB); fastest of {args.repeat}; "
             f"{datetime.date.today()}, git {V._git_rev()}", "",
             "| step | wall s | peak RSS GB | slowest trainer s |", "|---|---:|---:|---:|"]
    for n, row in best.items():
        tr = f"{row['trainer_s']:.1f}" if "trainer_s" in row else ""
        lines.append(f"| {n} | {row['wall_s']:.1f} | {row['rss_gb']:.2f} | {tr} |")
    lines += ["", f"sanity (to-dcp output vs to-hf of it, sampled torch.equal): {sanity}"]
    text = "\n".join(lines)
    print("\n" + text)
    (work / "results_dcp.md").write_text(text + "\n")
    return 0 if all(r["rc"] == 0 for r in best.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
