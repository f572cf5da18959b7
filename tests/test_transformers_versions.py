"""The supported transformers range, tested: the newest 4.57.x and the newest 5.x run the fidelity checks
(ckpt_bridge.testing.version_checks) in one subprocess each, with an overlay of that version first on
PYTHONPATH; the newest 5.x with the newest peft, for the LoRA checks.  What they are judged against was built
here, under the pinned transformers (and peft)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckpt_bridge.testing.overlays import overlay, overlay_env, overlay_job
from ckpt_bridge.testing.tiny_models import FAMILIES, PRESETS
from ckpt_bridge.testing.tiny_olmo2 import corpus_text
from ckpt_bridge.testing.verl_save import LORA_CASES
from ckpt_bridge.version import TESTED, release
from ckpt_bridge.testing.version_checks import TOKENS, preset_tensors

# The newest 4.57.x and the newest 5.x (move with ckpt_bridge/version.py TESTED).  Each overlay holds the packages
# that release needs beyond the venv's: 5.25 needs huggingface_hub 2.x (which brings httpx2 / httpcore2 /
# truststore) and kernels (from_pretrained refuses to run without it: use_kernels defaults to on).  The newest
# 5.x carries the newest peft (0.22.0: FSDP2 adapter saves hold gathered full tensors); 4.57.6 runs the LoRA
# checks with the venv's peft 0.21.2.
VERSIONS = {
    "4.57.6": ["transformers==4.57.6", "tokenizers==0.22.2", "huggingface_hub<1.0"],
    "5.25.0": ["transformers==5.25.0", "tokenizers>=0.23.1,<0.24", "huggingface_hub==2.5.0", "httpx2==2.17.0",
               "httpcore2==2.17.0", "truststore==0.10.5", "kernels==0.19.1", "tomlkit==0.15.3", "peft==0.22.0"],
}
PEFT = {"4.57.6": "0.21.2", "5.25.0": "0.22.0"}  # the peft each version's subprocess imports
# built in the background from the session's start (tests/conftest.py): a few hundred MB of downloads
OVERLAYS = [overlay_job(specs, name=f"transformers-{v}") for v, specs in VERSIONS.items()]
@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_hf_factory):
    """Built under the pinned transformers: preset tensors, an OLMo-2 export (HF -> DCP -> HF) and its logits."""
    from safetensors.torch import save_file

    from ckpt_bridge import to_dcp, to_hf
    from ckpt_bridge.models.hf import load_pretrained

    d = tmp_path_factory.mktemp("versions")
    source = tiny_hf_factory("olmo2")
    to_dcp(source, d / "dcp")
    to_hf(d / "dcp", d / "export", config=source, progress=False)
    with torch.no_grad():
        logits = load_pretrained(d / "export")(input_ids=TOKENS).logits
    ref = {"logits/export": logits}
    # every family exported (HF -> DCP -> HF) under the pinned transformers 5: its config.json must build
    # the same model on 4.x.  MoE experts run one by one, as 4.x runs them ("eager": grouped matmul sums
    # in another order), at one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in FAMILIES:
            src = tiny_hf_factory(name)
            to_dcp(src, d / "dcp-fam" / name)
            to_hf(d / "dcp-fam" / name, d / "exports" / name, config=src, progress=False)
            model = load_pretrained(d / "exports" / name)
            if hasattr(model, "set_experts_implementation"):
                model.set_experts_implementation("eager")
            with torch.no_grad():
                ref[f"logits/family/{name}"] = model(input_ids=TOKENS).logits
    finally:
        torch.set_num_threads(threads)
    for name in PRESETS:
        if name != "llama_1b":
            ref.update(preset_tensors(name))
    save_file(ref, d / "ref.safetensors")
    (d / "text.txt").write_text(corpus_text()[:300])
    return {"ref": d / "ref.safetensors", "export": d / "export", "exports": d / "exports", "source": source, "dcp": d / "dcp",
            "text": d / "text.txt"}


@pytest.fixture(scope="module")
def results(reference, lora_root, tmp_path_factory):
    """One subprocess per version, run side by side (each is mostly single-threaded import and tiny models)."""
    d = tmp_path_factory.mktemp("version-results")
    args = [x for k in ("ref", "export", "exports", "source", "dcp", "text") for x in (f"--{k}", str(reference[k]))]
    args += ["--lora", str(lora_root)]
    procs = {}
    for version, specs in VERSIONS.items():
        env = overlay_env(overlay(specs, name=f"transformers-{version}"))
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "ckpt_bridge.testing.version_checks", "--out", str(d / f"{version}.json"), *args]
        procs[version] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    errors = {v: p.communicate(timeout=300)[1] for v, p in procs.items()}
    return {v: (procs[v].returncode, errors[v], d / f"{v}.json") for v in VERSIONS}


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_fidelity_under_other_transformers(results, version):
    code, err, out = results[version]
    assert code == 0, err[-3000:]
    res = json.loads(out.read_text())
    assert res["version"] == version
    # an export written under 5.10.4 reads the same rope on this version, and computes the same function
    assert res["export_rope_theta"] == 500000.0
    assert res["export_logits_max_diff"] == 0.0
    assert res["verify_logits"] == 0.0
    assert res["verify_loss"]["ok"] and abs(res["verify_loss"]["hf"] - res["verify_loss"]["dcp"]) <= 1e-5
    # every family's export written under 5.10.4: no missing / unexpected keys, the same function.  A config
    # misread is far off (rope theta 1e4 for 1e6, 128 experts for 4); what is left is summation order: 4.x
    # runs MoE experts with separate gate / up matmuls (5.x fuses them), and 5.24 reorders Gemma 2's
    # attention, so those agree to float32 rounding and the rest bit for bit.
    assert sorted(res["family_exports"]) == sorted(FAMILIES)
    for name, r in res["family_exports"].items():
        assert not r["missing"] and not r["unexpected"], (name, r)
        assert r["max_diff"] is not None and r["max_diff"] <= 1e-6, (name, r)
        if version.startswith("4.") and not r["moe"]:
            assert r["logits_equal"], (name, r)
    assert sum(r["logits_equal"] for r in res["family_exports"].values()) >= len(FAMILIES) - 2
    # the presets build the same model: save_pretrained writes the same tensors as under 5.10.4 (MoE and
    # Qwen2.5-VL too, whose in-memory layout and init order differ in 4.x)
    assert sorted(res["presets"]) == sorted(n for n in PRESETS if n != "llama_1b")
    for name, r in res["presets"].items():
        assert not r["differ"], (name, r["differ"])
        assert not [k for k in r["only_ref"] + r["only_here"] if "/derived:" not in k], (name, r)
    assert not res["presets"]["olmo2"]["differ"]  # rope_theta 5e5 on 4.x too (it read 1e4 before)
    # after_load recomputes what from_pretrained computes, with this version's own code
    for name, r in res["after_load"].items():
        assert r["derived"] and not r["missing"] and not r["differ"], (name, r)
        assert r["logits_equal"], name
        assert r["params"] == r["ref_params"], name
    assert res["after_load"]["llama_tied"]["retied"] == [["model.embed_tokens.weight", "lm_head.weight"]]
    # LoRA (tests/test_lora.py's comparisons, this version's transformers and peft): the merge is PEFT's own
    # merge_and_unload bit for bit, the adapter loads in PEFT without warnings and gives the live logits, and
    # holds what PEFT's save_pretrained writes
    lora = res["lora"]
    assert lora["peft"] == PEFT[version]
    assert sorted(lora["cases"]) == sorted(LORA_CASES)
    for case, r in lora["cases"].items():
        assert not r["merge_keys"] and not r["merge_differ"] and r["merge_logits_equal"], (case, r)
        assert not r["adapter_warnings"] and r["adapter_logits_equal"], (case, r)
        assert not r["adapter_keys"] and not r["adapter_differ"], (case, r)
    if release(PEFT[version]) >= (0, 22):
        # peft 0.22 gathers an FSDP2 model's DTensors before it writes (0.21.2 fails on them): the same file
        s = lora["sharded_save"]
        assert s["dtensor_params"] > 0 and not s["keys"] and not s["differ"], s


# ---------------------------------------------------------------------------------------------- the tested table

def _lock_pins() -> dict[str, str]:
    lock = (Path(__file__).resolve().parents[1] / "requirements.lock").read_text()
    return dict(m.groups() for m in re.finditer(r"(?m)^([A-Za-z0-9_.-]+)==([^\s;#]+)", lock))


def test_tested_table_is_what_ci_runs():
    """ckpt_bridge/version.py TESTED (what --version and inspect judge by) is this matrix plus the pinned set."""
    pins = _lock_pins()
    assert set(TESTED["transformers"]) == set(VERSIONS) | {pins["transformers"]}
    assert set(TESTED["peft"]) == set(PEFT.values()) | {pins["peft"]}
    for version, specs in VERSIONS.items():
        assert f"transformers=={version}" in specs
        assert PEFT[version] == pins["peft"] or f"peft=={PEFT[version]}" in specs


def test_pyproject_caps_no_dependency_and_admits_every_tested_release():
    """A cap refuses (or downgrades) a user's newer transformers / torch that nobody has seen break: none, and
    every release CI tests satisfies the range."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    reqs = {(r := Requirement(d)).name: r for d in project["dependencies"]}
    capped = {n: str(r.specifier) for n, r in reqs.items() if any(s.operator in ("<", "<=", "==", "===", "~=")
                                                                  for s in r.specifier)}
    assert not capped, capped
    for name in ("torch", "transformers"):
        assert reqs[name].specifier, f"{name} keeps its lower bound"
        for version in TESTED[name]:
            assert reqs[name].specifier.contains(version), (name, version)


def test_version_and_inspect_name_an_untested_release(tiny_hf_dir, monkeypatch, capsys):
    """The installed transformers newer than every tested one (the table made older than the pinned 5.10.4):
    `--version` says it is untested and which is the newest tested, and so does inspect; a tested one is not
    flagged."""
    from ckpt_bridge import version
    from ckpt_bridge.cli import main

    assert main(["inspect", str(tiny_hf_dir)]) == 0
    assert "untested" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"transformers  {_lock_pins()['transformers']}" in out and "untested" not in out

    monkeypatch.setitem(version.TESTED, "transformers", ("4.57.6",))
    with pytest.raises(SystemExit):
        main(["--version"])
    out = capsys.readouterr().out
    assert "untested: newer than the newest tested 4.57.6" in out.split("transformers", 1)[1].splitlines()[0]
    assert main(["inspect", str(tiny_hf_dir)]) == 0  # a note beside the report, not a problem of the checkpoint
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "untested" in ln]
    assert lines == [f"  untested    transformers {_lock_pins()['transformers']} (newer than the newest tested 4.57.6)"]
    assert main(["inspect", str(tiny_hf_dir), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["untested"]) == {"transformers"}
