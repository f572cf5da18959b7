"""A legacy (non-zip) pytorch_model.bin (``torch.save(..., _use_new_zipfile_serialization=False)``) is read
weights-only without mmap, inspect says so, and a really corrupt file still gets the corrupt-file message."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ckpt_bridge.cli import main as cli
from ckpt_bridge.testing.tiny_models import save_tiny_hf


@pytest.fixture(scope="module")
def legacy_hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("legacy-bin")
    model = save_tiny_hf(d, "llama")
    (d / "model.safetensors").unlink()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(sd, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert (d / "pytorch_model.bin").read_bytes()[:2] != b"PK"  # really the legacy format
    with pytest.raises(RuntimeError):  # what we used to do: mmap only works on zip archives
        torch.load(d / "pytorch_model.bin", mmap=True, weights_only=True)
    return d, sd


def test_legacy_bin_exports_exactly_and_inspect_says_so(legacy_hf, tmp_path, capsys):
    src, sd = legacy_hf
    assert cli(["inspect", str(src), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert any("legacy (non-zip)" in n for n in report["evidence"]["notes"])
    assert report["tensors"] == len(sd)

    assert cli(["to-hf", str(src), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = load_file(tmp_path / "out" / "model.safetensors")
    for k, v in out.items():
        assert torch.equal(v, sd[k]), k
    assert set(sd) - set(out) <= {"lm_head.weight"}  # a tied alias is not written twice

    # the single file too
    assert cli(["verify", str(src / "pytorch_model.bin"), str(tmp_path / "out")]) == 0


def test_really_corrupt_bin_keeps_the_corrupt_message(legacy_hf, tmp_path, capsys):
    src, _ = legacy_hf
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    data = (bad / "pytorch_model.bin").read_bytes()
    (bad / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert cli(["to-hf", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated or corrupt" in err[0] and "pytorch_model.bin" in err[0]
    assert not (tmp_path / "out").exists()
