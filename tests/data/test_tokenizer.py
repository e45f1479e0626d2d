"""Tokenizer: exact byte-level round trip; HF-directory loading resolves EOS/BOS/chat template."""

import json

import pytest

from batchpilot.data.tokenizer import Tokenizer

HARD_TEXT = "Héllo  wörld\n\t日本語 🙂 <|endoftext|> trailing space "


def test_round_trip_is_exact(small_tokenizer: Tokenizer, make_documents):
    for text in [HARD_TEXT, "", " leading", "\n\n", *make_documents(5, seed=1)]:
        assert small_tokenizer.decode(small_tokenizer.encode(text)) == text
    assert small_tokenizer.vocab_size == 300
    assert small_tokenizer.eos_id == 0 and small_tokenizer.bos_id is None
    assert small_tokenizer.encode_batch(["a b", "c"]) == [small_tokenizer.encode("a b"), small_tokenizer.encode("c")]


def test_vocab_too_small_is_rejected():
    with pytest.raises(ValueError, match="vocab_size 100"):
        Tokenizer.train_bpe(["abc"], 100)


def test_save_then_load_directory(small_tokenizer: Tokenizer, tmp_path):
    small_tokenizer.save(tmp_path)
    loaded = Tokenizer.from_path(tmp_path)
    assert loaded.encode(HARD_TEXT) == small_tokenizer.encode(HARD_TEXT)
    assert (loaded.eos_id, loaded.vocab_size) == (small_tokenizer.eos_id, small_tokenizer.vocab_size)
    assert Tokenizer.from_path(tmp_path / "tokenizer.json").eos_id == small_tokenizer.eos_id
    small_tokenizer.save(tmp_path / "model" / "tokenizer.json")  # a file path works too
    assert Tokenizer.from_path(tmp_path / "model").encode(HARD_TEXT) == small_tokenizer.encode(HARD_TEXT)
    assert (tmp_path / "model" / "tokenizer_config.json").is_file()


def test_hf_directory_special_tokens_and_chat_template(tmp_path, make_documents):
    tok = Tokenizer.train_bpe(make_documents(50), 300, special_tokens=("<|endoftext|>", "<s>", "</s>"))
    tok.inner.save(str(tmp_path / "tokenizer.json"))
    # Without configs: EOS by well-known name (<|endoftext|> first), BOS by name.
    plain = Tokenizer.from_path(tmp_path)
    assert (plain.eos_id, plain.bos_id, plain.chat_template) == (0, 1, None)
    # tokenizer_config.json (AddedToken dict form) wins over the names.
    config = {"eos_token": {"content": "</s>"}, "bos_token": "<s>", "chat_template": "{{ messages }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = Tokenizer.from_path(tmp_path)
    assert (hf.eos_id, hf.bos_id, hf.chat_template) == (2, 1, "{{ messages }}")
    # config.json ids (a list, as in Llama 3.1) are used when tokenizer_config.json says nothing.
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [2, 0], "bos_token_id": 1}))
    assert Tokenizer.from_path(tmp_path).eos_id == 2


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_path(tmp_path)
