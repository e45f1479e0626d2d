"""End to end through the command line: plan -> train -> sample, and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest

from batchpilot.cli import main


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "batchpilot", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_plan_then_train_executes_the_plan(tmp_path, tiny_text_dir):
    plan_path = tmp_path / "plan.json"
    assert main(["plan", "--preset", "tiny", "--tokens", "6144", "--gpus", "1", "--gpu-memory-gib", "8",
                 "--seq-len", "64", "--law", "step", "--out", str(plan_path)]) == 0  # 96 steps of 64 tokens
    plan = json.loads(plan_path.read_text())
    run = tmp_path / "run"
    assert main(["train", "--plan", str(plan_path), "--data", str(tiny_text_dir), "--out", str(run),
                 "--eval-every", "1000"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert json.loads((run / "plan.json").read_text()) == plan
    for key, (component, field) in [("global_batch_tokens", ("batch", "global_batch_tokens")),
                                    ("micro_batch_size", ("batch", "micro_batch_size")), ("peak_lr", ("optim", "lr")),
                                    ("seq_len", ("data", "seq_len")), ("total_steps", ("schedule", "max_steps")),
                                    ("warmup_tokens", ("schedule", "warmup_tokens"))]:
        assert config[component][field] == plan[key]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == plan["total_steps"]
    assert all(m["global_batch_tokens"] == plan["global_batch_tokens"] for m in metrics)


def test_plan_flags_cannot_override_the_plan(tmp_path):
    plan_path = tmp_path / "plan.json"
    main(["plan", "--preset", "tiny", "--tokens", "24576", "--gpus", "1", "--gpu-memory-gib", "8", "--seq-len", "64",
          "--out", str(plan_path)])
    assert main(["train", "--plan", str(plan_path), "--lr", "0.1", "--out", str(tmp_path / "r")]) == 2
    assert main(["train", "--plan", str(plan_path), "--optim.lr", "0.1", "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "nope", "--max-steps", "1"], "neither a preset"),
    (["train", "--data", "/no/such/path", "--max-steps", "1"], "/no/such/path"),
    (["train", "--max-steps", "1", "--seq-len", "100", "--global-batch-tokens", "150"], "multiple of seq_len"),
    (["train"], "--max-steps"),
    (["train", "--max-steps", "1", "--float8", "fp4"], "float8 'fp4': choose one of tensorwise, rowwise"),
    (["train", "--schedule.max_steps", "1", "--logging.eval_every", "-1"], "eval_every >= 0"),
    (["train", "--schedule.max_steps", "1", "--checkpoint.save_every", "0"], "save_every must be >= 1"),
    (["train", "--schedule.max_steps", "1", "--logging.log_every", "0"], "log_every >= 1"),
    (["train", "--schedule.max_steps", "1", "--optim.name", "adam"], "unknown optimizer 'adam'"),
    (["train", "--schedule.max_steps", "1", "--batch.policy", "grow"], "--batch.policy 'grow'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = run_cli(*args, "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.strip().splitlines() if "is deprecated" not in line]
    assert len(errors) == 1


def test_malformed_jsonl_and_missing_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    result = run_cli("train", "--data", str(bad), "--max-steps", "1", "--out", str(tmp_path / "r1"))
    assert result.returncode == 2 and "bad.jsonl:2" in result.stderr and "Traceback" not in result.stderr
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"body": "x"}\n')
    result = run_cli("train", "--data", str(missing), "--max-steps", "1", "--out", str(tmp_path / "r2"))
    assert result.returncode == 2 and "text" in result.stderr


def test_unknown_flag_is_an_error(tmp_path):
    result = run_cli("train", "--max-steps", "1", "--no-such-flag", "3", "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "train", "--preset", "nope", "--max-steps", "1", "--out", str(tmp_path / "r"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_checkpoint_from_another_shape_is_refused(tmp_path, tiny_text_dir):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_text_dir), "--max-steps", "2", "--seq-len", "32",
                 "--global-batch-tokens", "128", "--micro-batch-size", "4", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    config["model"]["name"] = "llama-125m"
    (run / "config.json").write_text(json.dumps(config))  # someone points the run at another model
    assert main(["train", "--data", str(tiny_text_dir), "--max-steps", "4", "--seq-len", "32",
                 "--global-batch-tokens", "128", "--micro-batch-size", "4", "--out", str(run), "--resume"]) == 2


def test_read_metrics_drops_a_torn_last_line_only(tmp_path):
    from batchpilot.metrics import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{broken\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(tmp_path)
