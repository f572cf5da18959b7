"""flame's model zoo (flash-linear-attention) and any model class not built into transformers (issue 27).

The real fla 0.6.0 (``flash-linear-attention`` + ``fla-core`` from PyPI, an overlay first on a subprocess's
PYTHONPATH, cached like every overlay) in two subprocesses for all model types (:mod:`ckpt_bridge.testing.fla_checks`):

* ``convert``: every fla model type that builds on a CPU from a tiny config, saved by ``save_pretrained``;
  ``to-dcp --custom-import fla --aux future_predictor:linear`` then ``to-hf`` of that DCP equal the
  ``save_pretrained`` files bit for bit; ``verify`` by tensors; ``--logits`` / ``--loss`` refused in one line
  (fla's forward needs GPU kernels); the Python API with no flag after ``import fla``.
* ``load`` (torchrun, 2 ranks, FSDP2 on gloo, the model built as flame builds it): torchtitan's own
  ``CheckpointManager`` model-only load of each of our DCPs holds every HF tensor and the aux head's init;
  ``set_initial_load`` and the save hook with no flag (the trainer imported fla).

This process (fla not imported, not even installed): the refusals of the issue's table name the flag that
works, and a model whose code ships in its directory (written here, with a marker it leaves when imported)
converts with ``--trust-remote-code`` only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckpt_bridge.testing.harness import _child_env, run_torchrun
from ckpt_bridge.testing.overlays import OverlayError, overlay
from ckpt_bridge.testing.upstream import FLA

# The fla 0.6.0 model types whose tiny models build on a CPU (hgrn2, nsa and rodimus need other sizes than
# fla_checks.TINY; mla, samba and transformer import flash-attn at build time)
CPU_TYPES = ["abc", "bitnet", "cat", "comba", "cyclic_flow_attention", "delta_net", "deltaformer",
             "forgetting_transformer", "gated_deltanet", "gated_deltaproduct", "gla", "gsa", "hgrn", "kda",
             "lightnet", "linear_attn", "log_linear_mamba2", "mamba", "mamba2", "mamba3", "mesa_net", "moba", "mom",
             "parallax", "path_attn", "precond_gated_deltanet", "precond_kda", "raven", "retnet", "rwkv6", "rwkv7",
             "stickbreaking_attn", "wall_transformer", "yoco"]


@pytest.fixture(scope="module")
def fla_env() -> dict[str, str]:
    try:
        fla = overlay(FLA, name="fla")
    except OverlayError as e:
        pytest.fail(f"fla overlay: {e}")
    env = _child_env(None)
    env["PYTHONPATH"] = os.pathsep.join([str(fla), env["PYTHONPATH"]])
    return env


@pytest.fixture(scope="module")
def fla_runs(fla_env, tmp_path_factory) -> dict:
    """Both jobs' JSON: the conversions (one process), then the trainer's loads of them (one torchrun job)."""
    root = tmp_path_factory.mktemp("fla")
    proc = subprocess.run([sys.executable, "-m", "ckpt_bridge.testing.fla_checks", "convert", "--root", str(root),
                           "--out", str(root / "convert.json")], env=fla_env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_torchrun(["ckpt_bridge.testing.fla_checks", "load", "--root", str(root), "--out", str(root / "load.json")],
                 nproc=2, timeout=900, env=fla_env)
    return {"root": root, "convert": json.loads((root / "convert.json").read_text())["types"],
            "load": json.loads((root / "load.json").read_text())}


def _exact(cmp: dict) -> None:
    assert cmp["compared"] > 0 and not cmp["missing"] and not cmp["extra"] and not cmp["different"], cmp


@pytest.mark.parametrize("model_type", CPU_TYPES)
def test_fla_model_round_trip_is_bit_exact(fla_runs, model_type):
    rec = fla_runs["convert"][model_type]
    assert "build_error" not in rec, rec["build_error"]
    assert "exception" not in rec, rec["exception"]
    assert rec["to_dcp"]["rc"] == 0 and rec["to_hf"]["rc"] == 0, rec
    _exact(rec["export_vs_save_pretrained"])  # to-hf of our DCP == save_pretrained, key by key, bit for bit
    assert rec["verify"]["rc"] == 0, rec["verify"]
    code = rec["manifest_model_code"]  # the manifest records the module and its version
    assert code["model_type"] == model_type and code["custom_import"][0]["module"] == "fla"
    assert code["custom_import"][0]["version"] == "0.6.0", code


@pytest.mark.parametrize("model_type", CPU_TYPES)
def test_torchtitan_loads_every_tensor_on_two_fsdp2_ranks(fla_runs, model_type):
    assert fla_runs["load"]["world"] == 2
    rec = fla_runs["load"]["types"][model_type]
    assert "exception" not in rec, rec["exception"]
    assert rec["loaded"] is True
    assert "hidden_size" in rec["after_load_checked"], rec  # after_load checked the config against the HF one
    _exact(rec["vs_hf_and_aux"])  # the HF tensors and the aux head, under the keys the CheckpointManager loads
    # every HF tensor and the aux head's two
    assert rec["vs_hf_and_aux"]["compared"] == fla_runs["convert"][model_type]["export_vs_save_pretrained"]["compared"] + 2


def test_hooks_work_with_no_flag_after_import_fla(fla_runs):
    """flame's train.py imports fla: set_initial_load converts and the save hook exports with no flag."""
    first = next(t for t, r in fla_runs["load"]["types"].items() if "hooks" in r)
    hooks = fla_runs["load"]["types"][first]["hooks"]
    assert hooks["loaded"] is True
    _exact(hooks["vs_hf_and_aux"])
    assert hooks["hook"] and hooks["hook"][0]["ok"], hooks["hook"]
    _exact(hooks["hook_export_vs_hf"])


