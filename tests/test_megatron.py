"""verl Megatron checkpoints -> Hugging Face (issue 17), on REAL saves.

Every checkpoint here is written by verl 0.9.1's own ``MegatronCheckpointManager.save_checkpoint``
(``use_dist_checkpointing=True``) from a megatron-core 0.16.1 ``GPTModel`` at the case's TP / PP / EP
(``ckpt_bridge.testing.megatron_save``, one torchrun job for the session, see tests/conftest.py).  The
Megatron model was loaded from an HF model with a mapping written in that module, not ckpt-bridge's; the
reference is that HF model's ``save_pretrained`` (``base_model/``), which exports must equal bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ckpt_bridge import safeload
from ckpt_bridge.compare import bits_equal
from ckpt_bridge.formats.base import TensorInfo
from ckpt_bridge.commands.to_hf import to_hf

from ckpt_bridge.testing.megatron_save import SESSION_CASES as MEGATRON_CASES
from test_failure_table import assert_fails  # tests/ is on sys.path (rootdir conftest)


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_equals_reference(out: Path, case: Path) -> None:
    got, want = _weights(out), _weights(case / "base_model")
    assert sorted(got) == sorted(want)
    bad = [k for k in want if not bits_equal(got[k], want[k])]
    assert not bad, bad[:5]


# llama_mfsdp (verl's Megatron-FSDP layout) has its own tests: tests/test_megatron_fsdp.py
LMS = [c for c in MEGATRON_CASES if "critic" not in c and "mfsdp" not in c]


@pytest.mark.parametrize("case", LMS)
def test_export_is_bit_exact_and_loads(megatron_ckpts, tmp_path, case):
    """to-hf --dtype keep == the HF model's save_pretrained, file bytes included; from_pretrained loads it
    with no missing / unexpected keys; every (pp, tp) rank's rng lands in extra_state_merged.pt."""
    import transformers

    root = megatron_ckpts[case]
    out = tmp_path / "hf"
    s = to_hf(root / "global_step_1", out, dtype="keep", config=root / "base_model", progress=False)
    assert s.source_format == "verl-megatron"
    _assert_equals_reference(out, root)
    # file bytes too, but for MoE: the writer orders per-expert splits by group, save_pretrained by name
    if not any(".experts." in k for k in _weights(root / "base_model")):
        for f in (root / "base_model").glob("*.safetensors"):
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    cfg = json.loads((out / "config.json").read_text())
    model, info = getattr(transformers, cfg["architectures"][0]).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    extra = safeload.load_plain(out / "extra_state_merged.pt")
    refs = [torch.load(f, weights_only=False) for f in sorted((root / "reference").glob("rank*_rng.pt"))]
    firsts = {(r["pp"], r["tp"]): r for r in refs if r["dp"] == 0}  # verl saves data-parallel rank 0's rng
    assert sorted(extra["rng"]) == sorted(f"pp{p}_tp{t}" for p, t in firsts)
    for (p, t), r in firsts.items():
        got = extra["rng"][f"pp{p}_tp{t}"]
        assert torch.equal(got["torch_rng_state"], r["torch"])
        assert got["random_rng_state"] == r["random"]
        assert extra["global_step"] == 1
    live = root / "reference" / "lr_scheduler.pt"  # the cases saved with a real Megatron optimizer + scheduler
    if live.is_file():
        assert extra["lr_scheduler"] == torch.load(live, weights_only=False)
        assert json.loads((out / "lr_scheduler_state.json").read_text())["lr_scheduler"]["num_steps"] == 3


def test_a_case_saves_a_real_optimizer_and_lr_scheduler(megatron_ckpts):
    """qwen3_pp2 is saved with verl's own Megatron optimizer (get_megatron_optimizer over megatron's DDP) and
    OptimizerParamScheduler (stepped 3 times): the lr_scheduler check above runs on it, not skipped."""
    root = megatron_ckpts["qwen3_pp2"]
    manifest = json.loads((root / "global_step_1" / "actor" / "ckpt_contents.json").read_text())
    assert manifest["contents"]["lr_scheduler"]["path"] == "optimizer/dist_ckpt"
    assert torch.load(root / "reference" / "lr_scheduler.pt", weights_only=False)["num_steps"] == 3


