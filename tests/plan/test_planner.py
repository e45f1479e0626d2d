"""Plan invariants: rounding, LR rescaling, memory fit, warnings, serialisation and every bad input."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from batchpilot.model.hf import config_to_hf
from batchpilot.model.llama import LlamaConfig, get_preset
from batchpilot.model import counting
from batchpilot.plan import laws
from batchpilot.plan.memory import GIB, estimate_peak_bytes, offload_step_seconds
from batchpilot.plan.planner import ROWS_TOLERANCE, Budget, Plan, compare, derive_shape, make_plan

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"

BUDGETS = [
    Budget(preset="llama-1b", tokens=1e11, num_gpus=8),
    Budget(preset="llama-125m", tokens=1e10, num_gpus=3, gpu_memory_gib=24, seq_len=1024),
    Budget(preset="llama-8b", tokens=2e11, num_gpus=8, law="deepseek", optimizer="lamb"),
    Budget(preset="qwen2-0.5b", compute_flops=1e19, num_gpus=2, optimizer="sgd"),
    Budget(preset="tiny", tokens=1e7, seq_len=256, optimizer="lars"),
]


@pytest.mark.parametrize("budget", BUDGETS)
def test_rounding_and_lr_rule(budget):
    plan = make_plan(budget)
    per_step = plan.micro_batch_size * plan.grad_accum_steps * plan.num_gpus * plan.seq_len
    assert plan.global_batch_tokens == per_step
    rows = max(1, round(plan.law["batch_tokens"] / plan.seq_len / plan.num_gpus))  # the law's rows per GPU
    assert plan.micro_batch_size >= 1
    assert abs(plan.micro_batch_size * plan.grad_accum_steps - rows) <= ROWS_TOLERANCE * rows
    ratio = plan.global_batch_tokens / plan.law["batch_tokens"]
    scale = ratio if budget.optimizer in ("sgd", "lars") else math.sqrt(ratio)
    assert plan.peak_lr == pytest.approx(plan.law["peak_lr"] * scale)
    assert plan.total_steps == round(plan.law["tokens"] / plan.global_batch_tokens)
    assert plan.warmup_steps == min(2000, int(0.1 * plan.total_steps))
    assert plan.predicted_peak_memory_bytes <= 0.9 * budget.gpu_memory_gib * GIB
    assert plan.sharding == ("fsdp" if budget.num_gpus > 1 else "none")


def test_step_law_values_and_schedule():
    plan = make_plan(BUDGETS[0])
    assert plan.law["non_vocab_params"] == counting.non_vocab_params(get_preset("llama-1b"))
    assert plan.law["batch_tokens"] == pytest.approx(laws.step_law_batch_tokens(1e11))
    assert (plan.schedule, plan.min_lr) == ("cosine", 1e-5)
    assert not plan.warnings  # N 9.7e8 and D 1e11 are inside the grid
    deepseek = make_plan(dataclasses.replace(BUDGETS[0], law="deepseek"))
    assert deepseek.schedule == "multistep" and deepseek.min_lr == pytest.approx(0.1 * deepseek.peak_lr)
    wsd = make_plan(dataclasses.replace(BUDGETS[0], schedule="wsd"))
    assert wsd.schedule == "wsd" and any("not validated" in w for w in wsd.warnings)


def test_extrapolation_is_warned():
    plan = make_plan(Budget(preset="llama-125m", tokens=2.5e9))
    assert any("outside the fitted range" in w for w in plan.warnings)
    assert "WARNING: N (non-vocab params)" in plan.explain()
    assert "WARNING" in make_plan(Budget(preset="llama-8b", tokens=1e12, num_gpus=8, law="deepseek")).explain()


def fits(config, mb, accum, *, gib, compile=True, ckpt=False):
    est = estimate_peak_bytes(config, micro_batch_size=mb, seq_len=2048, checkpointing=ckpt, compile=compile,
                              grad_accum_steps=accum)
    return est.total_bytes <= 0.9 * gib * GIB


def test_micro_batch_at_an_assumed_mfu_keeps_the_rows_nearest_the_law_then_the_largest():
    """One assumed MFU for every shape: tokens/s ties, so the rows nearest the law win (541 is prime: no
    micro-batch of a reasonable size divides it, so 540 or 542), then the largest micro-batch that fits (any
    whole number, not only powers of two)."""
    budget = Budget(preset="llama-125m", tokens=1e11, gpu_memory_gib=24)  # law: 541 rows of 2048
    plan = make_plan(budget)
    config = get_preset("llama-125m")
    assert plan.activation_checkpointing == "none" and plan.compile  # fits at >= 8192 tokens per micro-batch
    rows = plan.micro_batch_size * plan.grad_accum_steps
    assert rows in (540, 542) and plan.micro_batch_size >= 4
    assert fits(config, plan.micro_batch_size, plan.grad_accum_steps, gib=24)
    for mb in range(plan.micro_batch_size + 1, 513):  # no larger micro-batch reaching 540-542 fits
        accum = round(541 / mb)
        assert abs(mb * accum - 541) > 1 or not fits(config, mb, accum, gib=24)
    assert "the highest predicted tokens/s among" in plan.explain()
    eight = make_plan(Budget(preset="llama-1b", tokens=1e11, num_gpus=8))  # 68 rows per GPU: 17 x 4 exactly
    assert eight.micro_batch_size * eight.grad_accum_steps == 68


def test_eight_by_one_where_four_by_two_was_chosen():
    """Law batch 7.9 rows: the old rule capped the micro-batch at the largest power of two <= 7.9 (4, then 4 x 2);
    now the step's rows are the nearest whole number (8) and micro-batch 8 fits: 8 x 1, at the same rows."""
    tokens = (7.9 * 2048 / 0.58) ** (1 / 0.571)  # Step Law: batch = 0.58 D^0.571 tokens
    plan = make_plan(Budget(preset="llama-125m", tokens=tokens))
    assert plan.law["batch_tokens"] / 2048 == pytest.approx(7.9)
    assert (plan.micro_batch_size, plan.grad_accum_steps) == (8, 1)