@pytest.mark.parametrize("model_type", ["gla", "gated_deltanet"])
def test_python_api_needs_no_flag_after_import_fla(fla_runs, model_type):
    assert fla_runs["convert"][model_type]["api_same_as_cli"] is True


def _one_line(rec: dict, *says: str) -> str:
    assert rec["rc"] == 2 and len(rec["stderr"]) == 1, rec
    for s in says:
        assert s in rec["stderr"][0], rec["stderr"][0]
    return rec["stderr"][0]


def test_logits_and_loss_on_a_cpu_say_fla_needs_a_gpu(fla_runs):
    rec = fla_runs["convert"]["gla"]
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: fla's forward runs")
    _one_line(rec["verify_logits"], "flash-linear-attention", "GPU", "--logits")
    _one_line(rec["verify_against_loss"], "flash-linear-attention", "GPU")
    assert rec["verify_against"]["rc"] == 0 and rec["inspect"]["rc"] == 0, rec


def test_workers_export_is_the_same(fla_runs):
    """to-hf --workers 2 of an fla DCP: both processes import fla (the flag travels), the shards are bit exact."""
    rec = fla_runs["convert"]["gla"]
    assert rec["to_hf_workers"]["rc"] == 0, rec["to_hf_workers"]
    assert rec["workers_files"] > 2  # several shards, split between the two workers
    _exact(rec["workers_vs_save_pretrained"])


def test_custom_import_of_a_missing_module_is_one_line(fla_runs):
    rec = fla_runs["convert"]["gla"]
    _one_line(rec["no_such_module"], "--custom-import no_such_fla_module", "no module named")
    assert "x1" not in rec["x_written"]


# ---------------------------------------------------------------- this process: fla not importable


