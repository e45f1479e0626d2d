"""PackedLoader: rows are windows of the token stream, positions restart after EOS, the sampler is
deterministic, resumable and independent of world_size."""

import json

import numpy as np
import pytest
import torch

from batchpilot.data.packing import PackedLoader
from batchpilot.data.prepare import PrepareConfig, load_meta, prepare

SEQ_LEN = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, make_documents):
    root = tmp_path_factory.mktemp("packing")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(40)))
    cfg = PrepareConfig(sources=[str(root / "docs.jsonl")], out_dir=str(root / "ds"), vocab_size=300,
                        val_fraction=0.2, shard_tokens=500)  # several shards: rows cross shard boundaries
    return prepare(cfg)


def stream(data_dir, split) -> np.ndarray:
    meta = load_meta(data_dir)
    return np.concatenate([np.fromfile(data_dir / f, dtype=meta["dtype"]) for f in meta["shards"][split]])


def naive_positions(row: list[int], eos_id: int) -> list[int]:
    positions, pos = [], 0
    for i, token in enumerate(row):
        pos = 0 if i == 0 or row[i - 1] == eos_id else pos + 1
        positions.append(pos)
    return positions


def test_rows_are_shifted_windows_with_document_positions(data_dir):
    loader = PackedLoader(data_dir, "train", SEQ_LEN)
    tokens = stream(data_dir, "train")
    assert len(load_meta(data_dir)["shards"]["train"]) > 1
    assert loader.num_rows == (len(tokens) - 1) // SEQ_LEN
    batches = list(loader.eval_batches(7))
    assert [len(b.input_ids) for b in batches[:-1]] == [7] * (len(batches) - 1)
    inputs = torch.cat([b.input_ids for b in batches])
    targets = torch.cat([b.targets for b in batches])
    positions = torch.cat([b.position_ids for b in batches])
    assert len(inputs) == loader.num_rows and inputs.dtype == torch.int64
    expected = torch.from_numpy(tokens[:loader.num_rows * SEQ_LEN + 1].astype(np.int64))
    assert torch.equal(inputs.flatten(), expected[:-1])
    assert torch.equal(targets.flatten(), expected[1:])
    assert (positions == 0).sum() > len(inputs)  # documents start inside rows
    for row, pos in zip(inputs.tolist(), positions.tolist()):
        assert pos == naive_positions(row, loader.eos_id)
    assert len(list(loader.eval_batches(4, max_batches=2))) == 2


def test_sampler_is_seeded_and_epochs_wrap(data_dir):
    a, b, c = (PackedLoader(data_dir, "train", SEQ_LEN, seed=s) for s in (0, 0, 1))
    first = a.take(8)
    assert torch.equal(first.input_ids, b.take(8).input_ids)
    assert not torch.equal(first.input_ids, c.take(8).input_ids)

    fresh = PackedLoader(data_dir, "train", SEQ_LEN)
    n = fresh.num_rows
    epoch0 = fresh.take(n).input_ids
    all_rows = torch.cat([bt.input_ids for bt in fresh.eval_batches(n)])
    assert sorted(map(tuple, epoch0.tolist())) == sorted(map(tuple, all_rows.tolist()))  # each row once
    wrapped = fresh.take(n + 3)
    assert fresh.state_dict() == {"epoch": 2, "position": 3, "seed": 0, "seq_len": SEQ_LEN}
    assert not torch.equal(wrapped.input_ids[:n], epoch0)  # epoch 1 is reshuffled


def test_resume_continues_exactly(data_dir):
    loader = PackedLoader(data_dir, "train", SEQ_LEN, seed=3)
    loader.take(loader.num_rows - 2)  # the next take crosses into epoch 1
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [loader.take(5) for _ in range(3)]
    resumed = PackedLoader(data_dir, "train", SEQ_LEN, seed=3)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.take(5)
        assert all(torch.equal(g, w) for g, w in zip(
            (got.input_ids, got.targets, got.position_ids), (want.input_ids, want.targets, want.position_ids)))
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(data_dir, "train", SEQ_LEN * 2, seed=3).load_state_dict(state)


def test_rank_slices_concatenate_to_the_global_batch(data_dir):
    single = PackedLoader(data_dir, "train", SEQ_LEN)
    ranks = [PackedLoader(data_dir, "train", SEQ_LEN) for _ in range(2)]
    for _ in range(3):
        whole = single.take(6)
        parts = [loader.take(6, rank=r, world_size=2) for r, loader in enumerate(ranks)]
        assert torch.equal(torch.cat([p.input_ids for p in parts]), whole.input_ids)
        assert torch.equal(torch.cat([p.position_ids for p in parts]), whole.position_ids)
    with pytest.raises(ValueError, match="not divisible"):
        single.take(5, world_size=2)


def test_short_split_is_a_clear_error(data_dir):
    val_tokens = load_meta(data_dir)["tokens"]["val"]
    with pytest.raises(ValueError, match=f"validation split has {val_tokens} tokens, needs at least seq_len"):
        PackedLoader(data_dir, "val", val_tokens)
    assert PackedLoader(data_dir, "val", val_tokens - 1).num_rows == 1


def test_tokenizer_comes_with_the_data(data_dir):
    loader = PackedLoader(data_dir, "val", SEQ_LEN)
    assert loader.tokenizer.eos_id == loader.eos_id
    assert loader.tokenizer.vocab_size == load_meta(data_dir)["vocab_size"]
