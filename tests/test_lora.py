"""LoRA checkpoints from verl: the merged model equals PEFT's own merge_and_unload(), the adapter loads in PEFT.

Every checkpoint here is a real verl 0.9.1 FSDPCheckpointManager save of a PEFT-wrapped tiny model on 2 FSDP2
CPU ranks after 2 AdamW steps (all cases in one torchrun job, ckpt_bridge.testing.verl_save --lora).  The
reference is the live model's full state dict at save time, loaded into a fresh PEFT model.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_bridge import to_hf
from ckpt_bridge.cli import main as cli


CASES = ["llama", "qwen2_rslora", "qwen2_embed", "qwen2_lora_only"]  # every LORA_CASES entry (conftest's lora_root)


@pytest.fixture(scope="module")
def exported(lora_root, tmp_path_factory):
    """``exported(case)`` -> (out dir, summary) of the default export (--lora both), made once per case."""
    done: dict[str, tuple] = {}

    def get(case: str):
        if case not in done:
            out = tmp_path_factory.mktemp(f"lora-{case}") / "out"
            done[case] = (out, export(lora_root, case, out))
        return done[case]
    return get


def actor(root: Path, case: str) -> Path:
    return root / case / "global_step_2" / "actor"


def live_peft_model(case_dir: Path):
    """A fresh PEFT model holding the live model's full state dict at save time (eval mode)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ref = case_dir / "reference"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(case_dir / "base_model", dtype=torch.float32),
                           LoraConfig.from_pretrained(ref / "peft_config"))
    model.load_state_dict(load_file(ref / "model.safetensors"), strict=True)
    return model.eval()


def merged_weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("model*.safetensors")) for k, v in load_file(f).items()}


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def export(root: Path, case: str, out: Path, **kw):
    extra = {"lora_config": root / case / "init_adapter"} if case == "qwen2_rslora" else {}
    if case == "qwen2_lora_only":
        extra["base"] = root / case / "base_model"
    return to_hf(actor(root, case), out, progress=False, **extra, **kw)


@pytest.mark.parametrize("case", CASES)
def test_merged_equals_peft_merge_and_unload(lora_root, exported, case):
    from transformers import AutoModelForCausalLM

    live = live_peft_model(lora_root / case)
    sd = live.state_dict()
    b = [v for k, v in sd.items() if ".lora_B." in k or "lora_embedding_B" in k]
    assert b and all(v.abs().sum() > 0 for v in b), "the training steps must have changed every lora_B"
    out, s = exported(case)
    assert s.lora["mode"] == "both" and s.lora["r"] == 4 and s.lora["alpha"] == 8
    peft_merged = live.merge_and_unload()
    want = {k: v for k, v in peft_merged.state_dict().items() if not (k == "lm_head.weight"
                                                                        and peft_merged.config.tie_word_embeddings)}
    got = merged_weights(out)
    assert set(got) == set(want)
    assert not [k for k in got if "base_layer" in k or "lora_" in k or k.startswith("base_model.")]
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"not bit-identical to PEFT's merge_and_unload: {differ}"
    tokens = torch.load(lora_root / case / "reference" / "logits.pt")["tokens"]
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(logits(ours, tokens), logits(peft_merged, tokens))


