"""to-dcp output loaded by the real trainer code: torchtitan 0.3.0's CheckpointManager on a 1-process gloo
group (flat / auto), real DCP with the pre-2025-06 ``{"model": ...}`` request (nested), and the wrong
pairings caught by ``verify --against``.  Every comparison is torch.equal against the HF files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_bridge.plan.aux_modules import as_specs, attach_aux, init_aux
from ckpt_bridge.cli import main as cli
from ckpt_bridge.commands.to_dcp import to_dcp
from ckpt_bridge.formats.dcp_files import MANIFEST
from ckpt_bridge.errors import BridgeError, KeyPlanError, OutputError
from ckpt_bridge.formats.dcp import DCPReader
from ckpt_bridge.formats.hf import weight_files
from ckpt_bridge.checks.verify_dcp import verify_dcp

AUX = ["future_encoder:mlp", "future_predictor:linear", "action_layer:linear:16"]


def hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in weight_files(hf_dir)[1]:
        out.update(load_file(f))
    return out


def aux_state(specs, config, seed: int = 0) -> dict[str, torch.Tensor]:
    out = {}
    for s in as_specs(specs):
        module, _ = init_aux(s, config, seed)
        out.update({f"{s.name}.{k}": v for k, v in module.state_dict().items()})
    return out


def trainer_model(hf_dir: Path, aux=AUX, compile_blocks: bool = False):
    """The flame-style target: the HF class built on meta from the config, aux heads attached, to_empty."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    attach_aux(model, aux, cfg)
    if compile_blocks:  # per-block torch.compile: the trainer's keys show "_orig_mod."
        for i, layer in enumerate(model.model.layers):
            model.model.layers[i] = torch.compile(layer)
    return model


def titan_load(model, dcp_dir: Path, dump: Path) -> bool:
    from torchtitan.components.checkpoint import CheckpointManager

    cfg = CheckpointManager.Config(enable=True, folder="checkpoint", keep_latest_k=0,
                                   initial_load_path=str(dcp_dir.absolute()), initial_load_model_only=True)
    mgr = CheckpointManager(cfg, dataloader=None, model_parts=[model], optimizers=None, lr_schedulers=None,
                            states={}, sd_adapter=None, base_folder=str(dump))
    try:
        return mgr.load()
    finally:
        mgr.close()


def assert_equal_to_source(model, hf_dir: Path, aux=AUX, seed: int = 0) -> int:
    from ckpt_bridge.plan.planner import canonical_key

    want = {**hf_state(hf_dir), **aux_state(aux, model.config, seed)}
    got = {canonical_key(k): v for k, v in model.state_dict().items()}
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert set(got) == set(want) | tied
    for k, v in want.items():
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k], v.float()), k
    if tied:
        assert torch.equal(got["lm_head.weight"], want["model.embed_tokens.weight"].float())
    return len(want)


@pytest.mark.parametrize("layout", ["auto", "flat"])
@pytest.mark.parametrize("model", ["olmo2", "llama_tied"])
def test_titan_checkpoint_manager_loads_to_dcp_output_exactly(gloo1, tiny_hf_factory, tmp_path, layout, model):
    hf = tiny_hf_factory(model)
    s = to_dcp(hf, tmp_path / "dcp", layout=layout, aux=AUX, progress=False)
    assert s.layout == "flat" and (s.trainer == "torchtitan 0.3.0" if layout == "auto" else "forced" in s.trainer)
    m = trainer_model(hf)
    m.to_empty(device="cpu")
    assert titan_load(m, tmp_path / "dcp", tmp_path / "dump") is True
    n = assert_equal_to_source(m, hf)
    assert s.tensors == len(m.state_dict()) and n > 20


def test_nested_output_loads_through_the_old_model_only_request(tiny_hf_factory, tmp_path):
    """torchtitan before 2025-06-13 asked DCP for {"model": ModelWrapper(model)} on a model-only load."""
    import torch.distributed.checkpoint as dcp
    from torchtitan.components.checkpoint import ModelWrapper

    hf = tiny_hf_factory("olmo2")
    s = to_dcp(hf, tmp_path / "nested", layout="nested", aux=AUX, progress=False)
    assert s.layout == "nested"
    r = DCPReader(tmp_path / "nested")
    assert r.layout() == "nested" and all(k.startswith("model.") for k in r.tensors())
    m = trainer_model(hf)
    m.to_empty(device="cpu")
    dcp.load({"model": ModelWrapper(m)}, checkpoint_id=str(tmp_path / "nested"), no_dist=True)
    assert_equal_to_source(m, hf)


