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
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
BIN = Path(sys.executable).parent
CLI = [PY, "-m", "ckpt_bridge"]  # ckpt-bridge only through its public CLI
CHUNK = 64 * 1024 * 1024
STARTUP_CMD = [PY, "-c", "import torch, safetensors.torch"]

# ------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------

SIZES = {"1b": "llama_1b", "1b_x2": "llama_1b_x2", "8b_w2": "llama_1b"}  # --size NAME -> tiny_models preset
PRESET_LAYERS = {"1b": 16, "1b_x2": 32, "8b_w2": 2}
LAYER_FACTOR = {"1b": 1, "1b_x2": 2, "8b_w2": 0}  # 0: --layers does not apply (already 2 layers)
# The widths of each size (what the disk guards and the parameter count use); OVERRIDES are set on the preset's
# config: 8b_w2 is Llama-3.1-8B's widths with 2 layers, untied (1.49B params, embedding and lm_head 2.1 GB each
# in fp32): the size of issue 20's memory target, where a tool that holds whole tensors shows it.
WIDTHS = {"1b": dict(hidden=2048, inter=8192, vocab=128256, heads=32, kv=8, head_dim=64, tied=True),
          "8b_w2": dict(hidden=4096, inter=14336, vocab=128256, heads=32, kv=8, head_dim=128, tied=False)}
WIDTHS["1b_x2"] = WIDTHS["1b"]
OVERRIDES = {"8b_w2": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                           head_dim=128, tie_word_embeddings=False)}
GROUPS = {"both": ["1b", "1b_x2"], "all": ["1b", "1b_x2", "8b_w2"]}


def sizes_arg(value: str) -> list[str]:
    """``--size``: a size, ``both`` (1b, 1b_x2), ``all`` (and 8b_w2), or a comma list of sizes."""
    names = [n for part in value.split(",") for n in GROUPS.get(part, [part])]
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        raise SystemExit(f"unknown --size {', '.join(unknown)}; known: {', '.join([*SIZES, *GROUPS])}")
    return list(dict.fromkeys(names))


def add_size_args(ap, default: str = "1b") -> None:
    ap.add_argument("--size", default=default, metavar="SIZE[,SIZE...]",
                    help="1b = llama_1b (16 layers, 1.24B params), 1b_x2 = llama_1b_x2 (32 layers, 2.21B), "
                         "8b_w2 = Llama-3.1-8B widths with 2 layers (untied, 1.49B: the memory target's size), "
                         f"both = 1b,1b_x2, all = 1b,1b_x2,8b_w2, or a comma list; default {default}")
    ap.add_argument("--layers", type=int, default=None, metavar="K",
                    help="for fast iteration: the 1b size gets K layers and 1b_x2 gets 2K (the 2x ratio is kept; "
                         "8b_w2 keeps its 2); default: the presets' 16 and 32")
    ap.add_argument("--repeat", type=int, default=3,
                    help="interleaved rounds; the tables show each tool's median round with min and max (default 3)")


class Size:
    """One benchmark size: preset name, layer count, config overrides, work dir (``WORKDIR/<tag>``)."""

    def __init__(self, name: str, layers: int | None, workdir: Path):
        self.name = name
        self.preset = SIZES[name]
        self.overrides = OVERRIDES.get(name, {})
        self.widths = WIDTHS[name]
        factor = LAYER_FACTOR[name]
        self.layers = PRESET_LAYERS[name] if layers is None or not factor else layers * factor
        self.override = self.layers != PRESET_LAYERS[name]
        self.tag = name if not self.override else f"{name}-L{self.layers}"
        self.dir = workdir / self.tag
        self.logdir = self.dir / "logs"

    def describe(self) -> str:
        w = self.widths
        shape = "" if not self.overrides else (f", hidden {w['hidden']}, intermediate {w['inter']}, vocab {w['vocab']}, "
                                               f"{w['heads']} heads / {w['kv']} kv heads, "
                                               + ("tied" if w["tied"] else "untied"))
        return f"{self.preset}" + (f" with --layers override: {self.layers} layers" if self.override else
                                   f" ({self.layers} layers{shape})")

    def config_json(self) -> str:
        """What a child sets on ``build_config(preset)``: the layer count and the size's overrides."""
        return json.dumps({**self.overrides, "num_hidden_layers": self.layers})

    def params(self) -> int:
        w = self.widths
        h, q, kv = w["hidden"], w["heads"] * w["head_dim"], w["kv"] * w["head_dim"]
        per_layer = 2 * h * q + 2 * h * kv + 3 * h * w["inter"] + 2 * h
        return self.embedding_params() * (1 if w["tied"] else 2) + self.layers * per_layer + h

    def est_fp32_bytes(self) -> int:
        """fp32 model bytes (disk guard and parameter count)."""
        return 4 * self.params()

    def embedding_params(self) -> int:
        return self.widths["vocab"] * self.widths["hidden"]

    def dcp_extra_bytes(self) -> int:
        """What to-dcp writes beyond the fp32 model: a tied embedding twice (embed_tokens and lm_head, as the
        trainer loads them)."""
        return 4 * self.embedding_params() if self.widths["tied"] else 0


