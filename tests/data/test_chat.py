"""Chat data: which characters are assistant turns (any template), prepare --format chat, the tokenizer check,
and the loader's masked targets / per-conversation positions / whole-conversation rows."""

import json

import numpy as np
import pytest
import torch

from batchpilot.data.chat import LOSS, START, ChatConfig, conversation_of, encode_conversation, render_segments
from batchpilot.data.chat_template import chat_template_of
from batchpilot.data.packing import PackedLoader
from batchpilot.data.prepare import PrepareConfig, check_tokenizer_matches, load_meta, prepare
from batchpilot.data.tokenizer import Tokenizer
from tests.data.conftest import CHATML

LLAMA3_STYLE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CONVERSATION = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello."}, {"role": "user", "content": "more?"},
                {"role": "assistant", "content": "  yes  "}]


def test_chatml_segments_are_the_assistant_turns_and_their_closing_token():
    segments = render_segments(CONVERSATION, CHATML, {}, ["<|im_end|>"])
    assert [t for t, a in segments if a] == ["hello.<|im_end|>", "  yes  <|im_end|>"]
    text = "".join(t for t, _ in segments)
    assert text == ("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
                    "hello.<|im_end|>\n<|im_start|>user\nmore?<|im_end|>\n<|im_start|>assistant\n  yes  <|im_end|>")


def test_trimming_template_with_bos():
    segments = render_segments(CONVERSATION, LLAMA3_STYLE, {"bos_token": "<BOS>"}, ["<|eot_id|>"])
    assert segments[0][0].startswith("<BOS><|start_header_id|>system")
    assert [t for t, a in segments if a] == ["hello.<|eot_id|>", "yes<|eot_id|>"]
    assert segments[-2][0].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_template_that_rewrites_earlier_turns_is_refused():
    drops_old_answers = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                         "[{{ m['role'] }}]{{ m['content'] }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")
    with pytest.raises(ValueError, match="extension"):
        render_segments(CONVERSATION, drops_old_answers, {}, [])


def test_records_pairs_and_errors():
    cfg = ChatConfig(prompt_field="instruction", response_field="output")
    assert conversation_of({"instruction": "q", "output": "a"}, cfg) == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(ValueError, match="instruction"):
        conversation_of({"prompt": "q"}, cfg)
    with pytest.raises(ValueError, match="no assistant"):
        conversation_of({"messages": [{"role": "user", "content": "q"}]}, cfg)
    with pytest.raises(ValueError, match="loss_on"):
        ChatConfig(loss_on="user")


def test_encoded_flags(chat_model_dir):
    tokenizer = Tokenizer.from_path(chat_model_dir)
    template, special = chat_template_of(chat_model_dir)
    ids, flags = encode_conversation(CONVERSATION, tokenizer, template, special)
    assert flags[0] == START and not (flags[1:] & START).any()
    trained = tokenizer.decode(ids[(flags & LOSS) > 0].tolist())
    assert trained == "hello.<|im_end|>  yes  <|im_end|>"
    assert tokenizer.decode(ids.tolist()) == "".join(t for t, _ in render_segments(CONVERSATION, template, special,
                                                                                     ["<|im_end|>"]))
    _, all_flags = encode_conversation(CONVERSATION, tokenizer, template, special, loss_on="all")
    assert (all_flags[1:] == LOSS).all()


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, chat_model_dir, make_conversations):
    root = tmp_path_factory.mktemp("chat_data")
    records = make_conversations(40)
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = PrepareConfig(sources=[str(root / "chat.jsonl")], out_dir=str(root / "ds"), tokenizer=str(chat_model_dir),
                        format="chat", val_fraction=0.2, shard_tokens=300)  # several shards
    return prepare(cfg), records


def split_streams(data_dir, split):
    meta = load_meta(data_dir)
    tokens = np.concatenate([np.fromfile(data_dir / f, dtype=meta["dtype"]) for f in meta["shards"][split]])
    flags = np.concatenate([np.fromfile(data_dir / f, dtype=np.uint8) for f in meta["mask_shards"][split]])
    return tokens.astype(np.int64), flags


def test_prepare_chat_writes_aligned_flag_shards(chat_data, chat_model_dir):
    data_dir, records = chat_data
    meta = load_meta(data_dir)
    assert meta["format"] == "chat" and meta["loss_on"] == "assistant"
    assert sum(meta["documents"].values()) == len(records) and len(meta["shards"]["train"]) > 1
    tokenizer = Tokenizer.from_path(chat_model_dir)
    for split in ("train", "val"):
        tokens, flags = split_streams(data_dir, split)
        assert len(tokens) == len(flags) == meta["tokens"][split]
        assert int((flags & START).astype(bool).sum()) == meta["documents"][split]
        assert int((flags & LOSS).astype(bool).sum()) == meta["loss_tokens"][split]
    # every assistant message of every record is trained on, in order, and nothing else
    trained = set()
    for split in ("train", "val"):
        tokens, flags = split_streams(data_dir, split)
        trained |= set(tokenizer.decode(tokens[(flags & LOSS) > 0].tolist()).split("<|im_end|>"))
    answers = {m["content"] for r in records for m in r["messages"] if m["role"] == "assistant"}
    assert trained - {""} == answers
    assert Tokenizer.from_path(data_dir).chat_template == CHATML  # the model's template travels with the data


