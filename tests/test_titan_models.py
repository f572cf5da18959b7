"""TorchTitan's own llama3 and qwen3 (torchtitan 0.3.0, importable on CPU with triton 3.9.0), tied and untied,
built by us from tiny HF configs.  The oracle is TorchTitan itself: its CheckpointManager loading our DCP must
give the state dict its own ``initial_load_in_hf`` gives from the same HF dir (torch.equal per key), the titan
model's logits and loss must be the HF model's, and to-hf of our DCP must give back the HF files bit for bit."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_bridge.cli import main as cli
from ckpt_bridge.formats.hf import weight_files
from ckpt_bridge.testing.tiny_models import save_tiny_tokenizer

import triton  # noqa: E402,F401 - torchtitan 0.3.0's models import it; pinned in requirements.lock, so never skipped

# (titan model, HF config class, tie_word_embeddings)
CASES = {
    "llama3-tied": ("llama3", "LlamaConfig", True),
    "llama3-untied": ("llama3", "LlamaConfig", False),
    "qwen3-tied": ("qwen3", "Qwen3Config", True),
    "qwen3-untied": ("qwen3", "Qwen3Config", False),
}
# Logits of the two implementations agree to float32 rounding, not bit for bit: TorchTitan runs FlexAttention
# and complex-number (llama3) / cos-sin (qwen3) RoPE, transformers runs sdpa and its own rotate_half RoPE; the
# same math in another order of float32 operations.  Measured ~3e-7 on these models.
ATOL = 1e-5


def _hf_config(cls_name: str, tied: bool):
    import transformers

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied, rms_norm_eps=1e-5)
    if cls_name == "LlamaConfig":
        kw["rope_theta"] = 500000.0
    else:
        kw["head_dim"] = 32  # Qwen3 sets head_dim apart from hidden/heads
    cfg = getattr(transformers, cls_name)(**kw)
    cfg.architectures = [cls_name.replace("Config", "ForCausalLM")]
    return cfg


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("titan-hf")
    out = {}
    for case, (_, cls_name, tied) in CASES.items():
        torch.manual_seed(sum(map(ord, case)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(_hf_config(cls_name, tied))
            with torch.no_grad():  # norms start at 1.0: make them weights that a mix-up would show
                for n, p in model.named_parameters():
                    if p.dim() == 1:
                        p.uniform_(0.5, 1.5)
            model.save_pretrained(root / case, max_shard_size="40KB")  # several shards + index, as real models
        save_tiny_tokenizer(root / case, vocab_size=256)
        out[case] = root / case
    return out


def _hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in weight_files(hf_dir)[1]:
        sd.update(load_file(f))
    return sd


def _titan_load(tm, dump: Path, **config) -> torch.nn.Module:
    """The trainer's flow: meta build -> to_empty -> torchtitan's own CheckpointManager.load().  No init_states:
    the RoPE cache is left as garbage (NaN), as after a to_empty that nothing re-initialises."""
    from torchtitan.components.checkpoint import CheckpointManager

    model = tm.build("meta")
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():  # nothing may survive the load
            p.fill_(7.0)
        for b in model.buffers():
            b.fill_(float("nan"))
    cfg = CheckpointManager.Config(enable=True, folder="checkpoint", keep_latest_k=0, initial_load_model_only=True,
                                   **config)
    mgr = CheckpointManager(cfg, dataloader=None, model_parts=[model], optimizers=None, lr_schedulers=None,
                            states={}, sd_adapter=tm.adapter, base_folder=str(dump))
    try:
        assert mgr.load()
    finally:
        mgr.close()
    return model


def _logits_and_loss(model, tokens: torch.Tensor, titan: bool) -> tuple[torch.Tensor, float]:
    with torch.no_grad():
        if titan:
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            logits = model(tokens, attention_masks=model.get_attention_masks(positions))
        else:
            logits = model(tokens).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    return logits, float(loss)


@pytest.mark.parametrize("case", list(CASES))
def test_titan_model_from_cli_loads_like_torchtitans_own_hf_load(gloo1, hf_dirs, tmp_path, case, capsys):
    from transformers import AutoModelForCausalLM

    from ckpt_bridge.integrations.torchtitan import after_load
    from ckpt_bridge.models.titan import titan_model

    name, _, tied = CASES[case]
    hf = hf_dirs[case]
    assert cli(["to-dcp", str(hf), "--out", str(tmp_path / "dcp"), "--titan-model", name, "--quiet"]) == 0
    manifest = json.loads((tmp_path / "dcp" / "ckpt_bridge_manifest.json").read_text())
    assert manifest["titan_model"] == name

    tm = titan_model(name, hf)
    ours = _titan_load(tm, tmp_path / "d1", initial_load_path=str((tmp_path / "dcp").absolute()))
    theirs = _titan_load(tm, tmp_path / "d2", initial_load_path=str(hf.absolute()), initial_load_in_hf=True)
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b) and len(a) > 20
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert ("lm_head.weight" in a) and torch.equal(a["lm_head.weight"], a["tok_embeddings.weight"]) == tied

    report = after_load(ours, hf)  # rope cache by the model's own code, config parity under mapped names
    assert {r for r, _ in report.recomputed} == {f"layers.{i}.attention.rope.cache" for i in range(2)}
    assert all(change == float("inf") for _, change in report.recomputed)  # it was NaN; now the model's own
    assert {"rope_theta", "rms_norm_eps", "tie_word_embeddings", "head_dim"} <= set(report.checked)
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    hf_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    hf_logits, hf_loss = _logits_and_loss(hf_model, tokens, titan=False)
    tt_logits, tt_loss = _logits_and_loss(ours.eval(), tokens, titan=True)
    assert float((tt_logits - hf_logits).abs().max()) <= ATOL
    assert abs(tt_loss - hf_loss) <= ATOL and hf_loss > 1.0

    # back to HF through the adapter's to_hf: the manifest names the model and the config dir
    assert cli(["to-hf", str(tmp_path / "dcp"), "--out", str(tmp_path / "back"), "--quiet"]) == 0
    src, back = _hf_state(hf), _hf_state(tmp_path / "back")
    assert set(back) == set(src)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in src.items())


def test_set_initial_load_with_titan_model(gloo1, hf_dirs, tmp_path):
    from torchtitan.components.checkpoint import CheckpointManager

    from ckpt_bridge.integrations.torchtitan import set_initial_load
    from ckpt_bridge.models.titan import titan_model

    hf = hf_dirs["qwen3-tied"]
    ck = CheckpointManager.Config(enable=True, folder="checkpoint", keep_latest_k=0, initial_load_model_only=False)
    out = set_initial_load(ck, hf, titan_model="qwen3", cache_dir=tmp_path / "cache")
    assert ck.initial_load_path == str(out) and ck.initial_load_model_only
    tm = titan_model("qwen3", hf)
    model = _titan_load(tm, tmp_path / "dump", initial_load_path=ck.initial_load_path)
    src = _hf_state(hf)

    # torchtitan's own last-step saves of that model: native DCP (model only) and its own HF export
    for folder, in_hf in (("native", False), ("theirs", True)):
        cfg = CheckpointManager.Config(enable=True, folder=folder, keep_latest_k=0, last_save_model_only=True,
                                       last_save_in_hf=in_hf, export_dtype="float32")
        mgr = CheckpointManager(cfg, dataloader=None, model_parts=[model], optimizers=None, lr_schedulers=None,
                                states={}, sd_adapter=tm.adapter, base_folder=str(tmp_path / "run"))
        mgr.save(curr_step=1, last_step=True)
        mgr.close()
    step = tmp_path / "run" / "native" / "step-1"
    assert not (step / "ckpt_bridge_manifest.json").exists()  # nothing names the model: the flag does
    assert cli(["to-hf", str(step), "--out", str(tmp_path / "back"), "--titan-model", "qwen3", "--config", str(hf),
                "--quiet"]) == 0
    ours, theirs = _hf_state(tmp_path / "back"), _hf_state(tmp_path / "run" / "theirs" / "step-1")
    assert set(ours) == set(theirs) == set(src)
    assert all(torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], src[k]) for k in src)


def test_verify_judges_against_the_titan_models_keys(hf_dirs, tmp_path, capsys):
    hf = hf_dirs["llama3-tied"]
    assert cli(["to-dcp", str(hf), "--out", str(tmp_path / "hfnames"), "--quiet"]) == 0
    assert cli(["to-dcp", str(hf), "--out", str(tmp_path / "titan"), "--titan-model", "llama3", "--quiet"]) == 0
    capsys.readouterr()
    # HF-named output: fine for the HF class, unloadable by TorchTitan's llama3
    assert cli(["verify", str(tmp_path / "hfnames"), "--against", str(hf)]) == 0
    assert cli(["verify", str(tmp_path / "hfnames"), "--against", str(hf), "--titan-model", "llama3"]) == 1
    out = capsys.readouterr().out
    assert "1 of 21 model keys would load: the checkpoint holds Hugging Face names" in out  # lm_head.weight: same name
    assert "--titan-model llama3" in out and "PROBLEMS" in out
    # our titan output: the manifest names the model, every key and value checks out through from_hf
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; a model state dict maps names to tensors. " * 8)
    assert cli(["verify", str(tmp_path / "titan"), "--against", str(hf), "--loss", str(text)]) == 0
    out = capsys.readouterr().out
    assert "TorchTitan llama3" in out and "21 of 21 model keys would load" in out and "21 equal" in out
    assert "(ok, atol 1e-05)" in out  # TorchTitan's own forward, loaded from the DCP, vs the HF model


def test_tied_plan_streams_one_key_with_the_embedding_as_context(hf_dirs):
    """Tied llama3: every layer key is its own transform; the embedding is shown to from_hf as a meta
    placeholder (context), never read again for it."""
    from ckpt_bridge.formats.base import TensorInfo
    from ckpt_bridge.formats.hf import HFReader
    from ckpt_bridge.models.titan import titan_model
    from ckpt_bridge.pipeline.execute import execute
    from ckpt_bridge.plan.state_dict_adapter import adapter_plan

    hf = hf_dirs["llama3-tied"]
    source = HFReader(hf)
    infos = {k: TensorInfo(k, tuple(v.shape), v.dtype) for k, v in source.model_tensors().items()}
    plan = adapter_plan(infos, titan_model("llama3", hf).adapter.from_hf, "Llama3StateDictAdapter.from_hf",
                        where=str(hf))  # every group a call of the adapter
    ts = plan.transforms
    assert all(t.op == "adapter" and len(t.inputs) == 1 for t in ts)
    emb = next(t for t in ts if t.inputs == ("model.embed_tokens.weight",))
    assert set(emb.targets) == {"tok_embeddings.weight", "lm_head.weight"}
    layer = [t for t in ts if t is not emb]
    assert len(layer) == 19 and all("model.embed_tokens.weight as context" in t.rule for t in layer)
    reads = []
    for _ in execute(plan, lambda k, dtype=None: reads.append(k) or source.read(k, dtype), ahead=False):
        pass
    assert reads.count("model.embed_tokens.weight") == 1 and len(reads) == 20


def test_moe_experts_group_by_what_the_adapter_stacks():
    """qwen3's MoE adapter stacks every expert of a layer into one tensor: learned from the adapter, not a table."""
    from torchtitan.models.qwen3 import model_registry

    from ckpt_bridge.plan.state_dict_adapter import adapter_plan
    from ckpt_bridge.formats.base import TensorInfo

    spec = model_registry("debugmodel_moe")
    adapter = spec.state_dict_adapter(spec.model, None)
    with torch.device("meta"):
        native = spec.model.build().state_dict()
    hf = adapter.to_hf(dict(native))
    plan = adapter_plan({k: TensorInfo(k, tuple(v.shape), v.dtype) for k, v in hf.items()}, adapter.from_hf,
                        "Qwen3StateDictAdapter.from_hf", where="moe")
    n_exp = next(layer.moe.num_experts for layer in spec.model.layers if layer.moe is not None)
    stacked = [t for t in plan.transforms if len(t.inputs) > 1]
    assert stacked and all(len(t.inputs) == n_exp and len(t.targets) == 1 for t in stacked)
    assert set(plan.targets()) == set(adapter.from_hf(dict(hf)))  # what one whole-model call gives


