"""--out is never clobbered: a directory that appears at --out while an export runs, two concurrent exports to
one new --out, a crash between the two renames of --overwrite, stale partials of dead processes.  Each case runs
with the native rename (renameat2 NOREPLACE / EXCHANGE) and with the portable fallback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_bridge.cli import main
from ckpt_bridge.formats.hf import weight_files
from ckpt_bridge.pipeline import atomic

NATIVE = pytest.mark.parametrize("native", [True, False], ids=["renameat2", "fallback"])


def weights(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in weight_files(d)[1]:
        out.update(load_file(f))
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@NATIVE
def test_directory_appearing_at_out_during_export_is_left_alone(tiny_hf_dir, tmp_path, monkeypatch, capsys, native):
    from ckpt_bridge.commands import to_hf as export

    monkeypatch.setattr(atomic, "USE_NATIVE", native)
    out = tmp_path / "out"
    original = export._write_configs

    def someone_else_writes_out(*a, **k):  # after the weights are in the temporary dir, before the rename
        out.mkdir()
        (out / "precious.txt").write_text("user data")
        return original(*a, **k)

    monkeypatch.setattr(export, "_write_configs", someone_else_writes_out)
    code = main(["to-hf", str(tiny_hf_dir), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    kept = tmp_path / f"out.conflict-{os.getpid()}"
    assert str(out) in err and str(kept) in err and "appeared while this export ran" in err
    assert tree(out) == {"precious.txt": b"user data"}  # untouched
    assert_same_weights(kept, tiny_hf_dir)  # our finished output, under the name the message gave
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


BARRIER_EXPORT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ckpt_bridge.commands import to_hf as export
    from ckpt_bridge.cli import main
    from ckpt_bridge.pipeline import atomic
    barrier, me, native = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    atomic.USE_NATIVE = native
    original = export._write_configs
    def wait_for_both(*a, **k):  # both exports have passed every check and written their weights
        (barrier / me).touch()
        while len(list(barrier.iterdir())) < 2:
            time.sleep(0.02)
        return original(*a, **k)
    export._write_configs = wait_for_both
    sys.exit(main(sys.argv[4:]))
""")


def test_two_concurrent_exports_to_one_new_out(tiny_hf_dir, tmp_path, monkeypatch, capsys):
    """One export in a second process, one here, at once.  The first to take the output's lock writes; the
    other is refused at once in one line naming the holder, and nothing of it is left (it used to race to
    the rename and keep a full copy as out.conflict-PID)."""
    import time

    from ckpt_bridge.commands import to_hf as export

    barrier = tmp_path / "barrier"
    barrier.mkdir()
    out = tmp_path / "out"
    other = subprocess.Popen([sys.executable, "-c", BARRIER_EXPORT, str(barrier), "other", "1",
                              "to-hf", str(tiny_hf_dir), "--out", str(out), "--quiet"],
                             stderr=subprocess.PIPE, text=True)
    original = export._write_configs

    def wait_for_both(*a, **k):
        (barrier / "here").touch()
        while len(list(barrier.iterdir())) < 2 and other.poll() is None:
            time.sleep(0.02)
        return original(*a, **k)

    monkeypatch.setattr(export, "_write_configs", wait_for_both)
    here = (main(["to-hf", str(tiny_hf_dir), "--out", str(out), "--quiet"]), capsys.readouterr().err.strip(),
            os.getpid())
    (barrier / "here").touch()  # refused before its barrier: let the other one go on
    there = (other.wait(timeout=300), other.stderr.read().strip(), other.pid)
    assert sorted([here[0], there[0]]) == [0, 2], (here, there)
    _, err, _ = here if here[0] == 2 else there
    winner = there[2] if here[0] == 2 else here[2]
    assert len(err.splitlines()) == 1 and str(out) in err and f"process (pid {winner}) is writing it now" in err, err
    assert_same_weights(out, tiny_hf_dir)  # the winner's output, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["barrier", "out"]  # no conflict copy, partial, lock
    assert json.loads((out / "ckpt_bridge_export.json").read_text())["source"] == os.path.realpath(tiny_hf_dir)


