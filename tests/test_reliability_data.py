"""Issue 26, the data defects: silent wrong exports and what inspect does not see.

- D1: a checkpoint whose output layer was trained apart from the embedding while its config says
  ``tie_word_embeddings: true`` (Megatron ``output_layer``, verl FSDP ``lm_head``, DCP ``lm_head``).  The plan
  dropped the tied alias without comparing it: exit 0, the export's head was the embedding, and ``verify SRC
  EXPORT`` said EQUAL.  Now both copies are compared when the plan runs (planner._check_tied_copies) and an
  unequal pair is refused in one line naming both tensors; an equal pair is written once, as before.
- D4: a Megatron save whose transformer_config.json computes something config.json does not
  (verl's ``override_transformer_config``): refused in one line naming the field and both values.
- D10: a Megatron save missing one (pp, tp) rng entry: ``inspect`` reports what ``to-hf`` refuses (one check).
- EP-split experts are named as expert parallelism, not "another model".

Every input is a real save from the session fixtures (verl FSDP, verl Megatron, our to-dcp), copied and edited
the way the defect makes it; each test fails on the code before this change (exit 0 / "problems none" / the
wrong diagnosis).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_bridge.cli import main as cli
from ckpt_bridge.commands.to_hf import to_hf
from test_failure_table import assert_fails  # tests/ is on sys.path (rootdir conftest)


def _tie(config_json: Path) -> None:
    d = json.loads(config_json.read_text())
    d["tie_word_embeddings"] = True
    config_json.write_text(json.dumps(d, indent=2))


def _silent_export(src: Path, out: Path, config: Path | None = None) -> Path:
    """What the old code wrote for a tied config over an untied save: the weights without the head, config tied
    (built here from the untied export, since the new code refuses to write it)."""
    to_hf(src, out, config=config, max_shard_size="1GB", progress=False)
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
        f.unlink()
    for f in out.glob("*.safetensors.index.json"):
        f.unlink()
    assert "lm_head.weight" in tensors
    del tensors["lm_head.weight"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    _tie(out / "config.json")
    return out


def _refused_both_ways(capsys, src: Path, tmp_path: Path, alias: str, kept: str, config: Path) -> None:
    """to-hf refuses the source with ``--config`` (one line naming both tensors, nothing written), and verify
    against what the old code exported is refused too (not EQUAL)."""
    line = assert_fails(capsys, ["to-hf", str(src), "--out", str(tmp_path / "out"), "--config", str(config)],
                        says=f"{alias} and {kept} hold different values", sources=(src,))
    assert "tie_word_embeddings" in line and "false" in line
    # to-dcp's trainer asks for both names of the tie group: each stays its own streamed copy, compared all the same
    assert_fails(capsys, ["to-dcp", str(src), "--out", str(tmp_path / "dcp"), "--config", str(config)],
                 says=f"{alias} and {kept} hold different values", sources=(src,))
    untied = tmp_path / "untied_cfg"  # the old export, made from the untied config
    untied.mkdir()
    shutil.copy(config / "config.json", untied / "config.json")
    _untie_in_place(untied / "config.json")
    export = _silent_export(src, tmp_path / "old_export", untied)
    assert_fails(capsys, ["verify", str(src), str(export)], says=f"{alias} and {kept} hold different values",
                 sources=(src, export))


def _untie_in_place(config_json: Path):
    d = json.loads(config_json.read_text())
    d["tie_word_embeddings"] = False
    config_json.write_text(json.dumps(d, indent=2))


def test_megatron_output_layer_trained_apart_under_a_tied_config_is_refused(megatron_ckpts, tmp_path, capsys):
    """llama_tp2pp2 saves output_layer.weight (untied run); its config edited to tie_word_embeddings: true."""
    actor = megatron_ckpts["llama_tp2pp2"] / "global_step_1" / "actor"
    cfg = tmp_path / "tied_cfg"
    cfg.mkdir()
    shutil.copy(megatron_ckpts["llama_tp2pp2"] / "base_model" / "config.json", cfg / "config.json")
    _tie(cfg / "config.json")
    _refused_both_ways(capsys, actor, tmp_path, "output_layer.weight", "embedding.word_embeddings.weight", cfg)


def test_verl_fsdp_lm_head_trained_apart_under_a_tied_config_is_refused(verl_ckpt, tmp_path, capsys):
    """A real verl FSDP2 save of an untied llama whose huggingface/config.json says tied."""
    actor = tmp_path / "actor"
    shutil.copytree(verl_ckpt("llama", "2"), actor)
    cfg = actor / "huggingface" / "config.json"
    _tie(cfg)
    line = assert_fails(capsys, ["to-hf", str(actor), "--out", str(tmp_path / "out")],
                        says="lm_head.weight and model.embed_tokens.weight hold different values", sources=(actor,))
    assert "tie_word_embeddings" in line
    _untie_in_place(cfg)
    export = _silent_export(actor, tmp_path / "old_export")
    _tie(cfg)
    assert_fails(capsys, ["verify", str(actor), str(export)],
                 says="lm_head.weight and model.embed_tokens.weight hold different values", sources=(actor, export))


def test_dcp_lm_head_trained_apart_under_a_tied_config_is_refused(llama_dcp_with_aux, tmp_path, capsys):
    """Our to-dcp output of an untied llama (lm_head saved apart), its kept hf_config edited to tied."""
    dcp = tmp_path / "dcp"
    shutil.copytree(llama_dcp_with_aux[1], dcp)
    cfg = dcp / "hf_config" / "config.json"
    _tie(cfg)
    assert_fails(capsys, ["to-hf", str(dcp), "--out", str(tmp_path / "out")],
                 says="lm_head.weight and model.embed_tokens.weight hold different values", sources=(dcp,))
    _untie_in_place(cfg)
    export = _silent_export(dcp, tmp_path / "old_export")
    _tie(cfg)
    assert_fails(capsys, ["verify", str(dcp), str(export)],
                 says="lm_head.weight and model.embed_tokens.weight hold different values", sources=(dcp, export))


def test_equal_tied_copies_are_compared_and_written_once(verl_ckpt, tmp_path, capsys):
    """A tied verl save stores both names (one tensor): they are compared, found equal, written once as
    save_pretrained does, and verify says EQUAL."""
    from ckpt_bridge.testing.harness import reference_dir

    actor = verl_ckpt("llama_tied", "2")
    out = tmp_path / "out"
    summary = to_hf(actor, out, progress=False)
    assert ("lm_head.weight", "tied to model.embed_tokens.weight") in summary.dropped
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(load_file(f))
    ref = load_file(reference_dir(actor) / "model.safetensors")
    assert "lm_head.weight" not in got
    assert torch.equal(got["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])
    capsys.readouterr()
    assert cli(["verify", str(actor), str(out)]) == 0
    assert "result: EQUAL" in capsys.readouterr().out


def test_tied_copies_are_compared_in_row_pieces(verl_ckpt, tmp_path, monkeypatch, capsys):
    """The comparison streams: the kept copy of a tied pair stays a rename moved in row pieces, and the other
    stored copy is read in the same rows and compared piece by piece (before, both were read whole and held
    together: a 1 GB embedding of a tied 1B model peaked at ~2.5 GB).  With pieces far smaller than the
    embedding, neither copy is read whole, the export equals save_pretrained bit for bit, and a pair trained
    apart is still refused in one line with nothing written."""
    from ckpt_bridge.formats.verl_fsdp import VerlFSDPReader
    from ckpt_bridge.pipeline import pieces
    from ckpt_bridge.testing.harness import reference_dir

    tied = ("model.embed_tokens.weight", "lm_head.weight")
    whole, rows = [], []
    read, read_rows = VerlFSDPReader.read, VerlFSDPReader.read_rows

    def spy_read(self, key, dtype=None):
        whole.append(key)
        return read(self, key, dtype)

    def spy_rows(self, key, out, start, stop):
        rows.append(key)
        return read_rows(self, key, out, start, stop)

    monkeypatch.setattr(VerlFSDPReader, "read", spy_read)
    monkeypatch.setattr(VerlFSDPReader, "read_rows", spy_rows)
    monkeypatch.setattr(pieces, "PIECE_BYTES", 1000)  # a few rows of the tiny embedding a piece
    actor = verl_ckpt("llama_tied", "2")
    out = tmp_path / "out"
    to_hf(actor, out, progress=False)
    assert not set(whole) & set(tied), f"read whole: {sorted(set(whole) & set(tied))}"
    assert all(rows.count(k) > 10 for k in tied), {k: rows.count(k) for k in tied}
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(load_file(f))
    ref = load_file(reference_dir(actor) / "model.safetensors")
    assert set(ref) - set(got) <= {"lm_head.weight"} and "lm_head.weight" not in got  # the tie written once
    assert all(torch.equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype for k in got)

    apart = tmp_path / "apart"  # an untied save under a config that says tied: refused in the piece path too
    shutil.copytree(verl_ckpt("llama", "2"), apart)
    _tie(apart / "huggingface" / "config.json")
    whole.clear()
    rows.clear()
    assert_fails(capsys, ["to-hf", str(apart), "--out", str(tmp_path / "refused")],
                 says="lm_head.weight and model.embed_tokens.weight hold different values", sources=(apart,))
    assert "lm_head.weight" in rows and not set(whole) & set(tied)
    assert not (tmp_path / "refused").exists()


# ---------------------------------------------------------------------------------------------------- D4

def _copy_actor(megatron_ckpts, tmp_path: Path, case: str) -> tuple[Path, Path]:
    root = megatron_ckpts[case]
    dst = tmp_path / case
    shutil.copytree(root / "global_step_1", dst / "global_step_1")
    return dst / "global_step_1" / "actor", root / "base_model"


DENSE_OVERRIDES = [  # (field, value verl's override_transformer_config would write, what the line must say)
    ("layernorm_zero_centered_gamma", True, "layernorm_zero_centered_gamma=true"),
    ("layernorm_epsilon", 1e-5, "layernorm_epsilon=1e-05, but"),
    ("rotary_interleaved", True, "rotary_interleaved=true"),
    ("rotary_percent", 0.5, "rotary_percent=0.5, but"),
    ("normalization", "LayerNorm", 'normalization="LayerNorm", but'),
    ("apply_residual_connection_post_layernorm", True, "apply_residual_connection_post_layernorm=true"),
    ("gated_linear_unit", False, "gated_linear_unit=false, but"),
]
MOE_OVERRIDES = [
    ("moe_router_topk", 1, "moe_router_topk=1, but"),
    ("moe_router_score_function", "sigmoid", 'moe_router_score_function="sigmoid", but'),
    ("moe_router_pre_softmax", True, "moe_router_pre_softmax=true, but"),
]
IMPLIED = {"layernorm_epsilon": "layernorm_epsilon=1e-06 (rms_norm_eps)", "rotary_percent": "rotary_percent=1.0",
           "normalization": 'normalization="RMSNorm"', "gated_linear_unit": "gated_linear_unit=true",
           "moe_router_topk": "moe_router_topk=2 (num_experts_per_tok)",
           "moe_router_score_function": 'moe_router_score_function="softmax"',
           "moe_router_pre_softmax": "moe_router_pre_softmax=false (norm_topk_prob=true)"}


@pytest.mark.parametrize("case,overrides", [("llama_tp2pp2", DENSE_OVERRIDES), ("qwen3_moe_ep2", MOE_OVERRIDES)])
def test_transformer_config_that_computes_something_else_is_refused(megatron_ckpts, tmp_path, capsys, case,
                                                                    overrides):
    """Each field edited in a copy's transformer_config.json (what verl's override_transformer_config saves):
    exit 2, one line naming the field and both values; the untouched copy still exports."""
    actor, base = _copy_actor(megatron_ckpts, tmp_path, case)
    tc = actor / "transformer_config.json"
    clean = json.loads(tc.read_text())
    for i, (field, value, says) in enumerate(overrides):
        tc.write_text(json.dumps({**clean, field: value}, indent=2))
        line = assert_fails(capsys, ["to-hf", str(actor), "--out", str(tmp_path / f"o{i}"), "--config", str(base)],
                            says=says, sources=(actor,))
        assert "transformer_config.json" in line
        if field in IMPLIED:
            assert IMPLIED[field] in line, line
    tc.write_text(json.dumps(clean, indent=2))
    assert cli(["to-hf", str(actor), "--out", str(tmp_path / "ok"), "--config", str(base), "--quiet"]) == 0


def test_inspect_sees_the_transformer_config_to_hf_refuses(megatron_ckpts, tmp_path, capsys):
    """A bridge save carries its config.json: inspect runs the same check (it said "problems none")."""
    actor, _ = _copy_actor(megatron_ckpts, tmp_path, "llama_bridge_tp2pp2")
    tc = actor / "transformer_config.json"
    tc.write_text(json.dumps({**json.loads(tc.read_text()), "layernorm_zero_centered_gamma": True}))
    refused = assert_fails(capsys, ["to-hf", str(actor), "--out", str(tmp_path / "o")],
                           says="layernorm_zero_centered_gamma=true", sources=(actor,))
    capsys.readouterr()
    assert cli(["inspect", str(actor)]) == 2
    assert refused.split("error: ", 1)[1] in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------- D10

def test_inspect_reports_the_missing_rng_rank_to_hf_refuses(megatron_ckpts, tmp_path, capsys):
    """One (pp, tp) rng entry taken out of the extra dist_ckpt's .metadata: to-hf refused it, inspect said
    "problems none" and exit 0; now both say the same line."""
    from ckpt_bridge.safeload import load_dcp_metadata

    actor, base = _copy_actor(megatron_ckpts, tmp_path, "llama_tp2pp2")
    meta = actor / "extra" / "dist_ckpt" / ".metadata"
    md = load_dcp_metadata(meta)
    key = "rng_state/shard_1.0_2.2"
    assert key in md.state_dict_metadata
    del md.state_dict_metadata[key]
    md.storage_data = {i: v for i, v in md.storage_data.items() if i.fqn != key}
    meta.write_bytes(pickle.dumps(md))
    says = "no rng_state for pp rank 1, tp rank 0 (of PP=2, TP=2)"
    refused = assert_fails(capsys, ["to-hf", str(actor), "--out", str(tmp_path / "o"), "--config", str(base)],
                           says=says, sources=(actor,))
    capsys.readouterr()
    assert cli(["inspect", str(actor)]) == 2
    report = capsys.readouterr().out
    assert "problems    1" in report and says in report
    assert refused.split("error: ", 1)[1] in report  # the same check, the same words


# ----------------------------------------------------------------------------------------------- minor

def test_expert_parallel_share_is_named_as_such(tiny_hf_factory, tmp_path, capsys):
    """An HF-named save holding experts 0-1 of a 4-expert Qwen3-MoE (one EP rank's local experts): the line
    names expert parallelism (it said "this config describes another model")."""
    src = tiny_hf_factory("qwen3_moe")
    d = tmp_path / "ep_share"
    shutil.copytree(src, d)
    tensors = {}
    for f in sorted(d.glob("*.safetensors")):
        tensors.update(load_file(f))
        f.unlink()
    for f in d.glob("*.safetensors.index.json"):
        f.unlink()
    kept = {k: v for k, v in tensors.items() if not any(f".experts.{e}." in k for e in (2, 3))}
    assert len(kept) < len(tensors)
    save_file(kept, d / "model.safetensors", metadata={"format": "pt"})
    line = assert_fails(capsys, ["to-hf", str(d), "--out", str(tmp_path / "o")], says="expert parallelism",
                        sources=(d,))
    assert "experts = 4, but the checkpoint holds 2 experts" in line and "another model" not in line
