"""Masked loss on packed chat rows equals the loss computed one conversation at a time on assistant tokens only
(fp32, our model, gradients included), and conversations packed in one row do not see each other."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchpilot.data.chat import LOSS, START
from batchpilot.data.packing import PackedLoader
from batchpilot.data.prepare import PrepareConfig, load_meta, prepare
from batchpilot.model.attention import DocumentMask, document_ids_from_positions
from batchpilot.model.llama import LlamaConfig, build_model

SEQ_LEN = 160


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, chat_model_dir, make_conversations):
    root = tmp_path_factory.mktemp("chat_loss")
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_conversations(24, seed=3)))
    cfg = PrepareConfig(sources=[str(root / "chat.jsonl")], out_dir=str(root / "ds"), tokenizer=str(chat_model_dir),
                        format="chat", val_fraction=0.2)
    return prepare(cfg)


@pytest.fixture(scope="module")
def model(data_dir):
    config = LlamaConfig(vocab_size=load_meta(data_dir)["vocab_size"], hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2)
    return build_model(config, seed=0).float()


def packed_loss(model, batch):
    meta = DocumentMask(document_ids=document_ids_from_positions(batch.position_ids))
    return model(batch.input_ids, targets=batch.targets, position_ids=batch.position_ids, attn_meta=meta)


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_masked_loss_equals_per_conversation_reference(data_dir, model):
    meta = load_meta(data_dir)
    tokens = np.concatenate([np.fromfile(data_dir / f, dtype=meta["dtype"]) for f in meta["shards"]["train"]])
    flags = np.concatenate([np.fromfile(data_dir / f, dtype=np.uint8) for f in meta["mask_shards"]["train"]])
    bounds = list(np.flatnonzero(flags & START)) + [len(tokens)]
    assert max(np.diff(bounds)) <= SEQ_LEN  # no conversation is truncated, so both sides see the same tokens

    loader = PackedLoader(data_dir, "train", SEQ_LEN, pack="conversation")
    batch = next(loader.eval_batches(loader.num_rows))
    assert loader.num_rows < len(bounds) - 1  # rows really hold several conversations
    got = packed_loss(model, batch)
    got_grads = grads_of(model, got)

    total, count = torch.zeros(()), 0
    for a, b in zip(bounds[:-1], bounds[1:]):  # one conversation at a time, plain causal attention
        ids = torch.from_numpy(tokens[a:b].astype(np.int64))[None]
        logits = model(ids)[0, :-1]
        keep = torch.from_numpy((flags[a + 1:b] & LOSS) > 0)
        total = total + F.cross_entropy(logits[keep], ids[0, 1:][keep], reduction="sum")
        count += int(keep.sum())
    expected = total / count
    expected_grads = grads_of(model, expected)

    assert count == int((batch.targets != -100).sum()) == meta["loss_tokens"]["train"]
    assert abs(got.item() - expected.item()) < 1e-5
    for name, g in expected_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_changing_one_conversation_leaves_the_other_untouched(data_dir, model):
    loader = PackedLoader(data_dir, "train", SEQ_LEN, pack="conversation")
    batch = next(loader.eval_batches(loader.num_rows))
    row = next(r for r in range(len(batch.input_ids)) if int((batch.position_ids[r] == 0).sum()) >= 3)
    starts = torch.nonzero(batch.position_ids[row] == 0).flatten().tolist()
    a_end = starts[1]  # conversation A is [0, a_end); B follows it
    b_targets = batch.targets[row:row + 1].clone()
    b_targets[0, :a_end] = -100

    def b_loss_and_grads(input_ids):
        one = type(batch)(input_ids, b_targets, batch.position_ids[row:row + 1])
        loss = packed_loss(model, one)
        return loss.item(), grads_of(model, loss)

    original = batch.input_ids[row:row + 1].clone()
    changed = original.clone()
    generator = torch.Generator().manual_seed(0)
    changed[0, 1:a_end] = torch.randint(0, model.config.vocab_size, (a_end - 1,), generator=generator)
    assert not torch.equal(changed, original)
    loss_1, grads_1 = b_loss_and_grads(original)
    loss_2, grads_2 = b_loss_and_grads(changed)
    assert abs(loss_1 - loss_2) < 1e-6
    for name, g in grads_1.items():  # A's tokens get no gradient from B's loss, whatever they are
        torch.testing.assert_close(grads_2[name], g, atol=1e-6, rtol=1e-5, msg=name)
