"""Two checkouts of ckpt-bridge on the same inputs, interleaved: is a change slower, or heavier, than before?

    .venv/bin/python bench/ab_versions.py OLD_REPO [--size 1b] [--repeat 3] [--layers K]

OLD_REPO is another checkout with its own ``.venv`` (``make install`` there); this checkout is NEW.  Per round,
for each direction, OLD then NEW (the order alternates between rounds), each timed by ``common.measure``
(``sync`` first, rusage of the child): verl fp32 4 ranks -> HF bf16 (``to-hf --dtype bf16``), HF bf16 -> DCP
fp32 (``to-dcp``), DCP fp32 -> HF (``to-hf`` of NEW's DCP).  Inputs are bench_verl_to_hf.py's checkpoint and
its bf16 export (built if missing).  Prints each tool's median wall and CPU seconds (min-max) and peak RSS, and
NEW / OLD.  Not a test: issue 16's acceptance ("no direction slower than before beyond the run-to-run noise,
peak RSS not higher") is read from its table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_verl_to_hf as V  # noqa: E402
import common as C  # noqa: E402

DIRECTIONS = ("verl->hf bf16", "hf bf16->dcp fp32", "dcp fp32->hf")


def cmd(repo: Path, direction: str, size: C.Size, out: Path) -> tuple[list[str], list[Path]]:
    # -P: the child runs from this repo's directory (common.measure), and `python -m` would put it first on
    # sys.path; without it OLD's venv would import NEW's ckpt_bridge
    py = [str(repo / ".venv" / "bin" / "python"), "-P"]
    actor, hf, dcp = V.actor_dir(size), size.dir / "ab" / "hf-bf16", size.dir / "ab" / "dcp-new"
    if direction == "verl->hf bf16":
        return [*py, "-m", "ckpt_bridge", "to-hf", str(actor), "--out", str(out), "--dtype", "bf16", "--quiet"], \
            V.ckpt_files(actor)
    if direction == "hf bf16->dcp fp32":
        return [*py, "-m", "ckpt_bridge", "to-dcp", str(hf), "--out", str(out), "--quiet"], C.weight_files(hf)
    return [*py, "-m", "ckpt_bridge", "to-hf", str(dcp), "--out", str(out), "--quiet"], sorted(dcp.glob("*.distcp"))


def ensure_inputs(new: Path, size: C.Size) -> None:
    if V.ensure_checkpoint(size) is None:
        raise SystemExit("not enough disk for the checkpoint")
    ab = size.dir / "ab"
    ab.mkdir(exist_ok=True)
    for direction, dst in (("verl->hf bf16", ab / "hf-bf16"), ("hf bf16->dcp fp32", ab / "dcp-new")):
        if not dst.exists():
            c, _ = cmd(new, direction, size, dst)
            subprocess.run(c, check=True, cwd=new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path, help="the other checkout (with its own .venv)")
    C.add_size_args(ap)
    ap.add_argument("--workdir", type=Path, default=C.HERE / "out")
    args = ap.parse_args()
    new = C.REPO
    size = C.Size(C.sizes_arg(args.size)[0], args.layers, args.workdir)
    ensure_inputs(new, size)
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.repeat):
        order = [("old", args.old.resolve()), ("new", new)]
        if r % 2:
            order.reverse()
        for direction in DIRECTIONS:
            for name, repo in order:
                out = size.dir / "ab" / f"out-{name}"
                C.rm(out)
                c, warm = cmd(repo, direction, size, out)
                res = C.measure(f"{direction} {name} r{r}".replace(" ", "_").replace(">", ""), c, warm,
                                size.dir / "ab" / "logs")
                runs.setdefault((direction, name), []).append(res)
                C.rm(out)
    for name, repo in (("OLD", args.old.resolve()), ("NEW", new)):  # which code each side really ran
        where = subprocess.run([str(repo / ".venv" / "bin" / "python"), "-P", "-c",
                                "import ckpt_bridge; print(ckpt_bridge.__file__)"], cwd=new, capture_output=True,
                               text=True).stdout.strip()
        print(f"{name}: ckpt_bridge from {where}")
    print(f"\n## OLD {args.old} vs NEW {new} ({C.git_rev()}), {size.describe()}, median of {args.repeat}\n")
    print("| direction | OLD wall s (min-max) | NEW wall s (min-max) | NEW/OLD wall | OLD cpu s | NEW cpu s "
          "| OLD peak RSS | NEW peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for d in DIRECTIONS:
        o, n = C.combine(runs[(d, "old")]), C.combine(runs[(d, "new")])
        if not (C.ok(o) and C.ok(n)):
            print(f"| {d} | failed: {o.get('error') or n.get('error')} |")
            continue
        print(f"| {d} | {o['wall_s']:.2f} ({o['wall_min']:.2f}-{o['wall_max']:.2f}) | {n['wall_s']:.2f} "
              f"({n['wall_min']:.2f}-{n['wall_max']:.2f}) | {n['wall_s'] / o['wall_s']:.2f}x | {o['cpu_s']:.1f} "
              f"| {n['cpu_s']:.1f} | {C.gb_kib(o['rss_kib']):.2f} GB | {C.gb_kib(n['rss_kib']):.2f} GB |")
    print(f"\n{C.machine_line()}; load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
