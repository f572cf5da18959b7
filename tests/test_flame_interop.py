"""flame interop, with flame's own scripts (flame e11e7be from its source tarball, on its README's torchtitan pin
0b44d4c, with fla + triton as an overlay; neither is on PyPI: the tarballs come from ``$CKPT_BRIDGE_UPSTREAM``
and the tests skip without it):

* ``python -m flame.utils.convert_hf_to_dcp`` writes ``{"model": state_dict}`` (nested); our ``to-hf`` of it
  equals the HF source bit for bit.
* ``python -m flame.utils.convert_dcp_to_hf`` reads our nested ``to-dcp`` output (no aux modules: flame's
  script loads the state dict strictly into the HF class) and its export equals the HF source bit for bit.
* The same both ways for a flash-linear-attention GLA model (flame's own model zoo), with ``--custom-import fla``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from ckpt_bridge.testing.harness import _child_env
from ckpt_bridge.testing.overlays import OverlayError, overlay
from ckpt_bridge.testing.upstream import FLA, UpstreamMissing, era_overlay, tarball


@pytest.fixture(scope="module")
def flame(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(flame source root, env whose python imports flame's era torchtitan, fla and flame)."""
    try:
        src = tarball("flame-e11e7be")  # not on PyPI: only from $CKPT_BRIDGE_UPSTREAM
        titan = era_overlay("0b44d4c")  # flame's README pin
        fla = overlay(FLA, name="fla")
    except UpstreamMissing as e:
        pytest.skip(str(e))
    except OverlayError as e:
        pytest.fail(f"flame fixture: {e}")
    root = tmp_path_factory.mktemp("flame")
    with tarfile.open(src) as tf:
        tf.extractall(root, filter="data")
    (flame_root,) = [p.parent.parent for p in root.glob("*/flame/__init__.py")]
    env = _child_env(None)
    env["PYTHONPATH"] = os.pathsep.join([str(titan), str(fla), str(flame_root), env["PYTHONPATH"]])
    return flame_root, env


# Both flame scripts run in one process (runpy, as ``python -m`` would): one import of fla/triton, not two.
RUN_BOTH = """
import runpy, sys
for argv in {argvs!r}:
    sys.argv = argv
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def flame_runs(flame, trained_olmo2, tmp_path_factory) -> dict[str, Path]:
    """flame's convert_hf_to_dcp of the HF model, and flame's convert_dcp_to_hf of our nested to-dcp output."""
    from ckpt_bridge.cli import main as bridge

    root, env = flame
    work = tmp_path_factory.mktemp("flame-runs")
    theirs = work / "theirs" / "checkpoint" / "step-0"
    ours = work / "ours"
    assert bridge(["to-dcp", str(trained_olmo2), "--out", str(ours / "checkpoint" / "step-0"), "--layout", "nested",
                   "--quiet"]) == 0
    argvs = [["flame.utils.convert_hf_to_dcp", "--model", str(trained_olmo2), "--checkpoint", str(theirs)],
             ["flame.utils.convert_dcp_to_hf", "--path", str(ours), "--step", "0", "--config", str(trained_olmo2),
              "--tokenizer", str(trained_olmo2)]]
    proc = subprocess.run([sys.executable, "-c", RUN_BOTH.format(argvs=argvs)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"flame_dcp": theirs, "flame_hf_of_ours": ours}


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from ckpt_bridge.formats.hf import weight_files

    out: dict[str, torch.Tensor] = {}
    for f in weight_files(d)[1]:
        out.update(load_file(f))
    return out


def _assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_to_hf_reads_flames_convert_hf_to_dcp(flame_runs, trained_olmo2, tmp_path):
    from ckpt_bridge.cli import main as bridge
    from ckpt_bridge.formats.dcp import DCPReader

    step0 = flame_runs["flame_dcp"]
    assert DCPReader(step0).layout() == "nested"  # what flame writes: {"model": state_dict}
    assert bridge(["to-hf", str(step0), "--out", str(tmp_path / "hf"), "--config", str(trained_olmo2),
                   "--quiet"]) == 0
    _assert_bit_identical(_weights(tmp_path / "hf"), _weights(trained_olmo2))


def test_flames_convert_dcp_to_hf_reads_our_nested_to_dcp(flame_runs, trained_olmo2):
    _assert_bit_identical(_weights(flame_runs["flame_hf_of_ours"]), _weights(trained_olmo2))


# flame's own model zoo: a tiny GLA (flash-linear-attention, registered by `import fla`). In one process of the
# flame environment: the model saved by save_pretrained (with the OLMo-2 byte tokenizer beside it: flame's
# convert_dcp_to_hf copies one), our nested to-dcp (--custom-import fla), flame's two scripts, our to-hf of
# flame's DCP.
FLA_SCRIPT = """
import runpy, shutil, sys
from pathlib import Path
from ckpt_bridge.cli import main
from ckpt_bridge.testing.fla_checks import build

hf, ours, theirs, back, tok = map(Path, {paths!r})
why = build("gla", hf)
assert why is None, why
for f in Path(tok).iterdir():
    if f.name.startswith(("tokenizer", "special_tokens")):
        shutil.copy2(f, hf / f.name)
assert main(["to-dcp", str(hf), "--out", str(ours / "checkpoint" / "step-0"), "--layout", "nested",
             "--custom-import", "fla", "--quiet"]) == 0
for argv in {argvs!r}:
    sys.argv = argv
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
assert main(["to-hf", str(theirs), "--out", str(back), "--config", str(hf), "--custom-import", "fla", "--quiet"]) == 0
"""


@pytest.fixture(scope="module")
def flame_fla_runs(flame, trained_olmo2, tmp_path_factory) -> dict[str, Path]:
    root, env = flame
    work = tmp_path_factory.mktemp("flame-fla")
    hf, ours, theirs, back = work / "gla-hf", work / "ours", work / "theirs" / "checkpoint" / "step-0", work / "back"
    argvs = [["flame.utils.convert_hf_to_dcp", "--model", str(hf), "--checkpoint", str(theirs)],
             ["flame.utils.convert_dcp_to_hf", "--path", str(ours), "--step", "0", "--config", str(hf),
              "--tokenizer", str(hf)]]
    script = FLA_SCRIPT.format(paths=[str(p) for p in (hf, ours, theirs, back, trained_olmo2)], argvs=argvs)
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"hf": hf, "flame_hf_of_ours": ours, "ours_of_flame_dcp": back}


def test_flame_and_ckpt_bridge_interoperate_on_an_fla_model(flame_fla_runs):
    """flame's convert_dcp_to_hf reads our to-dcp of a GLA model, and our to-hf reads flame's convert_hf_to_dcp:
    both give back the save_pretrained weights bit for bit."""
    want = _weights(flame_fla_runs["hf"])
    _assert_bit_identical(_weights(flame_fla_runs["flame_hf_of_ours"]), want)
    _assert_bit_identical(_weights(flame_fla_runs["ours_of_flame_dcp"]), want)
