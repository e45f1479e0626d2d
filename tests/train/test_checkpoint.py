"""DCP checkpoints resume on another number of ranks (2 -> 1 and 1 -> 2) and continue the same losses.

Both runs keep the global batch (8 rows of 32 tokens); only its split over ranks changes. The loader's
position counts global rows, so the data order does not depend on the number of ranks either.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_parallel import losses, make_dataset, run_ranks, tiny_run

from batchpilot.model.llama import build_model
from batchpilot.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from batchpilot.train.optim import OptimConfig, build_optimizer
from batchpilot.train.parallel import ParallelDims
from batchpilot.train.trainer import TrainConfig, train

STEPS, SAVE_EVERY = 4, 2


def rewind_copy(run_dir: Path, dest: Path, step: int) -> Path:
    """A copy of a finished run whose ``latest`` points at an earlier checkpoint, and metrics cut to that step."""
    shutil.copytree(run_dir, dest)
    (dest / "checkpoints" / "latest").write_text(f"step_{step:08d}")
    metrics = (dest / "metrics.jsonl").read_text().splitlines()[:step]
    (dest / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics))
    return dest


def _two_rank_worker(full: dict, resumed: dict) -> None:
    train(TrainConfig(**full))
    train(TrainConfig(**resumed))


def as_dict(cfg: TrainConfig) -> dict:
    return {f: getattr(cfg, f) for f in cfg.__slots__}


def test_resume_on_other_world_size_continues_losses(tmp_path):
    data = make_dataset(tmp_path)
    run = dict(max_steps=STEPS, save_every=SAVE_EVERY)
    one = train(tiny_run(tmp_path / "one", data, **run))  # 1 rank, 4 steps
    one_to_two = rewind_copy(Path(one.run_dir), tmp_path / "one_to_two", SAVE_EVERY)
    run_ranks(_two_rank_worker, as_dict(tiny_run(tmp_path / "two", data, **run)),
              as_dict(tiny_run(one_to_two, data, resume=True, **run)))
    two_to_one = rewind_copy(tmp_path / "two", tmp_path / "two_to_one", SAVE_EVERY)
    train(tiny_run(two_to_one, data, resume=True, **run))

    ref = losses(one.run_dir)
    assert len(ref) == STEPS
    assert losses(tmp_path / "two") == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert losses(one_to_two) == pytest.approx(ref, rel=1e-5, abs=1e-6)  # saved at 1 rank, resumed at 2
    assert losses(two_to_one) == pytest.approx(ref, rel=1e-5, abs=1e-6)  # saved at 2 ranks, resumed at 1


def test_checkpoint_round_trip_and_atomic_pointer(tiny_config, tmp_path):
    dims = ParallelDims()
    model = build_model(tiny_config, seed=0)
    opt = build_optimizer(model, OptimConfig())
    model(torch.randint(0, 512, (2, 8)), targets=torch.randint(0, 512, (2, 8))).backward()
    opt.step()
    path = save_checkpoint(tmp_path, 7, model, opt, {"step": 7}, dims)
    assert latest_checkpoint(tmp_path) == path and not list((tmp_path / "checkpoints").glob(".tmp-*"))
    other = build_model(tiny_config, seed=1)
    other_opt = build_optimizer(other, OptimConfig())
    assert load_checkpoint(path, other, other_opt) == {"step": 7}
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    exp_avg = [opt.state[p]["exp_avg"] for p in model.parameters()]
    assert all(torch.equal(a, other_opt.state[p]["exp_avg"]) for a, p in zip(exp_avg, other.parameters()))