def test_wrong_layout_fails_the_real_loader_and_verify_says_why(gloo1, tiny_hf_factory, tmp_path, capsys):
    hf = tiny_hf_factory("olmo2")
    to_dcp(hf, tmp_path / "nested", layout="nested", aux=AUX, progress=False)
    to_dcp(hf, tmp_path / "flat", layout="flat", aux=AUX, progress=False)
    m = trainer_model(hf)
    m.to_empty(device="cpu")
    # DCP's CheckpointException is a BaseException: `except Exception` would not even see it.
    with pytest.raises(BaseException, match="Missing key in checkpoint state_dict"):
        titan_load(m, tmp_path / "nested", tmp_path / "dump")

    res = verify_dcp(tmp_path / "nested", hf, layout_for="installed")
    assert not res.ok and res.satisfied == 0 and res.requested == len(m.state_dict())
    assert "the checkpoint is nested, this trainer loads flat" in res.headline()
    assert res.equal == res.compared > 0  # values are right; only the layout is wrong
    res = verify_dcp(tmp_path / "flat", hf, layout_for="nested")
    assert not res.ok and res.satisfied == 0 and "the checkpoint is flat, this trainer loads nested" in res.headline()
    assert verify_dcp(tmp_path / "flat", hf, layout_for="installed").ok
    assert verify_dcp(tmp_path / "nested", hf, layout_for="nested").ok

    assert cli(["verify", str(tmp_path / "nested"), "--against", str(hf)]) == 1
    out = capsys.readouterr().out
    assert f"0 of {len(m.state_dict())} model keys would load: the checkpoint is nested, this trainer loads flat" in out
    assert cli(["verify", str(tmp_path / "flat"), "--against", str(hf)]) == 0


def test_compiled_blocks_get_orig_mod_keys(gloo1, tiny_hf_factory, tmp_path):
    hf = tiny_hf_factory("olmo2")
    target = trainer_model(hf, compile_blocks=True)
    assert any("_orig_mod" in k for k in target.state_dict())
    s = to_dcp(hf, tmp_path / "dcp", aux=AUX, model=target, progress=False)
    keys = DCPReader(tmp_path / "dcp").tensors()
    assert "model.layers.0._orig_mod.self_attn.q_proj.weight" in keys and s.tensors == len(keys)
    m = trainer_model(hf, compile_blocks=True)
    m.to_empty(device="cpu")
    assert titan_load(m, tmp_path / "dcp", tmp_path / "dump")
    assert_equal_to_source(m, hf)


