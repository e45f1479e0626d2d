"""Automatic micro-batch fitting: predict, confirm, back off on OOM, grow when there is room.

The global batch (tokens per optimizer step) never changes: the micro-batch is only how a rank's
share of the step is cut into forward/backward passes, so shrinking it raises gradient
accumulation and the step's math stays the same (the trainer weights each micro-batch by its
rows, so a last, smaller micro-batch is fine). Three parts:

- ``predict_micro_batch_size``: the largest micro-batch the memory model says fits, cut into
  balanced pieces (16 rows that fit 12 become 8 + 8, not 12 + 4);
- ``MicroBatchFitter``: pure decisions (no tensors, no collectives): halve on OOM and remember
  the size that failed; after ``grow_after_steps`` clean steps, try a larger size if the measured
  peak, scaled by the memory model, leaves ``headroom`` of the GPU free; shrink after two
  consecutive steps with allocator retries (thrashing), as Composer does;
- ``run_step_with_oom_retry``: runs one optimizer step; on an OOM (on any rank) every rank
  frees gradients and cached blocks, rewinds the loader to the start of the step, shrinks and
  redoes the same step, so no data is skipped or repeated.

Synchronisation: every rank calls exactly one ``any_across_ranks`` per attempt and one
``max_across_ranks`` per successful step, whether it OOMed or not, so decisions are identical
everywhere. That is deadlock-free when the OOMing rank has issued the same collectives as the
others before raising: true when every rank fails at the same point (the usual case: the same
shapes allocate the same tensors in the same order on every rank) and for failures outside the
sharded forward/backward (the ``grads_fn``/``update_fn`` split puts the OOM check before the
optimizer touches anything). A rank that fails alone *inside* an FSDP all-gather leaves its peers
waiting in that collective; no scheme can undo that short of aborting the communicator, so the
fitter keeps ``headroom`` free to make OOMs happen, if at all, at the first attempt of a size.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from batchpilot.model.llama import LlamaConfig
from batchpilot.train import parallel

T = TypeVar("T")
EstimateBytes = Callable[[int], float]  # micro-batch rows per rank -> predicted peak bytes per GPU


class Rewindable(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def balanced_micro_batch(rows: int, limit: int) -> int:
    """The smallest micro-batch that splits ``rows`` into as few passes as micro-batches of ``limit`` would."""
    limit = max(1, min(limit, rows))
    return math.ceil(rows / math.ceil(rows / limit))


def build_memory_estimate(config: LlamaConfig, *, seq_len: int, num_gpus: int, sharded: bool,
                          checkpointing: bool | str, optimizer: str = "adamw", compile: bool = False,
                          float8: str | None = None) -> EstimateBytes:
    """Peak bytes per GPU as a function of the micro-batch, from the planner's memory model (``plan/memory.py``):
    the blocks as they run (``checkpointing`` none/selective/full, compiled, float8), so a compiled run does not
    start from the eager blocks' larger activations."""
    from batchpilot.plan.memory import estimate_peak_bytes  # the planner's model, validated on an H200

    def estimate(micro_batch_size: int) -> float:
        return estimate_peak_bytes(config, micro_batch_size=micro_batch_size, seq_len=seq_len,
                                   optimizer=optimizer, num_gpus=num_gpus, sharding="fsdp" if sharded else "none",
                                   checkpointing=checkpointing, compile=compile, float8=float8).total_bytes
    return estimate


def predict_micro_batch_size(estimate: EstimateBytes, *, rows_per_rank: int, capacity_bytes: float,
                             headroom: float = 0.1) -> int:
    """Largest balanced micro-batch whose predicted peak stays under (1 - headroom) of the GPU (at least 1)."""
    budget = (1 - headroom) * capacity_bytes
    lo, hi = 1, rows_per_rank  # estimate is increasing in the micro-batch: bisect for the last size that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if estimate(mid) <= budget else (lo, mid - 1)
    return balanced_micro_batch(rows_per_rank, lo)


