"""Micro-batch auto-fit: the pure decisions, and a simulated OOM on one of 2 gloo ranks under FSDP2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_parallel import make_dataset, run_ranks

from batchpilot.data.packing import PackedLoader
from batchpilot.model.llama import build_model, get_preset
from batchpilot.train import parallel
from batchpilot.train.autofit import (MicroBatchFitter, balanced_micro_batch, build_memory_estimate,
                                      predict_micro_batch_size, run_step_with_oom_retry)
from batchpilot.train.optim import OptimConfig, build_optimizer
from batchpilot.train.trainer import accumulate_gradients

GIB = 1 << 30


def test_balanced_micro_batch():
    assert balanced_micro_batch(16, 12) == 8  # 8 + 8, not 12 + 4
    assert balanced_micro_batch(16, 16) == 16
    assert balanced_micro_batch(10, 4) == 4  # 4 + 4 + 2: three passes either way
    assert balanced_micro_batch(5, 100) == 5 and balanced_micro_batch(5, 0) == 1


def test_oom_halves_and_remembers_the_failed_size():
    fitter = MicroBatchFitter(rows_per_rank=16, micro_batch_limit=16)
    assert fitter.on_oom() == 8 and fitter.largest_failed == 16
    assert fitter.on_oom() == 4 and fitter.largest_failed == 8
    assert fitter.on_oom() == 2 and fitter.on_oom() == 1
    with pytest.raises(torch.OutOfMemoryError, match="micro-batch 1"):
        fitter.on_oom()


def test_grows_only_after_clean_steps_with_headroom_and_below_the_failed_size():
    fitter = MicroBatchFitter(rows_per_rank=32, micro_batch_limit=4, grow_after_steps=3, headroom=0.1)
    reading = dict(peak_bytes=20 * GIB, capacity_bytes=100 * GIB)
    assert [fitter.after_step(**reading) for _ in range(3)] == [4, 4, 8]  # doubles: 40 GiB predicted < 90
    assert [fitter.after_step(**reading) for _ in range(3)] == [8, 8, 16]  # 16 x 20/8 = 40 GiB
    assert [fitter.after_step(peak_bytes=60 * GIB, capacity_bytes=100 * GIB) for _ in range(3)] == [16] * 3
    fitter.on_oom()  # say 16 fails after all: back to 8, never 16 again, try halfway (12 -> balanced 11)
    assert fitter.micro_batch_size == 8 and fitter.largest_failed == 16
    grown = [fitter.after_step(**reading) for _ in range(3)][-1]
    assert 8 < grown < 16 and 32 % grown <= grown
    assert fitter.after_step(peak_bytes=None, capacity_bytes=None) == grown  # no reading (CPU): never grows


def test_memory_model_scales_the_measured_peak():
    fitter = MicroBatchFitter(rows_per_rank=8, micro_batch_limit=2, grow_after_steps=1,
                              estimate=lambda mb: 50 * GIB + mb * GIB)  # mostly fixed state
    assert fitter.after_step(peak_bytes=52 * GIB, capacity_bytes=80 * GIB) == 4  # 52 x 54/52 = 54 < 72


def test_limit_follows_a_change_of_the_global_batch():
    fitter = MicroBatchFitter(rows_per_rank=16, micro_batch_limit=6)
    assert fitter.micro_batch_size == 6  # 6 + 6 + 4
    fitter.rows_per_rank = 8  # the batch controller halved the global batch
    assert fitter.micro_batch_size == 4  # 4 + 4: balanced under the same limit
    fitter.rows_per_rank = 3
    assert fitter.micro_batch_size == 3


def test_thrashing_twice_in_a_row_shrinks():
    fitter = MicroBatchFitter(rows_per_rank=8, micro_batch_limit=8)
    assert fitter.after_step(peak_bytes=1.0, capacity_bytes=2.0, alloc_retries=3) == 8
    assert fitter.after_step(peak_bytes=1.0, capacity_bytes=2.0, alloc_retries=1) == 4


def test_prediction_from_the_planner_memory_model():
    config = get_preset("llama-1b")
    estimate = build_memory_estimate(config, seq_len=2048, num_gpus=1, sharded=False, checkpointing=False)
    assert estimate(2) > estimate(1) > 20 * GIB  # fp32 params + grads + AdamW for 1.24B: ~20 GB
    mb = predict_micro_batch_size(estimate, rows_per_rank=64, capacity_bytes=140 * GIB)
    assert 1 <= mb <= 64 and estimate(mb) <= 0.9 * 140 * GIB
    assert predict_micro_batch_size(estimate, rows_per_rank=64, capacity_bytes=1 * GIB) == 1


def test_the_fitter_predicts_the_blocks_as_they_run():
    """Compiled and float8 blocks save fewer activation bytes: their first micro-batch is at least the eager one's."""
    from batchpilot.plan.memory import estimate_peak_bytes

    config = get_preset("llama-1b")
    kinds = {"eager": {}, "compiled": {"compile": True}, "float8": {"compile": True, "float8": "tensorwise"}}
    est = {k: build_memory_estimate(config, seq_len=2048, num_gpus=1, sharded=True, checkpointing="none", **kw)
           for k, kw in kinds.items()}
    assert est["eager"](8) > est["compiled"](8) > est["float8"](8)
    assert est["compiled"](8) == estimate_peak_bytes(config, micro_batch_size=8, seq_len=2048, num_gpus=1,
                                                     sharding="fsdp", compile=True).total_bytes
    mbs = [predict_micro_batch_size(est[k], rows_per_rank=64, capacity_bytes=140 * GIB) for k in kinds]
    assert mbs == sorted(mbs)