def _cli(capsys, argv: list) -> tuple[int, list[str]]:
    from ckpt_bridge.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_to_hf_of_an_fla_dcp_without_the_flag_names_it(fla_runs, capsys, tmp_path):
    """The manifest says which module made it: the refusal names the exact flag; nothing is written."""
    rc, err = _cli(capsys, ["to-hf", fla_runs["root"] / "gla" / "dcp", "--out", tmp_path / "o"])
    assert rc == 2 and len(err) == 1 and "--custom-import fla" in err[0], err
    assert "install a transformers release" not in err[0] and not (tmp_path / "o").exists()
    rc, err = _cli(capsys, ["verify", fla_runs["root"] / "gla" / "dcp", "--against", fla_runs["root"] / "gla" / "hf"])
    assert rc == 2 and len(err) == 1 and "--custom-import fla" in err[0], err


@pytest.mark.parametrize("model_type", ["gla", "gated_deltanet", "rwkv7", "delta_net", "retnet", "kda"])
def test_the_unknown_model_refusal_says_what_works(fla_runs, capsys, tmp_path, model_type):
    """The issue's table: 'install a transformers release' for a type no release has; now the flag and package."""
    rc, err = _cli(capsys, ["to-dcp", fla_runs["root"] / model_type / "hf", "--out", tmp_path / "o",
                            "--aux", "future_predictor:linear"])
    assert rc == 2 and len(err) == 1, err
    assert "--custom-import fla" in err[0] and "flash-linear-attention" in err[0], err[0]
    assert "install a transformers release" not in err[0] and not (tmp_path / "o").exists()


def test_a_module_that_registers_nothing_for_the_type_is_one_line(fla_runs, capsys, tmp_path):
    rc, err = _cli(capsys, ["to-dcp", fla_runs["root"] / "gla" / "hf", "--out", tmp_path / "o",
                            "--custom-import", "json"])
    assert rc == 2 and len(err) == 1 and "--custom-import json" in err[0] and "'gla'" in err[0], err
    assert not (tmp_path / "o").exists()
    rc, err = _cli(capsys, ["to-dcp", fla_runs["root"] / "gla" / "hf", "--out", tmp_path / "o",
                            "--custom-import", "no_such_module_for_gla"])
    assert rc == 2 and len(err) == 1 and "no_such_module_for_gla" in err[0], err


# ---------------------------------------------------------------- a checkpoint's own code (auto_map)

CONFIG_PY = '''
from transformers import PretrainedConfig


class TinyRemoteConfig(PretrainedConfig):
    model_type = "tinyremote"

    def __init__(self, vocab_size=32, hidden_size=16, num_hidden_layers=2, **kw):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        super().__init__(**kw)
'''
MODELING_PY = '''
import pathlib

pathlib.Path({marker!r}).write_text("imported")  # proof that this file ran

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_tinyremote import TinyRemoteConfig


class TinyRemoteForCausalLM(PreTrainedModel):
    config_class = TinyRemoteConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(nn.Linear(config.hidden_size, config.hidden_size)
                                    for _ in range(config.num_hidden_layers))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, **kw):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return CausalLMOutput(logits=self.lm_head(h))
'''


@pytest.fixture
def remote_model(tmp_path) -> tuple[Path, Path]:
    """(model dir with auto_map code, the marker its modeling file writes when imported)."""
    from safetensors.torch import save_file

    d, marker = tmp_path / "remote", tmp_path / "IMPORTED"
    d.mkdir()
    (d / "configuration_tinyremote.py").write_text(CONFIG_PY)
    (d / "modeling_tinyremote.py").write_text(MODELING_PY.format(marker=str(marker)))
    (d / "config.json").write_text(json.dumps({
        "model_type": "tinyremote", "architectures": ["TinyRemoteForCausalLM"], "vocab_size": 32, "hidden_size": 16,
        "num_hidden_layers": 2, "auto_map": {"AutoConfig": "configuration_tinyremote.TinyRemoteConfig",
                                             "AutoModelForCausalLM": "modeling_tinyremote.TinyRemoteForCausalLM"}}))
    g = torch.Generator().manual_seed(0)
    sd = {"embed.weight": torch.randn(32, 16, generator=g), "lm_head.weight": torch.randn(32, 16, generator=g)}
    for i in range(2):
        sd[f"layers.{i}.weight"] = torch.randn(16, 16, generator=g)
        sd[f"layers.{i}.bias"] = torch.randn(16, generator=g)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d, marker