def apply_config(cfg, config_json: str):
    """Set a Size's ``config_json`` on a transformers config (in a child)."""
    for k, v in json.loads(config_json).items():
        setattr(cfg, k, v)
    return cfg


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


RUSAGE = ("ru_utime", "ru_stime", "ru_maxrss", "ru_majflt", "ru_minflt", "ru_nvcsw", "ru_nivcsw")


def measure(key: str, cmd: list[str], warm_files: list[Path], logdir: Path) -> dict:
    """Run ``cmd`` as a child after warming ``warm_files`` and one ``sync``: wall seconds, and from the child's
    rusage (``os.wait4``, what /usr/bin/time reports) user / sys CPU seconds, peak RSS (KiB), major / minor page
    faults, voluntary / involuntary context switches; the CPU the rest of the machine used meanwhile; rc."""
    logdir.mkdir(parents=True, exist_ok=True)
    t_warm = warm(warm_files)
    print(f"\n[{key}] warm-up cat+sync {t_warm:.1f}s; running: {' '.join(cmd)}", flush=True)
    out_log, err_log = logdir / f"{key}.stdout", logdir / f"{key}.stderr"
    with open(out_log, "wb") as so, open(err_log, "wb") as se:
        os.sync()  # (warm already synced; again right before the clock starts: no tool pays for another's write-back)
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
        "stime_s": ru.ru_stime, "cpu_s": cpu, "majflt": ru.ru_majflt, "minflt": ru.ru_minflt,
        "nvcsw": ru.ru_nvcsw, "nivcsw": ru.ru_nivcsw,
        # machine-wide busy CPU minus the child's: other processes (and kernel writeback) on this box
        "foreign_cpu_s": max(0.0, busy - cpu), "stderr": err_log, "out_bytes": 0,
        "error": first_error_line(err_log) if rc else "",
    }
    print(f"[{key}] rc={rc} wall={wall:.2f}s peak_rss={gb_kib(ru.ru_maxrss):.2f} GB "
          f"cpu={ru.ru_utime:.1f}u+{ru.ru_stime:.1f}s faults={ru.ru_majflt}maj+{ru.ru_minflt}min "
          f"csw={ru.ru_nvcsw}vol+{ru.ru_nivcsw}invol other_cpu={res['foreign_cpu_s']:.1f}s", flush=True)
    if rc:
        tail = err_log.read_text(errors="replace").splitlines()[-15:]
        print(f"[{key}] FAILED: {res['error']}\n  stderr tail ({err_log}):\n  " + "\n  ".join(tail), flush=True)
    return res


# what combine() takes the median of; rss_kib is the max over the rounds, out_bytes / out_files the first's
MEDIAN_FIELDS = ("wall_s", "utime_s", "stime_s", "cpu_s", "majflt", "minflt", "nvcsw", "nivcsw", "foreign_cpu_s")


def combine(reps: list[dict]) -> dict:
    """The successful rounds of one tool: the median of each of MEDIAN_FIELDS (targets are judged on the
    median), wall min and max, peak RSS = the max; ``rounds`` keeps every round.  A failure if none succeeded."""
    good = [r for r in reps if r["rc"] == 0]
    if not good:
        return {**reps[-1], "rounds": reps}
    res = dict(good[0])
    for f in MEDIAN_FIELDS:
        res[f] = statistics.median(r[f] for r in good)
    walls = [r["wall_s"] for r in good]
    res.update(rss_kib=max(r["rss_kib"] for r in good), wall_min=min(walls), wall_max=max(walls),
               n_ok=len(good), n_failed=len(reps) - len(good), rounds=reps)
    return res


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