@pytest.mark.parametrize("case", CASES)
def test_adapter_loads_in_peft_without_warnings_and_gives_live_logits(lora_root, exported, case):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adir = exported(case)[0] / "lora_adapter"
    cfg = json.loads((adir / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["use_rslora"] is (case == "qwen2_rslora")
    base = AutoModelForCausalLM.from_pretrained(lora_root / case / "base_model", dtype=torch.float32)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(base, adir).eval()
    finally:
        logging.getLogger().removeHandler(handler)
    # PEFT warns about any tied model whose embedding is an adapter target (peft#2777), the live run's own
    # get_peft_model included: a property of that run's config, not of the adapter we wrote
    tied_note = "tied layer is part of the adapter"
    left = [str(w.message) for w in caught if not (case == "qwen2_embed" and tied_note in str(w.message))]
    assert not left, left
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    ref = torch.load(lora_root / case / "reference" / "logits.pt")
    assert torch.equal(logits(model, ref["tokens"]), ref["logits"])


@pytest.mark.parametrize("case", ["llama", "qwen2_embed"])  # modules_to_save; embedding (PEFT saves its base)
def test_peft_key_names_match_save_pretrained(lora_root, tmp_path, case):
    """The adapter file holds exactly the keys and values PeftModel.save_pretrained writes for the live model."""
    export(lora_root, case, tmp_path / "out", lora="adapter")
    live = live_peft_model(lora_root / case)
    live.save_pretrained(tmp_path / "peft")
    want = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    got = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_lora_only_without_base_writes_the_adapter_and_says_so(lora_root, tmp_path, capsys):
    src = actor(lora_root, "qwen2_lora_only")
    cfg = json.loads((src / "huggingface" / "config.json").read_text())
    if cfg.get("_name_or_path") and Path(cfg["_name_or_path"]).is_dir():
        pytest.fail("this test expects a checkpoint that does not record a local base dir")
    assert cli(["to-hf", str(src), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert "adapter alone" in capsys.readouterr().err
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "a" / "model.safetensors").exists()
    assert cli(["to-hf", str(src), "--out", str(tmp_path / "b"), "--lora", "merge"]) == 2
    err = capsys.readouterr().err
    assert "--base" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def test_lora_only_does_not_follow_the_base_its_adapter_config_names(lora_root, exported, tmp_path, capsys):
    """No --base, but the run's adapter_config.json records base_model_name_or_path (a local dir outside the
    checkpoint): not read on the checkpoint's say (issue 19 row 5); the error gives the --base to pass, and that
    gives the merge checked against PEFT above."""
    case = lora_root / "qwen2_lora_only"
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
           "base_model_name_or_path": str(case / "base_model")}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    src = actor(lora_root, "qwen2_lora_only")
    for mode in ("both", "merge"):
        assert cli(["to-hf", str(src), "--out", str(tmp_path / "o"), "--lora", mode, "--lora-config",
                    str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pass --base {case / 'base_model'}" in err[0] and not (tmp_path / "o").exists()
    s = to_hf(src, tmp_path / "out", lora_config=tmp_path, base=case / "base_model", progress=False)
    assert s.lora["mode"] == "both"
    want = merged_weights(exported("qwen2_lora_only")[0])  # merged with --base, checked against PEFT above
    got = merged_weights(tmp_path / "out")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_dry_run_shows_fold_transforms_and_inspect_shows_lora(lora_root, capsys):
    src = actor(lora_root, "llama")
    assert cli(["to-hf", str(src), "--out", "/nonexistent/never", "--dry-run"]) == 0
    out = capsys.readouterr().out
    folds = [ln for ln in out.splitlines() if ln.startswith("fold: ")]
    assert len(folds) == 14  # 7 projections x 2 layers
    assert any(ln.endswith("-> model.layers.0.self_attn.q_proj.weight  [PEFT LoRA merge, scale alpha/r = 2]")
               for ln in folds)
    assert "base_model.model.lm_head.modules_to_save.default.weight -> lm_head.weight" in out
    assert "base_model.model.lm_head.original_module.weight -> (dropped: original of a modules_to_save copy)" in out
    assert cli(["inspect", str(src)]) == 0
    report = capsys.readouterr().out
    assert "r=4" in report and "alpha=8" in report and "q_proj" in report and "base inside" in report


@pytest.mark.parametrize("extra,module,what", [
    ({"use_dora": True}, "model.layers.0.self_attn.v_proj", "DoRA"),
    ({"lora_bias": True}, "model.layers.0.self_attn.v_proj", "LoRA bias"),
    ({"trainable_token_indices": [5, 6]}, "model.embed_tokens", "trainable token"),
])
def test_unfoldable_adapters_are_refused_naming_the_module(tmp_path, capsys, extra, module, what):
    """Real PEFT state dicts of adapters whose merge is not a plain fold: one line, exit 2, nothing written."""
    from peft import LoraConfig, get_peft_model

    from ckpt_bridge.testing.tiny_models import build_model, save_tiny_hf

    save_tiny_hf(tmp_path / "base", "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(build_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"],
                                                                **extra))
    torch.save(model.state_dict(), tmp_path / "peft_state.pt")
    (tmp_path / "cfg.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    capsys.readouterr()  # the base model's save progress
    rc = cli(["to-hf", str(tmp_path / "peft_state.pt"), "--config", str(tmp_path / "base"),
              "--out", str(tmp_path / "o"), "--lora-config", str(tmp_path / "cfg.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and repr(module) in err[0] and what in err[0], err
    assert not (tmp_path / "o").exists()


def _gpt2_config():
    from transformers import GPT2Config

    cfg = GPT2Config(vocab_size=251, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    cfg.architectures = ["GPT2LMHeadModel"]
    return cfg


@pytest.mark.parametrize("family,dtype,targets", [
    ("llama", torch.bfloat16, ["q_proj", "down_proj", "embed_tokens"]),  # half precision: PEFT's fp32 product
    ("gpt2", torch.float32, ["c_attn", "c_proj", "c_fc"]),  # Conv1D: fan_in_fan_out=True
])
def test_fold_matches_peft_for_half_precision_and_fan_in_fan_out(tmp_path, family, dtype, targets):
    """PEFT's own state dict of a trained-looking adapter (random A and B), saved as a torch file: the fold
    equals merge_and_unload() bit for bit in bf16 too, and for GPT-2's transposed Conv1D weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ckpt_bridge.testing.tiny_models import build_config, save_tiny_tokenizer

    torch.manual_seed(0)
    cfg = _gpt2_config() if family == "gpt2" else build_config(family)
    base = AutoModelForCausalLM.from_config(cfg).to(dtype)
    base.save_pretrained(tmp_path / "base")
    save_tiny_tokenizer(tmp_path / "base")
    lcfg = LoraConfig(r=4, lora_alpha=7, target_modules=targets, fan_in_fan_out=family == "gpt2",
                      task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype), lcfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "adapter_cfg")
    torch.save(model.state_dict(), tmp_path / "peft_state.pt")
    to_hf(tmp_path / "peft_state.pt", tmp_path / "out", config=tmp_path / "base", lora="merge",
          lora_config=tmp_path / "adapter_cfg", progress=False)
    want = model.merge_and_unload().state_dict()
    got = merged_weights(tmp_path / "out")
    assert set(got) <= set(want) and len(got) >= len(want) - 1  # a tied lm_head is written once
    differ = [k for k in got if not torch.equal(got[k], want[k])]
    assert not differ, differ


def test_lora_export_streams_one_module_at_a_time(lora_root, tmp_path, monkeypatch):
    """Counts, at each read, how many earlier read tensors still hold their storage (see test_to_dcp's
    streaming test): a fold holds one module's W, A and B, plus the next transform's inputs read ahead.
    No gc.collect() per read (seconds each with transformers, PEFT and verl imported): tensors are freed by
    reference counting, and a cycle that kept one alive would count against us, never hide a leak."""
    import weakref

    from ckpt_bridge.formats.verl_fsdp import VerlFSDPReader

    original, issued, peak = VerlFSDPReader.read, [], [0]

    def counting_read(self, key, dtype=None):
        peak[0] = max(peak[0], sum(r() is not None for r in issued))
        t = original(self, key, dtype)
        issued.append(weakref.ref(t.untyped_storage()))
        return t

    monkeypatch.setattr(VerlFSDPReader, "read", counting_read)
    # every tensor read whole: this counts whole reads (the renames stream in row pieces otherwise; pieces
    # have tests/test_pieces.py)
    from ckpt_bridge.pipeline import pieces

    monkeypatch.setattr(pieces, "PIECE_BYTES", 1)
    export(lora_root, "llama", tmp_path / "out")
    assert len(issued) >= 80  # the merged model's and the adapter's inputs
    assert peak[0] <= 5


def test_lora_export_streams_untouched_weights_in_row_pieces(lora_root, exported, tmp_path, monkeypatch):
    """The weights no adapter touches (embedding, norms) are renames: they go by row pieces like any export's,
    and the files are the same bytes as the default export's (which is checked against PEFT's own merge)."""
    from ckpt_bridge.formats.verl_fsdp import VerlFSDPReader
    from ckpt_bridge.pipeline import pieces

    original, rows = VerlFSDPReader.read_rows, []

    def counting_rows(self, key, out, start, stop):
        rows.append(key)
        return original(self, key, out, start, stop)

    monkeypatch.setattr(VerlFSDPReader, "read_rows", counting_rows)
    monkeypatch.setattr(pieces, "PIECE_BYTES", 4096)  # several pieces per tiny tensor
    export(lora_root, "llama", tmp_path / "out")
    assert any("embed_tokens" in k for k in rows) and any("norm" in k for k in rows)
    direct = exported("llama")[0]
    for f in ("model.safetensors", "lora_adapter/adapter_model.safetensors"):
        assert (tmp_path / "out" / f).read_bytes() == (direct / f).read_bytes(), f


def test_verl_callback_and_watch_export_lora_runs(lora_root, exported, tmp_path):
    """The save-time callback (default both) and `watch --lora adapter` on a LoRA run."""
    import shutil

    from ckpt_bridge.integrations.verl import HFExportCallback
    from ckpt_bridge.commands.watch import watch

    run = tmp_path / "run"
    shutil.copytree(lora_root / "llama" / "global_step_2", run / "global_step_2")
    (run / "latest_checkpointed_iteration.txt").write_text("2")  # as verl's trainer writes it after a save
    cb = HFExportCallback()
    cb.on_save(trainer=None, global_step=2, checkpoint_dir=str(run / "global_step_2"))
    assert [o["ok"] for o in cb.wait()] == [True]
    out = run / "global_step_2" / "actor_hf"
    direct = exported("llama")[0]
    for f in ("model.safetensors", "lora_adapter/adapter_model.safetensors", "lora_adapter/adapter_config.json"):
        assert (out / f).read_bytes() == (direct / f).read_bytes(), f
    events = watch(run, once=True, out_root=tmp_path / "w", lora="adapter")
    assert [(e.step, e.status) for e in events] == [(2, "exported")]
    got = tmp_path / "w" / "global_step_2" / "actor"
    assert (got / "adapter_model.safetensors").read_bytes() == (out / "lora_adapter" / "adapter_model.safetensors"
                                                                ).read_bytes()
    assert not (got / "model.safetensors").exists()


def test_fan_in_fan_out_on_linear_targets_merges_as_peft_does(lora_root, exported, tmp_path):
    """Issue 19 row 2: an adapter_config.json saying fan_in_fan_out=true for nn.Linear targets (the llama case's
    square q_proj / o_proj).  PEFT warns and turns the flag off for Linear layers (dispatch_default), so its merge
    is the plain one; we used to transpose the delta.  Reference: PEFT's own model built from that config."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    case = lora_root / "llama"
    cfg = json.loads((case / "reference" / "peft_config" / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = True
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "adapter_config.json").write_text(json.dumps(cfg))
    s = to_hf(actor(lora_root, "llama"), tmp_path / "out", lora_config=tmp_path / "cfg", progress=False)
    assert any("fan_in_fan_out=true" in n and "nn.Linear" in n for n in s.lora["notes"])
    base = lambda: AutoModelForCausalLM.from_pretrained(case / "base_model", dtype=torch.float32)  # noqa: E731
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to False"):
        peft = get_peft_model(base(), LoraConfig.from_pretrained(tmp_path / "cfg"))
    peft.load_state_dict(load_file(case / "reference" / "model.safetensors"), strict=True)
    want = peft.merge_and_unload().eval()
    got = merged_weights(tmp_path / "out")
    differ = [k for k, v in want.state_dict().items() if k in got and not torch.equal(got[k], v)]
    assert len(got) >= len(want.state_dict()) - 1 and not differ, differ
    assert all(torch.equal(got[k], v) for k, v in merged_weights(exported("llama")[0]).items())  # = flag off
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to False"):
        adapter = PeftModel.from_pretrained(base(), tmp_path / "out" / "lora_adapter").eval()
    ref = torch.load(case / "reference" / "logits.pt")  # the live (unmerged) model's
    assert torch.equal(logits(adapter, ref["tokens"]), ref["logits"])


def test_conv1d_targets_transpose_even_when_the_config_says_not(tmp_path):
    """The other half of PEFT's rule: GPT-2's Conv1D targets are merged transposed whatever fan_in_fan_out says
    (PEFT warns and turns it on)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ckpt_bridge.testing.tiny_models import save_tiny_tokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_gpt2_config()).save_pretrained(tmp_path / "base")
    save_tiny_tokenizer(tmp_path / "base")
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 7, "fan_in_fan_out": False,
           "target_modules": ["c_attn", "c_proj", "c_fc"]}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                               LoraConfig.from_pretrained(tmp_path / "cfg"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    torch.save(model.state_dict(), tmp_path / "peft_state.pt")
    to_hf(tmp_path / "peft_state.pt", tmp_path / "out", config=tmp_path / "base", lora="merge",
          lora_config=tmp_path / "cfg", progress=False)
    want = model.merge_and_unload().state_dict()
    got = merged_weights(tmp_path / "out")
    assert len(got) >= len(want) - 1 and not [k for k in got if not torch.equal(got[k], want[k])]


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_travel_in_the_adapter_as_peft_saves_them(tmp_path, bias):
    """PEFT's bias="all" / "lora_only" trains base biases (the tiny llama's q/k/v/o have them) and saves them in
    the adapter; an adapter dir without them loaded into PEFT gave other logits than the merged model (found by
    the issue-19 sweep).  The adapter file must hold exactly PEFT's keys and values."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from ckpt_bridge.testing.tiny_models import save_tiny_hf

    save_tiny_hf(tmp_path / "base", "llama")
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], bias=bias,
                      task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), lcfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:  # what training would move: lora_A/B and the biases PEFT unfroze
                p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(tmp_path / "peft")
    torch.save(model.state_dict(), tmp_path / "peft_state.pt")
    to_hf(tmp_path / "peft_state.pt", tmp_path / "out", config=tmp_path / "base", lora_config=tmp_path / "peft",
          progress=False)
    want = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    got = load_file(tmp_path / "out" / "lora_adapter" / "adapter_model.safetensors")
    assert set(got) == set(want) and any(k.endswith(".bias") for k in want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    tokens = torch.randint(0, 200, (2, 9))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                       tmp_path / "out" / "lora_adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=tokens).logits, model(input_ids=tokens).logits)
    merged = model.merge_and_unload().state_dict()
    assert all(torch.equal(v, merged[k]) for k, v in merged_weights(tmp_path / "out").items())


@pytest.mark.parametrize("fields", [
    {"target_modules": ["q_proj", "down_proj"]},
    {"target_modules": r".*\.layers\.1\.self_attn\.(q|v)_proj"},
    {"target_modules": "all-linear"},
    {"target_modules": ["q_proj", "k_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": 0},
    {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["model.layers.0.self_attn.v_proj"]},
    {"target_modules": ["q_proj", "embed_tokens", "lm_head"], "modules_to_save": ["lm_head"]},
    {"target_modules": ["model.layers.0.self_attn.o_proj"], "modules_to_save": ["embed_tokens"]},
])
def test_peft_match_is_peft_s_own_choice_of_modules(tmp_path, fields):
    """ckpt_bridge.plan.peft_match (the rules the export checks adapter configs with, PEFT not imported) picks the
    modules PEFT's get_peft_model adapts and the copies it keeps, config for config."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper
    from transformers import AutoModelForCausalLM

    from ckpt_bridge.plan import lora
    from ckpt_bridge.plan import peft_match
    from ckpt_bridge.plan.hf_target import expected_model
    from ckpt_bridge.testing.tiny_models import save_tiny_hf

    save_tiny_hf(tmp_path / "base", "llama")
    cfg = {"r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM", **fields}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), LoraConfig(**cfg))
    inner = model.base_model.model
    adapted = {n for n, m in inner.named_modules() if isinstance(m, LoraLayer)}
    saved = {n for n, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    exp = expected_model(tmp_path / "base")
    ck = lora.LoraCheckpoint(lora.LoraSettings(r=4, lora_alpha=8, task_type="CAUSAL_LM", config=cfg), "default",
                             {}, {}, {}, [], {})
    view = lora.ModelView.of(ck, exp)
    assert {m for m in view.modules if peft_match.is_target(cfg, m, view.all_linear)} == adapted
    assert {m for m in view.modules if peft_match.is_saved(cfg, m)} == saved
