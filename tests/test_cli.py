"""The CLI surface: --dry-run, verify --logits, python -m ckpt_bridge, --help."""

from __future__ import annotations

import json
import subprocess
import sys

from ckpt_bridge.cli import main


def test_dry_run_prints_the_plan_and_writes_nothing(verl_ckpt, tmp_path, capsys):
    actor = verl_ckpt("llama_tied", "2")
    out = tmp_path / "never"
    assert main(["to-hf", str(actor), "--out", str(out), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "LlamaForCausalLM" in plan and "model.embed_tokens.weight" in plan
    assert "lm_head.weight -> (dropped: tied to model.embed_tokens.weight)" in plan
    assert not out.exists()


def test_verify_logits_between_verl_checkpoint_and_export(verl_ckpt, tmp_path, capsys):
    actor = verl_ckpt("olmo2", "2")
    out = tmp_path / "hf"
    assert main(["to-hf", str(actor), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["verify", str(actor), str(out), "--logits", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ok"] and res["logits_ok"] and res["logits_max_abs_diff"] == 0.0
    assert res["compared"] == res["equal"] > 0


def test_module_entry_point_and_help():
    proc = subprocess.run([sys.executable, "-m", "ckpt_bridge", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "to-hf" in proc.stdout and "examples:" in proc.stdout and "exit codes" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "ckpt_bridge"], capture_output=True, text=True)
    assert proc.returncode == 2


def test_cyclic_gc_is_paused_for_a_command_and_restored(tmp_path, capsys):
    """cyclic_gc.paused(): off inside (also when it was off already), back as it was after, also on an error;
    the CLI's commands run inside it and leave the caller's collector on, whether they succeed or fail."""
    import gc

    from ckpt_bridge import cyclic_gc

    assert gc.isenabled()
    try:
        with cyclic_gc.paused():
            assert not gc.isenabled()
            raise KeyError("x")
    except KeyError:
        pass
    assert gc.isenabled()
    gc.disable()
    try:
        with cyclic_gc.paused():
            pass
        assert not gc.isenabled()  # the caller had it off: it stays off
    finally:
        gc.enable()
    assert main(["inspect", str(tmp_path / "missing")]) == 2  # a failing command
    assert main(["to-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    assert gc.isenabled()


def test_the_process_entry_flushes_its_output_and_keeps_the_exit_code(tiny_hf_factory, tmp_path):
    """entry() ends the process with os._exit (no interpreter finalization): what it printed into a pipe
    arrives whole, and the exit codes are main's, for a success, a failure and a conversion that writes."""
    hf = tiny_hf_factory("llama_tied")
    proc = subprocess.run([sys.executable, "-m", "ckpt_bridge", "inspect", str(hf), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["format"]  # the whole report, through a pipe's block buffer
    proc = subprocess.run([sys.executable, "-m", "ckpt_bridge", "inspect", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("ckpt-bridge inspect: "), proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ckpt_bridge.cli", "to-dcp", str(hf), "--out",
                           str(tmp_path / "dcp")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and (tmp_path / "dcp" / ".metadata").is_file()
