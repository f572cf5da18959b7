"""Hostile pickles: a payload whose ``__reduce__`` would create a marker file is planted in every file kind we
unpickle (DCP ``.metadata``, DCP bytes entries, verl rank files and extra_state, HF ``.bin``, rng files);
no command runs it: exit 2, one line on stderr, marker absent, no output left.  ``--trust-pickle`` opts out
(which also proves the payloads are live)."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ckpt_bridge.cli import main as cli



class Boom:
    """Unpickling this runs ``touch MARKER`` (pickled as the global posix.system)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tree_hash(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def run(capsys, args: list[str]) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = cli(args)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def clean_dcp(llama_dcp_with_aux):
    return llama_dcp_with_aux


def plant_in_metadata(src: Path, dst: Path, marker: Path, where: str) -> Path:
    shutil.copytree(src, dst)
    with open(dst / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own clean file
    if where == "dict":
        md.__dict__["note"] = Boom(marker)
    else:
        md.storage_meta.modules = [Boom(marker)]
    with open(dst / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return dst


@pytest.mark.parametrize("where", ["dict", "storage_meta"])
def test_metadata_payload_runs_in_no_command(clean_dcp, tmp_path, capsys, where):
    hf, clean = clean_dcp
    marker = tmp_path / "PWNED"
    d = plant_in_metadata(clean, tmp_path / "dcp", marker, where)
    before = tree_hash(d)
    out = tmp_path / "out"
    text = tmp_path / "text.txt"
    text.write_text("hello world " * 20)
    commands = [
        ["inspect", str(d)],
        ["to-hf", str(d), "--out", str(out)],
        ["to-hf", str(d), "--out", str(out), "--dry-run"],
        ["verify", str(d), str(hf)],
        ["verify", str(hf), str(d)],
        ["verify", str(d), "--against", str(hf)],
        ["verify", str(d), "--against", str(hf), "--loss", str(text)],
        ["to-dcp", str(hf), "--out", str(out), "--aux-from", str(d)],
        ["to-dcp", str(hf), "--out", str(out), "--aux", "future_predictor:linear", "--aux-from", str(d)],
    ]
    for args in commands:
        code, err = run(capsys, args)
        assert code == 2, (args, err)
        assert len(err) == 1 and "refusing to unpickle posix.system" in err[0] and ".metadata" in err[0], (args, err)
        assert "--trust-pickle" in err[0]
        assert not marker.exists(), args
        assert not out.exists(), args
    assert tree_hash(d) == before
    # the opt-out really unpickles it (so the payload above was live)
    assert cli(["inspect", str(d), "--trust-pickle"]) == 0
    assert marker.exists()


def test_verify_loss_never_uses_torchs_plain_pickle_reader(clean_dcp, tmp_path, capsys, monkeypatch):
    """verify --loss hands the folder to dcp.load; it must get our reader, not FileSystemReader.read_metadata
    (a plain pickle.load).  The torch method is made a tripwire; the command still works."""
    from torch.distributed.checkpoint import FileSystemReader

    hf, d = clean_dcp

    def tripwire(self, *a, **k):
        raise AssertionError("FileSystemReader.read_metadata (plain pickle.load) was called")

    monkeypatch.setattr(FileSystemReader, "read_metadata", tripwire)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 10)
    capsys.readouterr()
    code = cli(["verify", str(d), "--against", str(hf), "--loss", str(text), "--loss-tokens", "32"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "loss on 32 tokens" in out.out and "(ok" in out.out


def _rewrite(path: Path, mutate) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = torch.load(path, weights_only=False, map_location="cpu")  # our own test copy
    mutate(obj)
    torch.save(obj, path)


def test_payloads_in_every_other_pickled_file(verl_ckpt, tiny_hf_factory, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    cases = {}

    actor = tmp_path / "verl" / "global_step_1" / "actor"
    shutil.copytree(verl_ckpt("llama", "2"), actor)
    model1 = actor / "model_world_size_2_rank_1.pt"
    _rewrite(model1, lambda sd: sd.__setitem__("evil", Boom(marker)))
    cases["verl rank file"] = (actor, "model_world_size_2_rank_1.pt")

    actor2 = tmp_path / "verl2" / "global_step_1" / "actor"
    shutil.copytree(verl_ckpt("llama", "2"), actor2)
    _rewrite(actor2 / "extra_state_world_size_2_rank_1.pt",
             lambda st: st["lr_scheduler"].__setitem__("evil", Boom(marker)))
    cases["verl extra_state"] = (actor2, "extra_state_world_size_2_rank_1.pt")

    hf = tiny_hf_factory("llama")
    from ckpt_bridge.formats.hf import HFReader

    sd = {k: HFReader(hf).read(k) for k in HFReader(hf).tensors()}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(hf / "config.json", bin_dir / "config.json")
    torch.save({**sd, "evil": Boom(marker)}, bin_dir / "pytorch_model.bin")
    cases["HF .bin"] = (bin_dir, "pytorch_model.bin")

    titan = tmp_path / "step-3"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": sd, "lr_scheduler": {"evil": Boom(marker)}, "train_state": {"step": 3}},
                 checkpoint_id=str(titan), no_dist=True)
    cases["DCP bytes entry"] = (titan, "entry 'lr_scheduler.evil'")

    for name, (src, culprit) in cases.items():
        before = tree_hash(src)
        out = tmp_path / "out"
        args = ["to-hf", str(src), "--out", str(out)] + (["--config", str(hf)] if src == titan else [])
        code, err = run(capsys, args)
        assert code == 2, (name, err)
        assert len(err) == 1 and "refusing to unpickle" in err[0] and culprit in err[0], (name, err)
        assert not marker.exists(), name
        assert not out.exists(), name
        assert tree_hash(src) == before, name


def test_trust_pickle_reaches_dcp_bytes_entries_and_rng_files(tiny_hf_factory, tmp_path, capsys):
    """A TorchTitan step folder whose lr_scheduler entry, or whose save hook rng file, holds an object beyond
    weights_only: refused by default (the line names the file and --trust-pickle), read with --trust-pickle
    (the payload runs: the flag reached that file)."""
    from ckpt_bridge.formats.dcp import RNG_DIR
    from ckpt_bridge.formats.hf import HFReader

    hf = tiny_hf_factory("llama")
    sd = {k: HFReader(hf).read(k) for k in HFReader(hf).tensors()}
    cases = {}
    for name in ("entry", "rng"):
        marker = tmp_path / f"RAN-{name}"
        step = tmp_path / name / "step-3"
        sched = {"evil": Boom(marker)} if name == "entry" else {"last_epoch": 3}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"model": sd, "lr_scheduler": sched, "train_state": {"step": 3}}, checkpoint_id=str(step),
                     no_dist=True)
        if name == "rng":
            (step / RNG_DIR).mkdir()
            torch.save({"torch": torch.get_rng_state(), "python": Boom(marker)}, step / RNG_DIR / "rank_0.pt")
        cases[name] = (step, marker, "entry 'lr_scheduler.evil'" if name == "entry" else f"{RNG_DIR}/rank_0.pt")
    for name, (step, marker, culprit) in cases.items():
        args = ["to-hf", str(step), "--out", str(tmp_path / f"out-{name}"), "--config", str(hf), "--quiet"]
        code, err = run(capsys, args)
        assert code == 2 and len(err) == 1, (name, err)
        assert culprit in err[0] and "--trust-pickle" in err[0], (name, err)
        assert not marker.exists(), name
        code, err = run(capsys, [*args, "--trust-pickle"])
        assert code == 0, (name, err)
        assert marker.exists(), name  # --trust-pickle reached this file: its pickle ran
        assert (tmp_path / f"out-{name}" / "extra_state_merged.pt").is_file(), name
