"""``batchpilot report RUN_DIR``: plots and an HTML summary of a run (see ``reports/plots.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path
import importlib.util


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="plot a run directory into RUN_DIR/report/report.html",
                              description="Read config.json, plan.json and metrics.jsonl of a run and write PNG "
                                          "plots (loss, LR, batch vs critical batch, noise scale, throughput, "
                                          "memory) and a self-contained report.html into RUN_DIR/report/.")
    p.add_argument("run_dir", help="a run directory written by `batchpilot train`")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if Path(args.run_dir, "summary.json").is_file() and Path(args.run_dir, "early.csv").is_file():
        return sft_sweep_report(Path(args.run_dir))
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("matplotlib is not installed: pip install 'batchpilot[plots]'")
    from batchpilot.reports.plots import build_report, read_run, summarize

    run_ = read_run(args.run_dir)
    page = build_report(run_)
    summary = summarize(run_)
    print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                    if v is not None))
    print(f"report: {page}")
    return 0


def sft_sweep_report(sweep_dir: Path) -> int:
    """An SFT sweep directory (``sweep --recipe sft``): its ranking, the cut and how well it predicted."""
    import json

    from batchpilot.cli.sweep import print_sft
    from batchpilot.train.sft_sweep import SftSweepResult

    summary = json.loads((sweep_dir / "summary.json").read_text())
    print_sft(SftSweepResult(results_path=sweep_dir / "results.csv", summary=summary, ran=0, failed={}))
    return 0
