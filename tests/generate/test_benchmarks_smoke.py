"""The generation benchmarks run end to end in their tiny CPU modes and write the summary keys the issue names."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, out: Path, *flags: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out), *flags],
                   check=True, capture_output=True, env=env, cwd=ROOT, timeout=300)
    (path,) = out.glob("*.json")
    return json.loads(path.read_text())


def test_generate_job_smoke(tmp_path):
    result = _run("generate_job.py", tmp_path, "--lines", "4", "--long-requests", "1", "--long-tokens", "8")
    assert result["complete"] and set(result["summary"]) >= {"cli_vs_warm_8000", "cli_vs_warm_1000",
                                                             "sampled_vs_greedy", "long_output_bytes_share"}
    rows = {r["row"]: r for r in result["rows"]}
    assert set(rows) == {"cli_4", "warm_4", "decode_greedy", "decode_sampled", "long_output"}
    assert not [r for r in rows.values() if "error" in r]
    assert result["summary"]["cli_vs_warm_4"] and rows["cli_4"]["lines"] == 4


def test_generate_throughput_quick_smoke(tmp_path):
    result = _run("generate_throughput.py", tmp_path, "--quick", "--a-requests", "4", "--c-requests", "4")
    assert result["complete"] and {r["workload"] for r in result["rows"]} == {"a", "c"}
    assert result["summary"]["speedup_vs_hf_a"] and result["summary"]["prefix_sharing_gain_a"]
    assert "roofline_share_c" in result["summary"]