def floor_rows(step, out_bytes: int, out_file: Path, inputs: list[Path]) -> None:
    """The rows every direction ends a round with: the I/O floor (read ``inputs``, write ``out_bytes``), the same
    plus one flush, and the torch start-up.  ``step(key, cmd, out_dir)`` runs and records one command."""
    for key, flush in (("floor", False), ("floor_flush", True)):
        r = step(key, floor_cmd(out_bytes, out_file, inputs, flush), None)
        r["out_bytes"] = out_bytes
        rm(out_file)
    step("startup", STARTUP_CMD, None)


def run_sizes(args, bench_size, report, workdir: Path, name: str, logs: str) -> list[dict] | None:
    """Every ``--size`` through ``bench_size``, the report printed and written to ``workdir/name``; the runs,
    or None if nothing was measured."""
    runs = [r for r in (bench_size(Size(n, args.layers, workdir), args) for n in sizes_arg(args.size)) if r]
    if not runs:
        print("nothing measured")
        return None
    md = report(runs, args)
    print("\n" + md)
    (workdir / name).write_text(md + "\n")
    print(f"written to {workdir / name}; logs in {workdir}/<size>/{logs}")
    return runs


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
    """Markdown rows: one per measured step, in ``labels`` order; every number is the median of the rounds
    (wall also with its min and max), peak RSS the max."""
    floor = results[floor_key]["wall_s"] if ok(results.get(floor_key)) else None
    rows = ["| tool | wall s: median [min-max] | wall / floor | CPU s: user+sys | peak RSS GB | page faults: "
            "major / minor | context switches: voluntary / involuntary | other CPU s during run | output GB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in labels.items():
        r = results.get(key)
        if r is None:
            continue
        if r["rc"] != 0:
            rows.append(f"| {label} | FAILED (exit {r['rc']}): {r['error'][:160]} |" + " - |" * 7)
            continue
        wall = f"{r['wall_s']:.2f}"
        if r.get("n_ok", 1) > 1:
            wall += f" [{r['wall_min']:.2f}-{r['wall_max']:.2f}]"
        if r.get("n_failed"):
            wall += f" ({r['n_failed']} round(s) FAILED)"
        flag = " (!)" if noisy(r) else ""
        rows.append(
            f"| {label} | {wall} | " + (f"{r['wall_s'] / floor:.2f}x" if floor else "-")
            + f" | {r['utime_s']:.1f}+{r['stime_s']:.1f} = {r['cpu_s']:.1f} | {gb_kib(r['rss_kib']):.2f} | "
            f"{r['majflt']:.0f} / {r['minflt']:.0f} | {r['nvcsw']:.0f} / {r['nivcsw']:.0f} | "
            f"{r['foreign_cpu_s']:.1f}{flag} | " + (f"{r['out_bytes'] / 1e9:.2f} |" if r["out_bytes"] else "- |"))
    return rows


def rounds_table(results: dict[str, dict], labels: dict[str, str]) -> list[str]:
    """Every round of every tool (the medians above come from these): wall, CPU, peak RSS, faults, switches."""
    rows = ["| tool | round | wall s | user s | sys s | peak RSS GB | major / minor faults | vol / invol switches | "
            "other CPU s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in labels.items():
        r = results.get(key)
        for i, x in enumerate((r or {}).get("rounds", []), 1):
            if x["rc"] != 0:
                rows.append(f"| {label} | {i} | FAILED (exit {x['rc']}) | - | - | - | - | - | - |")
                continue
            rows.append(f"| {label} | {i} | {x['wall_s']:.2f} | {x['utime_s']:.2f} | {x['stime_s']:.2f} | "
                        f"{gb_kib(x['rss_kib']):.2f} | {x['majflt']} / {x['minflt']} | {x['nvcsw']} / {x['nivcsw']} | "
                        f"{x['foreign_cpu_s']:.1f} |")
    return rows


def noisy(r: dict) -> bool:
    """Other processes used noticeable CPU during the run: its wall time is probably inflated."""
    return r["foreign_cpu_s"] > max(1.0, 0.10 * r["wall_s"] * NCPU)


def direction_checks(res: dict[str, dict], *, other: str | None, other_label: str, speedup_target: float | None,
                     rss_target_gb: float | None) -> list[tuple[str, str, str]]:
    """The summary of one direction at one size: (check, target, value + verdict) rows, on the medians.

    ``res`` keys: cb (ckpt-bridge, 1 process), cb_w2 (--workers 2), ``other`` (the tool compared with; None:
    no peer runs here, ``other_label`` says why), floor, floor_flush, startup."""
    cb, w2 = res.get("cb"), res.get("cb_w2")
    oth = res.get(other) if other else None
    floor, flush, st = res.get("floor"), res.get("floor_flush"), res.get("startup")
    fail = "not run" if cb is None else "-" if ok(cb) else "ckpt-bridge FAILED: " + cb["error"][:120]
    rows = []
    if other is None:
        rows.append(("speed-up vs peer", "-", other_label))
    else:
        target = "> 1x (faster)" if speedup_target is None else f">= {speedup_target:g}x"
        good = (lambda x: x > 1.0) if speedup_target is None else (lambda x: x >= speedup_target)
        rows.append((f"speed-up vs {other_label} (median wall)", target, _ratio_cell(oth, cb, good) if ok(cb) else fail))
        rows.append((f"CPU (user+sys) of {other_label} / ckpt-bridge's", "context",
                     _ratio_cell(oth, cb, None, "cpu_s") if ok(cb) else fail))
    cell = fail
    if ok(cb) and ok(st) and ok(floor):
        x = (cb["wall_s"] - st["wall_s"]) / floor["wall_s"]
        cell = (f"{x:.2f}x {verdict(x <= 2.0)} ({cb['wall_s'] - st['wall_s']:.2f} s after a {st['wall_s']:.2f} s "
                "torch start-up)")
    rows.append(("(wall - `import torch, safetensors.torch`) / floor", "<= 2x", cell))
    rows.append(("wall / floor", "context", _ratio_cell(cb, floor, None) if ok(cb) else fail))
    rows.append(("wall / (floor + one flush)", "context", _ratio_cell(cb, flush, None) if ok(cb) else fail))
    if ok(cb):
        rss = gb_kib(cb["rss_kib"])
        tgt = f"< {rss_target_gb:g} GB" if rss_target_gb else "report"
        rows.append(("peak RSS (max of the rounds)", tgt,
                     f"{rss:.2f} GB" + (f" {verdict(rss < rss_target_gb)}" if rss_target_gb else "")))
    else:
        rows.append(("peak RSS (max of the rounds)", "-", fail))
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


def _ratio_cell(num: dict | None, den: dict | None, good, field: str = "wall_s") -> str:
    if not ok(num) or not ok(den):
        missing = [r for r in (num, den) if not ok(r)]
        return "-" if not missing or missing[0] is None else f"n/a ({missing[0]['key']} failed)"
    x = num[field] / den[field]
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
    pair = [next((t for t in spg if t.split("-")[0] == name), None) for name in ("1b", "1b_x2")]
    if all(pair):
        (s1, (t1, r1)), (s2, (t2, r2)) = ((t, spg[t]) for t in pair)
        tr, rr = t2 / t1, r2 / r1
        lines.append(f"- growth {s1} -> {s2}: time/GB x{tr:.2f} ({_flat(tr)}), peak RSS x{rr:.2f} ({_flat(rr)}) "
                     "(flat = the larger model's value within 15 % of the smaller's)")
    else:
        lines.append("- growth: needs the sizes 1b and 1b_x2 (--size both)")
    return lines


def _flat(ratio: float) -> str:
    return "NOT flat: grows" if ratio > 1.15 else "flat" if ratio >= 1 / 1.15 else "falls"


def params_of(size: Size) -> str:
    return f"{size.params() / 1e9:.2f}B"


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
        "files were read with `cat > /dev/null`, then `sync` (os.sync) flushed every earlier dirty page, outside the "
        "timing: no tool pays for another's write-back. No tool fsyncs, except ckpt-bridge's one flush before its "
        "final rename and the \"floor + one flush\" row.",
        "- rounds: the tools run one after the other, N interleaved rounds (`--repeat N`); each number is the "
        "median of the rounds (wall also [min-max]), peak RSS the max; targets are judged on the medians. CPU, "
        "faults and context switches are the child's rusage from `os.wait4` (what /usr/bin/time prints), "
        "children it reaped included.",
        f"- peak RSS: `ru_maxrss` of the child, GB = 10^9 bytes; the stdlib-only parent was "
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