def test_aux_init_is_seeded_per_module_and_manifest_records_everything(tiny_hf_factory, tmp_path):
    hf = tiny_hf_factory("olmo2")
    to_dcp(hf, tmp_path / "a", aux=["future_predictor"], seed=3, progress=False)
    to_dcp(hf, tmp_path / "b", aux=["future_predictor", "action_layer:linear:16"], seed=3, progress=False)
    to_dcp(hf, tmp_path / "c", aux=["future_predictor"], seed=4, progress=False)
    ra, rb, rc = (DCPReader(tmp_path / n) for n in "abc")
    w = "future_predictor.weight"
    assert torch.equal(ra.read(w), rb.read(w))  # adding a head does not change the others
    assert not torch.equal(ra.read(w), rc.read(w))
    assert float(ra.read("future_predictor.bias").abs().max()) == 0.0
    assert abs(float(ra.read(w).std()) - 0.02) < 0.004  # initializer_range of the config
    assert rb.tensors()["action_layer.weight"].shape == (16, 64)

    m = json.loads((tmp_path / "b" / MANIFEST).read_text())
    files = {f["name"]: f for f in m["source"]["files"]}
    for p in weight_files(hf)[1] + [hf / "config.json"]:
        assert files[p.name]["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert m["hf_config"] == json.loads((hf / "config.json").read_text())
    assert m["layout"]["layout"] == "flat" and m["layout"]["trainer"] == "torchtitan 0.3.0"
    aux = {a["name"]: a for a in m["aux"]}
    assert aux["action_layer"]["keys"] == {"action_layer.bias": [16], "action_layer.weight": [16, 64]}
    assert aux["future_predictor"]["seed"] == 3 and "normal(0, 0.02)" in aux["future_predictor"]["init"]


def test_every_side_file_kept_in_the_dcp_folder_is_hashed_in_the_manifest(tiny_hf_factory, tmp_path):
    """One side-file rule: what to-dcp keeps of the source (hf_config/) is what its manifest hashes, including
    files no tokenizer prefix names (a README, a video processor config) and the files of a side folder."""
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf_factory("olmo2"), hf)
    (hf / "README.md").write_text("model card\n")
    (hf / "video_preprocessor_config.json").write_text('{"do_resize": true}\n')
    (hf / "additional_chat_templates").mkdir()
    (hf / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}\n")
    to_dcp(hf, tmp_path / "out", progress=False)
    m = json.loads((tmp_path / "out" / MANIFEST).read_text())
    hashed = {f["name"]: f["sha256"] for f in m["source"]["files"]}
    kept_dir = tmp_path / "out" / m["hf_config_dir"]
    kept = sorted(p.relative_to(kept_dir).as_posix() for p in kept_dir.rglob("*") if p.is_file())
    assert {"README.md", "video_preprocessor_config.json", "additional_chat_templates/tool_use.jinja"} <= set(kept)
    for name in kept:
        assert hashed.get(name) == hashlib.sha256((hf / name).read_bytes()).hexdigest(), name


def test_aux_from_copies_and_checks(tiny_hf_factory, tmp_path):
    hf = tiny_hf_factory("olmo2")
    to_dcp(hf, tmp_path / "first", aux=AUX, seed=9, progress=False)
    to_dcp(hf, tmp_path / "copy", aux_from=tmp_path / "first", progress=False)  # names from the manifest
    a, b = DCPReader(tmp_path / "first"), DCPReader(tmp_path / "copy")
    assert set(a.tensors()) == set(b.tensors())
    assert all(torch.equal(a.read(k), b.read(k)) for k in a.tensors())
    with pytest.raises(KeyPlanError, match="--aux-from .* has no"):
        to_dcp(hf, tmp_path / "bad", aux=["other_head"], aux_from=tmp_path / "first", progress=False)
    with pytest.raises(KeyPlanError, match="shape"):
        to_dcp(hf, tmp_path / "bad", aux=["action_layer:linear:8"], aux_from=tmp_path / "first", progress=False)
    assert not (tmp_path / "bad").exists()


