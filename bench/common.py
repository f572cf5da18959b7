#!/usr/bin/env python
"""What bench_verl_to_hf.py and bench_dcp.py share; standard library only at import time.

* sizes: the benchmark presets (``1b`` = ``llama_1b``, ``1b_x2`` = ``llama_1b_x2``) and their work dirs;
* ``measure``: one command as a child process, wall time, ``ru_maxrss`` and CPU time from ``os.wait4``;
* the I/O floor, run as a child of its own (``python bench/common.py floor ...``, no torch);
* ``compare_outputs``: byte identity of two output dirs (``filecmp``), for ``--workers 2`` vs ``--workers 1``;
* the report: per-tool rows, target checks, the summary and per-size tables.

The parent processes import only this module and the standard library: on Linux a child's ``ru_maxrss``
counts the parent's image at fork (before exec), so a parent that had imported torch would inflate every
measurement.  Whatever needs torch runs in a child.
"""

from __future__ import annotations

import datetime
import filecmp
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
BIN = Path(sys.executable).parent
CKPT_BRIDGE = str(BIN / "ckpt-bridge")
CHUNK = 64 * 1024 * 1024
STARTUP_CMD = [PY, "-c", "import torch, safetensors.torch"]

# ------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------

SIZES = {"1b": "llama_1b", "1b_x2": "llama_1b_x2"}  # --size NAME -> tiny_models preset
PRESET_LAYERS = {"1b": 16, "1b_x2": 32}
LAYER_FACTOR = {"1b": 1, "1b_x2": 2}


def sizes_arg(value: str) -> list[str]:
    return list(SIZES) if value == "both" else [value]


def add_size_args(ap) -> None:
    ap.add_argument("--size", choices=[*SIZES, "both"], default="1b",
                    help="1b = llama_1b (16 layers, 1.24B params), 1b_x2 = llama_1b_x2 (32 layers, 2.21B), "
                         "both (what `make bench` runs); default 1b")
    ap.add_argument("--layers", type=int, default=None, metavar="K",
                    help="for fast iteration: the 1b size gets K layers and 1b_x2 gets 2K (the 2x ratio is kept); "
                         "default: the presets' 16 and 32")


class Size:
    """One benchmark size: preset name, layer count, work dir (``WORKDIR/<tag>``)."""

    def __init__(self, name: str, layers: int | None, workdir: Path):
        self.name = name
        self.preset = SIZES[name]
        self.layers = PRESET_LAYERS[name] if layers is None else layers * LAYER_FACTOR[name]
        self.override = layers is not None
        self.tag = name if layers is None else f"{name}-L{self.layers}"
        self.dir = workdir / self.tag
        self.logdir = self.dir / "logs"

    def describe(self) -> str:
        return f"{self.preset}" + (f" with --layers override: {self.layers} layers" if self.override else
                                   f" ({self.layers} layers)")

    def est_fp32_bytes(self) -> int:
        """fp32 model bytes of the Llama-3.2-1B widths at this depth (disk guard only; tied embeddings)."""
        per_layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048
        return self.embedding_fp32_bytes() + 4 * (self.layers * per_layer + 2048)

    @staticmethod
    def embedding_fp32_bytes() -> int:
        """The tied embedding; to-dcp writes it twice (embed_tokens and lm_head, as the trainer loads them)."""
        return 4 * 128256 * 2048


def disk_ok(path: Path, need: int, what: str) -> bool:
    """True if the file system of ``path`` has ``need`` bytes (+1 GB margin) free; else says so."""
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free >= need + 1e9:
        return True
    print(f"[disk] {what}: needs ~{need / 1e9:.1f} GB (+1 GB margin), {free / 1e9:.1f} GB free on {path}; "
          "skipped", flush=True)
    return False


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------

