"""The SFT recipe: the paper's directions hold (larger batch -> lower LR, constant schedule), small datasets cap
the batch, memory decides micro-batch / accumulation or offload, and the early-signal ranking is what it says."""

import math

import pytest

from batchpilot.model.llama import get_preset
from batchpilot.plan.sft import LARGE_BATCH_LR, PAPER_LARGE_BATCH_EXAMPLES, TULU_LR, SftBudget, large_batch_lr, plan_sft


def test_large_dataset_gets_the_papers_large_batch_and_low_lr():
    plan = plan_sft(SftBudget(config=get_preset("llama-8b"), examples=300_000, tokens_per_example=600, num_gpus=8,
                              gpu_memory_gib=80))
    assert plan.batch_examples == PAPER_LARGE_BATCH_EXAMPLES and plan.peak_lr == pytest.approx(LARGE_BATCH_LR)
    assert plan.schedule == "constant" and plan.epochs == 2 and plan.steps == 300_000 * 2 // 3840
    assert plan.batch_tokens == 3840 * 600 and plan.rows_per_step == math.ceil(3840 * 600 / plan.seq_len)
    assert plan.offload == "none"
    assert plan.micro_batch_rows * 8 * plan.grad_accum_steps >= plan.rows_per_step
    assert any("2412.13337" in line for line in plan.explanation)
    assert any("[ours]" in line for line in plan.explanation)


def test_small_dataset_caps_the_batch_and_raises_the_lr():
    plan = plan_sft(SftBudget(config=get_preset("qwen2-0.5b"), examples=20_000, tokens_per_example=300))
    assert plan.epochs == 2 and plan.batch_examples == 20_000 * 2 // 50 and plan.steps >= 50
    assert LARGE_BATCH_LR < plan.peak_lr < TULU_LR
    tiny = plan_sft(SftBudget(config=get_preset("qwen2-0.5b"), examples=2_000, tokens_per_example=300))
    assert tiny.epochs == 3 and tiny.batch_examples == 2_000 * 3 // 50 and tiny.peak_lr == TULU_LR
    assert any("outside the paper's 3B-7B" in line for line in plan.explanation)


def test_lr_falls_monotonically_with_batch():
    lrs = [large_batch_lr(b) for b in (16, 128, 512, 2048, 3840, 7680)]
    assert lrs[0] == lrs[1] == pytest.approx(TULU_LR) and lrs[-1] == lrs[-2] == pytest.approx(LARGE_BATCH_LR)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_model_too_large_for_the_gpu_proposes_offload():
    plan = plan_sft(SftBudget(config=get_preset("llama-8b"), examples=50_000, tokens_per_example=500,
                              gpu_memory_gib=24))
    assert plan.offload == "cpu" and plan.micro_batch_rows >= 1 and plan.checkpointing
    assert any("--parallel.offload cpu" in line for line in plan.explanation)


def test_budget_errors():
    with pytest.raises(ValueError, match="--examples"):
        SftBudget(config=get_preset("tiny"), examples=0, tokens_per_example=10)





def test_offload_step_time_is_bounded_by_the_host_link_and_the_cpu_step():
    from batchpilot.plan.sft import CPU_ADAM_BYTES_PER_PARAM, OFFLOAD_BYTES_PER_PARAM, predicted_step_seconds
    from batchpilot.model.counting import total_params

    budget = SftBudget(config=get_preset("llama-8b"), examples=50_000, tokens_per_example=500, gpu_memory_gib=24)
    plan = plan_sft(budget)
    compute = predicted_step_seconds(budget, plan.rows_per_step, offload="none")
    params = total_params(budget.config)
    micro_steps = -(-plan.rows_per_step // plan.micro_batch_rows)
    link = 3 * params * OFFLOAD_BYTES_PER_PARAM * micro_steps / (budget.pcie_gb_s * 1e9)
    cpu = params * CPU_ADAM_BYTES_PER_PARAM / (budget.cpu_memory_gb_s * 1e9)
    assert plan.predicted_step_seconds == pytest.approx(max(compute, link) + cpu)
    assert plan.predicted_step_seconds > compute and any("host link" in line for line in plan.explanation)
    halved = plan_sft(SftBudget(config=get_preset("llama-8b"), examples=50_000, tokens_per_example=500,
                                gpu_memory_gib=24, pcie_gb_s=25.0))
    assert halved.predicted_step_seconds > plan.predicted_step_seconds


def test_cli_plan_sft_saves_a_plan_that_train_executes(tmp_path, capsys):
    from batchpilot.cli import main
    from batchpilot.cli.train import build_config
    from batchpilot.model.hf import save_model
    from batchpilot.model.llama import build_model
    from batchpilot.plan.planner import Plan

    model_dir = tmp_path / "model"
    save_model(build_model(get_preset("tiny"), seed=0), model_dir)
    out = tmp_path / "sft_plan.json"
    assert main(["plan", "--recipe", "sft", "--model", str(model_dir), "--examples", "3000",
                 "--tokens-per-example", "200", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2412.13337" in printed and "SFT plan" in printed
    plan = Plan.load(out)
    assert plan.schedule == "constant" and plan.model == str(model_dir) and plan.law is None
    import argparse

    parser = argparse.ArgumentParser()
    from batchpilot.cli import train as train_cli

    train_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--plan", str(out), "--recipe", "sft", "--data", str(tmp_path / "x.jsonl"),
                              "--out", str(tmp_path / "run")])
    cfg = build_config(args)
    assert (cfg.recipe.name, cfg.schedule.name, cfg.optim.lr) == ("sft", "constant", plan.peak_lr)
    assert cfg.schedule.max_steps == plan.total_steps and cfg.batch.global_batch_tokens == plan.global_batch_tokens
    assert cfg.optim.weight_decay == 0.0 and cfg.data.format == "chat"  # the recipe fills what the plan leaves
