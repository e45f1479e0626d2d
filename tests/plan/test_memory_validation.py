"""benchmarks/memory_validation.py: the probes are held out and cover issue 17's space; the dry run writes the
JSON (provenance, rows, summary) through the trainer's step in a child process."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def mv():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("memory_validation", BENCH / "memory_validation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_validation"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_gpu_probes_are_held_out_and_cover_the_issue(mv):
    from tests.plan.test_memory import MEASURED_COMPILED, MEASURED_FLOAT8

    probes = mv.GPU_PROBES
    assert len(probes) >= 8 and len(set(probes)) == len(probes)
    assert {p.preset for p in probes} == {"llama-125m", "qwen2-0.5b", "llama-1b", "moe-1b"}
    assert {p.activation_checkpointing for p in probes} == {"none", "selective", "full"}
    assert {p.kind for p in probes} == {"eager", "compiled", "float8"}
    assert min(p.seq_len for p in probes) >= 2048 and max(p.seq_len for p in probes) <= 8192
    used = {("llama-1b", seq, mb) for _, seq, mb, _, _, _ in MEASURED_COMPILED + MEASURED_FLOAT8}
    assert not any((p.preset, p.seq_len, p.micro_batch_size) in used for p in probes)
    assert all(sum(p.kind == k for p in probes) >= 3 for k in ("eager", "compiled", "float8"))


def test_summary_splits_the_max_error_by_kind(mv):
    rows = [{"kind": "eager", "prediction_error": -0.02, "measured_bytes": 1},
            {"kind": "eager", "prediction_error": 0.04, "measured_bytes": 1},
            {"kind": "float8", "prediction_error": 0.15, "measured_bytes": 1},
            {"kind": "compiled", "prediction_error": None, "measured_bytes": None}]
    s = mv.summarize(rows)
    assert s["memory_prediction_max_error"] == {"eager": 0.04, "compiled": None, "float8": 0.15, "all": 0.15}
    assert s["within_5_percent"] == {"eager": True, "compiled": None, "float8": False}
    assert s["probes_failed_or_skipped"] == 1


def test_dry_run_writes_the_json_after_each_probe(mv, tmp_path):
    path = mv.main(["--dry", "--kinds", "eager", "--out", str(tmp_path)])
    d = json.loads(path.read_text())
    assert {"gpu", "torch", "commit", "date", "command", "rows", "summary"} <= set(d)
    rows = d["rows"]
    assert [r["config"]["preset"] for r in rows] == ["tiny", "tiny-moe"]  # the MoE one with its balance loss
    for row in rows:
        assert "error" not in row and row["measured_bytes"] is None and len(row["step_seconds"]) == 2
        assert row["predicted_bytes"] > 0 and row["kind"] == "eager"
    assert set(d["summary"]["memory_prediction_max_error"]) == {"eager", "compiled", "float8", "all"}
    spent = mv.main(["--dry", "--kinds", "eager", "--budget-s", "1", "--out", str(tmp_path / "spent")])
    assert json.loads(spent.read_text())["rows"][0]["error"] == "skipped: budget spent"
