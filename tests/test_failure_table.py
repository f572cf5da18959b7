"""Section 7's failure table: every failure is exactly one line on stderr and exit 2 (130 on Ctrl-C),
nothing partial is left next to --out, and the source files are unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckpt_bridge.cli import main as cli
from ckpt_bridge.dcp_export import MANIFEST

PY = sys.executable


def tree_hash(d: Path) -> dict[str, str]:
    if d.is_file():
        return {d.name: hashlib.sha256(d.read_bytes()).hexdigest()}
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def assert_fails(capsys, args: list[str], *, code: int = 2, says: str = "", sources: tuple[Path, ...] = ()):
    """Run the CLI in-process; exactly one stderr line containing ``says``; no output or .partial left."""
    hashes = [tree_hash(s) for s in sources]
    out = Path(args[args.index("--out") + 1]) if "--out" in args else None
    capsys.readouterr()
    rc = cli(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code, (args, err)
    assert len(err) == 1, (args, err)
    assert says in err[0], (args, err[0])
    if out is not None:
        assert not os.path.lexists(out) or out.is_symlink(), out
        parent = out.parent if not out.parent.is_symlink() else out.parent.parent
        assert not [p for p in parent.iterdir() if ".partial-" in p.name], list(parent.iterdir())
    assert [tree_hash(s) for s in sources] == hashes
    return err[0]


@pytest.fixture(scope="module")
def dcp_dir(llama_dcp_with_aux):
    return llama_dcp_with_aux


def copy_dcp(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_distcp_and_offsets_past_the_end(dcp_dir, tmp_path, capsys):
    hf, clean = dcp_dir
    d = copy_dcp(clean, tmp_path / "trunc")
    big = max(d.glob("*.distcp"), key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    for args in (["to-hf", str(d), "--out", str(tmp_path / "o")], ["to-hf", str(d), "--out", str(tmp_path / "x"), "--dry-run"],
                 ["verify", str(d), "--against", str(hf)], ["verify", str(d), str(hf)]):
        assert_fails(capsys, args, says=f"{big.name}", sources=(d,))

    d2 = copy_dcp(clean, tmp_path / "offsets")
    with open(d2 / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own clean file
    index, info = next(iter(md.storage_data.items()))
    info.offset = (d2 / info.relative_path).stat().st_size + 4096
    with open(d2 / ".metadata", "wb") as f:
        pickle.dump(md, f)
    line = assert_fails(capsys, ["to-hf", str(d2), "--out", str(tmp_path / "o")], says="truncated or from another save",
                        sources=(d2,))
    assert index.fqn in line


def _hf_with_config(src: Path, dst: Path, raw: bytes) -> Path:
    shutil.copytree(src, dst)
    (dst / "config.json").write_bytes(raw)
    return dst


@pytest.mark.parametrize("verb", ["to-hf", "to-dcp"])
def test_bad_config_json(tiny_hf_factory, tmp_path, capsys, verb):
    hf = tiny_hf_factory("llama")
    cfg = json.loads((hf / "config.json").read_text())
    cases = {
        "not UTF-8": (b"\xff\xfe{\x00", "not UTF-8"),
        "not an object": (b"[1, 2]", "not an object"),
        "unknown model_type": (json.dumps({**cfg, "model_type": "llamazilla"}).encode(), "'llamazilla'"),
        "auto_map": (json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "x.Y"}}).encode(), "auto_map"),
        "wrong field type": (json.dumps({**cfg, "architectures": "LlamaForCausalLM"}).encode(), "'architectures'"),
    }
    for i, (name, (raw, says)) in enumerate(cases.items()):
        d = _hf_with_config(hf, tmp_path / f"hf{i}", raw)
        assert_fails(capsys, [verb, str(d), "--out", str(tmp_path / "o")], says=says, sources=(d,))


def test_wrong_json_structure_names_the_field(dcp_dir, verl_ckpt, tiny_hf_factory, tmp_path, capsys):
    hf = tiny_hf_factory("llama")  # sharded: has model.safetensors.index.json
    d = tmp_path / "hf"
    shutil.copytree(hf, d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    assert_fails(capsys, ["to-hf", str(d), "--out", str(tmp_path / "o")], says="'weight_map'", sources=(d,))

    actor = tmp_path / "verl" / "global_step_1" / "actor"
    shutil.copytree(verl_ckpt("llama", "2"), actor)
    cfg = json.loads((actor / "fsdp_config.json").read_text())
    (actor / "fsdp_config.json").write_text(json.dumps({**cfg, "world_size": "two"}))
    assert_fails(capsys, ["to-hf", str(actor), "--out", str(tmp_path / "o")], says="'world_size'", sources=(actor,))

    _, clean = dcp_dir
    m = copy_dcp(clean, tmp_path / "manifest")
    doc = json.loads((m / MANIFEST).read_text())
    (m / MANIFEST).write_text(json.dumps({**doc, "aux": {"future_predictor": 1}}))
    for args in (["to-hf", str(m), "--out", str(tmp_path / "o")], ["verify", str(m), "--against", str(hf)],
                 ["to-dcp", str(hf), "--out", str(tmp_path / "o"), "--aux-from", str(m)]):
        assert_fails(capsys, args, says="field 'aux'", sources=(m,))


def test_absurd_aux_size_in_a_manifest_is_refused_before_allocating(dcp_dir, tmp_path, capsys):
    hf, clean = dcp_dir
    m = copy_dcp(clean, tmp_path / "absurd")
    doc = json.loads((m / MANIFEST).read_text())
    doc["aux"][0]["spec"] = "future_predictor:linear:99999999999"  # ~256 TB of fp32 with hidden 64
    (m / MANIFEST).write_text(json.dumps(doc))
    text = tmp_path / "t.txt"
    text.write_text("hello " * 50)
    for args in (["verify", str(m), "--against", str(hf), "--loss", str(text)],
                 ["to-dcp", str(hf), "--out", str(tmp_path / "o"), "--aux-from", str(m)]):
        line = assert_fails(capsys, args, says="exceeds the model's largest dimension", sources=(m,))
        assert "aux[0].spec" in line


def test_symlink_loop_out_and_complex_tensor(tiny_hf_factory, tmp_path, capsys):
    hf = tiny_hf_factory("llama")
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    for verb in ("to-hf", "to-dcp"):
        assert_fails(capsys, [verb, str(hf), "--out", str(loop)], says="symlink loop", sources=(hf,))
        assert_fails(capsys, [verb, str(hf), "--out", str(loop / "x")], says="symlink loop", sources=(hf,))

    from ckpt_bridge.formats.hf import HFReader

    r = HFReader(hf)
    sd = {k: r.read(k) for k in r.tensors()}
    key = "model.layers.0.mlp.up_proj.weight"
    sd[key] = torch.complex(sd[key], sd[key])
    d = tmp_path / "complex"
    d.mkdir()
    shutil.copy(hf / "config.json", d)
    torch.save(sd, d / "pytorch_model.bin")
    line = assert_fails(capsys, ["to-hf", str(d), "--out", str(tmp_path / "o")], says="complex64", sources=(d,))
    assert key in line


# ---------------------------------------------------------------- ENOSPC (a small tmpfs)


@pytest.fixture
def small_fs(tmp_path):
    """A 200 KB tmpfs (the tiny models need ~500 KB).  Needs root and mount permission."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}): ENOSPC needs a small file system")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_is_one_line_with_the_bytes_needed(dcp_dir, tiny_hf_factory, small_fs, capsys):
    hf, d = dcp_dir
    for args in (["to-hf", str(hf), "--out", str(small_fs / "a")],
                 ["to-dcp", str(hf), "--out", str(small_fs / "b")],
                 ["to-hf", str(d), "--out", str(small_fs / "c")]):
        line = assert_fails(capsys, args + ["--quiet"], says="no space left on the device", sources=(hf, d))
        assert "needs" in line and "bytes free" in line and str(small_fs) in line
    assert list(small_fs.iterdir()) == []


