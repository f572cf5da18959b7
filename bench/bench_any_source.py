#!/usr/bin/env python
"""Benchmark (issue 28): to-dcp straight from a trainer's checkpoint against the two-step path through an HF
export, at the Llama-3.2-1B shape (1.24B).  Not a test.  Run from the repo root:

    .venv/bin/python bench/bench_any_source.py [--size 1b|...] [--repeat N] [--layers K] [--workdir DIR]

Sources, built once and reused under WORKDIR/<size>/ by the other benchmarks' builders:

- verl FSDP: bench_verl_to_hf.py's checkpoint (``verl/global_step_1/actor``, fp32, 2 ranks)
- verl Megatron: bench_megatron.py's checkpoint (``megatron/global_step_1/actor``, fp32, TP2; ``--config`` its
  ``base_model``: verl's default save writes no config.json)

Per source and round, each as a child (wall, user / sys CPU, peak RSS, faults from ``os.wait4``; inputs warmed
with ``cat``, then ``sync``), interleaved:

    direct     ckpt-bridge to-dcp SRC --out DCP --quiet                     (fp32 DCP, what the trainer loads)
    two_step   sh -c "ckpt-bridge to-hf SRC --dtype keep --out HF && ckpt-bridge to-dcp HF --out DCP2"
               (peak RSS: the larger of the two steps; the intermediate HF dir is deleted after the round)

First round: ``ckpt-bridge verify DCP DCP2`` (every tensor, exact; untimed): the direct DCP must equal the two-step
one bit for bit.  Targets (issue 28): direct under 1.5 GB peak RSS and faster than its two-step path in the same
run.  Written to WORKDIR/results_any_source.md.  The parent imports only the standard library and bench/*.py.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_megatron as M  # noqa: E402 - stdlib only at import time
import bench_verl_to_hf as V  # noqa: E402
import common as C  # noqa: E402

LABELS = {
    "direct": "ckpt-bridge to-dcp SRC (one step)",
    "two_step": "ckpt-bridge to-hf SRC --dtype keep, then to-dcp HF",
}
RSS_TARGET_GB = 1.5


def sources(size: C.Size) -> dict[str, tuple[Path, list[str], list[Path]]]:
    """{name: (SRC, extra flags, input files to warm)}; builds the checkpoints that are missing."""
    out = {}
    if V.ensure_checkpoint(size) is not None:
        actor = V.actor_dir(size)
        out["verl-fsdp"] = (actor, [], V.ckpt_files(actor))
    if M.ensure_checkpoint(size) is not None:
        actor = M.actor_dir(size)
        out["megatron"] = (actor, ["--config", str(size.dir / "megatron" / "base_model")], M.distcp_files(size))
    return out


def identity(a: Path, b: Path) -> str:
    """``ckpt-bridge verify A B`` of the direct and the two-step DCP: every tensor, exact."""
    p = subprocess.run([*C.CLI, "verify", str(a), str(b)], capture_output=True, text=True, cwd=C.REPO)
    lines = [ln for ln in (p.stdout + p.stderr).strip().splitlines() if ln.strip()]
    verdict = {0: "bit-identical", 1: "DIFFERENT"}.get(p.returncode, f"verify failed (exit {p.returncode})")
    line = f"{verdict}: {lines[-1] if lines else '(no output)'}"
    print(f"[identity] {line}", flush=True)
    return line


def run_round(size: C.Size, name: str, src: tuple, first: bool, reps: dict, notes: dict) -> None:
    path, flags, inputs = src
    logs = size.dir / "any-source-logs"
    out = {k: size.dir / f"any_{name}_{k}" for k in ("direct", "hf", "two")}
    for p in out.values():
        C.rm(p)
    direct = C.measure(f"{name}_direct", [*C.CLI, "to-dcp", str(path), *flags, "--quiet", "--out", str(out["direct"])],
                       inputs, logs)
    direct["out_bytes"] = C.weight_bytes(out["direct"]) if C.ok(direct) else 0
    reps[name]["direct"].append(direct)
    to_hf = [*C.CLI, "to-hf", str(path), *flags, "--dtype", "keep", "--quiet", "--out", str(out["hf"])]
    to_dcp = [*C.CLI, "to-dcp", str(out["hf"]), "--quiet", "--out", str(out["two"])]
    two = C.measure(f"{name}_two_step", ["sh", "-c", f"{shlex.join(to_hf)} && {shlex.join(to_dcp)}"], inputs, logs)
    two["out_bytes"] = C.weight_bytes(out["two"]) if C.ok(two) else 0
    reps[name]["two_step"].append(two)
    if first:
        notes[name] = (identity(out["direct"], out["two"]) if C.ok(direct) and C.ok(two)
                       else "not compared (a step failed)")
    for p in out.values():
        C.rm(p)


def bench_size(size: C.Size, args) -> dict | None:
    srcs = sources(size)
    if not srcs or not C.disk_ok(size.dir, 3 * size.est_fp32_bytes(), f"outputs of {size.tag}"):
        return None
    reps = {name: {k: [] for k in LABELS} for name in srcs}
    notes = {name: "not run" for name in srcs}
    for rnd in range(args.repeat):
        for name, src in srcs.items():  # interleaved: every source's pair in each round
            print(f"\n===== {size.tag} {name}: round {rnd + 1}/{args.repeat} =====", flush=True)
            run_round(size, name, src, rnd == 0, reps, notes)
    return {"size": size, "results": {n: {k: C.combine(v) for k, v in r.items()} for n, r in reps.items()},
            "identity": notes}


def checks(res: dict, ident: str) -> list[tuple[str, str, str]]:
    d, t = res.get("direct"), res.get("two_step")
    rows = [("speed-up vs the two-step path (median wall)", "> 1x (faster)",
             C._ratio_cell(t, d, lambda x: x > 1.0) if C.ok(d) else "direct FAILED")]
    rows.append(("CPU (user+sys) of the two steps / direct's", "context", C._ratio_cell(t, d, None, "cpu_s")))
    rss = C.gb_kib(d["rss_kib"]) if C.ok(d) else None
    rows.append(("direct peak RSS (max of the rounds)", f"< {RSS_TARGET_GB:g} GB",
                 f"{rss:.2f} GB {C.verdict(rss < RSS_TARGET_GB)}" if rss is not None else "-"))
    if C.ok(t):
        rows.append(("two-step peak RSS (the larger step)", "context", f"{C.gb_kib(t['rss_kib']):.2f} GB"))
    rows.append(("direct DCP == two-step DCP (verify, every tensor)", "bit-identical", ident))
    return rows


def report(runs: list[dict], args) -> str:
    md = C.header_lines("ckpt-bridge benchmark: any source -> TorchTitan DCP, direct vs through an HF export")
    for run in runs:
        size = run["size"]
        md += ["", f"## {size.tag}: {size.describe()}", "",
               f"- {args.repeat} interleaved round(s); medians, wall also [min-max], peak RSS the max"]
        for name, res in run["results"].items():
            md += ["", f"### {name} -> DCP fp32", "", *C.row_table(res, LABELS, "(no floor)"), "", "Every round:", "",
                   *C.rounds_table(res, LABELS), "", f"- identity: {run['identity'][name]}"]
    md += ["", "## Summary (issue 28 targets, on the medians)", ""]
    for name in sorted({n for r in runs for n in r["results"]}):
        md += C.summary_table(f"{name} -> DCP", {r["size"].tag: checks(r["results"][name], r["identity"][name])
                                                 for r in runs if name in r["results"]})
        md.append("")
    return "\n".join(md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=C.HERE / "out", help="default: bench/out (gitignored)")
    C.add_size_args(ap)
    args = ap.parse_args()
    runs = C.run_sizes(args, bench_size, report, args.workdir.resolve(), "results_any_source.md", "any-source-logs")
    if runs is None:
        return 1
    return 0 if all(C.ok(r["results"][n]["direct"]) for r in runs for n in r["results"]) else 1


if __name__ == "__main__":  # bench_megatron's build re-imports itself under torchrun, not this module
    sys.exit(main())