def test_the_measured_mfu_table_decides_the_micro_batch(tmp_path):
    """A table where micro-batch 4 runs at a higher MFU than 8: the planner takes 4 x 2 although 8 x 1 fits."""
    table = tmp_path / "mfu.json"
    table.write_text(json.dumps({"mfu": [{"seq_len": 2048, "micro_batch_size": 4, "mfu": 0.6},
                                         {"seq_len": 2048, "micro_batch_size": 8, "mfu": 0.5}]}))
    tokens = (7.9 * 2048 / 0.58) ** (1 / 0.571)
    plan = make_plan(Budget(preset="llama-125m", tokens=tokens, mfu_from=str(table)))
    assert (plan.micro_batch_size, plan.grad_accum_steps) == (4, 2) and plan.mfu == pytest.approx(0.6)
    assert plan.predicted_tokens_per_second == pytest.approx(989e12 * 0.6 / plan.flops_per_token)
    assert "table mfu.json: seq 2048" in plan.explain()
    flipped = tmp_path / "flipped.json"
    flipped.write_text(json.dumps({"mfu": [{"seq_len": 2048, "micro_batch_size": 4, "mfu": 0.5},
                                           {"seq_len": 2048, "micro_batch_size": 8, "mfu": 0.6}]}))
    assert make_plan(Budget(preset="llama-125m", tokens=tokens, mfu_from=str(flipped))).micro_batch_size == 8