def test_remote_code_is_refused_without_the_opt_in_and_never_run(remote_model, capsys, tmp_path):
    d, marker = remote_model
    for argv in (["to-dcp", d, "--out", tmp_path / "o"], ["to-hf", d, "--out", tmp_path / "o"],
                 ["verify", d, d, "--logits"]):
        rc, err = _cli(capsys, argv)
        assert rc == 2 and len(err) == 1 and "--trust-remote-code" in err[0] and "auto_map" in err[0], (argv, err)
        assert not (tmp_path / "o").exists()
    from ckpt_bridge.cli import main

    capsys.readouterr()
    assert main(["inspect", str(d), "--json"]) == 2  # inspect lists the same line among its problems
    assert any("--trust-remote-code" in p for p in json.loads(capsys.readouterr().out)["problems"])
    assert not marker.exists()  # the checkpoint's modeling file was never imported


def test_remote_code_converts_with_trust_remote_code(remote_model, capsys, tmp_path):
    from safetensors.torch import load_file

    d, marker = remote_model
    rc, err = _cli(capsys, ["to-dcp", d, "--out", tmp_path / "dcp", "--trust-remote-code", "--quiet"])
    assert rc == 0, err
    assert marker.exists()  # the opt-in ran it
    manifest = json.loads((tmp_path / "dcp" / "ckpt_bridge_manifest.json").read_text())
    assert manifest["model_code"]["trust_remote_code"] is True
    # without the opt-in, the DCP's to-hf names it (the code kept in hf_config/ is not run)
    rc, err = _cli(capsys, ["to-hf", tmp_path / "dcp", "--out", tmp_path / "hf"])
    assert rc == 2 and len(err) == 1 and "--trust-remote-code" in err[0] and not (tmp_path / "hf").exists(), err
    rc, err = _cli(capsys, ["to-hf", tmp_path / "dcp", "--out", tmp_path / "hf", "--trust-remote-code", "--quiet"])
    assert rc == 0, err
    got, want = load_file(tmp_path / "hf" / "model.safetensors"), load_file(d / "model.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    for f in ("configuration_tinyremote.py", "modeling_tinyremote.py"):  # the code travels, as save_pretrained's
        assert (tmp_path / "hf" / f).read_bytes() == (d / f).read_bytes()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["auto_map"] == \
        json.loads((d / "config.json").read_text())["auto_map"]
    rc, err = _cli(capsys, ["verify", d, tmp_path / "hf", "--logits", "--trust-remote-code"])
    assert rc == 0, err
    # the registration was for that command only: a later call without the opt-in is refused again
    rc, err = _cli(capsys, ["to-dcp", d, "--out", tmp_path / "again"])
    assert rc == 2 and "--trust-remote-code" in err[0], err


def test_trainer_keys_cache_keys_on_the_registered_code(tmp_path, monkeypatch):
    """A plan remembered for one package's class is never reused for another's (or another version's)."""
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ckpt_bridge.plan.trainer_expectation import _cache_file

    monkeypatch.setenv("CKPT_BRIDGE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "keyprobe"}))
    before = _cache_file(tmp_path, [], "auto")

    class KeyProbeConfig(PretrainedConfig):
        model_type = "keyprobe"

    AutoConfig.register("keyprobe", KeyProbeConfig)
    try:
        after = _cache_file(tmp_path, [], "auto")
    finally:
        CONFIG_MAPPING._extra_content.pop("keyprobe", None)
    assert before != after and _cache_file(tmp_path, [], "auto") == before
