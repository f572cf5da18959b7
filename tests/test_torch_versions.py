"""ckpt-bridge under the other torch releases of pyproject's range: 2.11 (verl's vLLM pin) and the newest.

One subprocess per version (``ckpt_bridge.testing.torch_checks``) with a torch overlay first on PYTHONPATH
(``overlays.torch_overlay``: PyPI's CUDA wheel and its nvidia packages, ~4.7 GB, downloaded once into the
overlays cache; it runs on CPU).  It runs the CLI's main paths on saves written here under the pinned torch
(verl FSDP and HSDP, a LoRA run) and on the committed fixtures of every torch (tests/fixtures/torch-*), and
compares each output bit for bit with its reference, and loads a to-dcp output written here (no zip CRC32s)
through DCP's reader and the trainer's CheckpointManager.  The other direction, other torches' saves read under
the pinned one, is tests/test_torch_fixtures.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_bridge import to_dcp, to_hf
from ckpt_bridge.pipeline import pieces
from ckpt_bridge.testing.harness import reference_dir
from ckpt_bridge.testing.overlays import overlay, overlay_env, torch_job, torch_overlay
from ckpt_bridge.testing.tiny_olmo2 import corpus_text
from ckpt_bridge.version import TESTED, release

VERSIONS = ["2.11.0", "2.15.0"]  # move with ckpt_bridge/version.py TESTED
# ~4.7 GB of downloads each on a fresh machine: started in the background when the session starts
# (tests/conftest.py), so they arrive while the tests before these run
OVERLAYS = [torch_job(v) for v in VERSIONS]


@pytest.fixture(scope="module")
def pinned_saves(verl_ckpt, lora_root, tmp_path_factory):
    """Saves written under the pinned torch: verl FSDP (2 ranks), HSDP (2x2), a LoRA run (the session's
    lora_root: tests/test_lora.py's llama case, no torchrun job of its own) and its export."""
    d = tmp_path_factory.mktemp("torch-versions")
    lora = lora_root / "llama" / "global_step_2" / "actor"
    to_hf(lora, d / "lora-export", progress=False)
    (d / "text.txt").write_text(corpus_text()[:300])
    fsdp = verl_ckpt("llama", "2")
    # to-dcp under the pinned torch (no zip CRC32s), its tensors cut into row chunks as a large model's are
    with pytest.MonkeyPatch.context() as m:
        m.setattr(pieces, "PIECE_BYTES", 4096)
        to_dcp(reference_dir(fsdp) / "hf", d / "pinned-dcp", progress=False)
    return {"fsdp": fsdp, "hsdp": verl_ckpt("llama", "2x2"), "lora": lora,
            "lora-export": d / "lora-export", "text": d / "text.txt", "dcp": d / "pinned-dcp", "dir": d}


@pytest.fixture(scope="module")
def results(pinned_saves):
    """One subprocess per torch version, both at once: each runs at one thread (OMP_NUM_THREADS=1), so on 2
    cores they take the wall time of the slower one instead of the sum; each maps its 4.7 GB CUDA torch but
    stays near 1 GB resident on CPU."""
    procs = {}
    for version in VERSIONS:
        env = overlay_env(torch_overlay(version))
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        work = pinned_saves["dir"] / f"work-{version}"
        args = [x for k in ("fsdp", "hsdp", "lora", "lora-export", "text", "dcp")
                for x in (f"--{k}", str(pinned_saves[k]))]
        result = work.parent / f"{work.name}.json"
        cmd = [sys.executable, "-m", "ckpt_bridge.testing.torch_checks", "--out", str(result), "--work", str(work),
               *args]
        procs[version] = (subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                           text=True), result)
    out = {}
    for version, (proc, result) in procs.items():
        try:
            err = proc.communicate(timeout=900)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            err = proc.communicate()[1] + "\n(timed out after 900 s)"
        out[version] = (proc.returncode, err, result)
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_cli_under_other_torch(results, version):
    code, err, path = results[version]
    assert code == 0, err[-3000:]
    res = json.loads(path.read_text())
    assert res["torch"].split("+")[0] == version
    checks = res["checks"]
    titan = checks.pop("torchtitan-import")
    failed = {k: v["error"] for k, v in checks.items() if not v["ok"]}
    assert not failed, failed
    # what ran: the pinned torch's saves, every committed fixture (each torch x FSDP/HSDP/Shard(1)/DCP)
    assert {"to-hf/fsdp", "to-hf/hsdp", "dcp-round-trip", "lora", "verl-hook", "pinned-dcp/dcp.load",
            "pinned-dcp/torchtitan"} <= set(checks)  # the last: CheckpointManager imports under 2.11 too
    fixtures = sorted(p.name for p in (Path(__file__).parent / "fixtures").glob("torch-*"))
    assert {f"fixture/{f}/{c}" for f in fixtures for c in ("fsdp", "hsdp", "shard1", "dcp", "torch_file")} <= set(checks)
    # torchtitan 0.3.0 (the pinned one) needs torch >= 2.12: it imports DataParallelMeshDims, which torch
    # 2.11 does not have; under the newest torch it imports, and so does our save hook
    if version.startswith("2.11"):
        assert not titan["ok"] and "DataParallelMeshDims" in titan["error"], titan
    else:
        assert titan["ok"], titan


def test_tested_torch_table_is_what_ci_runs():
    """ckpt_bridge/version.py TESTED (what --version and inspect judge by) is this matrix plus the pinned torch."""
    lock = (Path(__file__).resolve().parents[1] / "requirements.lock").read_text()
    pinned = re.search(r"(?m)^torch==(\S+)", lock).group(1)
    assert set(TESTED["torch"]) == set(VERSIONS) | {pinned}


def test_pip_resolves_next_to_the_newest_torch_and_transformers(tmp_path):
    """pip's own resolver, offline, with the newest torch and transformers CI tests installed (their overlays
    first on sys.path: pip counts what is importable as installed, so nothing is downloaded): installing
    ckpt-bridge needs nothing else and moves neither.  With the old cap transformers<5.25 this is pip's
    ResolutionImpossible.  PIP_CONSTRAINT=/dev/null: this machine's pip.conf caps torch at the
    CPU wheels on its disk, which is not what a user's pip sees."""
    from test_transformers_versions import VERSIONS as TRANSFORMERS

    newest_torch = max(VERSIONS, key=release)
    newest_tf = max(TRANSFORMERS, key=release)
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # pip writes its metadata build beside the sources: a copy, never the checkout
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(root / f, src / f)
    for d in ("ckpt_bridge", "integrations", "patches"):
        shutil.copytree(root / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    env = overlay_env(torch_overlay(newest_torch))
    env = overlay_env(overlay(TRANSFORMERS[newest_tf], name=f"transformers-{newest_tf}"), env)
    env["PIP_CONSTRAINT"] = "/dev/null"
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                           "--disable-pip-version-check", "--report", str(report), str(src),
                           f"torch=={newest_torch}", f"transformers=={newest_tf}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    install = json.loads(report.read_text())["install"]
    assert [i["metadata"]["name"] for i in install] == ["ckpt-bridge"]
    requires = install[0]["metadata"]["requires_dist"]
    assert any(r.replace(" ", "").startswith("torch>=") for r in requires), requires
