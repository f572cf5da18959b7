"""verl's Megatron-FSDP save (``use_megatron_fsdp``: one combined ``fsdp_dtensor`` DCP in ``model/dist_ckpt``) -> HF.

The checkpoint is the ``llama_mfsdp`` case of the session's one Megatron torchrun job
(``ckpt_bridge.testing.megatron_save``, 4 gloo ranks): megatron-core 0.16.1's ``GPTModel`` at TP 2 loaded from the HF
model with that module's own mapping, wrapped in megatron-core's own ``FullyShardedDataParallel`` (Megatron-FSDP,
DP 2 x TP 2, ``optim_grads_params``; CPU stand-ins for its CUDA device / stream / rng calls) with megatron-core's
distributed optimizer and an lr scheduler built by verl's own helpers, saved by verl 0.9.1's own
``MegatronCheckpointManager(use_megatron_fsdp=True)``.  verl imports the writer from Megatron-Bridge, which is not
installed: ``megatron_save.save_fsdp_dtensor_checkpoint`` re-states Megatron-Bridge's ``save_fsdp_dtensor_checkpoint``
/ ``preprocess_fsdp_dtensor_state_dict`` (NVIDIA-NeMo/Megatron-Bridge 067f987, src/megatron/bridge/training/
checkpointing.py) around megatron-core's own handlers (``handle_fp8_extra_state_case``, ``handle_swiglu_in_state_dict``,
``handle_experts_in_state_dict``, ``preprocess_state_dict_for_uneven_dtensor``) and ``dcp.save``.  The oracle is the
HF model's ``save_pretrained`` (``base_model/``).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from ckpt_bridge.commands.to_hf import to_hf
from ckpt_bridge.compare import bits_equal
from test_failure_table import assert_fails  # tests/ is on sys.path (rootdir conftest)

CASE = "llama_mfsdp"


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_equals_reference(out: Path, root: Path) -> None:
    got, want = _weights(out), _weights(root / "base_model")
    assert sorted(got) == sorted(want)
    assert not [k for k in want if not bits_equal(got[k], want[k])]


@pytest.fixture(scope="module")
def root(megatron_ckpts) -> Path:
    return megatron_ckpts[CASE]


def test_the_save_is_verls_megatron_fsdp_layout(root):
    """What the issue describes, on the real save: one plain DCP in model/dist_ckpt (no megatron metadata.json)
    holding model, optimizer, lr_scheduler and rng,
    with the model under the wrapper's ``module.`` names at their global (TP-gathered) shapes, SwiGLU halves and
    one rng per (pp, tp) rank; the manifest's extra/ and
    optimizer/ dist_ckpt folders hold nothing."""
    from ckpt_bridge.safeload import load_dcp_metadata

    actor = root / "global_step_1" / "actor"
    d = actor / "model" / "dist_ckpt"
    assert (d / ".metadata").is_file() and not (d / "metadata.json").exists()
    keys = set(load_dcp_metadata(d / ".metadata").state_dict_metadata)
    meta = load_dcp_metadata(d / ".metadata").state_dict_metadata
    assert tuple(meta["model.module.decoder.layers.0.mlp.linear_fc1.weight_w"].size) == (96, 64)  # gate, TP-gathered
    assert tuple(meta["model.module.decoder.layers.0.self_attention.linear_proj.weight"].size) == (64, 64)
    assert any(k.startswith("rng_state.(0, 1).") for k in keys)
    assert any(k.startswith("optimizer.") for k in keys) and "lr_scheduler.num_steps" in keys
    contents = json.loads((actor / "ckpt_contents.json").read_text())["contents"]
    assert contents["rng_state"]["path"] == "extra/dist_ckpt" and contents["optimizer"]["path"] == "optimizer/dist_ckpt"
    assert not any((actor / "extra" / "dist_ckpt").iterdir()) and not any((actor / "optimizer" / "dist_ckpt").iterdir())


def test_export_is_bit_exact_with_the_rng(root, tmp_path):
    """to-hf --dtype keep: the file bytes of save_pretrained; from_pretrained loads it with no missing /
    unexpected keys; the rng of each (pp, tp) rank lands in extra_state_merged.pt.  verl keys the Megatron-FSDP
    rng by (pp, tp) only, so both data-parallel ranks of a tp rank write the same DCP entries and DCP's de-duplication keeps one
    writer per entry: each field equals that field of one rank's live state (not necessarily the same rank)."""
    import transformers

    out = tmp_path / "hf"
    s = to_hf(root / "global_step_1", out, dtype="keep", config=root / "base_model", progress=False)
    assert s.source_format == "verl-megatron"
    _assert_equals_reference(out, root)
    for f in (root / "base_model").glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    model, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    extra = torch.load(out / "extra_state_merged.pt", weights_only=False)
    assert sorted(extra["rng"]) == ["pp0_tp0", "pp0_tp1"] and extra["global_step"] == 1 and extra["world_size"] == 4
    refs = [torch.load(f, weights_only=False) for f in sorted((root / "reference").glob("rank*_rng.pt"))]
    for tp in (0, 1):
        got = extra["rng"][f"pp0_tp{tp}"]
        mine = [r for r in refs if r["tp"] == tp]
        assert len(mine) == 2  # DP 2
        assert any(torch.equal(got["torch_rng_state"], r["torch"]) for r in mine)
        assert any(got["random_rng_state"] == r["random"] for r in mine)
        assert any(all(bits_equal(torch.as_tensor(a), torch.as_tensor(b)) if hasattr(a, "shape") else a == b
                       for a, b in zip(got["np_rng_state"], r["numpy"])) for r in mine)
    # the real Megatron optimizer's scheduler (verl's helpers, stepped 3 times), from the same DCP
    assert extra["lr_scheduler"] == torch.load(root / "reference" / "lr_scheduler.pt", weights_only=False)
    assert json.loads((out / "lr_scheduler_state.json").read_text())["lr_scheduler"]["num_steps"] == 3


