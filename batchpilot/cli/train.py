"""``batchpilot train``: flags map one-to-one onto ``TrainConfig`` fields (``--seq-len`` -> ``seq_len``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from batchpilot.train.trainer import TrainConfig, config_from_plan

_SKIP = {"plan", "out_dir", "model"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (from a preset, an HF directory, or a plan)",
                       description="Train a Llama-family model. Every flag is a TrainConfig field.")
    p.add_argument("--out", dest="out_dir", required=True, help="run directory (never overwritten; use --resume)")
    p.add_argument("--preset", "--model", dest="model", default=None,
                   help="preset name, HF model directory or config.json (default: tiny, or the plan's model)")
    p.add_argument("--plan", default=None, help="plan.json from `batchpilot plan --out`: executes it as fixed")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        if kind is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, dest=f.name, type=_parse_number if kind is int else kind, default=None)
    p.set_defaults(func=run)


def _base_type(hint: typing.Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _parse_number(text: str) -> int:
    """Integers with optional scientific notation or underscores: 1e6, 2_000_000."""
    value = float(text.replace("_", ""))
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    return int(value)


def run(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if f.name not in _SKIP and getattr(args, f.name) is not None}
    if args.plan:
        plan = json.loads(Path(args.plan).read_text())
        cfg = config_from_plan(plan, out_dir=args.out_dir, model=args.model, **overrides)
    else:
        if overrides.get("max_steps") is None and overrides.get("max_tokens") is None:
            raise ValueError("give --max-steps or --max-tokens (or --plan)")
        cfg = TrainConfig(out_dir=args.out_dir, model=args.model or "tiny", **overrides)
    if not sys.stdout.isatty():
        cfg.progress = False  # no live bar in logs and CI: the trainer prints a line every 10% instead
    from batchpilot.train.trainer import TrainingDiverged, train

    try:
        result = train(cfg)
    except TrainingDiverged as e:  # a clear one-line stop, exit 2; the last good checkpoint is intact
        raise ValueError(str(e)) from None
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    print(f"done: {result.steps} steps, {result.tokens:,} tokens, loss {result.final_loss:.4f}, val loss {val}, "
          f"{result.wall_seconds:.0f} s")
    print(f"run directory: {result.run_dir} (model in {result.run_dir}/model, metrics in metrics.jsonl)")
    return 0
