"""TrainConfig is made of components; flags and config files reach every field; a run's config.json re-runs it."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from batchpilot.cli import build_parser, main
from batchpilot.cli.config import load_config_file
from batchpilot.data.packing import PackedLoader
from batchpilot.model.llama import build_model, get_preset
from batchpilot.plan.planner import Plan
from batchpilot.train import trainer
from batchpilot.train.config import COMPONENTS, LEGACY_NAMES, TrainConfig, config_from_legacy, field_types
from batchpilot.train.optim import OptimConfig, build_optimizer
from batchpilot.train.parallel import ParallelDims

# The full flag list of `batchpilot train`; a change here is deliberate (and needs a line in docs/train.md).
TRAIN_FLAGS = sorted("""
--activation-checkpointing --adaptive-min-interval-steps --adaptive-target-multiplier --adaptive-warmup-steps
--auto-micro-batch --batch-policy --batch-ramp --batch.auto_micro_batch --batch.confidence_z --batch.ema_beta
--batch.global_batch_tokens --batch.lr_coupling --batch.max_batch_tokens --batch.max_growth --batch.measure_noise
--batch.micro_batch_size --batch.min_interval_steps --batch.min_measurements --batch.min_relative_change
--batch.norm_test_eta --batch.policy --batch.ramp --batch.target --batch.target_multiplier --beta1 --beta2
--checkpoint.keep --checkpoint.resume --checkpoint.resume_override --checkpoint.save_every --compile --config
--context-parallel --data --data.format --data.loss_on --data.pack --data.path --data.seed --data.seq_len
--data.text_field --debug --device --eval-batches --eval-every --float8 --fsdp-one-device --global-batch-tokens
--grad-clip --keep-checkpoints --log-every --logging.eval_batches --logging.eval_every --logging.log_every
--logging.peak_tflops --logging.progress --logging.tensorboard --lora.alpha --lora.dropout --lora.rank
--lora.target_modules --lr --lr-coupling --max-global-batch-tokens --max-steps --max-tokens --measure-noise
--micro-batch-size --min-lr --model --model.name --model.seed --moe.balance --moe.balance_coef --moe.z_loss_coef
--offload --optim.beta1 --optim.beta2 --optim.eps --optim.fused --optim.grad_clip --optim.lr --optim.momentum
--optim.name --optim.trust_coefficient --optim.weight_decay --optimizer --out --parallel.activation_checkpointing
--parallel.compile --parallel.context_parallel --parallel.device --parallel.float8 --parallel.fsdp_one_device
--parallel.master_dtype --parallel.offload --parallel.stream_chunk --parallel.stream_offload --peak-tflops --plan
--preset --progress --recipe --recipe.name --resume --save-every --schedule --schedule.decay_fraction --schedule.decay_shape --schedule.max_steps
--schedule.max_tokens --schedule.min_lr --schedule.name --schedule.power_a --schedule.power_b
--schedule.power_decay_fraction --schedule.stop_at_step --schedule.warmup_tokens --seed --seq-len --stop-at-step
--tensorboard --text-field --warmup-tokens --weight-decay
""".split())


def train_flags() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    flags = {s for action in sub.choices["train"]._actions for s in action.option_strings}
    return sorted(f for f in flags if f.startswith("--") and f not in ("--help",) and not f.startswith("--no-"))


def test_the_flag_list_is_frozen():
    assert train_flags() == TRAIN_FLAGS


def test_every_component_field_has_a_flag_and_a_file_key():
    flags = set(train_flags())
    for name, kind in COMPONENTS.items():
        for f in dataclasses.fields(kind):
            assert f"--{name}.{f.name}" in flags
    assert set(field_types()) == {f"{n}.{f.name}" for n, k in COMPONENTS.items() for f in dataclasses.fields(k)}
    # TrainConfig: one field per component, plus out_dir and the plan
    assert [f.name for f in dataclasses.fields(TrainConfig)] == ["out_dir", *COMPONENTS, "plan"]
    assert all(t in field_types() for targets in LEGACY_NAMES.values() for t in targets)


def test_file_form_round_trips(tmp_path):
    cfg = config_from_legacy(str(tmp_path / "r"), max_steps=3, lr=1e-2, optimizer="lamb", batch_policy="ramp",
                             batch_ramp="1e3:16384", seq_len=64, global_batch_tokens=8192)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown field optim.lrr"):
        TrainConfig.from_dict({"out_dir": "x", "optim": {"lrr": 1.0}, "schedule": {"max_steps": 1}})
    with pytest.raises(ValueError, match="unknown keys bogus"):
        TrainConfig.from_dict({"out_dir": "x", "bogus": {}})


@pytest.mark.parametrize("suffix, text", [
    (".toml", '[optim]\nname = "sgd"\nlr = 0.05\n[schedule]\nmax_steps = 7\nname = "wsd"\n[batch]\npolicy = "fixed"\n'),
    (".json", '{"optim": {"name": "sgd", "lr": 0.05}, "schedule": {"max_steps": 7, "name": "wsd"}}'),
    (".yaml", "optim:\n  name: sgd\n  lr: 0.05\nschedule:\n  max_steps: 7\n  name: wsd\n"),
])
def test_config_files_and_flags_override_them(tmp_path, suffix, text):
    if suffix == ".yaml":
        pytest.importorskip("yaml")
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    assert load_config_file(path)["optim"]["name"] == "sgd"
    from batchpilot.cli.train import build_config

    parser = build_parser()
    args = parser.parse_args(["train", "--config", str(path), "--out", str(tmp_path / "r"), "--optim.lr", "0.2",
                              "--batch.target", "norm_test"])
    cfg = build_config(args)
    assert (cfg.optim.name, cfg.optim.lr, cfg.schedule.max_steps, cfg.schedule.name) == ("sgd", 0.2, 7, "wsd")
    assert cfg.batch.target == "norm_test" and cfg.out_dir == str(tmp_path / "r")


def test_legacy_flags_print_one_deprecation_line_each(tmp_path, capsys):
    from batchpilot.cli.train import build_config

    args = build_parser().parse_args(["train", "--lr", "0.01", "--max-steps", "2", "--out", str(tmp_path / "r")])
    cfg = build_config(args)
    assert (cfg.optim.lr, cfg.schedule.max_steps) == (0.01, 2)
    err = capsys.readouterr().err.splitlines()
    assert "--lr is deprecated and will be removed; use --optim.lr" in err[0]
    assert len(err) == 2 and "--schedule.max_steps" in err[1]


def test_config_json_of_a_run_reproduces_its_first_10_losses(tmp_path, tiny_data):
    flags = ["--model.name", "tiny", "--data.path", str(tiny_data), "--data.seq_len", "32",
             "--batch.global_batch_tokens", "128", "--batch.micro_batch_size", "2", "--schedule.max_steps", "10",
             "--optim.lr", "1e-2", "--schedule.min_lr", "1e-3", "--logging.eval_every", "5",
             "--logging.eval_batches", "1", "--checkpoint.save_every", "5", "--parallel.device", "cpu"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", *flags, "--out", str(first)]) == 0
    assert main(["train", "--config", str(first / "config.json"), "--out", str(second)]) == 0
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (first, second)]
    assert len(losses[0]) == 10 and losses[0] == losses[1]
    config = json.loads((second / "config.json").read_text())
    assert config == {**json.loads((first / "config.json").read_text()), "out_dir": str(second)}
    plan = Plan.load(second / "plan.json")  # a run without a plan records the same type, without a law
    assert plan.law is None and plan.global_batch_tokens == 128 and plan.total_steps == 10


def test_a_nan_gradient_stops_before_the_update_naming_a_finite_checkpoint(tmp_path, tiny_data, monkeypatch):
    """A finite loss whose gradient is NaN (at step 3): the step is not applied, the stop names step 2."""
    calls = {"n": 0}
    real = trainer.forward_loss

    def poisoned(model, batch, device):
        loss = real(model, batch, device)
        calls["n"] += 1
        if model.training and calls["n"] == 5:  # 2 micro-batches per step: the first of step 3
            loss.register_hook(lambda g: g * math.nan)
        return loss

    monkeypatch.setattr(trainer, "forward_loss", poisoned)
    cfg = config_from_legacy(str(tmp_path / "run"), model="tiny", data=str(tiny_data), seq_len=32,
                             global_batch_tokens=128, micro_batch_size=2, max_steps=6, save_every=2,
                             eval_every=100, eval_batches=1, progress=False, device="cpu")
    with pytest.raises(trainer.TrainingDiverged, match="gradient norm became nan at step 3, not applied; "
                                                       "last good checkpoint: .*step_00000002"):
        trainer.train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)


def test_train_step_leaves_parameters_and_optimizer_state_untouched_on_nan(tiny_data):
    model = build_model(get_preset("tiny").with_(num_layers=1), seed=0)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    before = [p.detach().clone() for p in model.parameters()]
    next(model.parameters()).register_hook(lambda g: g * math.nan)
    loader = PackedLoader(tiny_data, "train", 32, seed=0)
    with pytest.raises(trainer.NonFiniteUpdate, match="gradient norm"):
        trainer.train_step(model, optimizer, loader, global_batch_tokens=128, seq_len=32, micro_batch_size=2,
                           dims=ParallelDims(), grad_clip=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not optimizer.state and all(p.grad is None for p in model.parameters())


# ---- issue 14: a run directory a scheduler can re-run, one process per directory, preemption, resume drift ----

def _run(tmp_path, data, out="run", **kw):
    base = dict(model="tiny", data=str(data), seq_len=32, global_batch_tokens=128, micro_batch_size=2, max_steps=4,
                save_every=2, eval_every=100, eval_batches=1, progress=False, device="cpu")
    return config_from_legacy(str(tmp_path / out), **{**base, **kw})


def test_resume_on_a_missing_directory_starts_the_run_and_a_locked_one_is_refused(tmp_path, tiny_data):
    from batchpilot.io import FileLock

    assert trainer.train(_run(tmp_path, tiny_data, max_steps=2, resume=True)).steps == 2
    with FileLock(tmp_path / "run" / ".lock"):  # another train process holds the directory
        with pytest.raises(ValueError, match="in use by another batchpilot process"):
            trainer.train(_run(tmp_path, tiny_data, max_steps=2, resume=True))


def test_resume_drift_is_refused_unless_overridden_and_rerun_steps_are_logged_once(tmp_path, tiny_data):
    trainer.train(_run(tmp_path, tiny_data, out="full"))
    trainer.train(_run(tmp_path, tiny_data, stop_at_step=3))  # checkpoints at steps 2 and 3
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "latest").write_text("step_00000002")  # killed after logging step 3, before saving
    for change, name in [(dict(weight_decay=0.0), "optim.weight_decay"), (dict(beta2=0.9), "optim.beta2"),
                         (dict(min_lr=1e-5), "schedule.min_lr"), (dict(max_steps=5), "schedule.max_steps")]:
        with pytest.raises(ValueError, match=f"cannot resume .* different {name}"):
            trainer.train(_run(tmp_path, tiny_data, resume=True, **change))
    resumed = trainer.train(_run(tmp_path, tiny_data, resume=True))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line)["loss"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and [r["loss"] for r in records] == want
    assert resumed.steps == 4
    longer = _run(tmp_path, tiny_data, resume=True, max_steps=6)
    longer.checkpoint.resume_override = "max_steps=6"
    assert trainer.train(longer).steps == 6
    logged = json.loads((run_dir / "resume_overrides.jsonl").read_text().splitlines()[-1])
    assert logged == {"schedule.max_steps": {"from": 4, "to": 6}}