def test_python_factory_aux(tiny_hf_factory, tmp_path):
    hf = tiny_hf_factory("olmo2")

    def head(cfg):
        return torch.nn.Sequential(torch.nn.Linear(cfg.hidden_size, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

    s1 = to_dcp(hf, tmp_path / "f1", aux={"value_head": head}, seed=1, progress=False)
    to_dcp(hf, tmp_path / "f2", aux={"value_head": head}, seed=1, progress=False)
    r1, r2 = DCPReader(tmp_path / "f1"), DCPReader(tmp_path / "f2")
    assert {"value_head.0.weight", "value_head.2.bias"} <= set(r1.tensors())
    assert all(torch.equal(r1.read(k), r2.read(k)) for k in r1.tensors())
    assert s1.aux_tensors == 4


def test_dtype_cast_and_bf16_source(tiny_hf_factory, tmp_path):
    hf16 = tiny_hf_factory("olmo2", dtype="bf16")
    to_dcp(hf16, tmp_path / "fp32", progress=False)  # default: fp32 master weights, lossless from bf16
    r = DCPReader(tmp_path / "fp32")
    src = hf_state(hf16)
    assert all(r.tensors()[k].dtype == torch.float32 for k in src)
    assert all(torch.equal(r.read(k), v.float()) for k, v in src.items())
    res = verify_dcp(tmp_path / "fp32", hf16)
    assert res.ok and "bfloat16 -> float32" in res.cast_note

    hf = tiny_hf_factory("olmo2")
    to_dcp(hf, tmp_path / "bf16", dtype="bf16", progress=False)
    r = DCPReader(tmp_path / "bf16")
    assert all(torch.equal(r.read(k), v.to(torch.bfloat16)) for k, v in hf_state(hf).items())


def test_refusals_leave_nothing_behind(tiny_hf_factory, tmp_path, monkeypatch):
    hf = tiny_hf_factory("olmo2")
    target = trainer_model(hf, aux=["future_predictor"])  # the trainer has a head nobody asked for
    with pytest.raises(KeyPlanError, match=r"2 key\(s\) the trainer requests are not in the source: "
                                           r"future_predictor.weight, future_predictor.bias"):
        to_dcp(hf, tmp_path / "x", model=target, progress=False)
    with pytest.raises(OutputError, match="inside"):
        to_dcp(hf, hf / "dcp", progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        to_dcp(hf, tmp_path / "exists", progress=False)
    with pytest.raises(BridgeError, match="already has a child"):
        to_dcp(hf, tmp_path / "x", aux=["lm_head"], progress=False)

    import ckpt_bridge.models.titan_eras as eras

    monkeypatch.setattr(eras, "torchtitan_version", lambda: None)
    with pytest.raises(BridgeError, match="none is installed here; pass --layout nested or --layout flat"):
        to_dcp(hf, tmp_path / "x", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]  # no output, no .partial dir
    assert not [p for p in hf.iterdir() if "dcp" in p.name]  # nothing written into the source


def test_source_missing_a_weight_is_refused(tiny_hf_factory, tmp_path):
    import shutil

    from safetensors.torch import save_file

    hf = tiny_hf_factory("olmo2", max_shard_size=None)
    bad = tmp_path / "hf"
    shutil.copytree(hf, bad)
    sd = load_file(bad / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyPlanError, match="not in the source: model.layers.1.mlp.up_proj.weight"):
        to_dcp(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_to_dcp_prints_flags_and_dry_run(tiny_hf_factory, tmp_path, capsys):
    hf = tiny_hf_factory("olmo2")
    out = tmp_path / "boot"
    assert cli(["to-dcp", str(hf), "--out", str(out), "--aux", "future_predictor", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert f"--checkpoint.initial_load_path {out.absolute()} --checkpoint.initial_load_model_only" in text
    # the installed era's flags only (older eras: tests/test_titan_eras.py)
    assert "torchtitan 0.3.0: " in text and "load_step" not in text and "after_load" in text
    assert cli(["to-dcp", str(hf), "--out", str(tmp_path / "dry"), "--dry-run", "--layout", "nested"]) == 0
    text = capsys.readouterr().out
    assert "model.model.embed_tokens.weight" in text and not (tmp_path / "dry").exists()
    assert cli(["to-dcp", str(hf), "--out", str(tmp_path / "e"), "--aux", "bad:conv"]) == 2
    assert "--aux 'bad:conv'" in capsys.readouterr().err


def test_verify_loss_on_the_shipped_corpus(trained_olmo2, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    from ckpt_bridge.testing.tiny_olmo2 import corpus_text

    text = tmp_path / "corpus.txt"
    text.write_text(corpus_text())
    to_dcp(trained_olmo2, tmp_path / "good", aux=["future_predictor"], progress=False)
    assert cli(["verify", str(tmp_path / "good"), "--against", str(trained_olmo2), "--loss", str(text),
                "--loss-tokens", "768"]) == 0
    out = capsys.readouterr().out
    assert "loss on 768 tokens" in out and "(ok, atol 1e-05)" in out
    res = verify_dcp(tmp_path / "good", trained_olmo2, loss_text=text, loss_tokens=768)
    assert res.loss_hf == res.loss_dcp and res.loss_hf < 2.6

    # a checkpoint one tensor off: values and loss both say so
    bad_hf = tmp_path / "bad-hf"
    shutil.copytree(trained_olmo2, bad_hf)
    sd = load_file(bad_hf / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"].t().contiguous()
    save_file(sd, bad_hf / "model.safetensors", metadata={"format": "pt"})
    to_dcp(bad_hf, tmp_path / "bad", progress=False)
    res = verify_dcp(tmp_path / "bad", trained_olmo2, loss_text=text, loss_tokens=768)
    assert not res.ok and res.keys_ok
    assert [k for k, _ in res.value_diffs] == ["model.layers.0.self_attn.q_proj.weight"]
    assert res.loss_dcp - res.loss_hf > 0.05
    assert cli(["verify", str(tmp_path / "bad"), "--against", str(trained_olmo2)]) == 1
    assert cli(["verify", str(tmp_path / "bad"), str(trained_olmo2), "--loss", str(text)]) == 2


class _PermutingAdapter:
    """A per-key adapter in the shape of TorchTitan's llama3 StateDictAdapter: renames every key and
    reverse-permutes q/k (the real llama3 adapter cannot be imported on this CPU machine: torchtitan's model
    package imports triton)."""

    def __init__(self, n_heads: int, n_kv: int):
        self.n_heads, self.n_kv = n_heads, n_kv
        self.hf_name: dict[str, str] = {}

    def native(self, key: str) -> str | None:
        if key.endswith("inv_freq"):
            return None
        nk = key.replace("model.", "", 1).replace("self_attn", "attention").replace(".", "_")
        self.hf_name[nk] = key
        return nk

    def _perm(self, w, n, inverse=False):
        d1, d2 = w.shape
        shape = (n, 2, d1 // n // 2, d2) if inverse else (n, d1 // n // 2, 2, d2)
        return w.reshape(shape).transpose(1, 2).reshape(d1, d2)

    def from_hf(self, sd):
        out = {}
        for k, v in sd.items():
            if k.endswith("q_proj.weight"):
                v = self._perm(v, self.n_heads, inverse=True)
            elif k.endswith("k_proj.weight"):
                v = self._perm(v, self.n_kv, inverse=True)
            nk = self.native(k)
            if nk is not None:
                out[nk] = v
        return out

    def to_hf(self, sd):
        back = {}
        for k, v in sd.items():
            hf = self.hf_name[k]
            if hf.endswith("q_proj.weight"):
                v = self._perm(v, self.n_heads)
            elif hf.endswith("k_proj.weight"):
                v = self._perm(v, self.n_kv)
            back[hf] = v
        return back


def test_torchtitan_style_model_through_its_state_dict_adapter(gloo1, tiny_hf_factory, tmp_path):
    from transformers import AutoConfig

    hf = tiny_hf_factory("llama")
    cfg = AutoConfig.from_pretrained(hf)
    adapter = _PermutingAdapter(cfg.num_attention_heads, cfg.num_key_value_heads)
    src = hf_state(hf)

    def native_model(device):
        m = torch.nn.Module()
        with torch.device(device):
            for k, v in adapter.from_hf({k: torch.empty(v.shape, device="meta") for k, v in src.items()}).items():
                m.register_parameter(k, torch.nn.Parameter(torch.empty(v.shape)))
        return m

    s = to_dcp(hf, tmp_path / "dcp", model=native_model("meta"), sd_adapter=adapter, progress=False)
    keys = DCPReader(tmp_path / "dcp").tensors()
    assert "layers_0_attention_q_proj_weight" in keys and "embed_tokens_weight" in keys
    assert s.tensors == len(src)
    m = native_model("cpu")
    assert titan_load(m, tmp_path / "dcp", tmp_path / "dump")
    back = adapter.to_hf(dict(m.state_dict()))
    assert set(back) == set(src)
    assert all(torch.equal(back[k], v) for k, v in src.items())
    q = "model.layers.0.self_attn.q_proj.weight"  # the permutation really happened
    assert not torch.equal(m.state_dict()["layers_0_attention_q_proj_weight"], src[q])


@pytest.mark.parametrize("direction", ["to_dcp", "dcp_to_hf"])
def test_one_tensor_in_memory_at_a_time(tiny_hf_factory, tmp_path, monkeypatch, direction):
    """Each time the next source tensor is read, counts how many earlier ones still have their storage alive
    (held by a view, a detached alias, a writer's cache): a writer that kept what it wrote (DCP's
    FileSystemWriter does, per file) or a reader that cached would show many.  torch keeps one Python object
    per storage for as long as the storage lives (ckpt_bridge.testing.streaming)."""
    from ckpt_bridge.pipeline import pieces
    from ckpt_bridge.commands.to_hf import to_hf
    from ckpt_bridge.formats.dcp import DCPReader
    from ckpt_bridge.formats.hf import HFReader
    from ckpt_bridge.testing.streaming import count_live_reads

    hf = tiny_hf_factory("olmo2")
    if direction == "dcp_to_hf":
        to_dcp(hf, tmp_path / "dcp", progress=False)
    live = count_live_reads(monkeypatch, HFReader if direction == "to_dcp" else DCPReader, collect=True)
    # every tensor read whole: this checks whole-tensor reads (pieces have tests/test_pieces.py and, into DCP's
    # writer, tests/test_dcp_chunks.py)
    monkeypatch.setattr(pieces, "PIECE_BYTES", 1)
    if direction == "to_dcp":
        to_dcp(hf, tmp_path / "out", progress=False)
    else:
        to_hf(tmp_path / "dcp", tmp_path / "out", config=hf, progress=False)
    assert live.reads >= 25
    assert live.peak <= 2  # the tensor being written and, for to-hf, the one read ahead


def test_tied_weights_are_not_written_back_to_back(tiny_hf_factory, tmp_path):
    """DCP's writer holds the previous tensor while it fetches the next: the plan writes in the trainer's
    request order, so a tied embedding and lm_head (one source, the two largest tensors) are never
    neighbours (on a 1B model that is 1 GB of peak memory)."""
    from ckpt_bridge.plan.hf_target import build_meta_model
    from ckpt_bridge.plan.trainer_keys import requested_keys

    hf = tiny_hf_factory("llama_tied")
    plan = to_dcp(hf, tmp_path / "x", dry_run=True, progress=False)
    order = [k for t in plan.transforms for k in t.targets]
    model = build_meta_model(hf)
    assert order == [k for k in requested_keys(model).fqn_of if k in order]
    assert abs(order.index("lm_head.weight") - order.index("model.embed_tokens.weight")) > 1


_TO_DCP_AND_LIST_IMPORTS = """
import sys
from ckpt_bridge.cli import main
code = main(sys.argv[1:])
print("heavy:", sorted(m for m in ("torch._dynamo", "torchtitan", "transformers.modeling_utils") if m in sys.modules))
sys.exit(code)
"""


def test_a_second_export_of_a_config_remembers_the_trainer_keys(tiny_hf_factory, tmp_path, monkeypatch):
    """The trainer's requested keys, tie groups and in-memory names are cached per config (and aux modules,
    layout, torchtitan, transformers): the second run imports neither transformers' modeling code
    (torch._dynamo) nor torchtitan, says so, and writes the same files; other config bytes are asked again."""
    import filecmp
    import shutil
    import subprocess
    import sys

    monkeypatch.setenv("CKPT_BRIDGE_CACHE", str(tmp_path / "cache"))
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf_factory("llama_tied"), hf)

    def export(out: Path) -> tuple[list[str], dict]:
        r = subprocess.run([sys.executable, "-c", _TO_DCP_AND_LIST_IMPORTS, "to-dcp", str(hf), "--out", str(out),
                            "--aux", "future_predictor", "--quiet"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        heavy = next(line for line in r.stdout.splitlines() if line.startswith("heavy:"))
        return heavy, json.loads((out / MANIFEST).read_text())

    heavy, cold = export(tmp_path / "a")
    assert "torchtitan" in heavy and "transformers.modeling_utils" in heavy
    assert "remembered" not in cold["layout"]["reason"]
    heavy, warm = export(tmp_path / "b")
    assert heavy == "heavy: []", heavy
    assert "remembered" in warm["layout"]["reason"] and warm["layout"]["keys"] == cold["layout"]["keys"]
    distcp = sorted(p.name for p in (tmp_path / "a").glob("*.distcp"))
    assert distcp and distcp == sorted(p.name for p in (tmp_path / "b").glob("*.distcp"))
    assert filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", distcp, shallow=False)[0] == distcp
    a, b = DCPReader(tmp_path / "a"), DCPReader(tmp_path / "b")
    assert a.tensors() == b.tensors() and all(torch.equal(a.read(k), b.read(k)) for k in a.tensors())
    assert warm["aux"][0]["sha256"] == cold["aux"][0]["sha256"]
    # another config (here the same one, reformatted) is not the remembered one
    (hf / "config.json").write_text(json.dumps(json.loads((hf / "config.json").read_text()), indent=1))
    heavy, _ = export(tmp_path / "c")
    assert "transformers.modeling_utils" in heavy
