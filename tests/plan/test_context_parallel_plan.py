"""The planner splits a sequence over GPUs (context parallelism) only when one sequence does not fit a GPU, and
then predicts its memory, its batch in data-parallel ranks and its time; ``train --plan`` takes the split."""

import pytest

from batchpilot.plan.memory import GIB, RING_SCORE_CHUNK_BYTES
from batchpilot.plan.planner import Budget, make_plan


def budget(seq_len: int, gpus: int = 8, **kw) -> Budget:
    return Budget(preset="llama-8b", tokens=2e10, num_gpus=gpus, gpu_memory_gib=80, seq_len=seq_len,
                  offload="none", **kw)


def test_a_sequence_that_fits_one_gpu_is_not_split():
    plan = make_plan(budget(131072))  # full checkpointing fits at micro-batch 1
    assert plan.context_parallel == 1 and plan.activation_checkpointing in ("full", "stream")
    assert any("context parallelism over 8 GPUs" in line and "not chosen" in line for line in plan.derivation)


def test_a_sequence_too_long_for_one_gpu_is_split_over_the_fewest_gpus_that_fit():
    plan = make_plan(budget(524288))
    cp = plan.context_parallel
    assert cp in (2, 4, 8) and 8 % cp == 0
    assert plan.predicted_peak_memory_bytes <= 0.9 * 80 * GIB
    assert plan.global_batch_tokens == plan.micro_batch_size * plan.grad_accum_steps * (8 // cp) * 524288
    assert plan.compile is False and plan.activation_checkpointing == "full" and plan.sharding == "fsdp"
    assert any(f"context parallelism over {cp} GPUs" in line and "Li et al. 2021" in line for line in plan.derivation)
    if cp > 2:  # the smallest split that fits: half as many GPUs per sequence did not
        with pytest.raises(ValueError):
            make_plan(budget(524288, gpus=cp // 2))
    # the ring's attention is plain fp32 math: the prediction is far slower than the unsplit tokens/s would be
    assert plan.predicted_tokens_per_second < 10_000


def test_one_gpu_cannot_split_and_says_what_does_not_fit():
    with pytest.raises(ValueError):
        make_plan(budget(524288, gpus=1))


def test_train_plan_takes_the_split(tmp_path):
    from batchpilot.train.config import plan_settings

    plan = make_plan(budget(524288))
    assert plan_settings(plan)["parallel.context_parallel"] == plan.context_parallel
    assert "parallel.context_parallel" not in plan_settings(make_plan(budget(131072)))


def test_the_ring_score_chunk_is_the_trainers():
    from batchpilot.train.context_parallel import SCORE_CHUNK_BYTES

    assert RING_SCORE_CHUNK_BYTES == SCORE_CHUNK_BYTES
