"""Issue 26, processes, signals and output: a Ctrl-C inside torch's zip writer (D7), the free space a full disk
reports (D8), a closed stdout (D9), SIGTERM / SIGHUP, and the CRC-less torch.save of to-dcp kept to our writer.

The signal and pipe cases run the real CLI process (``python -m ckpt_bridge``, i.e. ``cli.entry``) and send it
real signals / give it a real closed pipe."""

from __future__ import annotations

import errno
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from ckpt_bridge.errors import disk_full
from ckpt_bridge.writers import dcp as dcp_writer

PY = sys.executable


def _left(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ---------------------------------------------------------------- D7: Ctrl-C inside torch.save's zip writer

# DCP's writer calls torch.save(tensor, stream) per item; the third one's stream sends this process a real
# SIGINT from inside the zip writer's second write, where Ctrl-C landed in 5 of 7 tries of the issue: the
# KeyboardInterrupt leaves the archive half written, and closing it (torch.save's ``with`` exit) raises
# RuntimeError("... unexpected pos ...") with the KeyboardInterrupt as its __context__.
INTERRUPT_IN_ZIP_WRITER = """
import os, signal, torch
save, calls = torch.save, []
class Interrupting:
    def __init__(self, f):
        self.f, self.writes = f, 0
    def write(self, b):
        self.writes += 1
        if self.writes == 2:  # the archive half written: closing it then fails ("unexpected pos")
            os.kill(os.getpid(), signal.SIGINT)
        return self.f.write(b)
    def __getattr__(self, name):
        return getattr(self.f, name)
def interrupted_save(obj, f, *a, **k):
    calls.append(1)
    return save(obj, Interrupting(f) if len(calls) == 3 else f, *a, **k)
torch.save = interrupted_save
from ckpt_bridge.cli import entry
entry()
"""


def test_ctrl_c_inside_torch_zip_writer_is_an_interrupt(tiny_hf_dir, tmp_path):
    p = subprocess.run([PY, "-c", INTERRUPT_IN_ZIP_WRITER, "to-dcp", str(tiny_hf_dir), "--out",
                        str(tmp_path / "o"), "--quiet"], capture_output=True, text=True, timeout=180)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 130 and err == ["ckpt-bridge to-dcp: interrupted; no output was left behind"], \
        (p.returncode, p.stderr)
    assert _left(tmp_path) == []


# ---------------------------------------------------------------- SIGTERM / SIGHUP

# the source is slowed down so the signal lands while the output is being written
SLOW_CLI = """
import time
from ckpt_bridge.formats.hf import HFReader
read, read_rows = HFReader.read, HFReader.read_rows
def slow(self, key, dtype=None):
    time.sleep(0.2)
    return read(self, key, dtype)
def slow_rows(self, key, out, start, stop):
    time.sleep(0.2)
    return read_rows(self, key, out, start, stop)
HFReader.read, HFReader.read_rows = slow, slow_rows
from ckpt_bridge.cli import entry
entry()
"""


@pytest.mark.parametrize("verb,sig,written", [("to-dcp", signal.SIGTERM, "*.distcp"),
                                              ("to-hf", signal.SIGHUP, "*.safetensors")])
def test_sigterm_and_sighup_remove_the_partial_output(tiny_hf_dir, tmp_path, verb, sig, written):
    """What timeout / Slurm / Kubernetes send (SIGTERM) and a closed terminal (SIGHUP): handled as Ctrl-C, the
    hidden .o.partial-PID is removed, one line, exit 128 + signum.  Before, the process died at once and left
    the partial output (full size for to-hf) until the next write."""
    p = subprocess.Popen([PY, "-c", SLOW_CLI, verb, str(tiny_hf_dir), "--out", str(tmp_path / "o"), "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(f".o.partial-*/**/{written}")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(f".o.partial-*/**/{written}")), f"{verb} never started writing"
    p.send_signal(sig)
    _, stderr = p.communicate(timeout=60)
    err = stderr.strip().splitlines()
    assert p.returncode == 128 + sig, (p.returncode, stderr)
    assert err == [f"ckpt-bridge {verb}: stopped by {sig.name}; no output was left behind"], stderr
    assert _left(tmp_path) == []


# ---------------------------------------------------------------- D9: a closed stdout


def _with_closed_stdout(*args: str) -> subprocess.CompletedProcess:
    """The CLI with a stdout whose reader is already gone (``| true`` that exited first; unbuffered, as in many
    containers, so the first print meets it)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([PY, "-m", "ckpt_bridge", *args], stdout=w, stderr=subprocess.PIPE, text=True,
                              timeout=180, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        os.close(w)


def test_closed_stdout_does_not_fail_a_finished_export(tiny_hf_dir, tmp_path):
    """to-hf ... | true: the export is complete and in place, so the exit code is 0 and nothing blames the path
    (was: exit 2 "BrokenPipeError ...; check the path and its permissions", and the rerun refused)."""
    p = _with_closed_stdout("to-hf", str(tiny_hf_dir), "--out", str(tmp_path / "o"))
    assert p.returncode == 0 and p.stderr.strip() == "", (p.returncode, p.stderr)
    assert (tmp_path / "o" / "config.json").is_file() and _left(tmp_path) == ["o"]
    from ckpt_bridge.checks.verify import verify

    assert verify(tiny_hf_dir, tmp_path / "o").ok


def test_closed_stdout_keeps_the_commands_own_exit_code(tiny_hf_dir, tmp_path, capsys):
    """inspect | head -1: the exit code is inspect's own (0: no problems; 2 with problems), never a pipe error."""
    p = _with_closed_stdout("inspect", str(tiny_hf_dir))
    assert p.returncode == 0 and p.stderr.strip() == "", (p.returncode, p.stderr)
    bad = tmp_path / "bad"  # a checkpoint inspect finds a problem in: a shard the index names is missing
    bad.mkdir()
    for f in tiny_hf_dir.iterdir():
        if f.name != "model-00002-of-00006.safetensors":
            (bad / f.name).symlink_to(f)
    from ckpt_bridge.cli import main

    assert main(["inspect", str(bad)]) == 2 and "problems" in capsys.readouterr().out
    p = _with_closed_stdout("inspect", str(bad))
    assert p.returncode == 2 and p.stderr.strip() == "", (p.returncode, p.stderr)


# ---------------------------------------------------------------- D8: free space on a full disk


def test_disk_full_counts_the_space_a_sparse_partial_output_takes(tmp_path):
    """The safetensors writer creates its files at full size before writing (sparse); the free space the
    message reports adds what the unfinished export takes on disk (given back when it is removed), not the
    files' sizes.  Was: free + the whole export's size, so the message said the disk had more than enough."""
    part = tmp_path / f".o.partial-{os.getpid()}"
    part.mkdir()
    sparse = part / "model-00001-of-00001.safetensors"
    with open(sparse, "wb") as f:
        f.write(b"x" * (1 << 20))  # 1 MiB written ...
        f.truncate(8 << 30)  # ... of an 8 GiB file created at full size
    st = sparse.stat()
    if st.st_blocks * 512 >= st.st_size:
        pytest.skip("this file system does not make sparse files")
    import shutil

    before = shutil.disk_usage(tmp_path).free
    e = disk_full(OSError(errno.ENOSPC, "No space left on device", str(sparse)), sparse, 9 << 30)
    after = shutil.disk_usage(tmp_path).free
    said = int(re.search(r"has ([\d,]+) bytes free", str(e)).group(1).replace(",", ""))
    slack = 256 << 20  # other processes writing on this disk meanwhile
    assert min(before, after) - slack <= said <= max(before, after) + st.st_blocks * 512 + slack, (said, before)
    assert f"{tmp_path / 'o'}: no space left" in str(e) and "needs 9,663,676,416 bytes" in str(e)


# ---------------------------------------------------------------- CRC-less torch.save, our writer's only


def _crcs_ok(blob: bytes) -> tuple[bool, set[int]]:
    z = zipfile.ZipFile(io.BytesIO(blob))
    return z.testzip() is None, {i.CRC for i in z.infolist()}


def _save(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


@pytest.mark.parametrize("context", ["fresh", "copied"])
def test_no_zip_crc32_leaves_other_threads_torch_save_alone(context):
    """A trainer's async torch.save in another thread while our DCP writer writes keeps its CRCs; ours are still
    written without.  torch's own switch (``set_crc32_options``) is a config value: process-wide in older
    torch, a ContextVar in torch 2.13+, which a thread started from a copy of our context inherits
    (``asyncio.to_thread``, executors that copy the context, Python 3.14's ``thread_inherit_context``): the
    "copied" case took the CRCs off the other thread's save before."""
    import contextvars

    t = torch.arange(4096, dtype=torch.float32)
    theirs: list[bytes] = []
    with dcp_writer.no_zip_crc32():
        ours = _save(t)
        if context == "copied":
            run = contextvars.copy_context().run
            other = threading.Thread(target=run, args=(lambda: theirs.append(_save(t)),))
        else:
            other = threading.Thread(target=lambda: theirs.append(_save(t)))
        other.start()
        other.join()
        assert torch.serialization.get_crc32_options() is False  # this thread, inside our writer
    ok, crcs = _crcs_ok(theirs[0])
    assert ok and 0 not in crcs and crcs == _crcs_ok(_save(t))[1], crcs
    assert _crcs_ok(ours)[1] == {0}
    assert torch.serialization.get_crc32_options() is True and _crcs_ok(_save(t))[0]
    assert torch.equal(torch.load(io.BytesIO(ours)), t) and torch.equal(torch.load(io.BytesIO(theirs[0])), t)