def test_inspect_names_the_engine(root):
    from ckpt_bridge.checks.inspect import inspect

    r = inspect(root / "global_step_1")
    text = json.dumps(r, default=str)
    assert r["format"] == "verl-megatron" and not r["problems"], r["problems"]
    assert "Megatron-FSDP" in text and "fsdp_dtensor" in text


def test_verify_against_the_hf_dir(root, tmp_path):
    """verify: equal to the reference HF dir (exit 0); one element changed in the HF dir is found (exit 1)."""
    from safetensors.torch import load_file, save_file

    from ckpt_bridge.cli import main

    actor = root / "global_step_1" / "actor"
    assert main(["verify", str(actor), str(root / "base_model")]) == 0
    other = tmp_path / "other"
    shutil.copytree(root / "base_model", other)
    f = next(other.glob("*.safetensors"))
    w = load_file(f)
    key = "model.layers.2.mlp.up_proj.weight"  # from linear_fc1.weight_v
    w[key] = w[key].clone()
    w[key][3, 5] += 1e-3
    save_file(w, f, metadata={"format": "pt"})
    assert main(["verify", str(actor), str(other)]) == 1


def test_missing_distcp_exit_2_one_line_no_output(root, tmp_path, capsys):
    dst = tmp_path / "ckpt"
    shutil.copytree(root / "global_step_1", dst / "global_step_1")
    actor = dst / "global_step_1" / "actor"
    (actor / "model" / "dist_ckpt" / "__1_0.distcp").unlink()
    assert_fails(capsys, ["to-hf", str(actor), "--out", str(tmp_path / "o"), "--config", str(root / "base_model")],
                 says="__1_0.distcp", sources=(actor,))