def test_mfu_from_a_train_throughput_result():
    """The measured table of benchmarks/train_throughput.py: the compiled autocast system's mfu_causal at seq
    2048, micro-batch 16 (0.5302 in that run); step time = FLOPs x batch / (peak x MFU)."""
    path = RESULTS / "train_throughput_2026-11-28e.json"
    plan = make_plan(Budget(preset="llama-1b", tokens=1e11, mfu_from=str(path)))
    assert plan.mfu == pytest.approx(0.5302) and plan.compile and plan.activation_checkpointing == "none"
    assert plan.predicted_step_seconds == pytest.approx(plan.flops_per_token * plan.global_batch_tokens
                                                        / (989e12 * 0.5302))
    assert plan.predicted_tokens_per_second == pytest.approx(plan.global_batch_tokens / plan.predicted_step_seconds)
    assert plan.mfu_source.startswith("measured train_throughput_2026-11-28e.json: seq 2048")
    f8 = make_plan(Budget(preset="llama-1b", tokens=1e11, mfu_from=str(path), float8="tensorwise"))
    assert f8.mfu == pytest.approx(0.6327) and f8.float8 == "tensorwise"  # the float8 system's row
    long = make_plan(Budget(preset="llama-1b", tokens=1e11, seq_len=8192, mfu_from=str(path)))
    assert long.mfu == pytest.approx(0.5084)  # its seq 8192 row


def test_gpu_plans_compile_and_the_memory_model_follows():
    on = make_plan(Budget(preset="llama-1b", tokens=1e11))
    off = make_plan(Budget(preset="llama-1b", tokens=1e11, compile=False))
    assert on.compile and not off.compile
    assert "compile: on" in on.explain() and "compile: off" in off.explain()
    config = get_preset("llama-1b")
    same = [estimate_peak_bytes(config, micro_batch_size=8, seq_len=2048, compile=c).allocated_bytes
            for c in (True, False)]
    assert same[0] < same[1]  # compiled blocks save less: a compiled plan fits a micro-batch at least as large
    assert on.micro_batch_size >= off.micro_batch_size


def test_offload_when_the_model_does_not_fit():
    """llama-8b on one 24 GiB GPU: no sharding or checkpointing fits, CPU offload does; its step time is the
    host link's and the CPU step's (issue 21)."""
    budget = Budget(preset="llama-8b", tokens=1e11, gpu_memory_gib=24)
    plan = make_plan(budget)
    assert plan.offload == "cpu" and plan.sharding == "fsdp" and plan.activation_checkpointing == "full"
    assert not plan.compile and plan.predicted_peak_memory_bytes <= 0.9 * 24 * GIB
    config = get_preset("llama-8b")
    compute = plan.flops_per_token * plan.global_batch_tokens / (989e12 * plan.mfu)
    assert plan.predicted_step_seconds == pytest.approx(offload_step_seconds(
        config, compute_seconds=compute, micro_steps=plan.grad_accum_steps))
    assert plan.predicted_step_seconds > compute
    assert "CPU offload (FSDP2 CPUOffloadPolicy" in plan.explain() and "host link" in plan.explain()
    with pytest.raises(ValueError, match="does not fit"):
        make_plan(dataclasses.replace(budget, offload="none"))
    forced = make_plan(Budget(preset="llama-1b", tokens=1e10, offload="cpu"))
    assert forced.offload == "cpu" and "--offload cpu" in forced.explain()


def test_checkpointing_when_plain_does_not_fit():
    plan = make_plan(Budget(preset="llama-8b", tokens=1e11, num_gpus=8, gpu_memory_gib=40))
    assert plan.activation_checkpointing == "full"


def test_round_trip(tmp_path):
    plan = make_plan(BUDGETS[1])
    assert Plan.from_dict(plan.to_dict()) == plan
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    path = plan.save(tmp_path / "sub" / "plan.json")
    assert Plan.load(path) == plan and not list(path.parent.glob(".*tmp"))
    with pytest.raises(ValueError, match="is missing min_lr, model"):
        Plan.from_dict({k: v for k, v in plan.to_dict().items() if k not in ("model", "min_lr")})
    with pytest.raises(ValueError, match="schema_version 0, this batchpilot reads 1, 2, 3"):
        Plan.from_dict({**plan.to_dict(), "schema_version": 0})
    new_fields = ("compile", "float8", "offload", "predicted_tokens_per_second", "mfu_source", "context_parallel")
    v1 = {k: v for k, v in plan.to_dict().items() if k not in new_fields} | {"schema_version": 1}
    old = Plan.from_dict(v1)  # a version 1 plan ran eager, without float8, offload or context parallelism
    assert old.schema_version == 3 and (old.compile, old.float8, old.offload) == (False, None, "none")
    assert old.global_batch_tokens == plan.global_batch_tokens and old.context_parallel == 1
    v2 = {k: v for k, v in plan.to_dict().items() if k != "context_parallel"} | {"schema_version": 2}
    assert Plan.from_dict(v2) == plan  # a version 2 plan split no sequence
    with pytest.raises(ValueError, match="is missing compile"):
        Plan.from_dict({k: v for k, v in plan.to_dict().items() if k != "compile"})
    with pytest.raises(ValueError, match="schema_version None"):
        Plan.from_dict({"peak_lr": 1.0})
    with pytest.raises(ValueError, match="a plan is a JSON object"):
        Plan.from_dict([1, 2])  # type: ignore[arg-type]


