"""``batchpilot report RUN_DIR``: plots and an HTML summary of a run (see ``reports/plots.py``)."""

from __future__ import annotations

import argparse
import importlib.util


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="plot a run directory into RUN_DIR/report/report.html",
                              description="Read config.json, plan.json and metrics.jsonl of a run and write PNG "
                                          "plots (loss, LR, batch vs critical batch, noise scale, throughput, "
                                          "memory) and a self-contained report.html into RUN_DIR/report/.")
    p.add_argument("run_dir", help="a run directory written by `batchpilot train`")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
