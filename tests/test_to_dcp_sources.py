"""to-dcp from any source to-hf reads (issue 28): for each kind - verl FSDP actor dir and step dir, a verl
Megatron save, a nested-era DCP with a trained aux head (with and without its manifest), a TorchTitan-native
DCP, a torch file - ``to-dcp SRC`` equals, key for key and bit for bit, the two-step ``to-hf --dtype keep`` then
``to-dcp`` of the same source with the same --aux spec and seed; ``verify --against`` the HF export passes;
torchtitan's own CheckpointManager loads every one model-only on 2 FSDP2 CPU ranks (one torchrun job) and the
loaded model equals the HF export (+ its aux file, + the fresh head's seeded init).  The aux head a source
holds is carried unchanged (the nested -> flat migration), a name also given with --aux is refused, and the
manifest names what the source held beyond the weights and the chain of records it came through."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ckpt_bridge.checks.verify_dcp import verify_dcp
from ckpt_bridge.cli import main as cli
from ckpt_bridge.commands.to_dcp import to_dcp
from ckpt_bridge.commands.to_hf import to_hf
from ckpt_bridge.errors import BridgeError, KeyPlanError
from ckpt_bridge.formats.dcp import DCPReader
from ckpt_bridge.formats.dcp_files import EXTRA_STATE_DIR, MANIFEST, read_manifest

NEW = ["future_predictor:linear"]  # a new head added on the way, seeded
SEED = 3
HEAD = "action_layer:linear:16"  # the "trained" head of the nested-era source


def _dcp_state(d: Path) -> dict[str, torch.Tensor]:
    r = DCPReader(d)
    return {k: r.read(k) for k in r.tensors()}


def _llama3_hf(root: Path) -> Path:
    """A tiny llama that TorchTitan's llama3 builds from its config (as tests/test_titan_models.py)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ckpt_bridge.testing.tiny_models import save_tiny_tokenizer

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500000.0)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(11)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root)
    save_tiny_tokenizer(root, vocab_size=256)
    return root


@pytest.fixture(scope="module")
def sources(verl_ckpt, megatron_ckpts, tiny_hf_factory, tmp_path_factory):
    """{kind: (source path, to-dcp / to-hf keyword options)}."""
    root = tmp_path_factory.mktemp("any-source")
    hf = tiny_hf_factory("llama")
    actor = verl_ckpt("llama", "2")
    mega = megatron_ckpts["llama_tp2pp2"]
    # the nested era (flame's older pins) with an aux head trained in it: seed 5, not what --seed would make
    nested = root / "nested"
    to_dcp(hf, nested, layout="nested", aux=[HEAD], seed=5, progress=False)
    bare = root / "nested-bare"  # as the trainer itself saved it: no ckpt-bridge manifest, no kept config
    shutil.copytree(nested, bare)
    (bare / MANIFEST).unlink()
    shutil.rmtree(bare / "hf_config")
    # TorchTitan's own llama3 names, with the manifest taken away: only --source-titan-model says what they are
    l3 = _llama3_hf(root / "llama3-hf")
    native = root / "llama3-native"
    to_dcp(l3, native, titan_model="llama3", dtype="keep", progress=False)
    (native / MANIFEST).unlink()
    shutil.rmtree(native / "hf_config")
    tfile = root / "model.pt"
    from safetensors.torch import load_file

    from ckpt_bridge.formats.hf import weight_files

    sd = {}
    for f in weight_files(hf)[1]:
        sd.update(load_file(f))
    torch.save(sd, tfile)
    return {
        "verl-actor": (actor, {}),
        "verl-step": (actor.parent, {}),
        "megatron": (mega / "global_step_1", {"config": mega / "base_model"}),
        "nested": (nested, {}),
        "nested-bare": (bare, {"config": hf}),
        "titan-native": (native, {"config": l3}, {"titan_model": "llama3"}, {"source_titan_model": "llama3"}),
        "torch-file": (tfile, {"config": hf}),
    }