def _run_without_manifest(root: Path, tmp_path: Path) -> tuple[Path, Path, bytes]:
    run = tmp_path / "run"
    shutil.copytree(root / "global_step_1", run / "global_step_1")
    (run / "latest_checkpointed_iteration.txt").write_text("1")
    actor = run / "global_step_1" / "actor"
    manifest = (actor / "ckpt_contents.json").read_bytes()
    (actor / "ckpt_contents.json").unlink()
    # verl writes the HF config beside the save only with a bridge; the export here takes the model's
    shutil.copytree(root / "base_model", actor / "model" / "huggingface", dirs_exist_ok=True)
    return run, actor, manifest


def test_watch_and_the_verl_callback_export_a_completed_save(root, tmp_path):
    """The completion marker is the same as for verl's other Megatron saves (ckpt_contents.json, rank 0, last):
    watch waits without it and exports once it appears; the callback's async path the same."""
    from ckpt_bridge.commands.watch import watch
    from ckpt_bridge.integrations.verl import HFExportCallback

    run, actor, manifest = _run_without_manifest(root, tmp_path)
    (ev,) = watch(run, once=True, settle=0.0)
    assert ev.status == "waiting" and "ckpt_contents.json" in ev.message, ev
    (actor / "ckpt_contents.json").write_bytes(manifest)
    (ev,) = watch(run, once=True, settle=0.0)
    assert ev.status == "exported", ev
    _assert_equals_reference(run / "global_step_1" / "actor_hf", root)

    run2, actor2, manifest2 = _run_without_manifest(root, tmp_path / "two")
    cb = HFExportCallback(roles=("actor",))
    cb.on_save(None, 1, str(run2 / "global_step_1"), async_save=True)
    assert cb.pending and not cb.running
    (actor2 / "ckpt_contents.json").write_bytes(manifest2)
    (outcome,) = cb.wait(timeout=30, poll=0.1)
    assert outcome["ok"], outcome
    _assert_equals_reference(run2 / "global_step_1" / "actor_hf", root)


def test_an_mtp_layer_is_refused_saying_why():
    """Megatron MTP layers (``mtp.layers.*``) stay refused: the one-line error names the key and the reason (no
    transformers class of those families holds MTP weights, so no export can be checked against one)."""
    from ckpt_bridge.errors import KeyPlanError
    from ckpt_bridge.formats.base import TensorInfo
    from ckpt_bridge.plan.megatron import megatron_to_hf_names

    hf = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64}
    key = "mtp.layers.0.enorm.weight"
    with pytest.raises(KeyPlanError, match=r"'mtp\.layers\.0\.enorm\.weight' is a multi-token-prediction") as e:
        megatron_to_hf_names({key: TensorInfo(key, (64,), torch.float32)}, hf, "ckpt")
    assert "\n" not in str(e.value)


def test_a_save_of_two_pipeline_stages_is_refused(root, tmp_path, capsys):
    """Each PP stage's Megatron-FSDP state dict numbers its layers from 0, so stages may share DCP keys (DCP keeps
    one writer per key): never a silent merge.  The real save's manifest, with its model DCP replaced by one of the
    same key structure whose rng_state names pp ranks 0 and 1 (no PP > 1 Megatron-FSDP save is made here): exit 2,
    one line naming the stages, nothing written."""
    import torch.distributed.checkpoint as dcp

    dst = tmp_path / "ckpt"
    shutil.copytree(root / "global_step_1", dst / "global_step_1")
    actor = dst / "global_step_1" / "actor"
    model_dir = actor / "model" / "dist_ckpt"
    shutil.rmtree(model_dir)
    rng = {"torch_rng_state": torch.get_rng_state()}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore")
        dcp.save({"model": {"module.decoder.final_layernorm.weight": torch.ones(64)},
                  "rng_state": {"(0, 0)": [rng], "(1, 0)": [rng]}},
                 storage_writer=dcp.FileSystemWriter(str(model_dir)), no_dist=True)
    assert_fails(capsys, ["to-hf", str(actor), "--out", str(tmp_path / "o"), "--config", str(root / "base_model")],
                 says="pipeline stages", sources=(actor,))
