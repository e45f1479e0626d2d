"""``batchpilot sweep GRID.json --out SWEEP_DIR``: run a grid of proxy trainings into SWEEP_DIR/runs.csv.

The grid format and the resume rules are in ``batchpilot.train.sweep``; ``batchpilot fit SWEEP_DIR/runs.csv``
then fits laws to the table with no column flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from batchpilot.train.sweep import GridSpec, sweep


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sweep", help="run a grid of proxy trainings -> SWEEP_DIR/runs.csv",
                              description="Train every (shape, token budget, lr, batch) of GRID.json; resumable.")
    p.add_argument("grid", type=Path, help="grid spec (JSON), see docs/fit.md")
    p.add_argument("--out", type=Path, required=True, help="sweep directory (runs/, runs.csv)")
    p.add_argument("--workers", type=int, default=None,
                   help="runs trained at once (default: 4 per GPU, 1 on CPU)")
    p.set_defaults(func=run)


def default_workers() -> int:
    import torch

    return 4 * torch.cuda.device_count() or 1


def run(args: argparse.Namespace) -> int:
    if not args.grid.is_file():
        raise FileNotFoundError(f"grid file {args.grid} not found")
    grid = GridSpec.from_json(args.grid)
    result = sweep(grid, args.out, workers=args.workers or default_workers(), progress=sys.stdout.isatty())
    print(f"{result.ran} runs trained now, {result.finished} in {result.csv_path}")
    for run_id, error in result.failed.items():
        print(f"failed: {run_id}: {error} (log: {args.out / 'logs' / run_id}.log)", file=sys.stderr)
    return 1 if result.failed else 0