def _opts(entry):
    src, common = entry[0], entry[1]
    to_hf_only = entry[2] if len(entry) > 2 else {}
    to_dcp_only = entry[3] if len(entry) > 3 else {}
    return src, common, to_hf_only, to_dcp_only


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """{kind: (direct DCP, HF export, two-step DCP, summary)}."""
    root = tmp_path_factory.mktemp("any-source-out")
    out = {}
    for kind, entry in sources.items():
        src, common, hf_only, dcp_only = _opts(entry)
        direct = root / f"{kind}-direct"
        s = to_dcp(src, direct, aux=NEW, seed=SEED, progress=False, **common, **dcp_only)
        export = root / f"{kind}-hf"
        to_hf(src, export, dtype="keep", progress=False, **common, **hf_only)
        two = root / f"{kind}-two-step"
        to_dcp(export, two, aux=NEW, seed=SEED, progress=False)
        out[kind] = (direct, export, two, s)
    return out


KINDS = ["verl-actor", "verl-step", "megatron", "nested", "nested-bare", "titan-native", "torch-file"]


@pytest.mark.parametrize("kind", KINDS)
def test_direct_equals_the_two_step_path_and_verifies(converted, kind):
    direct, export, two, s = converted[kind]
    a, b = _dcp_state(direct), _dcp_state(two)
    assert sorted(a) == sorted(b) and len(a) > 10
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert any(k.startswith("future_predictor.") for k in a)
    res = verify_dcp(direct, export)
    assert res.ok, res.headline()
    assert res.equal == res.compared > 10
    m = read_manifest(direct)
    assert m["source"]["format"] == s.source_format and m["provenance"][-1]["format"] == s.source_format
    # the two-step DCP follows its chain back through the HF export's marker to the same source
    chain = read_manifest(two)["provenance"]
    assert chain[-1]["record"] == "ckpt_bridge_export.json" and chain[-2]["format"] == s.source_format


def test_nested_to_flat_keeps_the_trained_head_bit_for_bit(sources, converted):
    """The migration a flame user needs after upgrading: the head trained in the nested era arrives unchanged
    under the flat key, beside the new head (which does not change it); with and without the source's
    manifest (then the head is found as a top-level prefix the HF class lacks, and its spec from its shapes)."""
    src = DCPReader(sources["nested"][0])
    head = {k: src.read(k) for k in src.tensors() if k.startswith("model.action_layer.")}
    assert len(head) == 2 and src.layout() == "nested"
    for kind in ("nested", "nested-bare"):
        direct, _, _, s = converted[kind]
        got = _dcp_state(direct)
        assert s.layout == "flat"
        for k, v in head.items():
            assert torch.equal(got[k[len("model."):]], v), k
        rec = {a["name"]: a for a in read_manifest(direct)["aux"]}
        assert rec["action_layer"]["kind"] == "carried" and rec["action_layer"]["spec"] == HEAD
        assert rec["future_predictor"]["spec"] == "future_predictor:linear:hidden"
    # the nested source's manifest is in the chain, by hash
    chain = read_manifest(converted["nested"][0])["provenance"]
    assert chain[-1]["record"] == MANIFEST and len(chain[-1]["record_sha256"]) == 64
    assert chain[0]["format"] == "hf"


def test_a_head_in_the_source_and_in_aux_is_refused(sources, tmp_path):
    with pytest.raises(KeyPlanError, match="--aux action_layer: the source already holds an aux module 'action_layer'"):
        to_dcp(sources["nested"][0], tmp_path / "x", aux=["action_layer:linear:16"], progress=False)
    assert not (tmp_path / "x").exists()