@NATIVE
def test_rename_noreplace_never_replaces_a_finished_output(tmp_path, monkeypatch, native):
    """Two finished outputs racing for one name (what the concurrent exports reduce to): the second loses,
    whichever rename is used; with the fallback the check and the rename are not atomic, but POSIX rename
    refuses a non-empty target directory, so the loser still cannot replace the winner's files."""
    monkeypatch.setattr(atomic, "USE_NATIVE", native)
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    for d in (a, b):
        d.mkdir()
        (d / "model.safetensors").write_text(d.name)
    atomic.rename_noreplace(a, out)
    monkeypatch.setattr(os.path, "lexists", lambda p: False)  # the fallback's check lost the race
    with pytest.raises(FileExistsError):
        atomic.rename_noreplace(b, out)
    assert (out / "model.safetensors").read_text() == "a" and (b / "model.safetensors").read_text() == "b"


CRASH_BETWEEN_RENAMES = textwrap.dedent("""
    import os, sys
    from ckpt_bridge.cli import main
    from ckpt_bridge.pipeline import atomic
    atomic.USE_NATIVE = False  # the two-rename path (no RENAME_EXCHANGE)
    atomic.BETWEEN_RENAMES = lambda: os._exit(9)  # killed after the old export was moved aside
    sys.exit(main(sys.argv[1:]))
""")


def test_crash_between_the_renames_of_overwrite_loses_nothing(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["to-hf", str(tiny_hf_dir), "--out", str(out), "--quiet", "--dtype", "bf16"]) == 0
    old = tree(out)
    p = subprocess.Popen([sys.executable, "-c", CRASH_BETWEEN_RENAMES, "to-hf", str(tiny_hf_dir), "--out", str(out),
                          "--quiet", "--overwrite"])
    assert p.wait(timeout=120) == 9
    assert not out.exists() and (tmp_path / f".out.old-{p.pid}").is_dir()  # the state a crash there leaves
    capsys.readouterr()
    # the next run writing to out puts the old export back and says so (here: refused, no --overwrite)
    assert main(["to-hf", str(tiny_hf_dir), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"restored the previous export from {tmp_path / f'.out.old-{p.pid}'}" in err and "already exists" in err
    assert tree(out) == old
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".out.")]  # its partial is gone too


@NATIVE
def test_overwrite_replaces_and_leaves_no_old_copy(tiny_hf_dir, tmp_path, monkeypatch, native):
    monkeypatch.setattr(atomic, "USE_NATIVE", native)
    out = tmp_path / "out"
    assert main(["to-hf", str(tiny_hf_dir), "--out", str(out), "--quiet", "--dtype", "bf16"]) == 0
    assert main(["to-hf", str(tiny_hf_dir), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert_same_weights(out, tiny_hf_dir)  # fp32 again: the new export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_partials_of_dead_processes_are_cleaned_by_any_writer(tiny_hf_factory, tmp_path):
    from ckpt_bridge.commands.to_dcp import to_dcp
    from ckpt_bridge.commands.to_hf import to_hf

    hf = tiny_hf_factory("olmo2")
    mine_alive = tmp_path / f".hf.partial-{os.getppid()}"  # a live process's partial is never touched
    for name, run in (("hf", lambda o: to_hf(hf, o, progress=False)),
                      ("dcp", lambda o: to_dcp(hf, o, progress=False))):
        stale = tmp_path / f".{name}.partial-{dead_pid()}"
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"half")
        if name == "hf":
            mine_alive.mkdir()
        run(tmp_path / name)
        assert not stale.exists()
        assert (tmp_path / name).is_dir()
    assert mine_alive.is_dir()
