"""The tiny-model factory: byte tokenizer contract, HF save/load round trip, seeded init."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.tiny import build_tokenizer, main, save_tiny_model

TINY = dict(hidden_size=32, num_layers=2, num_heads=2)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "digit 7:",
        "12+7=19",
        "  two  spaces\tand\ttabs\n\nnewlines ",
        "héllo wörld",
        "日本語",
        "🙂👍🏽",
        "e\u0301",
    ],
)
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))  # one id per UTF-8 byte, no merges
    assert tokenizer.decode(ids) == text


def test_each_digit_is_one_token(tokenizer):
    for d in "0123456789":
        assert tokenizer.encode(d) == [ord(d)]
    assert len(tokenizer.encode("9876543210")) == 10


def test_special_tokens_and_no_automatic_bos(tokenizer):
    assert len(tokenizer) == 259
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|pad|>", 256)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|eos|>", 257)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|bos|>", 258)
    assert tokenizer("ab")["input_ids"] == [97, 98]
    assert tokenizer.decode([97, 257], skip_special_tokens=True) == "a"


def test_tokenizer_survives_save_and_auto_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "numbers 3 5 7 target 22: ünïcode"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (256, 257, 258)
    assert len(loaded) == 259


@pytest.mark.parametrize("arch, cls_name", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_model_directory_loads_with_auto_classes(tmp_path, arch, cls_name):
    path = save_tiny_model(tmp_path / arch, arch=arch, **TINY)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == cls_name
    assert model.dtype == torch.float32
    cfg = model.config
    assert cfg.vocab_size == len(tok) == 259  # no stray added token past the embedding table
    assert cfg.tie_word_embeddings is False
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (256, 257, 258)
    ids = torch.tensor([tok.encode("digit 3:")])
    assert model(ids).logits.shape == (1, ids.shape[1], 259)
    assert tok.decode(tok.encode("12+7= ok")) == "12+7= ok"


def test_same_seed_same_weights_other_seed_different(tmp_path):
    def weights(name, seed):
        path = save_tiny_model(tmp_path / name, seed=seed, **TINY)
        return AutoModelForCausalLM.from_pretrained(path).state_dict()

    a, b, c = weights("a", 0), weights("b", 0), weights("c", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_init_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    save_tiny_model(tmp_path / "m", seed=7, **TINY)
    assert torch.equal(torch.rand(3), expected)


def test_existing_directory_is_kept_unless_overwrite(tmp_path):
    path = save_tiny_model(tmp_path / "m", seed=0, **TINY)
    before = (path / "model.safetensors").read_bytes()
    assert save_tiny_model(path, seed=1, **TINY) == path
    assert (path / "model.safetensors").read_bytes() == before
    save_tiny_model(path, seed=1, overwrite=True, **TINY)
    assert (path / "model.safetensors").read_bytes() != before


def test_gqa_and_bad_shapes(tmp_path):
    path = save_tiny_model(tmp_path / "gqa", hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2)
    assert AutoModelForCausalLM.from_pretrained(path).config.num_key_value_heads == 2
    with pytest.raises(ValueError, match="divisible"):
        save_tiny_model(tmp_path / "bad", hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="arch"):
        save_tiny_model(tmp_path / "bad", arch="gpt2", **TINY)  # type: ignore[arg-type]


def test_cli_prints_the_path(tmp_path, capsys):
    out = tmp_path / "cli"
    main([str(out), "--arch", "qwen2", "--hidden", "32", "--layers", "1", "--heads", "2", "--seed", "3"])
    assert capsys.readouterr().out.strip() == str(out)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1
