"""Issue 15, the CLI job's cold path: weights straight into the serving dtype, compile decided by the job, an
honest end line."""

import json

import pytest
import torch

from batchpilot import load_model
from batchpilot.cli import main
from batchpilot.cli.generate import (CompileRecords, assumed_compile_gain_s, cache_root, compile_numbers,
                                     decide_compile, expected_decode_steps, load_for_serving,
                                     use_persistent_compile_cache)


def test_load_for_serving_equals_load_model(model_dir):
    ref = load_model(model_dir)
    got = load_for_serving(model_dir, device=torch.device("cpu"), dtype=torch.float32)
    assert got.lm_head.weight is got.embed_tokens.weight  # tied as load_model ties them
    ref_state, got_state = ref.state_dict(), got.state_dict()
    assert ref_state.keys() == got_state.keys()
    assert all(torch.equal(ref_state[k], got_state[k]) for k in ref_state)
    assert torch.equal(ref.inv_freq, got.inv_freq) and got.inv_freq.dtype == torch.float32
    ids = torch.tensor([[3, 5, 7, 11]])
    assert torch.equal(ref(ids), got(ids))
    half = load_for_serving(model_dir, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert half.embed_tokens.weight.dtype == torch.bfloat16 and half.inv_freq.dtype == torch.float32


def test_compile_is_decided_by_the_job():
    assert expected_decode_steps([128] * 8000, 1024) == 8 * 128
    assert expected_decode_steps([5, 100, 7], 2) == 100 + 5
    # the prior: the measured H200 point (llama-1b, 875 rows, 16 layers: 13.94 vs 9.86 ms) comes back out of it
    step = assumed_compile_gain_s(875, 16, 4.8e12)
    assert step == pytest.approx(4.08e-3, rel=0.02)
    assert assumed_compile_gain_s(64, 16, 4.8e12) == pytest.approx(step * 64 / 875)  # fewer rows, less to fuse
    gain, cost, source = compile_numbers({}, step, None)
    assert (gain, cost, source) == (step, 20.0, "assumed, gain assumed")
    # issue 15's 8,000-line job (1,024 steps at 1,024 rows) does not pay a cold 20 s compile; a 10x longer job does
    assert not decide_compile("auto", expected_decode_steps([128] * 8000, 1024), gain, cost)
    assert decide_compile("auto", expected_decode_steps([1280] * 8000, 1024), gain, cost)
    assert decide_compile("on", 1, gain) and not decide_compile("off", 10**9, gain)
    # measured on this machine: a cached compile costs little, and the measured gain decides
    gain, cost, source = compile_numbers({"compile_s": 1.5, "step_s_eager": 6e-3, "step_s_compiled": 4e-3}, step, None)
    assert (round(gain, 6), cost, source) == (2e-3, 1.5, "measured, gain measured")
    assert decide_compile("auto", expected_decode_steps([128] * 8000, 1024), gain, cost)
    assert compile_numbers({"compile_s": 1.5}, step, 7.0)[1:] == (7.0, "--compile-cost-s, gain assumed")


def test_compile_records_and_cache_dir(tmp_path, monkeypatch, model_dir):
    monkeypatch.setenv("BATCHPILOT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert cache_root() == tmp_path / "cache"
    assert use_persistent_compile_cache() == tmp_path / "cache" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_persistent_compile_cache() == tmp_path / "mine"  # a directory the user names wins
    records = CompileRecords(cache_root() / "compile_costs.json")
    key = records.key(load_for_serving(model_dir, device=torch.device("cpu"), dtype=torch.float32))
    assert records.get(key) == {}
    records.update(key, {"compile_s": 12.5})
    records.update(key, {"step_s_eager": 0.004})
    assert records.get(key) == {"compile_s": 12.5, "step_s_eager": 0.004}
    (cache_root() / "compile_costs.json").write_text("{not json")
    assert records.get(key) == {}


def test_end_line_reports_wall_cold_and_lines(model_dir, tmp_path, capsys):
    job, out = tmp_path / "job.jsonl", tmp_path / "out.jsonl"
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": "And God said", "max_tokens": 3}} for i in range(3)]
    job.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"bad"\n')
    args = ["generate", "--model", str(model_dir), "--input", str(job), "--output", str(out), "--dtype", "float32"]
    assert main(args) == 0  # stdout is not a terminal under pytest: no bar
    first = capsys.readouterr().out
    assert "lines: done 3, errors 1, skipped 0" in first and "wall " in first and "cold " in first
    assert "\r" not in first and "compile off (auto: no CUDA decode graphs)" in first
    assert main(args) == 0
    assert "lines: done 0, errors 0, skipped 4" in capsys.readouterr().out
