"""``batchpilot plan`` through the real dispatcher."""

import json

from batchpilot.cli import main
from batchpilot.plan.planner import Plan

KEYS = {"global_batch_tokens", "peak_lr", "micro_batch_size", "grad_accum_steps", "seq_len", "total_steps",
        "warmup_steps", "schedule", "min_lr", "predicted_peak_memory_bytes", "predicted_step_seconds",
        "predicted_total_seconds", "activation_checkpointing", "sharding", "num_gpus", "model", "law"}


def test_json_and_out(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", "--preset", "llama-1b", "--tokens", "1e11", "--gpus", "8", "--json", "--out", str(out)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert KEYS <= set(d) and {"name", "non_vocab_params", "batch_tokens", "peak_lr"} <= set(d["law"])
    assert d["model"] == "llama-1b" and Plan.load(out).to_dict() == d


def test_human_output(capsys):
    assert main(["plan", "--params", "3e8", "--hours", "2", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "1. model: derived" in out and "global batch" in out


def test_compare(capsys):
    assert main(["plan", "--preset", "llama-125m", "--tokens", "1e10", "--compare", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d) == {"step", "deepseek"} and d["deepseek"]["schedule"] == "multistep"
    assert main(["plan", "--preset", "llama-125m", "--tokens", "1e10", "--compare"]) == 0
    assert "deepseek" in capsys.readouterr().out


def test_errors_exit_2(capsys):
    assert main(["plan", "--preset", "tiny", "--tokens", "1e9", "--law", "nope"]) == 2
    assert "unknown law 'nope'; choose one of: step, deepseek" in capsys.readouterr().err
    assert main(["plan", "--preset", "llama-8b", "--tokens", "1e9", "--gpu-memory-gib", "16", "--offload", "none"]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_compile_float8_offload_and_mfu_table_flags(capsys, tmp_path):
    table = tmp_path / "mfu.json"
    table.write_text(json.dumps({"mfu": [{"seq_len": 2048, "micro_batch_size": 4, "mfu": 0.5}]}))
    assert main(["plan", "--preset", "llama-1b", "--tokens", "1e10", "--json", "--mfu-from", str(table),
                 "--float8", "tensorwise"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["compile"] is True and d["float8"] == "tensorwise" and d["mfu"] == 0.5 and d["schema_version"] == 3
    assert d["predicted_tokens_per_second"] > 0 and d["mfu_source"].startswith("table mfu.json")
    assert main(["plan", "--preset", "llama-1b", "--tokens", "1e10", "--json", "--no-compile"]) == 0
    assert json.loads(capsys.readouterr().out)["compile"] is False
    assert main(["plan", "--preset", "llama-8b", "--tokens", "1e10", "--gpu-memory-gib", "24", "--json",
                 "--pcie-gb-s", "25"]) == 0
    slow = json.loads(capsys.readouterr().out)
    assert slow["offload"] == "cpu"
    assert main(["plan", "--preset", "llama-8b", "--tokens", "1e10", "--gpu-memory-gib", "24", "--offload", "none"]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert main(["plan", "--preset", "llama-8b", "--tokens", "1e10", "--gpu-memory-gib", "24", "--json"]) == 0
    # a faster host link: more tokens/s (the micro-batch and accumulation may differ between the two plans)
    assert json.loads(capsys.readouterr().out)["predicted_tokens_per_second"] > slow["predicted_tokens_per_second"]
    assert main(["plan", "--preset", "tiny", "--tokens", "1e9", "--mfu-from", str(tmp_path / "none.json")]) == 2
    assert "--mfu-from" in capsys.readouterr().err


def test_config_file_sets_options_and_flags_win(capsys, tmp_path):
    cfg = tmp_path / "plan.toml"
    cfg.write_text('preset = "llama-1b"\ntokens = 1e10\ncompile = false\noffload = "none"\ngpu-memory-gib = 40\n')
    assert main(["plan", "--config", str(cfg), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["compile"] is False and d["gpu_memory_bytes"] == 40 * 2**30 and d["model"] == "llama-1b"
    assert main(["plan", "--config", str(cfg), "--json", "--gpu-memory-gib", "60"]) == 0
    assert json.loads(capsys.readouterr().out)["gpu_memory_bytes"] == 60 * 2**30
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"preset": "tiny", "tokens": 1e9, "wings": 2}))
    assert main(["plan", "--config", str(bad)]) == 2
    assert "unknown key 'wings'" in capsys.readouterr().err
    bad.write_text(json.dumps({"preset": "tiny", "tokens": 1e9, "offload": "disk"}))
    assert main(["plan", "--config", str(bad)]) == 2
    assert "offload = 'disk'; choose one of auto, none, cpu" in capsys.readouterr().err
