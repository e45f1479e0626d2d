"""``benchmarks/serve_goodput.py``'s summary: the issue's keys, by the definitions docs/serve.md states."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))  # its sibling modules (provenance)
    spec = importlib.util.spec_from_file_location("serve_goodput", BENCHMARKS / "serve_goodput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(rate, goodput):
    return {"rate": rate, "goodput_rps": goodput}


def test_summary_compares_at_aggressives_peak_and_takes_saturation_from_its_own_phase(bench):
    results = {"past_future": {"chat": [_row(25, 25.0), _row(50, 45.0), _row(100, 30.0)]},
               "aggressive": {"chat": [_row(25, 25.0), _row(50, 30.0), _row(100, 20.0)]},
               "conservative": {"chat": [_row(25, 20.0), _row(50, 15.0), _row(100, 10.0)]}}
    saturated = {"past_future": {"chat": {"output_tokens_per_s": 4000.0}}}
    offline = {"chat": {"output_tokens_per_s": 5000.0, "prefill_p50_s": 0.02, "decode_step_p50_s": 0.004}}
    low_load = {"chat": {"ttft_p50": 0.03, "tpot_p50": 0.0044}}
    variants = {"--decode-steps 1": {"chat": {"ttft_p50": 0.022, "tpot_p50": 0.005}}}
    s = bench.summarize(results, low_load, saturated, offline, variants)
    chat = s["per_workload"]["chat"]
    assert chat["rate"] == 50 and s["goodput_vs_aggressive"] == 1.5 and s["goodput_vs_conservative"] == 3.0
    assert s["saturation_vs_offline"] == pytest.approx(0.8)  # the saturation phase, not a rate's tokens/s
    assert s["low_load_ttft_vs_prefill"] == pytest.approx(1.5)
    assert chat["low_load_tpot_vs_decode_step"] == pytest.approx(1.1)
    assert chat["low_load_variants"]["--decode-steps 1"]["ttft_vs_prefill"] == pytest.approx(1.1)


def test_ttft_split_reads_the_phase_histograms(bench):
    before = {"batchpilot_ttft_phase_seconds_count{parse}": 2.0, "batchpilot_ttft_phase_seconds_sum{parse}": 0.002}
    after = {"batchpilot_ttft_phase_seconds_count{parse}": 4.0, "batchpilot_ttft_phase_seconds_sum{parse}": 0.006,
             "batchpilot_time_to_first_token_seconds_count": 2.0, "batchpilot_time_to_first_token_seconds_sum": 0.05,
             "batchpilot_rounds_before_first_token_count": 2.0, "batchpilot_rounds_before_first_token_sum": 1.0}
    split = bench.ttft_split(before, after)
    assert split["ttft_phases_mean_s"]["parse"] == pytest.approx(0.002)
    assert split["ttft_phases_mean_s"]["first_step"] is None  # no observations over the phase
    assert split["ttft_mean_s"] == pytest.approx(0.025) and split["rounds_waited_mean"] == pytest.approx(0.5)
