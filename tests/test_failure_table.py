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


def test_verify_loss_without_a_tokenizer_or_with_too_short_a_text(dcp_dir, tmp_path, capsys):
    """verify --loss against a model dir of weights and config only, and on a text of one token: one line each
    saying which (transformers 5 builds an empty tokenizer from nothing, which gives no tokens at all)."""
    hf, clean = dcp_dir
    bare = tmp_path / "weights-only"
    bare.mkdir()
    for p in hf.iterdir():
        if p.name == "config.json" or p.name.startswith("model"):
            shutil.copy2(p, bare / p.name)
    text = tmp_path / "text.txt"
    text.write_text("hello world, a few words of text")
    line = assert_fails(capsys, ["verify", str(clean), "--against", str(bare), "--loss", str(text)],
                        says=f"--loss needs the model's tokenizer and {bare} has none", sources=(clean, bare))
    assert "tokenizer.json" in line and "copy" in line
    one = tmp_path / "one.txt"
    one.write_text("a")
    assert_fails(capsys, ["verify", str(clean), "--against", str(hf), "--loss", str(one)],
                 says=f"--loss {one}: the tokenizer in {hf} makes 1 token(s) of it; a next-token loss needs at least 2",
                 sources=(clean, hf))
    assert cli(["verify", str(clean), "--against", str(hf), "--loss", str(text)]) == 0  # the same dir with a text


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