NCPU = len(os.sched_getaffinity(0))
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def busy_cpu_s() -> float:
    """Machine-wide non-idle CPU seconds since boot (/proc/stat, all CPUs)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # guest/guest_nice are already counted in user/nice
    return (total - idle) / _CLK_TCK


def warm(files: list[Path]) -> float:
    """Read ``files`` (warm page cache for every tool) and flush earlier dirty pages, outside the timing."""
    t0 = time.perf_counter()
    if files:
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=False)
    os.sync()
    return time.perf_counter() - t0


def first_error_line(stderr: Path) -> str:
    lines = [ln.strip() for ln in stderr.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower():
            return ln
    return lines[-1] if lines else "(no stderr)"


def measure(key: str, cmd: list[str], warm_files: list[Path], logdir: Path) -> dict:
    """Run ``cmd`` as a child after warming ``warm_files``; wall, peak RSS (KiB), CPU, other CPU, rc."""
    logdir.mkdir(parents=True, exist_ok=True)
    t_warm = warm(warm_files)
    print(f"\n[{key}] warm-up cat+sync {t_warm:.1f}s; running: {' '.join(cmd)}", flush=True)
    out_log, err_log = logdir / f"{key}.stdout", logdir / f"{key}.stderr"
    with open(out_log, "wb") as so, open(err_log, "wb") as se:
        busy0 = busy_cpu_s()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        busy = busy_cpu_s() - busy0
    rc = os.waitstatus_to_exitcode(status)
    cpu = ru.ru_utime + ru.ru_stime
    res = {
        "key": key, "rc": rc, "wall_s": wall, "rss_kib": ru.ru_maxrss, "utime_s": ru.ru_utime,
        "stime_s": ru.ru_stime, "cpu_s": cpu,
        # machine-wide busy CPU minus the child's: other processes (and kernel writeback) on this box
        "foreign_cpu_s": max(0.0, busy - cpu), "stderr": err_log, "out_bytes": 0,
        "error": first_error_line(err_log) if rc else "",
    }
    print(f"[{key}] rc={rc} wall={wall:.2f}s peak_rss={gb_kib(ru.ru_maxrss):.2f} GB "
          f"cpu={ru.ru_utime:.1f}u+{ru.ru_stime:.1f}s other_cpu={res['foreign_cpu_s']:.1f}s", flush=True)
    if rc:
        tail = err_log.read_text(errors="replace").splitlines()[-15:]
        print(f"[{key}] FAILED: {res['error']}\n  stderr tail ({err_log}):\n  " + "\n  ".join(tail), flush=True)
    return res


def combine(reps: list[dict]) -> dict:
    """Fastest successful repetition; peak RSS = max over the successful ones; a failure if none succeeded."""
    ok = [r for r in reps if r["rc"] == 0]
    if not ok:
        return reps[-1]
    best = dict(min(ok, key=lambda r: r["wall_s"]))
    best["rss_kib"] = max(r["rss_kib"] for r in ok)
    best["walls"] = [r["wall_s"] for r in ok]
    return best


def ok(r: dict | None) -> bool:
    return r is not None and r["rc"] == 0


def rm(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def weight_files(d: Path) -> list[Path]:
    """The weight files of an output dir: safetensors (HF) or .distcp (DCP)."""
    if not d.is_dir():
        return []
    return sorted([*d.rglob("*.safetensors"), *d.rglob("*.distcp")])


def weight_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(d))


def files_note(cb: dict) -> str:
    """How many weight files ckpt-bridge wrote: with fewer files than processes, --workers N shares a file
    (each process pwrites its tensors at their offsets); with more, each process writes whole files."""
    n = cb.get("out_files", 0)
    if not ok(cb) or not n:
        return ""
    return f"ckpt-bridge (1 process) wrote {n} weight file{'s' if n > 1 else ''}" + (
        " (--workers 2 shares it: each process writes its half of the tensors at their offsets)" if n == 1 else "")


# ------------------------------------------------------------------------------------------------
# the I/O floor (child process: `python bench/common.py floor OUT_BYTES OUT_FILE flush|noflush FILE...`)
# ------------------------------------------------------------------------------------------------


def floor_io(out_bytes: int, out_file: str, flush: bool, files: list[str]) -> None:
    """Read every input file (64 MiB chunks), write ``out_bytes`` to ``out_file`` (64 MiB chunks);
    with ``flush``, fsync the written file once at the end (the one flush ckpt-bridge does before its rename)."""
    view = memoryview(bytearray(CHUNK))
    read = 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                read += n
    left = out_bytes
    with open(out_file, "wb", buffering=0) as f:
        while left > 0:
            n = min(left, CHUNK)
            f.write(view[:n])
            left -= n
        if flush:
            os.fsync(f.fileno())
    print(json.dumps({"read": read, "written": out_bytes, "fsync": flush}))


def floor_cmd(out_bytes: int, out_file: Path, inputs: list[Path], flush: bool) -> list[str]:
    return [PY, str(Path(__file__).resolve()), "floor", str(out_bytes), str(out_file),
            "flush" if flush else "noflush", *map(str, inputs)]


# ------------------------------------------------------------------------------------------------
# byte identity of two outputs (--workers 2 vs --workers 1)
# ------------------------------------------------------------------------------------------------

# Files that differ between any two runs, whatever the worker count, and are not compared.
SKIP_FILES = {
    "ckpt_bridge_manifest.json": "records its creation time",
    "ckpt_bridge_export.json": "the export record (may carry times); not a weight file",
}


def compare_outputs(a: Path, b: Path) -> dict:
    """``filecmp`` (full contents) of every file of ``a`` and ``b`` except SKIP_FILES.  A DCP ``.metadata``
    that differs is compared again without its ``storage_meta`` (checkpoint_id = the temporary output path,
    save_id = a fresh uuid: they differ between any two saves), in a child that unpickles it."""
    fa = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    fb = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()}
    skipped = sorted(f for f in fa | fb if Path(f).name in SKIP_FILES)
    both = sorted(f for f in fa & fb if Path(f).name not in SKIP_FILES)
    differ = [f for f in both if not filecmp.cmp(a / f, b / f, shallow=False)]
    notes = []
    for f in [f for f in differ if Path(f).name == ".metadata"]:
        p = subprocess.run([PY, str(Path(__file__).resolve()), "dcp-metadata-equal", str(a / f), str(b / f)],
                           capture_output=True, text=True, cwd=REPO)
        if p.returncode == 0 and p.stdout.strip() == "equal":
            differ.remove(f)
            notes.append(f"{f} equal except storage_meta (checkpoint_id, save_id)")
    return {
        "compared": both, "differ": differ, "only_in_1": sorted(fa - fb - set(skipped)),
        "only_in_2": sorted(fb - fa - set(skipped)), "skipped": skipped, "notes": notes,
        "bytes": sum((a / f).stat().st_size for f in both),
    }


def identity_status(res: dict | None) -> str:
    if res is None:
        return "not checked (a run failed)"
    if res["differ"] or res["only_in_1"] or res["only_in_2"]:
        return "DIFFERENT"
    return "byte-identical" + (" (.metadata: all but storage_meta)" if res["notes"] else "")


def identity_line(res: dict | None) -> str:
    if res is None:
        return identity_status(res)
    line = (f"{identity_status(res)}: {len(res['compared'])} files compared with filecmp "
            f"({res['bytes'] / 1e9:.2f} GB: {_short_list(res['compared'])})")
    if res["notes"]:
        line += "; " + "; ".join(res["notes"])
    if res["differ"]:
        line += f"; differing: {_short_list(res['differ'])}"
    if res["only_in_1"] or res["only_in_2"]:
        line += f"; only in --workers 1: {_short_list(res['only_in_1'])}; only in --workers 2: " \
                f"{_short_list(res['only_in_2'])}"
    line += f"; not compared: {', '.join(res['skipped']) or 'none'}"
    return line


def _short_list(names: list[str], n: int = 8) -> str:
    if not names:
        return "none"
    distcp = [x for x in names if x.endswith(".distcp")]
    rest = [x for x in names if not x.endswith(".distcp")]
    shown = rest[:n] + ([f"{len(distcp)} .distcp files"] if distcp else [])
    return ", ".join(shown) + (f", ... ({len(rest) - n} more)" if len(rest) > n else "")


def dcp_metadata_equal(a: str, b: str) -> None:
    """Child: two DCP .metadata files equal once storage_meta (path, uuid) is blanked."""
    import pickle

    def load(p):
        with open(p, "rb") as f:
            m = pickle.load(f)  # noqa: S301 - our own benchmark outputs
        m.storage_meta = None
        return m

    ma, mb = load(a), load(b)
    same = (ma.state_dict_metadata == mb.state_dict_metadata and ma.planner_data == mb.planner_data
            and ma.storage_data == mb.storage_data)
    print("equal" if same else "different")


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def gb_kib(kib: int) -> float:
    return kib * 1024 / 1e9


def verdict(good: bool) -> str:
    return "met" if good else "NOT met"


def row_table(results: dict[str, dict], labels: dict[str, str], floor_key: str) -> list[str]:
    """Markdown rows: one per measured step, in ``labels`` order."""
    floor = results[floor_key]["wall_s"] if ok(results.get(floor_key)) else None
    rows = ["| tool | wall s | peak RSS GB | wall / floor | CPU s (user+sys) | other CPU s during run | output GB |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for key, label in labels.items():
        r = results.get(key)
        if r is None:
            continue
        if r["rc"] != 0:
            rows.append(f"| {label} | FAILED (exit {r['rc']}): {r['error'][:160]} | - | - | - | - | - |")
            continue
        wall = f"{r['wall_s']:.2f}"
        if len(r.get("walls", [])) > 1:
            wall += " (" + ", ".join(f"{w:.1f}" for w in r["walls"]) + ")"
        flag = " (!)" if noisy(r) else ""
        rows.append(
            f"| {label} | {wall} | {gb_kib(r['rss_kib']):.2f} | "
            + (f"{r['wall_s'] / floor:.2f}x" if floor else "-")
            + f" | {r['cpu_s']:.1f} ({r['utime_s']:.1f}+{r['stime_s']:.1f}) | {r['foreign_cpu_s']:.1f}{flag} | "
            + (f"{r['out_bytes'] / 1e9:.2f} |" if r["out_bytes"] else "- |"))
    return rows


def noisy(r: dict) -> bool:
    """Other processes used noticeable CPU during the run: its wall time is probably inflated."""
    return r["foreign_cpu_s"] > max(1.0, 0.10 * r["wall_s"] * NCPU)


def direction_checks(res: dict[str, dict], *, other: str, other_label: str, speedup_target: float | None,
                     rss_target_gb: float | None) -> list[tuple[str, str, str]]:
    """The summary of one direction at one size: (check, target, value + verdict) rows.

    ``res`` keys: cb (ckpt-bridge, 1 process), cb_w2 (--workers 2), ``other`` (the tool compared with),
    floor, floor_flush, startup."""
    cb, w2, oth = res.get("cb"), res.get("cb_w2"), res.get(other)
    floor, flush, st = res.get("floor"), res.get("floor_flush"), res.get("startup")
    fail = "not run" if cb is None else "-" if ok(cb) else "ckpt-bridge FAILED: " + cb["error"][:120]
    rows = []
    if speedup_target is None:
        rows.append((f"speed-up vs {other_label}", "> 1x (faster)",
                     _ratio_cell(oth, cb, lambda x: x > 1.0) if ok(cb) else fail))
    else:
        rows.append((f"speed-up vs {other_label}", f">= {speedup_target:g}x",
                     _ratio_cell(oth, cb, lambda x: x >= speedup_target) if ok(cb) else fail))
    rows.append(("wall / floor", "<= 1.5x", _ratio_cell(cb, floor, lambda x: x <= 1.5) if ok(cb) else fail))
    rows.append(("wall / (floor + one flush)", "context", _ratio_cell(cb, flush, None) if ok(cb) else fail))
    if ok(cb):
        rss = gb_kib(cb["rss_kib"])
        tgt = f"< {rss_target_gb:g} GB" if rss_target_gb else "report"
        rows.append(("peak RSS", tgt, f"{rss:.2f} GB" + (f" {verdict(rss < rss_target_gb)}" if rss_target_gb else "")))
    else:
        rows.append(("peak RSS", "-", fail))
    cell = fail
    if ok(cb) and ok(st):
        net = cb["wall_s"] - st["wall_s"]
        cell = f"{net:.2f} s (torch start-up {st['wall_s']:.2f} s)"
        if ok(floor):
            cell += f", {net / floor['wall_s']:.2f}x floor"
    rows.append(("wall - `import torch, safetensors.torch`", "context", cell))
    if w2 is not None:
        if ok(w2) and ok(cb):
            cell = (f"{w2['wall_s']:.2f} s, {cb['wall_s'] / w2['wall_s']:.2f}x vs 1 process, "
                    f"RSS {gb_kib(w2['rss_kib']):.2f} GB")
        elif w2["rc"] != 0:
            cell = f"FAILED (exit {w2['rc']}): {w2['error'][:120]}"
        else:
            cell = "-"
        rows.append(("--workers 2: wall, speed-up vs 1, peak RSS", "context", cell))
        rows.append(("--workers 2 output == --workers 1", "byte-identical", identity_status(res.get("identity"))))
    return rows


def _ratio_cell(num: dict | None, den: dict | None, good) -> str:
    if not ok(num) or not ok(den):
        missing = [r for r in (num, den) if not ok(r)]
        return "-" if not missing or missing[0] is None else f"n/a ({missing[0]['key']} failed)"
    x = num["wall_s"] / den["wall_s"]
    return f"{x:.2f}x" + (f" {verdict(good(x))}" if good else "")


def summary_table(title: str, per_size: dict[str, list[tuple[str, str, str]]]) -> list[str]:
    """One markdown table per direction: a row per check, a column per size."""
    sizes = list(per_size)
    lines = [f"**{title}**", "", "| check | target | " + " | ".join(sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    targets = {check: target for rows in per_size.values() for check, target, _ in rows}
    cells = {(s, check): value for s, rows in per_size.items() for check, _, value in rows}
    for check, target in targets.items():
        lines.append(f"| {check} | {target} | " + " | ".join(cells.get((s, check), "-") for s in sizes) + " |")
    return lines


def scaling_lines(title: str, per_size: dict[str, dict]) -> list[str]:
    """Seconds per GB written and peak RSS of ckpt-bridge (1 process) per size; flat if the ratio of the
    larger size to the smaller stays within 15 %."""
    lines = [f"**{title}: ckpt-bridge (1 process) per size**", "",
             "| size | params | output GB | wall s | s / GB written | peak RSS GB | --workers 2 s / GB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    spg = {}
    for tag, d in per_size.items():
        cb, w2 = d["cb"], d.get("cb_w2")
        if not ok(cb) or not cb["out_bytes"]:
            lines.append(f"| {tag} | {d['params']} | - | FAILED | - | - | - |")
            continue
        spg[tag] = (cb["wall_s"] / (cb["out_bytes"] / 1e9), gb_kib(cb["rss_kib"]))
        w2c = f"{w2['wall_s'] / (cb['out_bytes'] / 1e9):.2f}" if ok(w2) else "failed" if w2 else "-"
        lines.append(f"| {tag} | {d['params']} | {cb['out_bytes'] / 1e9:.2f} | {cb['wall_s']:.2f} | "
                     f"{spg[tag][0]:.2f} | {spg[tag][1]:.2f} | {w2c} |")
    lines.append("")
    if len(spg) == 2:
        (s1, (t1, r1)), (s2, (t2, r2)) = spg.items()
        tr, rr = t2 / t1, r2 / r1
        lines.append(f"- growth {s1} -> {s2}: time/GB x{tr:.2f} ({_flat(tr)}), peak RSS x{rr:.2f} ({_flat(rr)}) "
                     "(flat = the larger model's value within 15 % of the smaller's)")
    else:
        lines.append("- growth: needs both sizes (--size both)")
    return lines


def _flat(ratio: float) -> str:
    return "NOT flat: grows" if ratio > 1.15 else "flat" if ratio >= 1 / 1.15 else "falls"


def params_of(size: Size) -> str:
    return f"{size.est_fp32_bytes() / 4 / 1e9:.2f}B"


# ---- environment lines


def ver(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "?"


def self_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def git_rev() -> str:
    p = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
    return (p.stdout.strip() or "?") + (" + uncommitted changes" if dirty.stdout.strip() else "")


def machine_line() -> str:
    mem = 0.0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 1024**2
    return (f"{os.cpu_count()} CPUs (nproc {NCPU}), {mem:.1f} GiB RAM, {platform.platform()}, "
            f"Python {platform.python_version()}")


def header_lines(title: str) -> list[str]:
    return [
        f"# {title}", "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {machine_line()}",
        f"- versions: torch {ver('torch')}, transformers {ver('transformers')}, verl {ver('verl')}, "
        f"safetensors {ver('safetensors')}, ckpt-bridge {ver('ckpt-bridge')} (git {git_rev()})",
        "- page cache: warm. It cannot be dropped without root, so before every measured command its input "
        "files were read with `cat > /dev/null` and `sync` flushed earlier dirty pages (outside the timing). "
        "No tool fsyncs, except ckpt-bridge's one flush before its final rename (if the engine does it) and "
        "the \"floor + one flush\" row.",
        f"- peak RSS: `ru_maxrss` of the child from `os.wait4`, GB = 10^9 bytes; the stdlib-only parent was "
        f"{self_rss_kib() / 1024:.0f} MiB at spawn. For `--workers 2` this is the CLI process's ru_maxrss, which "
        "includes its reaped children (the workers): the largest of the CLI and any one worker, not their sum.",
        "- (!) = other processes used noticeable CPU during that run (machine-wide busy CPU minus the child's): "
        "its wall time is probably inflated.",
    ]


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "floor":
        floor_io(int(rest[0]), rest[1], rest[2] == "flush", rest[3:])
    elif mode == "dcp-metadata-equal":
        dcp_metadata_equal(rest[0], rest[1])
    else:
        raise SystemExit(f"unknown mode {mode}")
