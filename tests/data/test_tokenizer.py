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


TOJSON_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}|{{ m | tojson }}|"
                   "{{ {'b': 1, 'a': 'é<'} | tojson(indent=2) }}\n{% endfor %}"
                   "{% if add_generation_prompt %}assistant:{% endif %}")


def test_export_is_complete_and_transformers_reads_it(tmp_path, make_documents):
    from transformers import AutoTokenizer

    tok = Tokenizer.train_bpe(make_documents(50), 300, special_tokens=("<|endoftext|>", "<s>", "<pad>"))
    tok.bos_id, tok.pad_id, tok.chat_template = 1, 2, TOJSON_TEMPLATE
    tok.save(tmp_path, model_max_length=256)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 256 and "chat_template" not in config
    assert (tmp_path / "chat_template.jinja").read_text() == TOJSON_TEMPLATE  # as transformers 5 writes it
    ours = Tokenizer.from_path(tmp_path)
    assert (ours.eos_id, ours.bos_id, ours.pad_id, ours.model_max_length) == (0, 1, 2, 256)
    assert ours.chat_template == TOJSON_TEMPLATE
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id, hf.model_max_length) == (0, 1, 2, 256)
    assert hf.chat_template == TOJSON_TEMPLATE
    assert hf(HARD_TEXT, add_special_tokens=False)["input_ids"] == ours.encode(HARD_TEXT)


def test_chat_templates_render_as_transformers_renders_them(tmp_path, make_documents):
    from transformers import AutoTokenizer

    from batchpilot.data.chat_template import chat_template_of, render_chat

    tok = Tokenizer.train_bpe(make_documents(50), 300, special_tokens=("<|endoftext|>", "<s>"))
    tok.bos_id = 1
    date = "{{ bos_token }}{{ strftime_now('%Y') }}{% for m in messages %}{% if m['role'] == 'bad' %}" \
           "{{ raise_exception('no bad roles') }}{% endif %}{% if loop.index > 2 %}{% break %}{% endif %}" \
           "[{{ m['content'] | tojson }}]{% endfor %}"
    messages = [{"role": "user", "content": "héllo \"q\" <tag> & 🙂"}, {"role": "assistant", "content": "a\nb"},
                {"role": "user", "content": "third"}]
    for template in (TOJSON_TEMPLATE, date):
        tok.chat_template = template
        tok.save(tmp_path)
        hf = AutoTokenizer.from_pretrained(tmp_path)
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ours, special = chat_template_of(tmp_path)
        assert render_chat(messages, ours, special) == want
    with pytest.raises(ValueError, match="no bad roles"):
        render_chat([{"role": "bad", "content": ""}], date, {"bos_token": "<s>"})


def test_template_time_and_size_limits():
    from batchpilot.data.chat_template import RenderLimits, render_chat

    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(ValueError, match="took longer than"):
        render_chat(msgs, "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}", {},
                    limits=RenderLimits(max_seconds=0.2))
    with pytest.raises(ValueError, match="exceeds 1000 characters"):
        render_chat(msgs, "{% for a in range(99999) %}xxxxxxxxxx{% endfor %}", {}, limits=RenderLimits(max_chars=1000))
    import threading

    errors = []  # off the main thread (no SIGALRM there) the limit holds too

    def worker():
        try:
            render_chat(msgs, "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}", {},
                        limits=RenderLimits(max_seconds=0.2))
        except ValueError as e:
            errors.append(str(e))

    t = threading.Thread(target=worker)
    t.start()
    t.join(30)
    assert errors and "took longer than" in errors[0]


def test_garbage_tokenizer_is_a_one_line_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_path(tmp_path)