def build_fitter(config: LlamaConfig, dims: parallel.ParallelDims, *, rows_per_rank: int, seq_len: int,
                 fallback_micro_batch_size: int, sharded: bool, checkpointing: bool | str,
                 compile: bool = False, float8: str | None = None,
                 grow_after_steps: int = 50) -> MicroBatchFitter:
    """A fitter starting at the memory model's prediction on CUDA (``fallback_micro_batch_size`` elsewhere).

    ``sharded``: the model is under FSDP2 (``parallel.is_sharded``), bf16 parameters in compute.
    ``checkpointing``: "none", "selective" or "full" (True / False: full / none); ``compile``, ``float8``: the
    blocks' own memory terms.
    """
    estimate = build_memory_estimate(config, seq_len=seq_len, num_gpus=dims.world_size, sharded=sharded,
                                     checkpointing=checkpointing, compile=compile, float8=float8)
    limit = fallback_micro_batch_size
    if dims.device.type == "cuda":
        capacity = torch.cuda.get_device_properties(dims.device).total_memory
        limit = predict_micro_batch_size(estimate, rows_per_rank=rows_per_rank, capacity_bytes=capacity)
    return MicroBatchFitter(rows_per_rank=rows_per_rank, micro_batch_limit=limit, grow_after_steps=grow_after_steps,
                            estimate=estimate)


