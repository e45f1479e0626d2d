"""``--parallel.context_parallel N`` in the trainer: the real ``train()`` on gloo ranks equals one process.

The run's rows are packed text (documents cross the load-balanced shard boundaries), so the ring's causal
and document masks, the sharded positions and the loss weights of unequal target counts are all exercised;
cp=2 on 2 ranks, dp2 x cp2 on 4, and a stopped and resumed cp run.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_parallel import losses, make_dataset, run_ranks, tiny_run  # noqa: E402  (tests/train on sys.path)

from batchpilot.cli import build_parser
from batchpilot.cli.train import build_config
from batchpilot.metrics import read_metrics
from batchpilot.model.llama import get_preset
from batchpilot.train import parallel
from batchpilot.train.config import TrainConfig
from batchpilot.train.context_parallel import shard_batch
from batchpilot.train.parallel import ParallelConfig
from batchpilot.train.trainer import context_parallel_mesh, train


def with_cp(cfg: TrainConfig, size: int) -> TrainConfig:
    return dataclasses.replace(cfg, parallel=ParallelConfig(**dataclasses.asdict(cfg.parallel)
                                                           | {"context_parallel": size}))


def _cp_worker(cfg_dict: dict, size: int) -> None:
    train(with_cp(TrainConfig(**cfg_dict), size))


def _cp_recording_worker(cfg_dict: dict, size: int, out_dir: str) -> None:
    """``_cp_worker`` that records the shapes of the slices the ring saw (proof the sequence was split)."""
    import json
    import os
    from pathlib import Path

    from batchpilot.train import trainer

    seen = []

    def recording(input_ids, targets, group, *, position_ids=None):
        local = shard_batch(input_ids, targets, group, position_ids=position_ids)
        seen.append([list(input_ids.shape), list(local.input_ids.shape), position_ids is not None])
        return local

    trainer.shard_batch = recording
    _cp_worker(cfg_dict, size)
    Path(out_dir, f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen))


def as_dict(cfg: TrainConfig) -> dict:
    return {f: getattr(cfg, f) for f in cfg.__slots__}


def val_losses(run_dir) -> list[float]:
    return [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return make_dataset(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def single(dataset, tmp_path_factory):
    """The one-process reference run (4 steps, evaluated at the end)."""
    return train(tiny_run(tmp_path_factory.mktemp("single") / "run", dataset, max_steps=4)).run_dir


def test_cp2_on_two_ranks_equals_one_process(dataset, single, tmp_path):
    run_ranks(_cp_recording_worker, as_dict(tiny_run(tmp_path / "cp", dataset, max_steps=4)), 2, str(tmp_path),
              timeout=120.0)
    for rank in (0, 1):  # 4 steps x 4 micro-batches of 2 full rows (dp = 1), then validation; halves of T=32
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(seen) > 16 and all(full == [2, 32] and local == [2, 16] for full, local, _ in seen[:16])
        assert any(packed for *_, packed in seen)  # packed documents: positions and document ids sharded too
    assert losses(tmp_path / "cp") == pytest.approx(losses(single), rel=1e-5, abs=1e-6)
    assert val_losses(tmp_path / "cp") == pytest.approx(val_losses(single), rel=1e-5, abs=1e-6)
    records = [r for r in read_metrics(tmp_path / "cp") if "tokens_per_s" in r]
    assert [r["tokens"] for r in records] == [256, 512, 768, 1024]  # each token counted once, not per cp rank
    assert (tmp_path / "cp" / "model" / "model.safetensors").is_file()


def test_dp2_x_cp2_on_four_ranks_equals_one_process(dataset, single, tmp_path):
    run_ranks(_cp_worker, as_dict(tiny_run(tmp_path / "dpcp", dataset, max_steps=4)), 2, world_size=4,
              timeout=240.0)
    assert losses(tmp_path / "dpcp") == pytest.approx(losses(single), rel=1e-5, abs=1e-6)
    assert val_losses(tmp_path / "dpcp") == pytest.approx(val_losses(single), rel=1e-5, abs=1e-6)


def test_cp_resume_equals_uninterrupted(dataset, single, tmp_path):
    run_dir = tmp_path / "resumed"
    first = tiny_run(run_dir, dataset, max_steps=4, save_every=2, stop_at_step=2)
    run_ranks(_cp_worker, as_dict(first), 2, timeout=120.0)
    run_ranks(_cp_worker, as_dict(tiny_run(run_dir, dataset, max_steps=4, save_every=2, resume=True)), 2,
              timeout=120.0)
    assert losses(run_dir) == pytest.approx(losses(single), rel=1e-5, abs=1e-6)


def test_context_parallel_refuses_what_it_cannot_run(dataset, tmp_path):
    with pytest.raises(ValueError, match="--data.seq_len 34 must be a multiple of 2 x --parallel.context_parallel"):
        with_cp(tiny_run(tmp_path / "a", dataset, seq_len=34, global_batch_tokens=272), 2)
    with pytest.raises(ValueError, match="--parallel.context_parallel with --parallel.activation_checkpointing "
                                         "stream"):
        ParallelConfig(context_parallel=2, activation_checkpointing="stream")
    with pytest.raises(ValueError, match="--batch.auto_micro_batch with --parallel.context_parallel"):
        with_cp(tiny_run(tmp_path / "a", dataset, auto_micro_batch=True), 2)
    with pytest.raises(ValueError, match="--batch.policy adaptive"):
        with_cp(tiny_run(tmp_path / "a", dataset, batch_policy="adaptive"), 2)
    with pytest.raises(ValueError, match="--parallel.context_parallel must be >= 1"):
        ParallelConfig(context_parallel=0)
    cfg = with_cp(tiny_run(tmp_path / "a", dataset), 2)
    with pytest.raises(ValueError, match="WORLD_SIZE 1 is not a multiple of it"):
        context_parallel_mesh(cfg, get_preset("tiny"), parallel.ParallelDims())
    with pytest.raises(ValueError, match="MoE model"):
        context_parallel_mesh(cfg, get_preset("tiny-moe"), parallel.ParallelDims(world_size=2))
    args = build_parser().parse_args(["train", "--out", str(tmp_path / "b"), "--schedule.max_steps", "1",
                                      "--context-parallel", "2"])
    assert build_config(args).parallel.context_parallel == 2
