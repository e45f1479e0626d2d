"""The trainer's two-batch measurement against gradients computed directly (the oracle)."""

import pytest
import torch

from batchpilot.data.packing import PackedLoader
from batchpilot.model.llama import LlamaConfig, build_model
from batchpilot.train.parallel import ParallelDims
from batchpilot.train.trainer import accumulate_gradients, forward_loss

TINY = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_position_embeddings=64)


def _direct_sq_norm(model, batch) -> float:
    model.zero_grad(set_to_none=True)
    forward_loss(model, batch, torch.device("cpu")).backward()
    return sum(p.grad.square().sum().item() for p in model.parameters())


@pytest.mark.parametrize("micro", [8, 64])  # both fit the step in one micro-batch: it must be split in halves
def test_measurement_splits_one_micro_batch_in_halves(tiny_data, micro):
    dims, seq, rows = ParallelDims(), 32, 8
    model = build_model(TINY, seed=0)
    loss, m = accumulate_gradients(model, PackedLoader(tiny_data, "train", seq, seed=0),
                                   global_batch_tokens=rows * seq, seq_len=seq, micro_batch_size=micro, dims=dims,
                                   measure_noise=True)
    assert (m.small_batch_tokens, m.big_batch_tokens) == (rows // 2 * seq, rows * seq)
    whole = PackedLoader(tiny_data, "train", seq, seed=0).take(rows)
    half = PackedLoader(tiny_data, "train", seq, seed=0).take(rows // 2)
    assert m.small_sq_norm == pytest.approx(_direct_sq_norm(model, half), rel=1e-4)
    assert m.big_sq_norm == pytest.approx(_direct_sq_norm(model, whole), rel=1e-4)


def test_no_measurement_keeps_one_micro_batch(tiny_data):
    model = build_model(TINY, seed=0)
    _, m = accumulate_gradients(model, PackedLoader(tiny_data, "train", 32, seed=0), global_batch_tokens=8 * 32,
                                seq_len=32, micro_batch_size=8, dims=ParallelDims())
    assert m is None
