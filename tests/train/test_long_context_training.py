"""Long-sequence modes through the real trainer: streaming backprop (StreamBP, Luo et al., arXiv 2506.03077) as
an activation-checkpointing mode gives the plain run's losses; the order of parallelize's transforms."""

from __future__ import annotations

import pytest

from batchpilot.model.llama import build_model, get_preset
from batchpilot.train import parallel
from batchpilot.train.parallel import ParallelConfig
from batchpilot.train.stream import StreamingBlock
from batchpilot.train.trainer import train
from tests.train.test_parallel import losses, make_dataset, tiny_run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return make_dataset(tmp_path_factory.mktemp("corpus"))


def test_streamed_training_matches_the_plain_run(dataset, tmp_path):
    plain = train(tiny_run(tmp_path / "plain", dataset))
    cfg = tiny_run(tmp_path / "stream", dataset, activation_checkpointing="full")
    cfg.parallel = ParallelConfig(device="cpu", activation_checkpointing="stream", stream_chunk=8)  # 4 chunks
    streamed = train(cfg)
    ref, got = losses(plain.run_dir), losses(streamed.run_dir)
    assert len(got) == len(ref) == 3
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert ref[-1] < ref[0]


def test_stream_is_applied_where_checkpointing_is_and_compile_skips_it():
    model = build_model(get_preset("tiny").with_(num_layers=2), seed=0)
    parallel.parallelize(model, parallel.ParallelDims(), activation_checkpointing="stream", stream_chunk=16,
                         compile=True)
    assert all(isinstance(b, StreamingBlock) and b.chunk_tokens == 16 for b in model.layers)
    assert not any(hasattr(b, "_orig_mod") or getattr(b, "_compiled_call_impl", None) for b in model.layers)


def test_stream_config_validation_and_moe_refused():
    with pytest.raises(ValueError, match="--parallel.stream_chunk"):
        ParallelConfig(activation_checkpointing="stream", stream_chunk=0)
    with pytest.raises(ValueError, match="stream"):
        parallel.parallelize(build_model(get_preset("tiny-moe"), seed=0), parallel.ParallelDims(),
                             activation_checkpointing="stream")
