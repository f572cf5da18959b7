"""Every processor file travels with an export, folders included; weights and trainer files do not.
The export's config.json is read the same by transformers 4.x (rope_theta / rope_scaling) and 5.x."""

from __future__ import annotations

import json
import shutil

from ckpt_bridge import to_dcp, to_hf


def test_processor_files_and_folders_travel(tiny_hf_factory, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_hf_factory("llama"), src)
    side = {
        "video_preprocessor_config.json": '{"fps": 2}\n',
        "processor_config.json": '{"processor_class": "X"}\n',
        "preprocessor_config.json": '{"size": 14}\n',
        "chat_template.jinja": "{{ messages }}\n",
        "additional_chat_templates/tool_use.jinja": "{{ tools }}\n",
        "README.md": "# model card\n",
    }
    for name, text in side.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    (src / "original").mkdir()
    (src / "original" / "consolidated.00.pth").write_bytes(b"weights")  # a checkpoint folder, not a processor
    (src / "training_args.bin").write_bytes(b"pickle")
    to_dcp(src, tmp_path / "dcp")
    summary = to_hf(tmp_path / "dcp", tmp_path / "out", config=src, progress=False)
    out = tmp_path / "out"
    for name, text in side.items():
        assert (out / name).read_text() == text, name
    assert "additional_chat_templates" in summary.files
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert not (out / "original").exists() and not (out / "training_args.bin").exists()


def test_config_has_rope_for_both_majors(tiny_hf_factory, tmp_path):
    src = tiny_hf_factory("olmo2")
    to_dcp(src, tmp_path / "dcp")
    to_hf(tmp_path / "dcp", tmp_path / "out", config=src, progress=False)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}  # what 5.x reads
    assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"] is None  # what 4.x reads


def test_legacy_rope_fields_of_scaled_and_nested_rope():
    from ckpt_bridge.models.hf import with_legacy_fields as with_legacy_rope

    llama3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "original_max_position_embeddings": 32}
    got = with_legacy_rope({"rope_parameters": llama3, "text_config": {"rope_parameters": dict(llama3)}})
    for c in (got, got["text_config"]):
        assert c["rope_theta"] == 5e5
        assert c["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32}
    gemma3 = {"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    got = with_legacy_rope({"rope_parameters": gemma3})
    assert got["rope_theta"] == 1e6 and got["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    legacy = {"rope_theta": 1e4, "rope_scaling": None, "rope_parameters": {"rope_theta": 1e4}}
    assert with_legacy_rope(legacy) == legacy  # what is there is left alone


def test_renamed_fields_and_per_layer_rope_written_for_4x():
    """Taken from the installed transformers' own config classes: Qwen3-MoE's attribute_map alias
    (num_experts -> num_local_experts) and the legacy key Gemma 3's rope reading maps to sliding layers."""
    from ckpt_bridge.models.hf import with_legacy_fields

    got = with_legacy_fields({"model_type": "qwen3_moe", "num_local_experts": 4})
    assert got["num_experts"] == 4 and got["num_local_experts"] == 4
    gemma3 = {"model_type": "gemma3_text", "rope_theta": None,
              "rope_scaling": {"full_attention": {"rope_type": "default"}, "rope_type": "default"},
              "rope_parameters": {"rope_theta": None, "rope_type": "default",
                                  "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    got = with_legacy_fields(gemma3)
    assert got["rope_theta"] == 1e6 and got["rope_local_base_freq"] == 1e4 and got["rope_scaling"] is None


def test_config_of_other_major_is_warned_about(tmp_path, caplog):
    """A config.json written by transformers 4 read here (5.x): fields this version does not take are named."""
    import logging

    from ckpt_bridge.models.hf import load_config

    cfg = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "transformers_version": "4.57.6",
           "vocab_size": 251, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "rope_theta": 1e6, "made_up_4x_only_field": 7}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="ckpt_bridge"):
        load_config(tmp_path)
    assert "made_up_4x_only_field" in caplog.text and "4.57.6" in caplog.text
    caplog.clear()
    cfg.pop("made_up_4x_only_field")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="ckpt_bridge"):
        load_config(tmp_path)
    assert caplog.text == ""