def test_tokenizer_mismatch_is_refused(chat_data, chat_model_dir, small_tokenizer):
    data_dir, _ = chat_data
    check_tokenizer_matches(data_dir, Tokenizer.from_path(chat_model_dir))
    with pytest.raises(ValueError, match="another tokenizer"):
        check_tokenizer_matches(data_dir, small_tokenizer)


def test_chat_needs_a_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer"):
        PrepareConfig(sources=["x.jsonl"], out_dir=str(tmp_path), format="chat")


def naive_rows(tokens, flags, seq_len):
    """Greedy whole-conversation rows, written the obvious way: (inputs, targets, positions) per row."""
    starts = list(np.flatnonzero(flags & START)) + [len(tokens)]
    convs = [(starts[i], starts[i + 1]) for i in range(len(starts) - 1)]
    rows, current = [], []
    for a, b in convs:
        if current and sum(e - s for s, e in current) + (b - a) <= seq_len:
            current.append((a, b))
        else:
            if current:
                rows.append(current)
            current = [(a, min(b, a + seq_len))]
    rows.append(current)
    out = []
    for row in rows:
        inputs, targets, positions = [], [], []
        for a, b in row:
            for i in range(a, b):
                inputs.append(int(tokens[i]))
                positions.append(i - a)
                nxt = i + 1
                targets.append(int(tokens[nxt]) if nxt < len(tokens) and flags[nxt] & LOSS else -100)
        pad = seq_len - len(inputs)
        out.append((inputs + [-1] * pad, targets + [-100] * pad, positions + list(range(pad))))
    return out


def test_conversation_rows_match_a_naive_packer(chat_data):
    data_dir, _ = chat_data
    tokens, flags = split_streams(data_dir, "train")
    loader = PackedLoader(data_dir, "train", 48, pack="conversation")
    expected = naive_rows(tokens, flags, 48)
    assert loader.num_rows == len(expected)
    batch = next(loader.eval_batches(loader.num_rows))
    for b, (inputs, targets, positions) in enumerate(expected):
        real = [i for i, x in enumerate(inputs) if x != -1]
        assert batch.input_ids[b, real].tolist() == [inputs[i] for i in real]
        assert batch.targets[b].tolist() == targets
        assert batch.position_ids[b].tolist() == positions


def test_chunked_chat_rows_mask_targets_and_restart_positions(chat_data):
    data_dir, _ = chat_data
    tokens, flags = split_streams(data_dir, "train")
    loader = PackedLoader(data_dir, "train", 32)
    batch = loader.take(4)
    assert loader.state_dict() == {"epoch": 0, "position": 4, "seed": 0, "seq_len": 32}
    rows = np.random.default_rng((0, 0)).permutation(loader.num_rows)[:4]
    for b, r in enumerate(rows):
        window = slice(r * 32, r * 32 + 33)
        t, f = tokens[window], flags[window]
        assert batch.input_ids[b].tolist() == t[:-1].tolist()
        assert batch.targets[b].tolist() == [int(x) if m & LOSS else -100 for x, m in zip(t[1:], f[1:])]
        starts = [i == 0 or bool(f[i] & START) for i in range(32)]
        assert [p == 0 for p in batch.position_ids[b].tolist()] == starts


def test_conversation_pack_state_round_trip(chat_data):
    data_dir, _ = chat_data
    loader = PackedLoader(data_dir, "train", 48, pack="conversation", seed=2)
    loader.take(3)
    resumed = PackedLoader(data_dir, "train", 48, pack="conversation", seed=2)
    resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    assert torch.equal(loader.take(2).input_ids, resumed.take(2).input_ids)
    with pytest.raises(ValueError, match="pack"):
        PackedLoader(data_dir, "train", 48, seed=2).load_state_dict(loader.state_dict())


def test_compiled_templates_are_cached_and_faults_still_raise():
    from batchpilot.data.chat_template import compiled_template, render_chat

    messages = [{"role": "user", "content": "hi"}]
    assert compiled_template(CHATML) is compiled_template(CHATML)
    assert render_chat(messages, CHATML, {}) == render_chat(messages, CHATML, {}) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    for _ in range(2):  # a template that does not compile is never cached as compiled
        with pytest.raises(ValueError, match="chat template"):
            render_chat(messages, "{% for %}", {})
