"""``batchpilot sweep GRID.json --out SWEEP_DIR``: run a grid of proxy trainings into SWEEP_DIR/runs.csv.
``batchpilot sweep --recipe sft [GRID.json] --out SWEEP_DIR --sweep.FIELD VALUE ...``: the SFT sweep over
(lr, batch) configurations with early stopping by the early signals of Pareja et al. (arXiv 2412.13337).

The grid formats and the resume rules are in ``batchpilot.train.sweep`` / ``sft_sweep`` and docs/sweep.md; ``batchpilot fit
SWEEP_DIR/runs.csv`` fits laws to the pretraining table with no column flags. Every field of the SFT grid is
also a ``--sweep.<field>`` flag (lists comma-separated) that overrides the file, so a grid file is optional.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from pathlib import Path
from typing import Any

from batchpilot.cli.config import parse_int
from batchpilot.train.sft_sweep import SftGridSpec, SftSweepResult, sft_sweep
from batchpilot.train.sweep import GridSpec, sweep

FLAG_PREFIX = "sweep:"
HELP = {
    "model": "HF model directory (weights, tokenizer.json, chat template)",
    "data": "chat JSONL (prepared once into SWEEP_DIR/data) or a prepared chat dataset",
    "lrs": "peak learning rates, comma-separated", "batch_examples": "batches in examples per step, comma-separated",
    "batch_tokens": "or batches in tokens per step (multiples of seq_len x micro_batch_size)",
    "epochs": "passes over the packed train split, every configuration", "seq_len": "tokens per packed row",
    "early_fraction": "share of each configuration's steps in the early window",
    "keep_fraction": "share of the configurations that survive the early cut (rounded up)",
    "keep_top": "keep exactly this many instead (0: use keep_fraction)",
    "signal": "grad_norm | loss | rank_sum: the early signal that ranks the configurations",
    "validate_all": "train every configuration to the end anyway, to measure how well the signal predicted",
    "micro_batch_size": "rows per micro-step (the same for every configuration)",
    "eval_batches": "validation micro-batches", "val_fraction": "validation share when preparing the data",
    "loss_on": "assistant | all", "seed": "weights, data order and preparation", "device": "auto | cpu | cuda",
    "keep_checkpoints": "keep checkpoints and exported weights of finished runs",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sweep", help="run a grid of trainings (proxy runs for fit, or an SFT sweep)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", type=Path, nargs="?", default=None,
                   help="grid spec (JSON), see docs/sweep.md; optional with --recipe sft and --sweep.* flags")
    p.add_argument("--out", type=Path, required=True, help="sweep directory (runs/, runs.csv or results.csv)")
    p.add_argument("--workers", type=int, default=None,
                   help="runs trained at once (default: 4 per GPU, 1 on CPU)")
    p.add_argument("--recipe", choices=("none", "sft"), default="none",
                   help="sft: the fine-tuning sweep with early stopping (docs/sweep.md)")
    add_grid_flags(p)
    p.set_defaults(func=run)


def add_grid_flags(parser: argparse.ArgumentParser) -> None:
    """``--sweep.<field>`` for every field of ``SftGridSpec`` but ``train`` (a table: the grid file only)."""
    hints = typing.get_type_hints(SftGridSpec)
    group = parser.add_argument_group("SFT grid (--recipe sft; override the grid file)")
    for f in dataclasses.fields(SftGridSpec):
        if f.name == "train":
            continue
        kind = hints[f.name]
        default = "" if f.default is dataclasses.MISSING else f" (default: {f.default})"
        options: dict[str, Any] = {"dest": FLAG_PREFIX + f.name, "default": argparse.SUPPRESS,
                                   "help": (HELP.get(f.name, "") + default).replace("%", "%%")}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = list_of(typing.get_args(kind)[0]) if typing.get_origin(kind) is list else \
                (parse_int if kind is int else kind)
            options["metavar"] = "LIST" if typing.get_origin(kind) is list else getattr(kind, "__name__", "X").upper()
        group.add_argument(f"--sweep.{f.name}", **options)


def list_of(kind: type) -> typing.Callable[[str], list[Any]]:
    item = parse_int if kind is int else kind

    def convert(text: str) -> list[Any]:
        return [item(part.strip()) for part in text.split(",") if part.strip()]

    convert.__name__ = f"comma-separated {kind.__name__}"
    return convert


def grid_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {dest[len(FLAG_PREFIX):]: value for dest, value in vars(args).items() if dest.startswith(FLAG_PREFIX)}


def default_workers() -> int:
    import torch

    return 4 * torch.cuda.device_count() or 1


def run(args: argparse.Namespace) -> int:
    if args.grid is not None and not args.grid.is_file():
        raise FileNotFoundError(f"grid file {args.grid} not found")
    flags = grid_flags(args)
    if args.recipe == "sft":
        grid = SftGridSpec.from_json(args.grid, flags)
        result = sft_sweep(grid, args.out, workers=args.workers or default_workers(), progress=sys.stdout.isatty())
        print_sft(result)
        return report_failures(result.failed, args.out)
    if flags:
        raise ValueError(f"--sweep.{next(iter(flags))} belongs to the SFT sweep: add --recipe sft")
    if args.grid is None:
        raise ValueError("give the grid file: batchpilot sweep GRID.json --out SWEEP_DIR")
    result_ = sweep(GridSpec.from_json(args.grid), args.out, workers=args.workers or default_workers(),
                    progress=sys.stdout.isatty())
    print(f"{result_.ran} runs trained now, {result_.finished} in {result_.csv_path}")
    return report_failures(result_.failed, args.out)


def report_failures(failed: dict[str, str], out: Path) -> int:
    for run_id, error in failed.items():
        print(f"failed: {run_id}: {error} (log: {out / 'logs' / run_id}.log)", file=sys.stderr)
    return 1 if failed else 0


def print_sft(result: SftSweepResult) -> None:
    s = result.summary
    if "ranking" not in s:  # some early phases failed: no cut yet
        print(f"{result.ran} phases trained now; early signals for {s['early_done']} of {s['configurations']} "
              f"configurations (rerun to retry the rest)")
        return
    rho = s["spearman"]
    fmt = lambda v: "n/a" if v is None else f"{v:+.3f}"  # noqa: E731
    print(f"{result.ran} phases trained now; {s['rule']}")
    few = " (too few to mean much: 3 or more are needed)" if rho["n"] < 3 else ""
    print(f"Spearman rho, early ranking vs final val loss over {rho['n']} runs to the end{few}: "
          f"{fmt(rho['ranking'])} (grad norm alone {fmt(rho['grad_norm'])}, loss alone {fmt(rho['loss'])})"
          + ("" if s["validate_all"] else "; survivors only: pass --sweep.validate_all to measure on every run"))
    if s["best_final"] is not None:
        regret = s["regret_val_loss"]
        cut = (f", {'kept' if s['best_final_was_kept'] else 'stopped early'} by the cut"
               + ("" if regret is None or math.isclose(regret, 0.0) else f" (regret {regret:.4f})")) \
            if s["validate_all"] else ""
        print(f"best final val loss {s['best_final_val_loss']:.4f} ({s['best_final']}){cut}; "
              f"{s['compute_saved']:.0%} of the grid's tokens saved")
    print(f"results: {result.results_path} and {result.results_path.with_name('summary.json')}")