FAILED_CONSUMER = """
import sys, torch
from ckpt_bridge.stream import read_ahead
def read(k):  # a read that spends its time inside torch's C++ code, as DCP's reader does
    a = torch.randn(300, 300)
    for _ in range(10):
        a = a @ a / (a @ a).norm()
    return a
kept = []
def export():
    stream = read_ahead(list(range(20)), read)
    for k, t in stream:
        raise OSError(28, "No space left on device")  # the writer fails at the first tensor
try:
    export()
except OSError as e:
    kept.append(e)  # its traceback keeps the generator (and its reader thread) alive, as the CLI's did
sys.exit(2)
"""


def test_failed_export_exits_without_sigabrt():
    """DCP -> HF on a full disk used to abort at exit (SIGABRT, "terminate called without an active
    exception"): the failed export's read-ahead thread was still inside DCP's C++ reader when the interpreter
    killed it.  The same situation, deterministic: the worker must finish its read and return."""
    p = subprocess.run([PY, "-c", FAILED_CONSUMER], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "terminate called" not in p.stderr, (p.returncode, p.stderr)


# ---------------------------------------------------------------- Ctrl-C

SLOW_TO_DCP = """
import sys, time
from ckpt_bridge.formats.hf import HFReader
read = HFReader.read
def slow(self, key, dtype=None):  # slow the source down so the signal lands inside DCP's writer
    time.sleep(0.2)
    return read(self, key, dtype)
HFReader.read = slow
from ckpt_bridge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_during_to_dcp(tiny_hf_factory, tmp_path):
    hf = tiny_hf_factory("llama")
    out = tmp_path / "o"
    p = subprocess.Popen([PY, "-c", SLOW_TO_DCP, "to-dcp", str(hf), "--out", str(out), "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".o.partial-*/**/*.distcp")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".o.partial-*/**/*.distcp")), "to-dcp never started writing"
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=60)
    err = stderr.strip().splitlines()
    assert p.returncode == 130 and len(err) == 1 and "interrupted" in err[0], (p.returncode, stderr)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- issue 19, rows 6-12 (rel-misc)

def _run(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "ckpt_bridge", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _edited_config(src: Path, dst: Path, **fields) -> Path:
    cfg = json.loads((src / "config.json").read_text())
    return _hf_with_config(src, dst, json.dumps({**cfg, **fields}).encode())


@pytest.mark.parametrize("fields, says", [
    ({"num_hidden_layers": 1000000000}, "num_hidden_layers = 1000000000, but the checkpoint's"),
    ({"num_hidden_layers": 1e9}, "num_hidden_layers = 1000000000.0 is not an integer"),
    ({"hidden_size": 4096}, "hidden_size = 4096, but no tensor has a dimension of that size"),
    ({"vocab_size": 0}, "vocab_size = 0 must be at least 1"),
    ({"pad_token_id": 300}, "pad_token_id = 300 is outside the vocabulary"),
], ids=["layers-1e9-int", "layers-1e9-float", "hidden", "vocab-0", "pad-id"])
def test_issue19_config_that_describes_another_model(tiny_hf_factory, dcp_dir, verl_ckpt, tmp_path, capsys,
                                                     fields, says):
    """Row 6 (and 10): refused in one line before transformers parses the config or any model is built, in every
    direction that builds one; it used to run without an end (1e9 layers) or print transformers' warnings."""
    hf = tiny_hf_factory("llama")
    bad = _edited_config(hf, tmp_path / "bad", **fields)
    _, dcp = dcp_dir
    t0 = time.monotonic()
    for args in (["to-dcp", str(bad), "--out", str(tmp_path / "o")],
                 ["to-dcp", str(bad), "--out", str(tmp_path / "o"), "--titan-model", "llama3"],
                 ["to-hf", str(bad), "--out", str(tmp_path / "o")],
                 ["to-hf", str(verl_ckpt("llama", "2")), "--config", str(bad), "--out", str(tmp_path / "o")],
                 ["to-hf", str(dcp), "--config", str(bad), "--out", str(tmp_path / "o")],
                 ["verify", str(bad), str(hf), "--logits"],
                 ["verify", str(dcp), "--against", str(bad)]):
        assert_fails(capsys, args, says=says, sources=(bad,))
    rc, problems = _inspect_problems(capsys, bad)  # inspect: the same refusal, listed
    assert rc == 2 and says in problems, problems
    assert time.monotonic() - t0 < 60
    # transformers' own log lines (its handler writes to the real stderr): a subprocess sees them all
    r = _run("to-dcp", bad, "--out", tmp_path / "o")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, r.stderr


def _inspect_problems(capsys, d: Path) -> tuple[int, str]:
    from ckpt_bridge.cli import main

    capsys.readouterr()
    rc = main(["inspect", str(d), "--json"])
    return rc, "\n".join(json.loads(capsys.readouterr().out)["problems"])


@pytest.mark.parametrize("fields", [{"auto_map": {"AutoModelForCausalLM": "m.M"}}, {"model_type": "llamazilla"},
                                    {"hidden_size": -64}, {"num_hidden_layers": 1000000000}],
                         ids=["auto_map", "model_type", "negative-hidden", "layers"])
def test_issue19_inspect_lists_what_to_hf_and_to_dcp_refuse(tiny_hf_factory, verl_ckpt, tmp_path, capsys, fields):
    """Row 11: inspect used to say "problems none" (exit 0); it now lists the very line to-hf / to-dcp print."""
    bad = _edited_config(tiny_hf_factory("llama"), tmp_path / "bad", **fields)
    rc, problems = _inspect_problems(capsys, bad)
    for verb in ("to-hf", "to-dcp"):
        line = assert_fails(capsys, [verb, str(bad), "--out", str(tmp_path / "o")], sources=(bad,))
        assert rc == 2 and line.split("error: ", 1)[1] in problems, (line, problems)
    actor = tmp_path / "verl" / "global_step_1" / "actor"  # a real verl save carrying that config
    shutil.copytree(verl_ckpt("llama", "2"), actor)
    cfg = json.loads((actor / "huggingface" / "config.json").read_text())
    (actor / "huggingface" / "config.json").write_text(json.dumps({**cfg, **fields}))
    rc, problems = _inspect_problems(capsys, actor)
    line = assert_fails(capsys, ["to-hf", str(actor), "--out", str(tmp_path / "o")], sources=(actor,))
    assert rc == 2 and line.split("error: ", 1)[1] in problems, (line, problems)


def test_issue19_usage_errors_are_one_line(tiny_hf_dir, tmp_path):
    """Row 9: argparse's usage errors: one line naming the help to read, exit 2; --help unchanged."""
    for args, says in ((["to-hf", tiny_hf_dir, "--out", tmp_path / "o", "--lora", "bogus"], "argument --lora"),
                       (["to-hf", tiny_hf_dir, "--out", tmp_path / "o", "--workers", "abc"], "'abc'"),
                       (["to-dcp", tiny_hf_dir], "--out"), (["frobnicate"], "invalid choice")):
        r = _run(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and says in lines[0], r.stderr
        verb = "ckpt-bridge" + (f" {args[0]}" if args[0] != "frobnicate" else "")
        assert lines[0].startswith(f"{verb}: error: ") and lines[0].endswith(f"see {verb} --help"), lines[0]
    r = _run("to-hf", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: ckpt-bridge to-hf") and "--workers N" in r.stdout
    assert "--worker " not in r.stdout and "RANK/SIZE" not in r.stdout  # the internal flag stays hidden
    assert not (tmp_path / "o").exists()


def test_issue19_worker_coordination_is_not_in_the_environment(tiny_hf_dir, tmp_path):
    """Row 12: a stray CKPT_BRIDGE_WORKER made a plain to-hf pwrite into another directory's files; the hidden
    --worker flag works only for a process whose parent is writing that --out."""
    victim = tmp_path / "victim"
    shutil.copytree(tiny_hf_dir, victim)
    before = tree_hash(victim)
    env = dict(os.environ, CKPT_BRIDGE_WORKER=json.dumps({"rank": 1, "size": 2, "tmp": str(victim)}))
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert _run("to-hf", tiny_hf_dir, "--out", ref, "--quiet").returncode == 0
    r = _run("to-hf", tiny_hf_dir, "--out", out, "--quiet", env=env)
    assert r.returncode == 0 and tree_hash(victim) == before, r.stderr
    assert {k: v for k, v in tree_hash(out).items() if k != "ckpt_bridge_export.json"} == \
        {k: v for k, v in tree_hash(ref).items() if k != "ckpt_bridge_export.json"}
    for spec in ("1/2", "0/2", "x"):  # by hand: refused, nothing written
        r = _run("to-hf", tiny_hf_dir, "--out", tmp_path / "w", "--worker", spec)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "internal flag" in r.stderr
    assert not (tmp_path / "w").exists() and tree_hash(victim) == before


def test_issue19_workers_capped_by_cpus_and_items(verl_ckpt, tmp_path, capsys, caplog, monkeypatch):
    """Row 7: --workers 500 started ~360 processes (OOM killer); now one per usable CPU (and per work item), with
    a note, and the bytes of a one-process export.  A worker that cannot be started leaves nothing."""
    from ckpt_bridge import team as team_mod
    from ckpt_bridge.cli import main

    src = verl_ckpt("llama", "2")
    started = []
    real_popen = subprocess.Popen

    def spy(*a, **k):
        started.append(a[0])
        return real_popen(*a, **k)

    monkeypatch.setattr(team_mod.subprocess, "Popen", spy)
    assert main(["to-hf", str(src), "--out", str(tmp_path / "one"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["to-hf", str(src), "--out", str(tmp_path / "many"), "--quiet", "--workers", "500"]) == 0
    cpus = team_mod.usable_cpus()
    assert len(started) == min(cpus, 29) - 1, started
    assert f"note: --workers 500: using {cpus} process(es), one per CPU" in caplog.text
    assert tree_hash(tmp_path / "one").keys() == tree_hash(tmp_path / "many").keys()
    one, many = tree_hash(tmp_path / "one"), tree_hash(tmp_path / "many")
    assert all(one[k] == many[k] for k in one if k != "ckpt_bridge_export.json")

    t = team_mod.Team(size=8, kind="local")  # the cap by work items, decided by the leader before starting any
    t.fit(3)
    assert (t.size, t.kind) == (3, "local")
    t.fit(0)
    assert (t.size, t.kind) == (1, "solo")

    def no_fork(*a, **k):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(team_mod, "usable_cpus", lambda: 4)
    monkeypatch.setattr(team_mod.subprocess, "Popen", no_fork)
    assert_fails(capsys, ["to-hf", str(src), "--out", str(tmp_path / "o"), "--workers", "4"],
                 says="Resource temporarily unavailable", sources=(src,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many", "one"]  # no partial, no lock file


WATCH_HELD = """
import sys, time
from pathlib import Path
from ckpt_bridge import export
from ckpt_bridge.cli import main
go, ready = Path(sys.argv[1]), Path(sys.argv[2])
original = export._write_configs
def held(*a, **k):  # weights written, the step's lock held: wait until the test lets go
    ready.touch()
    while not go.exists():
        time.sleep(0.02)
    return original(*a, **k)
export._write_configs = held
sys.exit(main(sys.argv[3:]))
"""


def test_issue19_two_watchers_on_one_root(verl_ckpt, tmp_path):
    """Row 8: two `watch --once --all` on one root at once.  One holds step 1 (mid-export) while the other
    runs: the second skips step 1 and exports step 2; the first then finishes step 1 and skips step 2.  Both
    exit 0, each step is exported once and equals a plain to-hf, and nothing is left (no .conflict-PID copy,
    no .partial, no lock file)."""
    root = tmp_path / "run"
    shutil.copytree(verl_ckpt("llama", "2").parent.parent, root, ignore=shutil.ignore_patterns("reference", "base_model"))
    shutil.copytree(root / "global_step_1", root / "global_step_2")
    (root / "latest_checkpointed_iteration.txt").write_text("2")
    go, ready = tmp_path / "go", tmp_path / "ready"
    first = subprocess.Popen([PY, "-c", WATCH_HELD, str(go), str(ready), "watch", str(root), "--once", "--all"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = _run("watch", root, "--once", "--all")
    go.touch()
    out1, err1 = first.communicate(timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "step 1: skipped" in second.stdout and "another ckpt-bridge process is exporting it" in second.stdout
    assert "step 2: exported" in second.stdout
    assert first.returncode == 0, out1 + err1
    assert "step 1: exported" in out1 and "step 2: skipped" in out1, out1
    ref = tmp_path / "ref"
    assert _run("to-hf", root / "global_step_1" / "actor", "--out", ref, "--quiet").returncode == 0
    for step in (1, 2):
        step_dir = root / f"global_step_{step}"
        names = [p.name for p in step_dir.iterdir()]
        assert "actor_hf" in names and not [n for n in names if ".conflict-" in n or n.startswith(".")], names
        got = tree_hash(step_dir / "actor_hf")
        want = tree_hash(ref)
        assert got.keys() == want.keys()
        assert all(got[k] == want[k] for k in want if k.endswith(".safetensors")), step