def test_compute_hours_and_mfu_from(tmp_path):
    config = get_preset("llama-1b")
    fpt = counting.training_flops_per_token(config, 2048)
    plan = make_plan(Budget(preset="llama-1b", compute_flops=1e20))
    assert plan.law["tokens"] == pytest.approx(1e20 / fpt)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": i, "mfu": m}) for i, m in enumerate([0.3, 0.5, None])))
    plan = make_plan(Budget(preset="llama-1b", hours=10, num_gpus=8, mfu_from=str(metrics)))
    assert plan.mfu == pytest.approx(0.4)
    assert plan.law["tokens"] == pytest.approx(8 * 989e12 * 0.4 * 36000 / fpt)
    assert plan.predicted_total_seconds == pytest.approx(36000, rel=0.1)


def test_params_only_derives_a_shape():
    config = derive_shape(1e9)
    assert counting.non_vocab_params(config) == pytest.approx(1e9, rel=0.02)
    plan = make_plan(Budget(params=1e9, tokens=2e10))
    assert plan.law["non_vocab_params"] == 1e9 and LlamaConfig(**plan.model) == config


def test_hf_config_and_fitted_law(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(get_preset("llama-125m"))))
    law = {"name": "mine", "lr": {"coef": 1.79, "exp_params": -0.713, "exp_tokens": 0.307},
           "batch": {"coef": 0.58, "exp_params": 0.0, "exp_tokens": 0.571},
           "fitted_range": {"params": [1e7, 1e8], "tokens": [1e9, 1e10]}, "schedule": "cosine"}
    (tmp_path / "law.json").write_text(json.dumps(law))
    plan = make_plan(Budget(hf_config=str(tmp_path), tokens=5e9, law=str(tmp_path / "law.json")))
    step = make_plan(Budget(preset="llama-125m", tokens=5e9))
    assert plan.peak_lr == pytest.approx(step.peak_lr) and plan.global_batch_tokens == step.global_batch_tokens
    assert not plan.warnings and plan.law["name"] == "mine"
    assert LlamaConfig(**plan.model).hidden_size == 768
    assert set(compare(Budget(preset="llama-125m", tokens=5e9, law=str(tmp_path / "law.json")))) == {
        "step", "deepseek", "mine"}  # a law file is shown by the name inside it


