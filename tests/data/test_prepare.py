"""prepare(): EOS-separated documents, a stable non-empty val split, dtype by vocab, atomic and idempotent."""

import json

import numpy as np
import pytest
import tokenizers

from batchpilot.data.prepare import PrepareConfig, load_meta, prepare
from batchpilot.data.tokenizer import Tokenizer


@pytest.fixture
def jsonl_source(tmp_path, make_documents):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(60)))
    return str(path)


def config(source, out, **overrides) -> PrepareConfig:
    return PrepareConfig(**{"sources": [source], "out_dir": str(out), "vocab_size": 300, "val_fraction": 0.1,
                            **overrides})


def read_split(out, split) -> np.ndarray:
    meta = load_meta(out)
    return np.concatenate([np.fromfile(out / f, dtype=meta["dtype"]) for f in meta["shards"][split]])


def split_documents(out, split) -> list[str]:
    tok, ids = Tokenizer.from_path(out), read_split(out, split)
    assert ids[-1] == tok.eos_id
    ends = np.flatnonzero(ids == tok.eos_id)
    return [tok.decode(doc[:-1].tolist()) for doc in np.split(ids, ends + 1)[:-1]]  # drop each doc's EOS


def test_documents_are_eos_separated_and_split(jsonl_source, tmp_path, make_documents):
    out = prepare(config(jsonl_source, tmp_path / "ds"))
    meta = load_meta(out)
    train, val = split_documents(out, "train"), split_documents(out, "val")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300
    assert val and sorted(train + val) == sorted(make_documents(60))
    assert [d for d in make_documents(60) if d in val] == val  # stream order is kept
    assert meta["documents"] == {"train": len(train), "val": len(val)} and meta["num_documents"] == 60
    assert meta["tokens"] == {"train": len(read_split(out, "train")), "val": len(read_split(out, "val"))}


def test_split_is_deterministic_and_shards_roll_over(jsonl_source, tmp_path):
    one = prepare(config(jsonl_source, tmp_path / "one"))
    many = prepare(config(jsonl_source, tmp_path / "many", shard_tokens=100))
    assert len(load_meta(many)["shards"]["train"]) > 1
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_split(one, split), read_split(many, split))
    other_seed = prepare(config(jsonl_source, tmp_path / "seed1", seed=1))
    assert split_documents(other_seed, "val") != split_documents(one, "val")


def test_two_documents_give_a_non_empty_val_split(tmp_path):
    (tmp_path / "a.txt").write_text("first document " * 20)
    (tmp_path / "b.txt").write_text("second document " * 20)
    out = prepare(config(str(tmp_path), tmp_path / "ds", val_fraction=0.001))
    assert load_meta(out)["documents"] == {"train": 1, "val": 1}
    single = prepare(config(str(tmp_path / "a.txt"), tmp_path / "single", val_fraction=0.999))
    assert load_meta(single)["documents"] == {"train": 1, "val": 0}


def test_rerun_reuses_same_config_and_refuses_a_different_one(jsonl_source, tmp_path, capsys):
    out = prepare(config(jsonl_source, tmp_path / "ds"))
    mtime = (out / "train_000.bin").stat().st_mtime_ns
    assert prepare(config(jsonl_source, tmp_path / "ds")) == out
    assert "reusing" in capsys.readouterr().out
    assert (out / "train_000.bin").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="different config"):
        prepare(config(jsonl_source, tmp_path / "ds", vocab_size=320))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("not a dataset")
    with pytest.raises(ValueError, match="exists and is not empty"):
        prepare(config(jsonl_source, tmp_path / "busy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "docs.jsonl", "ds"]  # no temp dirs left


def test_large_vocab_uses_uint32(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)} | {"<|endoftext|>": 70_000}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("w69999 w1 w65536")
    (tmp_path / "b.txt").write_text("w2 w3")
    cfg = PrepareConfig(sources=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], out_dir=str(tmp_path / "ds"),
                        tokenizer=str(tmp_path / "tokenizer.json"))
    out = prepare(cfg)
    assert load_meta(out)["dtype"] == "uint32"
    stream = np.concatenate([read_split(out, "train"), read_split(out, "val")]).tolist()
    assert sorted(stream) == sorted([69999, 1, 65536, 70_000, 2, 3, 70_000])


def test_bad_config_and_missing_dataset(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        PrepareConfig(sources=["default"], out_dir=str(tmp_path), val_fraction=1.0)
    with pytest.raises(ValueError, match="not a prepared dataset"):
        load_meta(tmp_path)
