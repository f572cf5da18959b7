"""to-hf for DCP step folders: any layout (nested before torchtitan 0.2.0, flat after), model-only or full
training state, wrapper prefixes, aux modules apart, extra state, several models, a base model dir."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from ckpt_bridge.cli import main as cli
from ckpt_bridge.commands.to_dcp import to_dcp
from ckpt_bridge.errors import OutputError
from ckpt_bridge.commands.to_hf import to_hf
from ckpt_bridge.formats.hf import weight_files


def hf_state(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in weight_files(d)[1]:
        out.update(load_file(f))
    return out


def save_dcp(state: dict, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path), no_dist=True)


def load_pretrained(d: Path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)


def test_round_trip_through_to_dcp_with_aux(tiny_hf_factory, tmp_path, capsys):
    hf = tiny_hf_factory("olmo2")
    to_dcp(hf, tmp_path / "dcp", aux=["future_predictor", "action_layer:linear:16"], progress=False)
    # the manifest's recorded source dir lies outside the DCP folder: followed only when passed explicitly
    assert cli(["to-hf", str(tmp_path / "dcp"), "--out", str(tmp_path / "back"), "--quiet", "--config", str(hf)]) == 0
    assert "aux module future_predictor: 2 tensor(s), aux_modules.safetensors" in capsys.readouterr().out
    back, src = hf_state(tmp_path / "back"), hf_state(hf)
    assert set(back) == set(src) and all(torch.equal(back[k], src[k]) for k in src)
    aux = load_file(tmp_path / "back" / "aux_modules.safetensors")
    assert set(aux) == {"future_predictor.weight", "future_predictor.bias", "action_layer.weight", "action_layer.bias"}
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    _, info = load_pretrained(tmp_path / "back")
    assert not info["missing_keys"] and not info["unexpected_keys"]

    to_hf(tmp_path / "dcp", tmp_path / "drop", aux="drop", config=hf, progress=False)
    assert not (tmp_path / "drop" / "aux_modules.safetensors").exists()
    to_hf(tmp_path / "dcp", tmp_path / "inline", aux="inline", config=hf, progress=False)
    assert {"future_predictor.weight", "action_layer.bias"} <= set(hf_state(tmp_path / "inline"))


def test_nested_full_checkpoint_of_the_old_era(tiny_hf_factory, tmp_path):
    """torchtitan < 0.2.0 saved {"model": ..., "optimizer": ..., "lr_scheduler": ..., "train_state": ...};
    compiled blocks put _orig_mod. into the model keys."""
    hf = tiny_hf_factory("llama")
    src = hf_state(hf)
    model = {k.replace("layers.0.", "layers.0._orig_mod."): v for k, v in src.items()}
    state = {"model": model, "optimizer": {"state": {"model.norm.weight": {"exp_avg": torch.ones(64)}}},
             "lr_scheduler": {"last_epoch": 7}, "train_state": {"step": 7}}
    save_dcp(state, tmp_path / "step-7")
    s = to_hf(tmp_path / "step-7", tmp_path / "out", config=hf, progress=False)
    out = hf_state(tmp_path / "out")
    assert set(out) == set(src) and all(torch.equal(out[k], src[k]) for k in src)
    assert s.global_step == 7
    ts = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert ts["global_step"] == 7 and ts["lr_scheduler"] == {"last_epoch": 7} and ts["train_state"] == {"step": 7}


def test_main_and_ema_side_by_side(tiny_hf_factory, tmp_path):
    hf = tiny_hf_factory("llama")
    src = hf_state(hf)
    ema = {k: v * 0.5 for k, v in src.items()}
    save_dcp({**src, "ema": ema, "lr_scheduler": {"last_epoch": 3}}, tmp_path / "step-3")
    to_hf(tmp_path / "step-3", tmp_path / "out", config=hf, models=["main", "ema"], progress=False)
    main, e = hf_state(tmp_path / "out"), load_file(tmp_path / "out" / "ema.safetensors")
    assert all(torch.equal(main[k], src[k]) for k in src) and all(torch.equal(e[k], ema[k]) for k in ema)
    assert set(main) == set(src) == set(e)
    _, info = load_pretrained(tmp_path / "out")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with pytest.raises(Exception, match="no section 'swa'"):
        to_hf(tmp_path / "step-3", tmp_path / "bad", config=hf, models=["main", "swa"], progress=False)
    assert not (tmp_path / "bad").exists()


def test_base_components_copied_and_base_protected(tiny_hf_factory, tmp_path):
    hf = tiny_hf_factory("llama")
    base = tmp_path / "base"
    shutil.copytree(hf, base)
    (base / "vae").mkdir()
    save_file({"decoder.weight": torch.randn(4, 4)}, base / "vae" / "diffusion_pytorch_model.safetensors")
    (base / "preprocessor_config.json").write_text('{"size": 224}')
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in base.rglob("*") if p.is_file()}
    to_dcp(hf, tmp_path / "dcp", progress=False)
    to_hf(tmp_path / "dcp", tmp_path / "out", base=base, progress=False)
    vae = tmp_path / "out" / "vae" / "diffusion_pytorch_model.safetensors"
    assert vae.read_bytes() == (base / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert (tmp_path / "out" / "preprocessor_config.json").read_text() == '{"size": 224}'
    with pytest.raises(OutputError, match="inside"):
        to_hf(tmp_path / "dcp", base / "export", base=base, progress=False)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in base.rglob("*") if p.is_file()}
    assert after == before