@pytest.mark.parametrize("kwargs, match", [
    (dict(preset="tiny", tokens=0), "tokens must be > 0"),
    (dict(preset="tiny", hours=-1), "hours must be > 0"),
    (dict(preset="tiny", tokens=1e9, num_gpus=0), "num_gpus must be > 0"),
    (dict(preset="tiny", tokens=1e9, compute_flops=1e18), "exactly one of tokens"),
    (dict(tokens=1e9), "exactly one of preset"),
    (dict(preset="llama-70b", tokens=1e9), "unknown preset.*llama-1b"),
    (dict(preset="tiny", tokens=1e9, optimizer="adam8bit"), "unknown optimizer"),
    (dict(preset="tiny", tokens=1e9, schedule="linear"), "unknown schedule"),
    (dict(preset="tiny", tokens=1e9, mfu=1.5), "mfu"),
    (dict(preset="tiny", tokens=1e9, float8="e4m3"), "--float8 'e4m3'"),
    (dict(preset="tiny", tokens=1e9, offload="disk"), "--offload 'disk'"),
    (dict(preset="tiny", tokens=1e9, pcie_gb_s=0), "--pcie-gb-s"),
])
def test_bad_budgets(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Budget(**kwargs)


def test_bad_plans():
    with pytest.raises(ValueError, match="unknown law 'chinchilla'; choose one of: step, deepseek"):
        make_plan(Budget(preset="tiny", tokens=1e9, law="chinchilla"))
    with pytest.raises(ValueError, match=r"does not fit .* use >= \d+ GPUs of 24 GiB, or >= \d+ GiB per GPU"):
        make_plan(Budget(preset="llama-8b", tokens=1e11, gpu_memory_gib=24, offload="none"))
    with pytest.raises(ValueError, match=r"does not fit .*; even CPU offload needs [\d.]+ GiB"):
        make_plan(Budget(preset="llama-8b", tokens=1e11, gpu_memory_gib=8))


# --- long sequences: checkpointing, streaming backprop, context parallelism ----------------------------------

def _largest(config, mode, *, seq_len, gib=80.0, gpus=1, cap=8):
    from batchpilot.plan import memory as m

    best = 0
    for mb in range(1, cap + 1):
        est = m.estimate_peak_bytes(config, micro_batch_size=mb, seq_len=seq_len, num_gpus=gpus,
                                    sharding="fsdp" if gpus > 1 else "none", checkpointing=mode == "full",
                                    stream_chunk_tokens=m.STREAM_CHUNK_TOKENS if mode == "stream" else None)
        if est.total_bytes > gib * (1 << 30) * 0.9:
            break
        best = mb
    return best


@pytest.mark.parametrize("seq_len", [8192, 32768, 131072])
def test_long_sequence_mode_maximises_micro_batch_then_time(seq_len):
    from batchpilot.model.llama import get_preset
    from batchpilot.plan import memory as m

    config = get_preset("llama-1b")
    fit = m.fit_micro_batch(config, seq_len=seq_len, optimizer="adamw", num_gpus=1, gpu_memory_gib=80.0,
                            headroom=0.1, max_micro_batch=8)
    sizes = {mode: _largest(config, mode, seq_len=seq_len) for mode in ("none", "full", "stream")}
    if fit.mode != "none":  # checkpointing or streaming only when no checkpointing cannot reach the reasonable size
        assert fit.micro_batch_size == max(sizes.values())
        cheaper = [mode for mode in ("none", "full", "stream")
                   if sizes[mode] == fit.micro_batch_size
                   and m.recompute_factor(config, mode) < m.recompute_factor(config, fit.mode)]
        assert not cheaper
    assert fit.reason


def test_128k_tokens_on_one_gpu_streams_and_explains_why():
    plan = make_plan(Budget(preset="llama-1b", tokens=2e10, seq_len=131072, num_gpus=1, gpu_memory_gib=80))
    assert plan.activation_checkpointing == "stream"
    text = plan.explain()
    assert "chose stream" in text and "StreamBP" in text
    short = make_plan(Budget(preset="llama-1b", tokens=2e10, seq_len=2048, num_gpus=1, gpu_memory_gib=80))
    assert short.activation_checkpointing == "none"


def test_recompute_factors_order_and_context_parallel_is_stated_with_gpus():
    from batchpilot.model.llama import get_preset
    from batchpilot.plan.memory import recompute_factor

    c = get_preset("llama-1b")
    assert recompute_factor(c, "none") == 1 < recompute_factor(c, "full") == pytest.approx(4 / 3)
    assert recompute_factor(c, "full") < recompute_factor(c, "stream") < 1.5
    plan = make_plan(Budget(preset="llama-8b", tokens=2e10, seq_len=131072, num_gpus=8, gpu_memory_gib=80))
    assert plan.activation_checkpointing in ("full", "stream")
    assert "context parallelism over 8 GPUs" in plan.explain()