def test_what_the_source_held_is_named_and_copied_on_request(sources, converted, tmp_path, capsys):
    direct, _, _, s = converted["verl-actor"]
    m = read_manifest(direct)
    assert "lr_scheduler" in s.left_behind and "rng" in s.left_behind
    assert m["left_behind"]["held"] == s.left_behind and m["left_behind"]["carried"] is False
    assert not (direct / EXTRA_STATE_DIR).exists()
    actor = sources["verl-actor"][0]
    assert cli(["to-dcp", str(actor), "--out", str(tmp_path / "x"), "--extra-state", "--quiet"]) == 0
    assert f"not carried (a model-only DCP): {', '.join(s.left_behind)}" in capsys.readouterr().out
    extra = torch.load(tmp_path / "x" / EXTRA_STATE_DIR / "extra_state_merged.pt", weights_only=False)
    ref = torch.load(converted["verl-actor"][1] / "extra_state_merged.pt", weights_only=False)
    assert sorted(extra["rng"]) == sorted(ref["rng"]) and extra["global_step"] == ref["global_step"]
    assert read_manifest(tmp_path / "x")["left_behind"]["copied_beside"].startswith(EXTRA_STATE_DIR)
    # a source with nothing beyond the weights: the flag is refused, nothing written
    with pytest.raises(BridgeError, match="holds no training extra state"):
        to_dcp(sources["torch-file"][0], tmp_path / "y", config=sources["torch-file"][1]["config"],
               extra_state=True, progress=False)
    assert not (tmp_path / "y").exists()


def test_a_lora_run_is_refused_in_one_line(sources, tmp_path):
    """PEFT-wrapped keys (what verl saves for a LoRA run): refused with the command that merges them first."""
    sd = {k: v for k, v in torch.load(sources["torch-file"][0], weights_only=True).items()}
    w = sd.pop("model.layers.0.self_attn.q_proj.weight")
    sd = {f"base_model.model.{k}": v for k, v in sd.items()}
    sd["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] = w
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] = torch.zeros(2, w.shape[1])
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"] = torch.zeros(w.shape[0], 2)
    torch.save(sd, tmp_path / "lora.pt")
    with pytest.raises(BridgeError, match="a LoRA run; to-dcp does not fold adapters: write the merged model first"):
        to_dcp(tmp_path / "lora.pt", tmp_path / "x", config=sources["torch-file"][1]["config"], progress=False)
    assert not (tmp_path / "x").exists()


def test_titan_native_without_the_flag_names_it(sources, tmp_path):
    src, common, _, _ = _opts(sources["titan-native"])
    with pytest.raises(KeyPlanError, match="pass --source-titan-model llama3"):
        to_dcp(src, tmp_path / "x", progress=False, **common)


def test_torchtitan_loads_every_source_on_two_fsdp2_ranks(converted, tmp_path):
    """ONE torchrun job: every direct output through torchtitan's own CheckpointManager, model-only."""
    from ckpt_bridge.testing.harness import run_torchrun

    cases = []
    for kind, (direct, export, _, _) in converted.items():
        aux = [a["spec"] for a in read_manifest(direct)["aux"]]
        cases.append({"name": kind, "dcp": str(direct), "hf": str(export), "aux": aux, "fresh": NEW, "seed": SEED})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    run_torchrun(["ckpt_bridge.testing.titan_load", "--cases", str(tmp_path / "cases.json"),
                  "--out", str(tmp_path / "out.json")], nproc=2, timeout=600)
    res = json.loads((tmp_path / "out.json").read_text())
    assert sorted(res) == sorted(converted)
    for kind, r in res.items():
        assert r["loaded"] is True, kind
        assert not r["different"] and not r["not_in_model"] and not r["not_in_source"], (kind, r)
        assert len(r["equal"]) == r["keys_in_model"] > 10, kind


def test_workers_2_from_a_megatron_save_equal_one_process(sources, converted, tmp_path):
    """--workers 2 splits the Megatron source's plan (split qkv / fc1 composed before the trainer keys) between
    two processes: the same DCP, tensor for tensor."""
    src, common, _, _ = _opts(sources["megatron"])
    args = ["to-dcp", str(src), "--out", str(tmp_path / "w2"), "--config", str(common["config"]), "--workers", "2",
            "--seed", str(SEED), "--quiet"] + [x for a in NEW for x in ("--aux", a)]
    assert cli(args) == 0
    a, b = _dcp_state(converted["megatron"][0]), _dcp_state(tmp_path / "w2")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
