"""Summarise several seeds of the adaptive experiment into one file (no training: the rows are read back).

Each seed's JSON keeps the summary of the variant that came first in its ``--adaptive`` list. This recomputes
the issue's two numbers for every adaptive variant in every seed from the stored rows (``compare`` of
run_experiment.py, the same code), and reports the worst case over seeds per variant:

    python benchmarks/adaptive/summarize.py benchmarks/results/adaptive_2026-11-28_20tpp_seed*.json \
        --report adaptive_small_x1 --out benchmarks/results/adaptive_2026-11-28_20tpp_summary.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run_experiment
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # provenance
from provenance import provenance  # noqa: E402
from run_experiment import compare  # noqa: E402

from batchpilot.io import write_json_atomic  # noqa: E402


def summarize(results: list[dict], report: str) -> dict:
    """Per variant: its numbers in each seed and the worst over seeds; the ``report`` variant's at the top level."""
    per_seed = []
    for result in results:
        names = [r["name"] for r in result["rows"] if r["name"].startswith("adaptive")]
        per_seed.append(compare(result["rows"], names)["variants"])
    variants = {}
    for name in sorted({n for seed in per_seed for n in seed}):
        runs = [seed[name] for seed in per_seed if name in seed]
        variants[name] = {
            "seeds": len(runs), "final_loss_gap": [r["final_loss_gap"] for r in runs],
            "step_reduction": [r["step_reduction"] for r in runs],
            "worst_final_loss_gap": max(r["final_loss_gap"] for r in runs),
            "worst_step_reduction": min(r["step_reduction"] for r in runs),
            "met_in_every_seed": all(r["met"] for r in runs)}
    if report not in variants:
        raise SystemExit(f"no variant {report!r}; the files have {', '.join(variants)}")
    top = variants[report]
    return {"reported_variant": report, "final_loss_gap": top["worst_final_loss_gap"],
            "step_reduction": top["worst_step_reduction"], "met": top["met_in_every_seed"],
            "targets": {"final_loss_gap_max": 0.005, "step_reduction_min": 0.30}, "variants": variants}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="adaptive_*.json of run_experiment.py, one per seed")
    p.add_argument("--report", default="adaptive_small_x1", help="the variant whose worst case is the summary")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    results = [json.loads(Path(f).read_text()) for f in args.files]
    summary = summarize(results, args.report)
    out = {"benchmark": "adaptive_batch_seeds", **provenance(), "files": [Path(f).name for f in args.files],
           "seeds": [r["setup"].get("seed", 0) for r in results], "summary": summary}
    write_json_atomic(Path(args.out), out)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