@dataclass(kw_only=True, slots=True)
class MicroBatchFitter:
    """Decides the micro-batch (rows per rank per pass) from OOMs and memory readings; pure logic.

    ``micro_batch_limit`` is what memory allows; ``micro_batch_size`` is that limit balanced over the
    step's ``rows_per_rank``, which the trainer may change between steps (ramp or adaptive batch).
    """

    rows_per_rank: int  # rows each rank runs in the coming optimizer step
    micro_batch_limit: int  # the largest micro-batch allowed now
    grow_after_steps: int = 50  # clean steps before trying a larger micro-batch (0: never grow)
    headroom: float = 0.1  # fraction of GPU memory that must stay free after growing
    estimate: EstimateBytes | None = None  # the memory model; None scales the measured peak linearly
    largest_failed: int | None = None  # smallest micro-batch seen to OOM (never tried again)
    clean_steps: int = 0
    thrash_steps: int = 0

    def __post_init__(self) -> None:
        if self.rows_per_rank < 1 or self.micro_batch_limit < 1:
            raise ValueError("rows_per_rank and micro_batch_limit must be positive")

    @property
    def micro_batch_size(self) -> int:
        return balanced_micro_batch(self.rows_per_rank, self.micro_batch_limit)

    def on_oom(self) -> int:
        """Remember the failed size and halve; raise when even one row per pass does not fit."""
        failed = self.micro_batch_size
        if failed == 1:
            raise torch.OutOfMemoryError("out of memory at micro-batch 1: the model does not fit; enable "
                                         "activation checkpointing, shard over more GPUs or shorten seq_len")
        self.largest_failed = failed if self.largest_failed is None else min(self.largest_failed, failed)
        self.micro_batch_limit = failed // 2
        self.clean_steps = self.thrash_steps = 0
        return self.micro_batch_size

    def after_step(self, *, peak_bytes: float | None, capacity_bytes: float | None, alloc_retries: int = 0) -> int:
        """The micro-batch for the next step, from this step's peak memory (max over ranks) and allocator retries."""
        if alloc_retries > 0:
            self.thrash_steps += 1
            if self.thrash_steps >= 2:
                return self.on_oom()
            return self.micro_batch_size
        self.thrash_steps = 0
        self.clean_steps += 1
        if self.grow_after_steps <= 0 or self.clean_steps < self.grow_after_steps:
            return self.micro_batch_size
        self.clean_steps = 0
        candidate = self._next_larger()
        if candidate is not None and peak_bytes is not None and capacity_bytes is not None:
            if self._predicted_peak(candidate, peak_bytes) <= (1 - self.headroom) * capacity_bytes:
                self.micro_batch_limit = candidate
        return self.micro_batch_size

    def _next_larger(self) -> int | None:
        """Double, or go halfway to the size that failed; None when nothing larger is left to try."""
        ceiling = self.rows_per_rank if self.largest_failed is None else self.largest_failed - 1
        target = min(2 * self.micro_batch_size, ceiling)
        if self.largest_failed is not None:
            target = min(target, (self.micro_batch_size + self.largest_failed) // 2)
        candidate = balanced_micro_batch(self.rows_per_rank, target)
        return candidate if candidate > self.micro_batch_size else None

    def _predicted_peak(self, candidate: int, peak_bytes: float) -> float:
        if self.estimate is None:  # conservative: pretend all of the peak grows with the micro-batch
            return peak_bytes * candidate / self.micro_batch_size
        return peak_bytes * self.estimate(candidate) / self.estimate(self.micro_batch_size)


def run_step_with_oom_retry(grads_fn: Callable[[int], T], update_fn: Callable[[], Any], *,
                            fitter: MicroBatchFitter, loader: Rewindable, model: nn.Module,
                            optimizer: torch.optim.Optimizer, dims: parallel.ParallelDims) -> tuple[T, Any]:
    """One optimizer step that survives OOMs: ``grads_fn(micro_batch_size)`` runs every micro-batch's
    forward/backward (taking its data from ``loader``), ``update_fn()`` clips and steps.

    On an OOM on any rank, all ranks drop the partial gradients, rewind ``loader`` to where the step
    began, halve the micro-batch and redo the step; ``update_fn`` runs only once every rank has its
    gradients. Afterwards the fitter sees the step's peak memory and may pick a larger micro-batch
    for the next step. Returns (grads_fn's result, update_fn's result). An OOM inside ``update_fn``
    (the optimizer allocating its state at the first step) is not retried: some ranks would have
    stepped and others not.
    """
    start = loader.state_dict()
    while True:
        _reset_memory_stats(dims)
        try:
            results, failed = [grads_fn(fitter.micro_batch_size)], False  # a list: T itself may be None
        except torch.OutOfMemoryError:
            results, failed = [], True
        if not parallel.any_across_ranks(failed, dims):
            break
        results = []
        release_memory_after_oom(model, optimizer, dims)
        loader.load_state_dict(start)
        fitter.on_oom()
    updated = update_fn()
    peak, capacity, retries = _memory_reading(dims)
    peak, retries = parallel.max_across_ranks([peak, retries], dims)
    fitter.after_step(peak_bytes=peak if capacity else None, capacity_bytes=capacity or None,
                      alloc_retries=int(retries))
    return results[0], updated


def release_memory_after_oom(model: nn.Module, optimizer: torch.optim.Optimizer, dims: parallel.ParallelDims) -> None:
    """Drop partial gradients (FSDP2's unsharded ones too) and gathered parameters, then empty the CUDA cache."""
    optimizer.zero_grad(set_to_none=True)
    parallel.reshard_after_error(model)
    gc.collect()  # the OOM traceback's frames held activations
    if dims.device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_memory_stats(dims: parallel.ParallelDims) -> None:
    """Peak and allocator retries count per attempt (a failed attempt's retries are not thrashing)."""
    if dims.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dims.device)
        torch.cuda.reset_accumulated_memory_stats(dims.device)


def _memory_reading(dims: parallel.ParallelDims) -> tuple[float, float, float]:
    """(peak allocated bytes, GPU capacity, allocator retries) of this step's last attempt; zeros on CPU."""
    if dims.device.type != "cuda":
        return 0.0, 0.0, 0.0
    retries = torch.cuda.memory_stats(dims.device).get("num_alloc_retries", 0)
    capacity = torch.cuda.get_device_properties(dims.device).total_memory
    return float(torch.cuda.max_memory_allocated(dims.device)), float(capacity), float(retries)
