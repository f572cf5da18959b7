"""The tiny trained OLMo-2 test model: byte tokenizer, real training, exact reload, determinism."""

from __future__ import annotations

import json
import math
from importlib import resources

import pytest
import torch
from safetensors.torch import load_file

from ckpt_bridge.testing import tiny_olmo2 as T


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Default-step training once per module: (model, tokenizer, info, out_dir)."""
    out = tmp_path_factory.mktemp("tiny_olmo2")
    model, tok, info = T.train_model()
    T.save_trained(model, tok, info, out)
    return model, tok, info, out


def test_corpus_is_shipped_ascii_prose():
    text = T.corpus_text()
    assert 12_000 <= len(text) <= 20_000
    assert text.isascii()
    # Found as package data, not only through the source tree.
    assert resources.files("ckpt_bridge.testing").joinpath("data/corpus.txt").read_text("ascii") == text


def test_byte_tokenizer_ids_are_bytes_and_round_trip():
    tok = T.build_byte_tokenizer()
    assert tok("Hi")["input_ids"] == list(b"Hi")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert len(tok) == 259
    assert tok.convert_tokens_to_ids(["<s>", "</s>", "<pad>"]) == [256, 257, 258]
    every_ascii = "".join(map(chr, range(128)))
    assert tok(every_ascii)["input_ids"] == list(range(128))
    for text in (T.corpus_text(), "  leading spaces, tabs\tand\nnewlines , . ' s ", every_ascii):
        assert tok.decode(tok(text)["input_ids"]) == text
    # Non-ASCII still maps byte by byte.
    assert tok("caf\u00e9")["input_ids"] == list("caf\u00e9".encode())
    assert tok.decode([256, *b"ok", 257], skip_special_tokens=True) == "ok"


def test_config_has_olmo2_release_values():
    cfg = T.olmo2_config()
    assert type(cfg).__name__ == "Olmo2Config"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
            cfg.num_attention_heads, cfg.max_position_embeddings) == (259, 64, 171, 2, 4, 256)
    assert cfg.rope_parameters["rope_theta"] == 500000.0
    assert cfg.rms_norm_eps == 1e-6
    assert cfg.tie_word_embeddings is False
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (256, 257, 258)
    assert cfg.architectures == ["Olmo2ForCausalLM"]


def test_training_lowers_loss_far_below_chance(trained):
    model, tok, info, out = trained
    assert info["steps"] == 300 and info["seed"] == 0
    assert abs(info["initial_loss"] - math.log(259)) < 0.3  # a fresh init is at chance
    assert info["final_loss"] < 0.6 * info["initial_loss"]
    assert info["final_loss"] < 2.8
    assert json.loads((out / "training.json").read_text()) == info
    # The text_loss default window is longer than the training windows: still far below chance.
    assert T.text_loss(model, tok, T.corpus_text()) < 0.6 * math.log(259)


def test_reload_gives_exactly_the_same_text_loss(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, _, out = trained
    assert (out / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    tok2 = AutoTokenizer.from_pretrained(out)
    assert type(reloaded).__name__ == "Olmo2ForCausalLM"
    assert all(p.dtype == torch.float32 for p in reloaded.parameters())
    text = T.corpus_text()
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    a = T.text_loss(model, tok, text)
    assert T.text_loss(reloaded, tok2, text) == a
    assert T.text_loss(model, tok, text) == a  # repeatable, and it left no state behind
    # Other window lengths and a non-corpus text agree exactly too.
    other = "A checkpoint is a note that lets a conversation pick up where it left off."
    for kw in ({"seq_len": 64}, {"seq_len": 17, "max_tokens": 500}):
        assert T.text_loss(reloaded, tok2, other, **kw) == T.text_loss(model, tok, other, **kw)


def test_text_loss_notices_scrambled_weights(trained):
    model, tok, _, out = trained
    from transformers import AutoModelForCausalLM

    text = T.corpus_text()
    good = T.text_loss(model, tok, text)
    broken = AutoModelForCausalLM.from_pretrained(out)
    broken.model.layers[0], broken.model.layers[1] = broken.model.layers[1], broken.model.layers[0]
    assert T.text_loss(broken, tok, text) > good + 1.0


def test_text_loss_weights_every_predicted_token_equally(trained):
    model, tok, _, _ = trained
    text = T.corpus_text()[:300]
    ids = torch.tensor(tok(text)["input_ids"])
    with torch.no_grad():
        w1, w2 = ids[:200], ids[200:]
        l1 = model(input_ids=w1[None], labels=w1[None]).loss.double()
        l2 = model(input_ids=w2[None], labels=w2[None]).loss.double()
    expected = (l1 * 199 + l2 * 99) / 298
    assert T.text_loss(model, tok, text, seq_len=200) == pytest.approx(expected.item(), rel=1e-6)


def test_same_seed_gives_bit_identical_weights(tmp_path):
    rng_before = torch.random.get_rng_state()
    threads_before = torch.get_num_threads()
    a = T.train_tiny_olmo2(tmp_path / "a", steps=5, seed=3)
    b = T.train_tiny_olmo2(tmp_path / "b", steps=5, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG stream is untouched
    assert torch.get_num_threads() == threads_before
    assert a["final_loss"] == b["final_loss"] and a["initial_loss"] == b["initial_loss"]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # A different seed is a different model.
    T.train_tiny_olmo2(tmp_path / "c", steps=1, seed=4)
    wc = load_file(tmp_path / "c" / "model.safetensors")
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])


def test_cli(tmp_path, capsys):
    assert T.main(["--out", str(tmp_path / "m"), "--steps", "2", "--seed", "1"]) == 0
    assert "final loss" in capsys.readouterr().out
    info = json.loads((tmp_path / "m" / "training.json").read_text())
    assert info["steps"] == 2 and info["seed"] == 1
