"""``batchpilot train``: flags map one-to-one onto ``TrainConfig`` fields (``--seq-len`` -> ``seq_len``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path

from batchpilot.train.trainer import TrainConfig, config_from_plan

_SKIP = {"plan", "out_dir", "model"}

HELP = {
    "data": "'default' (embedded KJV corpus), a prepared directory, or .txt/.jsonl/.parquet files or a directory",
    "text_field": "JSONL field / Parquet column holding the text",
    "seq_len": "tokens per row", "global_batch_tokens": "tokens per optimizer step (a multiple of seq_len)",
    "micro_batch_size": "rows per GPU per micro-step (accumulation reaches the global batch)",
    "auto_micro_batch": "fit the micro-batch to GPU memory and back off on OOM, keeping the global batch",
    "max_steps": "optimizer steps (or give --max-tokens)", "max_tokens": "token budget (e.g. 2e9)",
    "lr": "peak learning rate", "min_lr": "learning-rate floor at the end of the schedule",
    "warmup_tokens": "linear warmup length in tokens (default 5%% of the budget)",
    "schedule": "cosine | wsd | power | multistep | constant (all counted in tokens)",
    "optimizer": "adamw | lamb | lars | sgd", "grad_clip": "clip the global grad norm (0: off)",
    "eval_every": "steps between validation passes", "eval_batches": "validation micro-batches per pass",
    "save_every": "steps between checkpoints", "log_every": "steps between metrics.jsonl records",
    "device": "auto | cpu | cuda", "compile": "torch.compile each block",
    "activation_checkpointing": "none | full | selective", "peak_tflops": "per-GPU peak for MFU",
    "fsdp_one_device": "one GPU: FSDP2 mixed precision (bf16 compute over fp32 masters, as under torchrun) "
                       "instead of autocast; about 1.5x the micro-batch at long sequences",
    "float8": "tensorwise | rowwise: float8 matmuls in the blocks (needs torchao and an H100/H200-class GPU; "
              "on CPU torch runs them in software, for tests); MFU stays against the bf16 peak",
    "batch_policy": "fixed | ramp | adaptive (grow the batch toward the gradient noise scale)",
    "batch_ramp": "ramp policy thresholds: TOKENS:BATCH,... e.g. 1e9:1048576,4e9:2097152",
    "max_global_batch_tokens": "cap of the adaptive policy",
    "adaptive_min_interval_steps": "steps between adaptive batch changes",
    "adaptive_warmup_steps": "noise measurements before the first adaptive change",
    "adaptive_target_multiplier": "grow toward this multiple of the measured B_simple",
    "lr_coupling": "sqrt | linear | none when the batch changes (default: sqrt for Adam-family, linear for SGD/LARS)",
    "measure_noise": "log the gradient noise scale every step (default: with the adaptive policy)",
    "resume": "continue the run in --out from its latest checkpoint",
    "stop_at_step": "stop (checkpointed) at this step while the schedule spans the whole budget",
    "tensorboard": "also write TensorBoard scalars (needs the tensorboard package)",
    "progress": "live progress bar (off when stdout is not a terminal)",
}


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
        default = "" if f.default is None or f.default is dataclasses.MISSING else f" (default: {f.default})"
        help_text = (HELP.get(f.name, "") + default).replace("%%", "%").replace("%", "%%")
        if kind is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(flag, dest=f.name, type=_parse_number if kind is int else kind, default=None,
                           help=help_text)
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
    # Before the first CUDA allocation: segments that grow in place instead of one cudaMalloc per size, so
    # the varying sizes of micro-batch fitting and packed rows do not fragment the cache (torchtitan does the
    # same). A user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from batchpilot.train.parallel import shutdown_distributed
    from batchpilot.train.trainer import TrainingDiverged, train

    try:
        result = train(cfg)
    except TrainingDiverged as e:  # a clear one-line stop, exit 2; the last good checkpoint is intact
        raise ValueError(str(e)) from None
    shutdown_distributed()  # torchrun's group or a one-device FSDP2 group: destroyed before interpreter exit
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    print(f"done: {result.steps} steps, {result.tokens:,} tokens, loss {result.final_loss:.4f}, val loss {val}, "
          f"{result.wall_seconds:.0f} s")
    print(f"run directory: {result.run_dir} (model in {result.run_dir}/model, metrics in metrics.jsonl)")
    return 0
