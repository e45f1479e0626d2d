"""``--parallel.offload cpu``: FSDP2 CPU offload trains exactly like the run without it (CPU, gloo).

One process (a one-rank FSDP2 mesh, as on one GPU) and 2 gloo ranks give the plain single-process run's
losses and gradient norms within fp32 tolerance; a stopped and resumed offload run continues them; the
optimizer is the fused CPU AdamW over the host shards; the flags reach the config and refuse what is not
supported.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_parallel import losses, run_ranks, tiny_run  # noqa: E402  (tests/train is on sys.path under pytest)

from batchpilot.cli import build_parser
from batchpilot.cli.train import build_config
from batchpilot.metrics import read_metrics
from batchpilot.model.llama import build_model, get_preset
from batchpilot.train import parallel
from batchpilot.train.config import TrainConfig
from batchpilot.train.optim import OptimConfig, build_optimizer
from batchpilot.train.parallel import ParallelConfig
from batchpilot.train.schedule import ScheduleConfig
from batchpilot.train.trainer import optimizer_config, train


def offloaded(cfg: TrainConfig, **parallel_fields) -> TrainConfig:
    par = dataclasses.asdict(cfg.parallel) | {"offload": "cpu", **parallel_fields}
    return dataclasses.replace(cfg, parallel=ParallelConfig(**par))


def grad_norms(run_dir) -> list[float]:
    return [r["grad_norm"] for r in read_metrics(run_dir) if "grad_norm" in r]


@pytest.fixture
def one_rank_group():
    """The in-process one-rank group an offload run starts is destroyed after the test."""
    yield
    parallel.shutdown_distributed()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from test_parallel import make_dataset

    return make_dataset(tmp_path_factory.mktemp("corpus"))


def test_offload_on_one_process_equals_the_plain_run(dataset, tmp_path, one_rank_group):
    plain = train(tiny_run(tmp_path / "plain", dataset))
    offload = train(offloaded(tiny_run(tmp_path / "offload", dataset)))
    assert losses(offload.run_dir) == pytest.approx(losses(plain.run_dir), rel=1e-5, abs=1e-6)
    assert grad_norms(offload.run_dir) == pytest.approx(grad_norms(plain.run_dir), rel=1e-5, abs=1e-6)
    assert losses(plain.run_dir)[-1] < losses(plain.run_dir)[0]
    assert (tmp_path / "offload" / "model" / "model.safetensors").is_file()  # export gathers the host shards


def _offload_worker(cfg_dict: dict) -> None:
    train(offloaded(TrainConfig(**cfg_dict)))


def test_offload_on_two_gloo_ranks_equals_one_process(dataset, tmp_path):
    single = train(tiny_run(tmp_path / "single", dataset))
    cfg = tiny_run(tmp_path / "offload", dataset)
    run_ranks(_offload_worker, {f: getattr(cfg, f) for f in cfg.__slots__}, timeout=120.0)
    assert losses(tmp_path / "offload") == pytest.approx(losses(single.run_dir), rel=1e-5, abs=1e-6)
    # plain FSDP2 on 2 ranks differs from one process by the same ~3e-5 in the norm (the shards' summation order)
    assert grad_norms(tmp_path / "offload") == pytest.approx(grad_norms(single.run_dir), rel=1e-4)


def test_offload_resume_equals_uninterrupted(dataset, tmp_path, one_rank_group):
    steps = dict(max_steps=4, save_every=2)
    full = train(offloaded(tiny_run(tmp_path / "full", dataset, **steps)))
    parallel.shutdown_distributed()
    first = train(offloaded(tiny_run(tmp_path / "resumed", dataset, stop_at_step=2, **steps)))
    assert first.steps == 2
    parallel.shutdown_distributed()
    resumed = train(offloaded(tiny_run(tmp_path / "resumed", dataset, resume=True, **steps)))
    assert resumed.steps == 4
    assert losses(resumed.run_dir) == pytest.approx(losses(full.run_dir), rel=1e-6, abs=1e-7)


def test_offload_keeps_shards_on_the_host_and_steps_them_with_fused_cpu_adamw(one_rank_group):
    config = get_preset("tiny").with_(num_layers=2, vocab_size=97)
    model = build_model(config, seed=0)
    parallel.parallelize(model, parallel.ParallelDims(), param_dtype=torch.float32, offload="cpu")
    assert parallel.is_sharded(model)
    assert all(p.device.type == "cpu" for p in model.parameters())
    cfg = TrainConfig(out_dir="unused", schedule=ScheduleConfig(max_steps=1), parallel=ParallelConfig(offload="cpu"))
    optim = optimizer_config(cfg)
    assert optim.fused is True  # the per-tensor loop is what fused=None would pick for CPU parameters
    optimizer = build_optimizer(model, optim)
    x = torch.randint(0, 97, (2, 16))
    loss = model(x, targets=x)
    loss.backward()
    norm = parallel.clip_grad_norm(model, 1.0)  # CPU DTensor gradients: the full norm over the shards
    assert torch.isfinite(norm) and norm.device.type == "cpu"
    optimizer.step()
    assert model(x, targets=x).item() < loss.item()
    assert optimizer_config(dataclasses.replace(cfg, optim=OptimConfig(fused=False))).fused is False


def test_offload_flags_reach_the_config_and_refuse_what_is_unsupported(tmp_path):
    parser = build_parser()
    for flags in (["--offload", "cpu"], ["--parallel.offload", "cpu"]):
        args = parser.parse_args(["train", "--out", str(tmp_path / "r"), "--schedule.max_steps", "1", *flags])
        assert build_config(args).parallel.offload == "cpu"
    args = parser.parse_args(["train", "--out", str(tmp_path / "r"), "--schedule.max_steps", "1", "--offload", "none",
                              "--parallel.offload", "cpu"])
    assert build_config(args).parallel.offload == "cpu"  # the dotted flag wins over its short alias
    with pytest.raises(ValueError, match="--parallel.offload 'gpu'"):
        ParallelConfig(offload="gpu")
    with pytest.raises(ValueError, match="--parallel.float8 with --parallel.offload cpu"):
        ParallelConfig(offload="cpu", float8="tensorwise")
    with pytest.raises(ValueError, match="--parallel.master_dtype"):
        ParallelConfig(master_dtype="float16")
    args = parser.parse_args(["train", "--out", str(tmp_path / "r"), "--schedule.max_steps", "1", "--recipe", "sft"])
    assert build_config(args).recipe.name == "sft"  # the other short name
    with pytest.raises(ValueError, match="--batch.auto_micro_batch with --parallel.offload cpu"):
        TrainConfig.from_dict({"out_dir": "r", "schedule": {"max_steps": 1}, "parallel": {"offload": "cpu"},
                               "batch": {"auto_micro_batch": True}})
    tree = {"out_dir": str(tmp_path / "r"), "schedule": {"max_steps": 1}, "parallel": {"offload": "cpu"}}
    assert TrainConfig.from_dict(tree).parallel.offload == "cpu"  # and from a config file


def test_bf16_masters_keep_parameters_and_adamw_states_in_bf16(dataset, tmp_path):
    """``--parallel.master_dtype bfloat16`` (what the 8B offload benchmark runs): half the optimizer's bytes."""
    from batchpilot.train import run

    cfg = tiny_run(tmp_path / "bf16", dataset)
    par = ParallelConfig(device="cpu", master_dtype="bfloat16")
    model = run.build_run_model(cfg.model, run.model_config(cfg.model), par, parallel.ParallelDims())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    optimizer = build_optimizer(model, OptimConfig())
    x = torch.randint(0, 100, (2, 16))
    model(x, targets=x).backward()
    optimizer.step()
    assert {s["exp_avg_sq"].dtype for s in optimizer.state.values()} == {torch.bfloat16}


def test_a_plan_that_offloads_fixes_parallel_offload(dataset, tmp_path):
    """Schema 2 plans carry ``offload``; one that says cpu makes ``train --plan`` offload (older plans: unset)."""
    import types

    from batchpilot.train import run
    from batchpilot.train.config import plan_settings

    cfg = tiny_run(tmp_path / "p", dataset)
    plan = run.executed_plan(cfg, run.model_config(cfg.model), parallel.ParallelDims())
    fields = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}
    assert plan_settings(types.SimpleNamespace(**{**fields, "offload": "cpu"}))["parallel.offload"] == "cpu"
    assert "parallel.offload" not in plan_settings(types.SimpleNamespace(**{**fields, "offload": "none"}))
    assert plan.compile is False and plan.offload == "none"  # the executed plan records the run's own layout
    # the plan's memory fit assumed its blocks: compile and float8 are fixed by the plan too
    fixed = plan_settings(types.SimpleNamespace(**{**fields, "compile": True, "float8": "tensorwise"}))
    assert fixed["parallel.compile"] is True and fixed["parallel.float8"] == "tensorwise"