def test_bad_titan_model_requests_are_one_line_errors(hf_dirs, tiny_hf_factory, tmp_path, capsys):
    hf = hf_dirs["llama3-untied"]
    biased = tiny_hf_factory("llama")  # the shared preset has attention_bias=True: no TorchTitan llama3 has biases
    capsys.readouterr()
    assert cli(["to-dcp", str(hf), "--out", str(tmp_path / "x"), "--titan-model", "qwen3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_type 'llama'" in err
    assert cli(["to-dcp", str(hf), "--out", str(tmp_path / "x"), "--titan-model", "gpt2"]) == 2
    assert "llama3, qwen3" in capsys.readouterr().err
    assert cli(["to-dcp", str(biased), "--out", str(tmp_path / "x"), "--titan-model", "llama3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "attention_bias=True" in err
    assert not (tmp_path / "x").exists()


def test_after_load_refuses_a_titan_config_that_is_not_the_hf_one(hf_dirs, tmp_path):
    import dataclasses

    from ckpt_bridge.models.after_load import ConfigMismatchError, after_load
    from ckpt_bridge.models.titan import titan_model

    hf = hf_dirs["llama3-untied"]
    tm = titan_model("llama3", hf)
    for layer in tm.config.layers:  # the flavor default theta, as a hand-built trainer config would have
        layer.attention.rope = dataclasses.replace(layer.attention.rope, theta=10000.0)
    model = tm.build("cpu")
    with pytest.raises(ConfigMismatchError, match=r"rope_theta 10000\.0 \(trainer\) vs 500000\.0"):
        after_load(model, hf)


def test_python_api_model_and_adapter_convert_back_without_flags(hf_dirs, tmp_path, capsys):
    """to_dcp(model=, sd_adapter=) with TorchTitan's own llama3 and its registered StateDictAdapter: the manifest
    names the family (and the adapter's class and model args), so to-hf and verify rebuild the adapter with no
    flag; a manifest that names only the adapter (as before) is one line naming --titan-model llama3."""
    from ckpt_bridge.commands.to_dcp import to_dcp
    from ckpt_bridge.formats.dcp_files import MANIFEST
    from ckpt_bridge.models.titan import titan_model

    hf = hf_dirs["llama3-untied"]
    tm = titan_model("llama3", hf)
    dcp = tmp_path / "dcp"
    to_dcp(hf, dcp, model=tm.build("meta"), sd_adapter=tm.adapter, progress=False)
    manifest = json.loads((dcp / MANIFEST).read_text())
    assert manifest["titan_model"] == "llama3"
    rec = manifest["titan_adapter"]
    assert rec["class"] == "torchtitan.models.llama3.state_dict_adapter.Llama3StateDictAdapter"
    assert rec["family"] == "llama3" and rec["model_config"]["num_key_value_heads"] == 2
    assert cli(["to-hf", str(dcp), "--out", str(tmp_path / "back"), "--quiet"]) == 0
    src, back = _hf_state(hf), _hf_state(tmp_path / "back")
    assert set(back) == set(src) and all(torch.equal(back[k], v) for k, v in src.items())
    capsys.readouterr()
    assert cli(["verify", str(dcp), "--against", str(hf)]) == 0
    assert "TorchTitan llama3" in capsys.readouterr().out

    # the manifest of a conversion that recorded no family (written before it did): the flag that works
    del manifest["titan_adapter"]
    manifest["titan_model"] = None
    (dcp / MANIFEST).write_text(json.dumps(manifest))
    for args in (["to-hf", str(dcp), "--out", str(tmp_path / "again")], ["verify", str(dcp), "--against", str(hf)]):
        capsys.readouterr()
        assert cli(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Llama3StateDictAdapter" in err[0] and "pass --titan-model llama3" in err[0], err
    assert not (tmp_path / "again").exists()
    assert cli(["to-hf", str(dcp), "--out", str(tmp_path / "again"), "--titan-model", "llama3", "--quiet"]) == 0


def test_adapter_of_another_config_records_no_family(hf_dirs, tmp_path):
    """A model whose config is not the HF config's (another rope theta): its adapter is recorded by class, and
    no family is claimed that would rebuild a different one."""
    import dataclasses

    from ckpt_bridge.models.titan import adapter_record, titan_model

    hf = hf_dirs["llama3-untied"]
    tm = titan_model("llama3", hf)
    other = dataclasses.replace(tm.config, layers=[dataclasses.replace(
        layer, attention=dataclasses.replace(layer.attention, rope=dataclasses.replace(layer.attention.rope,
                                                                                      theta=10000.0)))
        for layer in tm.config.layers])
    with torch.device("meta"):
        model = other.build()
    rec = adapter_record(tm.adapter, model, hf)
    assert rec["family"] is None and rec["class"].endswith("Llama3StateDictAdapter")
    assert rec["model_config"]["rope_parameters"]["rope_theta"] == 10000.0
    assert adapter_record(tm.adapter, tm.build("meta"), hf)["family"] == "llama3"


def test_save_hook_exports_a_titan_model_through_its_adapter(gloo1, hf_dirs, tmp_path):
    """HFExport(titan_model="llama3"): TorchTitan's own llama3, loaded by torchtitan's own HF load, saved by its
    CheckpointManager under its own names; the hook's export is the HF files bit for bit.  Without the name the
    export fails (torchtitan's save names no model) with a line naming the flag."""
    from torchtitan.components.checkpoint import CheckpointManager

    from ckpt_bridge.integrations.torchtitan import HFExport, attach
    from ckpt_bridge.models.titan import titan_model

    hf = hf_dirs["llama3-tied"]
    tm = titan_model("llama3", hf)
    model = _titan_load(tm, tmp_path / "load", initial_load_path=str(hf.absolute()), initial_load_in_hf=True)
    results = {}
    for case, name in (("named", "llama3"), ("unnamed", None)):
        cfg = CheckpointManager.Config(enable=True, folder="checkpoint", keep_latest_k=0, last_save_model_only=True,
                                       export_dtype="float32")
        mgr = CheckpointManager(cfg, dataloader=None, model_parts=[model], optimizers=None, lr_schedulers=None,
                                states={}, sd_adapter=tm.adapter, base_folder=str(tmp_path / case))
        hook = attach(mgr, HFExport(hf_config=hf, titan_model=name))
        try:
            mgr.save(curr_step=1, last_step=True)
            (results[case],) = hook.wait(timeout=300)
        finally:
            hook.close()
            mgr.close()
    named, unnamed = results["named"], results["unnamed"]
    assert named.ok, named.message
    src, got = _hf_state(hf), _hf_state(Path(named.out))
    assert set(got) == set(src) and all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in src.items())
    assert not unnamed.ok and "pass --titan-model llama3" in unnamed.message, unnamed.message


def test_titan_native_export_streams_its_renames_in_row_pieces(hf_dirs, tmp_path, monkeypatch):
    """Issue 16: a TorchTitan adapter is plan transforms composed with the export's, not a reader in front of
    it, so the keys its to_hf only renames move as row pieces (read_rows), like any export's renames; the keys
    it computes (llama3's q/k permutation) are read whole.  The export stays bit-exact."""
    from ckpt_bridge.formats.dcp import DCPReader

    case = next(c for c, (name, _, tied) in CASES.items() if name == "llama3" and not tied)
    hf = hf_dirs[case]
    assert cli(["to-dcp", str(hf), "--out", str(tmp_path / "dcp"), "--titan-model", "llama3", "--quiet"]) == 0
    rows, whole = set(), set()
    orig_rows, orig_read = DCPReader.read_rows, DCPReader.read

    def spy_rows(self, key, out, start, stop):
        rows.add(key)
        return orig_rows(self, key, out, start, stop)

    def spy_read(self, key, *a, **kw):
        whole.add(key)
        return orig_read(self, key, *a, **kw)

    monkeypatch.setattr(DCPReader, "read_rows", spy_rows)
    monkeypatch.setattr(DCPReader, "read", spy_read)
    assert cli(["to-hf", str(tmp_path / "dcp"), "--out", str(tmp_path / "back"), "--quiet"]) == 0
    src, back = _hf_state(hf), _hf_state(tmp_path / "back")
    assert set(back) == set(src) and all(torch.equal(back[k], v) for k, v in src.items())
    assert "tok_embeddings.weight" in rows and "layers.0.feed_forward.w1.weight" in rows
    permuted = {k for k in rows | whole if k.endswith(("wq.weight", "wk.weight"))}  # llama3's to_hf permutes q/k
    assert len(permuted) == 4 and whole == permuted and not rows & whole