@pytest.mark.parametrize("case", MEGATRON_CASES)
def test_megatron_forward_equals_the_hf_forward(megatron_ckpts, case):
    """The oracle independent of both mappings (the test's HF -> Megatron one and ckpt-bridge's plan): the
    Megatron model that verl saved, run by megatron-core's own forward (TP / EP collectives over gloo, PP
    stages chained) on a fixed batch, gives the HF model's logits.  A mistake the two mappings share (q / k
    / v order inside a KV group, gate / up order, a swapped norm, an expert permutation) changes them."""
    d = torch.load(megatron_ckpts[case] / "reference" / "logits.pt", weights_only=True)
    got, want = d["megatron"], d["hf"]
    assert got.shape == want.shape == (*d["tokens"].shape, 1 if "critic" in case else 256)
    assert want.abs().max() > 0.1  # not a degenerate (all-zero) forward
    err = (got - want).abs().max().item()
    assert err < 2e-6, f"{case}: Megatron logits differ from the HF model's by {err}"


def test_critic_exports_as_token_classification(megatron_ckpts, tmp_path):
    """verl's Megatron critic (value head as output_layer [1, H], config still the causal LM's): to-hf with
    the save's own model/huggingface config writes Qwen2ForTokenClassification, num_labels=1, bit-exact vs
    the HF critic's save_pretrained (whose score.bias is 0, as verl's head has no bias); it loads clean."""
    import transformers

    root = megatron_ckpts["qwen2_critic_tp2pp2"]
    critic = root / "global_step_1" / "critic"
    start = root / "causal_lm_config"  # the critic's starting config, as verl keeps it: the arch names no head
    assert json.loads((start / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    out = tmp_path / "hf"
    s = to_hf(root / "global_step_1", out, dtype="keep", config=start, progress=False)  # finds the critic
    assert s.source_format == "verl-megatron"
    _assert_equals_reference(out, root)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForTokenClassification"] and cfg["num_labels"] == 1
    model, info = transformers.Qwen2ForTokenClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    plan = to_hf(critic, tmp_path / "never", config=start, dry_run=True, progress=False).plan_lines
    assert any("critic: output_layer (1, 64) is verl's value head" in line for line in plan)


def test_bridge_written_weights_export_with_completeness_checked(megatron_ckpts, tmp_path, capsys):
    """verl's default (use_mbridge, use_dist_checkpointing=False): mbridge wrote the HF weights into
    model/huggingface (a real save: the Megatron model was loaded by mbridge too).  to-hf finds the config
    there, copies the weights through the plan bit-exactly, merges every (pp, tp) rank's rng; a tensor the
    save lost is an exit-2 error naming it, with no output."""
    from safetensors.torch import load_file, save_file

    root = megatron_ckpts["llama_bridge_tp2pp2"]
    actor = root / "global_step_1" / "actor"
    manifest = json.loads((actor / "ckpt_contents.json").read_text())
    assert manifest["backend"]["has_bridge"] and manifest["contents"]["model"]["format"] == "huggingface"
    out = tmp_path / "hf"
    to_hf(root / "global_step_1", out, dtype="keep", progress=False)  # no --config: the bridge wrote one
    _assert_equals_reference(out, root)
    extra = safeload.load_plain(out / "extra_state_merged.pt")
    assert sorted(extra["rng"]) == ["pp0_tp0", "pp0_tp1", "pp1_tp0", "pp1_tp1"]

    bad, _ = _copy_actor(megatron_ckpts, tmp_path, case="llama_bridge_tp2pp2")
    f = bad / "model" / "huggingface" / "model.safetensors"
    w = load_file(f)
    del w["model.layers.3.mlp.down_proj.weight"]
    save_file(w, f, metadata={"format": "pt"})
    assert_fails(capsys, ["to-hf", str(bad), "--out", str(tmp_path / "o")],
                 says="lack 1 tensor(s) LlamaForCausalLM has: model.layers.3.mlp.down_proj.weight", sources=(bad,))


def test_bridge_weights_missing_an_expert_is_named(megatron_ckpts):
    """The completeness rule on an MoE class (mbridge's MoE tables need transformer_engine's grouped
    experts, so no real bridge MoE save here): the HF weights of qwen3-moe with one expert removed."""
    from ckpt_bridge.errors import KeyPlanError
    from ckpt_bridge.formats.hf import HFReader
    from ckpt_bridge.plan.megatron import check_bridge_weights

    base = megatron_ckpts["qwen3_moe_ep2"] / "base_model"
    infos = dict(HFReader(base).tensors())
    check_bridge_weights(infos, base, "ckpt")  # complete: passes
    del infos["model.layers.1.mlp.experts.3.up_proj.weight"]
    with pytest.raises(KeyPlanError, match=r"lack 1 tensor\(s\) Qwen3MoeForCausalLM has: "
                                           r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        check_bridge_weights(infos, base, "ckpt")


def test_dry_run_prints_the_megatron_rules(megatron_ckpts, tmp_path):
    root = megatron_ckpts["qwen2_moe_ep2"]
    out = tmp_path / "never"
    s = to_hf(root / "global_step_1", out, config=root / "base_model", dry_run=True, progress=False)
    text = "\n".join(s.plan_lines)
    assert not out.exists()
    assert "split: decoder.layers.self_attention.linear_qkv.weight[1]" in text
    assert "split linear_qkv per KV group (2 x [2 q heads | k | v], d=16)" in text
    assert "decoder.layers.self_attention.linear_qkv.bias[0]" in text
    assert "split linear_fc1 [gate ; up]" in text and "mlp.shared_experts.linear_fc1.weight[0]" in text
    assert "decoder.layers.mlp.experts.experts.linear_fc1.weight[1]" in text  # then transformers' per-expert split
    assert "(dropped: megatron _extra_state" in text


def test_stacked_tensors_are_read_one_layer_at_a_time(megatron_ckpts, tmp_path, monkeypatch):
    """Streaming: the chunk copier is asked for one index of the layer axis at a time, never a whole
    stacked tensor (the expert stack of a layer is one layer slice)."""
    from ckpt_bridge.formats import dcp_direct
    from ckpt_bridge.formats.megatron import is_stacked

    calls = []
    orig = dcp_direct.DirectChunks.copy_rows

    def spy(self, out, spans, info, start, stop):
        calls.append((self.root.name, tuple(info.shape), start, stop, tuple(out.shape)))
        return orig(self, out, spans, info, start, stop)

    monkeypatch.setattr(dcp_direct.DirectChunks, "copy_rows", spy)
    whole = []
    from ckpt_bridge.formats.dcp import DCPReader

    orig_read = DCPReader.read

    def no_fallback(self, key, info):  # DCP's own loader reads a tensor whole
        raise AssertionError(f"{key} read through dcp.load, not by chunk")

    monkeypatch.setattr(DCPReader, "_dcp_load", no_fallback)
    monkeypatch.setattr(DCPReader, "read", lambda self, k, *a, **kw: whole.append(k) or orig_read(self, k, *a, **kw))
    root = megatron_ckpts["qwen3_moe_ep2"]
    to_hf(root / "global_step_1", tmp_path / "hf", config=root / "base_model", progress=False)
    assert not [k for k in whole if is_stacked(k)], whole
    stacked = [c for c in calls if c[0] == "dist_ckpt" and c[4][0] == 1 and len(c[1]) == len(c[4])]
    assert stacked and all(stop - start == 1 for _, _, start, stop, _ in stacked)
    # unstacked tensors (the embedding, split over TP ranks) move in row pieces too, never whole (issue 17)
    assert not whole, whole
    assert [c for c in calls if len(c[1]) == 2 and len(c[4]) == 2 and c[4][0] == c[3] - c[2]], calls
    assert any(len(shape) == 4 for _, shape, *_ in stacked)  # the [L, E, 2F, H] expert stack, per layer
    assert all(stop - start == 1 or shape[0] == stop - start and not len(shape) > 2
               for _, shape, start, stop, _ in calls), calls


def test_layouts_v1_and_bare_dist_ckpt(megatron_ckpts, tmp_path):
    """verl <= 0.8's layout (dist_ckpt/ + huggingface/ at the actor root, as verl's migration script maps it)
    and a bare dist_ckpt folder export the same bits."""
    root = megatron_ckpts["llama_tp2pp2"]
    actor = root / "global_step_1" / "actor"
    v1 = tmp_path / "global_step_1" / "actor"
    v1.mkdir(parents=True)
    shutil.copytree(actor / "model" / "dist_ckpt", v1 / "dist_ckpt")
    shutil.copytree(root / "base_model", v1 / "huggingface", ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copy2(actor / "transformer_config.json", v1 / "transformer_config.json")
    to_hf(v1.parent, tmp_path / "from_v1", progress=False)  # config found in huggingface/
    _assert_equals_reference(tmp_path / "from_v1", root)
    to_hf(actor / "model" / "dist_ckpt", tmp_path / "from_bare", config=root / "base_model", progress=False)
    _assert_equals_reference(tmp_path / "from_bare", root)


def test_inspect_reports_virtual_pipeline_stages(megatron_ckpts):
    from ckpt_bridge.checks.inspect import inspect

    text = json.dumps(inspect(megatron_ckpts["llama_pp2vpp2"] / "global_step_1"))
    assert '"vpp": 2' in text and '"pp": 2' in text, text


def test_inspect_reports_the_save(megatron_ckpts):
    from ckpt_bridge.checks.inspect import inspect

    r = inspect(megatron_ckpts["llama_tp2pp2"] / "global_step_1")
    d = r["details"] if "details" in r else r
    text = json.dumps(r)
    assert r["format"] == "verl-megatron" and not r["problems"], r["problems"]
    assert '"tp": 2' in text and '"pp": 2' in text and '"schema_version": 2' in text
    assert "LlamaForCausalLM" in text and d is not None


def _copy_actor(megatron_ckpts, tmp_path, case="llama_tp2pp2") -> tuple[Path, Path]:
    root = megatron_ckpts[case]
    dst = tmp_path / "ckpt"
    shutil.copytree(root / "global_step_1", dst / "global_step_1")
    return dst / "global_step_1" / "actor", root / "base_model"


def test_missing_distcp_truncated_file_and_incomplete_save_exit_2(megatron_ckpts, tmp_path, capsys):
    actor, base = _copy_actor(megatron_ckpts, tmp_path)
    dist = actor / "model" / "dist_ckpt"
    victim = dist / "__2_1.distcp"
    data = victim.read_bytes()
    victim.unlink()
    assert_fails(capsys, ["to-hf", str(actor), "--out", str(tmp_path / "o1"), "--config", str(base)],
                 says="__2_1.distcp", sources=(actor,))
    victim.write_bytes(data[: len(data) // 2])
    assert_fails(capsys, ["to-hf", str(actor), "--out", str(tmp_path / "o2"), "--config", str(base)],
                 says="__2_1.distcp", sources=(actor,))
    victim.write_bytes(data)
    (actor / "ckpt_contents.json").unlink()
    assert_fails(capsys, ["to-hf", str(actor), "--out", str(tmp_path / "o3"), "--config", str(base)],
                 says="no ckpt_contents.json: the save did not finish", sources=(actor,))


def test_config_that_disagrees_with_transformer_config_exit_2(megatron_ckpts, tmp_path, capsys):
    actor, base = _copy_actor(megatron_ckpts, tmp_path)
    wrong = tmp_path / "wrong_config"
    shutil.copytree(base, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["num_key_value_heads"] = 4
    (wrong / "config.json").write_text(json.dumps(cfg))
    assert_fails(capsys, ["to-hf", str(actor), "--out", str(tmp_path / "o"), "--config", str(wrong)],
                 says="num_key_value_heads is 4 but the checkpoint's transformer_config.json says "
                      "num_query_groups=2", sources=(actor,))
    assert_fails(capsys, ["to-hf", str(actor), "--out", str(tmp_path / "o")],
                 says="no config.json found", sources=(actor,))



def test_manifest_that_disagrees_with_the_save_exit_2(megatron_ckpts, tmp_path, capsys):
    """Found by this round's sweep: each of these exported with exit 0 (the rng silently left out; a Llama
    config taken for a run verl recorded as Qwen2; a non-numeric world size)."""
    actor, base = _copy_actor(megatron_ckpts, tmp_path)
    manifest = actor / "ckpt_contents.json"
    clean = manifest.read_text()

    def edited(edit) -> None:
        m = json.loads(clean)
        edit(m)
        manifest.write_text(json.dumps(m))

    cases = [(lambda m: m["contents"]["rng_state"].update(path="extra/elsewhere"),
              "lists the rng_state here but there is no dist_ckpt"),
             (lambda m: m.update(arch="Qwen2ForCausalLM"), "ckpt_contents.json says arch 'Qwen2ForCausalLM'"),
             (lambda m: m.update(world_size="4"), "field 'world_size' should be an integer >= 1, got '4'"),
             (lambda m: m.update(global_step=1.5), "field 'global_step' should be an integer")]
    for i, (edit, says) in enumerate(cases):
        edited(edit)
        assert_fails(capsys, ["to-hf", str(actor), "--out", str(tmp_path / f"o{i}"), "--config", str(base)],
                     says=says, sources=(actor,))
    manifest.write_text(clean)
    tc = actor / "transformer_config.json"
    d = json.loads(tc.read_text())
    tc.write_text(json.dumps({**d, "num_layers": "4"}))
    assert_fails(capsys, ["to-hf", str(actor), "--out", str(tmp_path / "o9"), "--config", str(base)],
                 says="field 'num_layers' should be an integer >= 1 or null, got '4'", sources=(actor,))


def test_unknown_megatron_key_is_named_not_guessed():
    from ckpt_bridge.errors import KeyPlanError
    from ckpt_bridge.formats.base import TensorInfo
    from ckpt_bridge.plan.megatron import megatron_to_hf_names

    hf = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64}
    for key in ("mtp.layers.0.enorm.weight", "decoder.layers.self_attention.linear_q_down_proj.weight[0]"):
        with pytest.raises(KeyPlanError, match=f"Megatron key '{key[:20]}"):
            megatron_to_hf_names({key: TensorInfo(key, (4, 64), torch.float32)}, hf, "ckpt")


def _megatron_run(megatron_ckpts, tmp_path) -> tuple[Path, Path, bytes]:
    """A verl run dir holding one real bridge save, latest = 1, its ckpt_contents.json taken away (a save
    still in flight); returns (run root, actor, the manifest's bytes)."""
    src = megatron_ckpts["llama_bridge_tp2pp2"]
    run = tmp_path / "run"
    shutil.copytree(src / "global_step_1", run / "global_step_1")
    (run / "latest_checkpointed_iteration.txt").write_text("1")  # async saves: written before the shards land
    actor = run / "global_step_1" / "actor"
    manifest = (actor / "ckpt_contents.json").read_bytes()
    (actor / "ckpt_contents.json").unlink()
    return run, actor, manifest


def test_watch_waits_for_ckpt_contents_then_exports(megatron_ckpts, tmp_path):
    from ckpt_bridge.commands.watch import watch

    run, actor, manifest = _megatron_run(megatron_ckpts, tmp_path)
    (ev,) = watch(run, once=True, settle=0.0)
    assert ev.status == "waiting" and "waiting for ckpt_contents.json" in ev.message, ev
    assert not (run / "global_step_1" / "actor_hf").exists()
    (actor / "ckpt_contents.json").write_bytes(manifest)
    (ev,) = watch(run, once=True, settle=0.0)
    assert ev.status == "exported", ev
    _assert_equals_reference(run / "global_step_1" / "actor_hf", megatron_ckpts["llama_bridge_tp2pp2"])
    (ev,) = watch(run, once=True, settle=0.0)
    assert ev.status == "skipped"


def test_verl_callback_exports_an_async_megatron_save_once_complete(megatron_ckpts, tmp_path):
    """verl's callback sees async saves: on_save(async_save=True) before ckpt_contents.json exists starts
    nothing; the export starts when the manifest appears (here: in wait())."""
    from ckpt_bridge.integrations.verl import HFExportCallback

    run, actor, manifest = _megatron_run(megatron_ckpts, tmp_path)
    cb = HFExportCallback(roles=("actor",))
    cb.on_save(None, 1, str(run / "global_step_1"), async_save=True)
    assert cb.pending and not cb.running and not cb.finished
    (actor / "ckpt_contents.json").write_bytes(manifest)
    (outcome,) = cb.wait(timeout=5, poll=0.1)
    assert outcome["ok"], outcome
    _assert_equals_reference(run / "global_step_1" / "actor_hf", megatron_ckpts["llama_bridge_tp2pp2"])


@pytest.mark.parametrize("case", ["qwen2_moe_ep2", "llama_tp2pp2"])
def test_verify_compares_a_megatron_checkpoint_with_an_hf_dir_through_the_plan(megatron_ckpts, tmp_path, case):
    """verify A B: the Megatron side seen through its to-hf plan (with the HF side's config when the save
    has none): equal to the reference HF dir (CLI exit 0); one element changed in B is found (exit 1)."""
    from safetensors.torch import load_file, save_file

    from ckpt_bridge.cli import main
    from ckpt_bridge.checks.verify import verify

    root = megatron_ckpts[case]
    actor = root / "global_step_1" / "actor"
    r = verify(actor, root / "base_model")
    assert r.ok and r.compared == len(_weights(root / "base_model")), r.as_dict()
    assert main(["verify", str(actor), str(root / "base_model")]) == 0
    other = tmp_path / "other"
    shutil.copytree(root / "base_model", other)
    f = next(other.glob("*.safetensors"))
    w = load_file(f)
    key = "model.layers.1.self_attn.k_proj.weight"
    w[key] = w[key].clone()
    w[key][3, 5] += 1e-3
    save_file(w, f, metadata={"format": "pt"})
    r = verify(actor, other)
    assert not r.ok and key in json.dumps(r.as_dict()), r.as_dict()
    assert main(["verify", str(actor), str(other)]) == 1


def test_megatron_lora_run_is_refused_in_one_line(megatron_ckpts, tmp_path, capsys):
    """ckpt_contents.json backend.peft (verl's Megatron LoRA): exit 2, one line naming where the adapter is
    and what ckpt-bridge lacks, no output (the base weights alone would be a silently wrong export)."""
    actor, base = _copy_actor(megatron_ckpts, tmp_path)
    f = actor / "ckpt_contents.json"
    m = json.loads(f.read_text())
    m["backend"]["peft"] = True
    f.write_text(json.dumps(m))
    assert_fails(capsys, ["to-hf", str(actor), "--out", str(tmp_path / "o"), "--config", str(base)],
                 says="backend.peft is true (a LoRA run); its adapter is in", sources=(actor,))


@pytest.mark.parametrize("case", ["qwen2_tp2", "qwen2_moe_tp2ep2_etp2"])
def test_each_layer_slice_is_read_once(megatron_ckpts, tmp_path, monkeypatch, case):
    """q / k / v come from one linear_qkv slice and gate / up from one linear_fc1 slice, yet each slice's
    bytes are read once (the reader keeps a slice the plan reads again until its last read)."""
    from collections import Counter

    from ckpt_bridge.formats.dcp import DCPReader

    n: Counter = Counter()
    orig = DCPReader.read_layer
    monkeypatch.setattr(DCPReader, "read_layer", lambda self, k, i, *a, **kw: n.update([(k, i)]) or
                        orig(self, k, i, *a, **kw))
    root = megatron_ckpts[case]
    to_hf(root / "global_step_1", tmp_path / "hf", dtype="keep", config=root / "base_model", progress=False)
    assert ("decoder.layers.self_attention.linear_qkv.weight", 1) in n
    assert max(n.values()) == 1, [k for k, v in n.items() if v > 1]
    _assert_equals_reference(tmp_path / "hf", root)


# ---------------------------------------------------------------- DeepSeek-V3 (multi-latent attention + MoE)

MLA_CASE = "deepseek_v3_tp2ep2"


def test_deepseek_v3_dry_run_prints_the_mla_rules(megatron_ckpts, tmp_path):
    """The MLA save (per-index layer keys: moe_layer_freq makes layer 0 dense): each projection a rename to
    DeepseekV3Attention's, the router's expert bias to e_score_correction_bias, the plural shared experts."""
    root = megatron_ckpts[MLA_CASE]
    s = to_hf(root / "global_step_1", tmp_path / "never", config=root / "base_model", dry_run=True, progress=False)
    text = "\n".join(s.plan_lines)
    for mcore, hf in (("self_attention.linear_q_down_proj.weight", "self_attn.q_a_proj.weight"),
                      ("self_attention.q_layernorm.weight", "self_attn.q_a_layernorm.weight"),
                      ("self_attention.linear_q_up_proj.weight", "self_attn.q_b_proj.weight"),
                      ("self_attention.linear_kv_down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"),
                      ("self_attention.kv_layernorm.weight", "self_attn.kv_a_layernorm.weight"),
                      ("self_attention.linear_kv_up_proj.weight", "self_attn.kv_b_proj.weight"),
                      ("mlp.router.expert_bias", "mlp.gate.e_score_correction_bias")):
        assert f"decoder.layers.1.{mcore} -> model.layers.1.{hf}" in text, (mcore, text)
    assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in text
    assert "decoder.layers.0.mlp.linear_fc1.weight" in text and "model.layers.0.mlp.gate_proj.weight" in text
    assert not (tmp_path / "never").exists()


def test_mla_names_of_the_transformer_engine_spec_map_as_the_local_ones(megatron_ckpts):
    """verl's real runs use TE's spec, where the q / kv norms are fused into the up-projections
    (``linear_q_up_proj.layer_norm_weight``, as mbridge's DeepseekV3Bridge names them) and a dense layer's
    post-attention norm into ``linear_fc1``: the same HF names as the local spec's separate norms."""
    from ckpt_bridge.formats.megatron import MegatronReader
    from ckpt_bridge.plan.megatron import megatron_to_hf_names

    root = megatron_ckpts[MLA_CASE]
    infos = MegatronReader(root / "global_step_1" / "actor").model_tensors()
    hf = json.loads((root / "base_model" / "config.json").read_text())
    te = {"self_attention.q_layernorm.weight": "self_attention.linear_q_up_proj.layer_norm_weight",
          "self_attention.kv_layernorm.weight": "self_attention.linear_kv_up_proj.layer_norm_weight",
          "0.pre_mlp_layernorm.weight": "0.mlp.linear_fc1.layer_norm_weight"}

    def te_name(k: str) -> str:
        return next((k.replace(a, b) for a, b in te.items() if k.endswith(a)), k)

    renamed = {te_name(k): v for k, v in infos.items()}
    assert len(renamed) == len(infos) and renamed.keys() != infos.keys()
    want = megatron_to_hf_names(infos, hf, "ckpt").targets()
    got = megatron_to_hf_names(renamed, hf, "ckpt").targets()
    assert sorted(got) == sorted(want) and "model.layers.2.self_attn.kv_a_layernorm.weight" in got


def test_mla_config_that_disagrees_with_transformer_config_exit_2(megatron_ckpts, tmp_path, capsys):
    """MLA's widths (not kv_channels, which MLA does not use) and the dense layers are checked against
    transformer_config.json; a non-MLA config for an MLA save is named as such."""
    actor, base = _copy_actor(megatron_ckpts, tmp_path, case=MLA_CASE)
    edits = [({"kv_lora_rank": 16}, "kv_lora_rank is 16 but the checkpoint's transformer_config.json says "
                                    "kv_lora_rank=24"),
             ({"qk_rope_head_dim": 4}, "qk_rope_head_dim is 4 but the checkpoint's transformer_config.json says "
                                       "qk_pos_emb_head_dim=8"),
             ({"first_k_dense_replace": 2}, "first_k_dense_replace=2 makes layers [0, 0, 1] MoE, but the "
                                            "checkpoint's transformer_config.json says moe_layer_freq=[0, 1, 1]"),
             ({"kv_lora_rank": None}, "not an MLA model, but the checkpoint's transformer_config.json says "
                                      "multi_latent_attention=True")]
    for i, (edit, says) in enumerate(edits):
        wrong = tmp_path / f"wrong{i}"
        shutil.copytree(base, wrong)
        cfg = json.loads((wrong / "config.json").read_text())
        (wrong / "config.json").write_text(json.dumps({**cfg, **edit}))
        assert_fails(capsys, ["to-hf", str(actor), "--out", str(tmp_path / f"o{i}"), "--config", str(wrong)],
                     says=says, sources=(actor,))
    # and the other way round (to-hf stops earlier here: the MLA config's experts are not in a Llama save)
    from ckpt_bridge.errors import KeyPlanError
    from ckpt_bridge.plan.megatron import check_config

    tc_file = megatron_ckpts["llama_tp2pp2"] / "global_step_1" / "actor" / "transformer_config.json"
    with pytest.raises(KeyPlanError, match=r"an MLA model \(kv_lora_rank\), but the checkpoint's "
                                           r"transformer_config.json says multi_latent_attention=False"):
        check_config(json.loads((base / "config.json").read_text()), json.loads(tc_file.read_text()),
                     base / "config.json", tc_file)


def test_an_mla_key_not_in_the_table_is_named(megatron_ckpts):
    """An MLA variant's key ckpt-bridge has no rule for (DeepSeek-V3.2's sparse-attention indexer, an MTP
    layer) is a one-line error naming it, with the MLA rules active."""
    from ckpt_bridge.errors import KeyPlanError
    from ckpt_bridge.formats.megatron import MegatronReader
    from ckpt_bridge.plan.megatron import megatron_to_hf_names

    root = megatron_ckpts[MLA_CASE]
    infos = MegatronReader(root / "global_step_1" / "actor").model_tensors()
    hf = json.loads((root / "base_model" / "config.json").read_text())
    megatron_to_hf_names(infos, hf, "ckpt")  # the real keys: all known
    for key in ("decoder.layers.1.self_attention.core_attention.indexer.linear_wq_b.weight",
                "mtp.layers.0.eh_proj.weight"):
        with pytest.raises(KeyPlanError, match=f"Megatron key '{key}'.*refusing to guess"):
            megatron_to_hf_names({**infos, key: TensorInfo(key, (8, 64), torch.float32)}, hf, "ckpt")


def test_inspect_reports_multi_latent_attention(megatron_ckpts):
    from ckpt_bridge.checks.inspect import inspect

    text = json.dumps(inspect(megatron_ckpts[MLA_CASE] / "global_step_1"))
    assert '"multi_latent_attention": true' in text and '"ep": 2' in text, text