ROWS_PER_RANK, SEQ_LEN = 4, 32
# (run name, first micro-batch, where the simulated OOM strikes, largest micro-batch that "fits")
RUNS = [("one_rank", 4, "rank1_after_step", 2), ("one_rank_ref", 2, None, 2),
        ("mid_step", 2, "all_ranks_second_micro_batch", 1), ("mid_step_ref", 1, None, 1)]


class FlakyLoader:
    """PackedLoader that raises a simulated OOM when a step's second micro-batch is too big (every rank)."""

    def __init__(self, loader: PackedLoader, fits: int) -> None:
        self.loader, self.fits, self.calls = loader, fits, 0

    def take(self, num_rows: int, *, rank: int, world_size: int):
        self.calls += 1
        if self.calls == 2 and num_rows // world_size > self.fits:
            raise torch.OutOfMemoryError("simulated")  # after micro-batch 1's backward: gradients half-accumulated
        return self.loader.take(num_rows, rank=rank, world_size=world_size)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state) -> None:
        self.loader.load_state_dict(state)


def _fit_worker(data: str, out: str) -> None:
    """3 steps on FSDP2 per run: each OOM scenario next to a run that starts at the size that fits."""
    dims = parallel.init_distributed("cpu")
    result = {}
    for name, start, oom, fits in RUNS:
        config = get_preset("tiny").with_(num_layers=2)
        model = parallel.parallelize(build_model(config, seed=0), dims)
        optimizer = build_optimizer(model, OptimConfig(lr=3e-3))
        loader = FlakyLoader(PackedLoader(data, "train", SEQ_LEN, seed=0), fits if oom else ROWS_PER_RANK)
        fitter = MicroBatchFitter(rows_per_rank=ROWS_PER_RANK, micro_batch_limit=start)
        losses, sizes = [], []
        for _ in range(3):
            loss, _ = run_step_with_oom_retry(
                lambda mb: _accumulate(model, loader, mb, dims, oom == "rank1_after_step" and mb > fits),
                lambda: _update(model, optimizer), fitter=fitter, loader=loader, model=model, optimizer=optimizer,
                dims=dims)
            losses.append(parallel.mean_across_ranks(loss, dims))
            sizes.append(fitter.micro_batch_size)
        result[name] = dict(losses=losses, sizes=sizes, largest_failed=fitter.largest_failed,
                            loader=loader.state_dict())
    Path(out, f"rank{dims.rank}.json").write_text(json.dumps(result))


def _accumulate(model, loader: FlakyLoader, micro_batch_size: int, dims, oom_on_rank1: bool) -> float:
    """The trainer's gradient accumulation, then (one scenario) an OOM on rank 1 after the step's last collective."""
    loader.calls = 0
    loss, _ = accumulate_gradients(model, loader, global_batch_tokens=ROWS_PER_RANK * dims.world_size * SEQ_LEN,
                                   seq_len=SEQ_LEN, micro_batch_size=micro_batch_size, dims=dims)
    if dims.rank == 1 and oom_on_rank1:
        raise torch.OutOfMemoryError("simulated")
    return loss.item()


def _update(model, optimizer) -> float:
    norm = parallel.clip_grad_norm(model, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


def test_simulated_oom_backs_off_on_every_rank_and_redoes_the_step(tmp_path):
    """OOM on rank 1 only (after the step's collectives), and on all ranks in the middle of gradient
    accumulation (FSDP2 holds unsharded partial gradients then): both back off together, no deadlock,
    and the losses equal a run that started at the smaller micro-batch."""
    data = make_dataset(tmp_path)
    run_ranks(_fit_worker, data, str(tmp_path), timeout=90)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        for name, start, _, fits in RUNS[::2]:
            fitted, ref = r[name], r[name + "_ref"]
            assert fitted["sizes"] == [fits] * 3 and fitted["largest_failed"] == start
            assert fitted["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
            assert fitted["loader"] == ref["loader"]  # the failed attempt consumed no data
    assert ranks[0] == ranks[1]
