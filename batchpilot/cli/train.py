"""``batchpilot train``: one ``--component.field`` flag per field of ``TrainConfig``'s components, or a config file.

``--config run.toml|run.yaml|run.json`` gives the run as a file (a run directory's config.json is one), and flags
override it; ``--plan plan.json`` executes a plan as fixed. The flat flags of the previous release (``--lr``,
``--max-steps``, ...) still work and print a one-line note naming the new flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from batchpilot.cli.config import (add_alias_flags, add_field_flags, add_legacy_flags, base_type, converter,
                                   given_fields, load_config_file, merged_tree)
from batchpilot.plan.planner import Plan
from batchpilot.train.config import COMPONENTS, LEGACY_NAMES, TrainConfig, field_types, plan_settings
from batchpilot.train.run import parse_overrides

HELP = {
    "model.name": "preset name, HF model directory (fine-tune from its weights) or config.json",
    "model.seed": "seed of the initial weights",
    "data.path": "'default' (embedded KJV corpus), a prepared directory, or .txt/.jsonl/.parquet files or a directory",
    "data.text_field": "JSONL field / Parquet column holding the text", "data.seq_len": "tokens per row",
    "data.seed": "seed of the data order (and of the tokenizer trained for raw sources)",
    "optim.name": "adamw | lamb | lars | sgd", "optim.lr": "peak learning rate",
    "optim.grad_clip": "clip the global grad norm (0: off)", "optim.fused": "adamw: fused kernel (default on CUDA)",
    "optim.momentum": "sgd and lars momentum", "optim.trust_coefficient": "LARS trust coefficient eta",
    "schedule.name": "cosine | wsd | power | multistep | constant (all counted in tokens)",
    "schedule.min_lr": "learning-rate floor at the end of the schedule",
    "schedule.warmup_tokens": "linear warmup length in tokens (default 5% of the budget)",
    "schedule.max_steps": "optimizer steps (or give --schedule.max_tokens)",
    "schedule.max_tokens": "token budget (e.g. 2e9)",
    "schedule.stop_at_step": "stop (checkpointed) at this step while the schedule spans the whole budget",
    "schedule.decay_fraction": "wsd: share of the tokens spent decaying",
    "schedule.decay_shape": "wsd tail: 1-sqrt | linear",
    "batch.global_batch_tokens": "tokens per optimizer step (a multiple of seq_len)",
    "batch.micro_batch_size": "rows per GPU per micro-step (accumulation reaches the global batch)",
    "batch.auto_micro_batch": "fit the micro-batch to GPU memory and back off on OOM, keeping the global batch",
    "batch.policy": "fixed | ramp | adaptive (grow the batch toward the gradient noise scale)",
    "batch.ramp": "ramp policy thresholds: TOKENS:BATCH,... e.g. 1e9:1048576,4e9:2097152",
    "batch.max_batch_tokens": "cap of the adaptive policy",
    "batch.lr_coupling": "sqrt | linear | none when the batch changes (default: the optimizer's rule)",
    "batch.measure_noise": "log the gradient noise scale every step (default: with the adaptive policy)",
    "batch.target": "adaptive target: gns (B_simple) | norm_test (AdAdaGrad's norm test, B_simple / eta^2)",
    "batch.min_interval_steps": "steps between adaptive batch changes",
    "batch.min_measurements": "noise measurements before the first adaptive change",
    "batch.target_multiplier": "grow toward this multiple of the target",
    "parallel.device": "auto | cpu | cuda", "parallel.compile": "torch.compile each block",
    "parallel.activation_checkpointing": "none | full | selective | stream",
    "parallel.stream_chunk": "rows of the sequence per backward chunk under activation_checkpointing=stream",
    "parallel.stream_offload": "streamed blocks keep their saved inputs in pinned host memory (one on the GPU)",
    "parallel.offload": "none | cpu: parameter shards, gradients and optimizer states in host memory (FSDP2 "
                        "CPUOffloadPolicy; implies FSDP2, on one GPU a one-rank mesh); the AdamW step runs on "
                        "the CPU (fused CPU kernel); models larger than the GPU on one GPU",
    "parallel.master_dtype": "float32 | bfloat16: dtype of the parameters the optimizer updates and of its states "
                             "(bfloat16 halves their memory, e.g. an 8B model's under --parallel.offload cpu)",
    "parallel.context_parallel": "ranks sharing each row, its sequence split over them (ring attention; seq_len a "
                                 "multiple of 2 x N, the number of ranks a multiple of N)",
    "parallel.fsdp_one_device": "one GPU: FSDP2 mixed precision (bf16 compute over fp32 masters, as under "
                                "torchrun) instead of autocast; about 1.5x the micro-batch at long sequences",
    "parallel.float8": "tensorwise | rowwise: float8 matmuls in the blocks (needs torchao and an H100/H200-class "
                       "GPU; on CPU torch runs them in software, for tests); MFU stays against the bf16 peak",
    "checkpoint.save_every": "steps between checkpoints",
    "checkpoint.keep": "newest checkpoints to keep (older ones are deleted after each save)",
    "checkpoint.resume": "continue the run in --out from its latest checkpoint (start it if it has none)",
    "checkpoint.resume_override": "KEY=VALUE,...: the LR / schedule changes a resume may make (lr, min_lr, schedule, "
                                  "warmup_tokens, max_steps, max_tokens, decay_fraction, decay_shape)",
    "logging.log_every": "steps between metrics.jsonl records",
    "logging.eval_every": "steps between validation passes (0: only at the end)",
    "logging.eval_batches": "validation micro-batches per pass", "logging.peak_tflops": "per-GPU peak for MFU",
    "logging.tensorboard": "also write TensorBoard scalars (needs the tensorboard package)",
    "logging.progress": "live progress bar (off when stdout is not a terminal)",
}


# Short flags the issues and docs use, kept (not deprecated): --offload cpu, --recipe sft, --context-parallel 2
SHORT_NAMES = {"offload": "parallel.offload", "recipe": "recipe.name", "context_parallel": "parallel.context_parallel"}


def _defaults() -> dict[str, object]:
    out = {}
    for name, kind in COMPONENTS.items():
        for f in dataclasses.fields(kind):
            if f.default is not dataclasses.MISSING:
                out[f"{name}.{f.name}"] = f.default
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (from a preset, an HF directory, a config file or a plan)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", dest="out_dir", required=True, help="run directory (never overwritten; use --resume)")
    p.add_argument("--config", default=None,
                   help="run configuration: .toml, .json (e.g. a run's config.json) or .yaml; flags override it")
    p.add_argument("--plan", default=None, help="plan.json from `batchpilot plan --out`: executes it as fixed")
    p.add_argument("--preset", dest="legacy:model", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    fields = field_types()
    add_field_flags(p, fields, _defaults(), HELP)
    add_legacy_flags(p, LEGACY_NAMES, fields)
    add_alias_flags(p, SHORT_NAMES, fields)
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> TrainConfig:
    """File, then flags (new and deprecated), then the plan's fixed settings; one TrainConfig."""
    given = given_fields(args, LEGACY_NAMES, command="train")
    tree = load_config_file(args.config) if args.config else {}
    plan = None
    if args.plan:
        plan = Plan.load(args.plan)
        fixed = plan_settings(plan)
        clash = sorted(k for k in fixed if k in given)
        if clash:
            raise ValueError(f"the plan fixes {', '.join('--' + k for k in clash)}; drop those flags or make a "
                             f"new plan")
        if isinstance(plan.model, dict) and "model.name" not in given and "name" not in tree.get("model", {}):
            raise ValueError("this plan was made for a model shape, not a preset: pass --model.name with its HF "
                             "directory or config.json")
        given = {**given, **fixed}
    override = given.get("checkpoint.resume_override", tree.get("checkpoint", {}).get("resume_override", ""))
    fields = field_types()
    for dotted, text in parse_overrides(str(override or "")).items():  # lr=1e-3 sets --optim.lr 1e-3
        kind, optional = base_type(fields[dotted])
        try:
            given[dotted] = converter(kind, optional)(text)
        except (ValueError, argparse.ArgumentTypeError):
            raise ValueError(f"--checkpoint.resume_override: {dotted}={text!r} is not a {kind.__name__}") from None
    tree = merged_tree(tree, given)
    tree["out_dir"] = args.out_dir
    return TrainConfig.from_dict(tree, plan=plan, source=args.config or "flags")


def owns_the_process() -> bool:
    """Whether ``train`` is this process's command (``batchpilot``, ``python -m batchpilot``, ``torchrun -m
    batchpilot``): then its SIGTERM / SIGINT are a preemption to checkpoint. An in-process ``main([...])`` (a
    test, a notebook, a sweep driver) keeps its caller's handlers, so the caller's own timeout still stops it."""
    entry = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    return entry.name == "batchpilot" or (entry.name == "__main__.py" and entry.parent.name == "batchpilot")


def run(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    if not sys.stdout.isatty():
        cfg.logging.progress = False  # no live bar in logs and CI: the trainer prints a line every 10% instead
    # Before the first CUDA allocation: segments that grow in place instead of one cudaMalloc per size, so
    # the varying sizes of micro-batch fitting and packed rows do not fragment the cache (torchtitan does the
    # same). A user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from batchpilot.train.parallel import shutdown_distributed
    from batchpilot.train.trainer import TrainingDiverged, train

    try:
        result = train(cfg, stop_on_signals=owns_the_process())  # preemption: a checkpointed stop, exit 0
    except TrainingDiverged as e:  # a clear one-line stop, exit 2; the last good checkpoint is intact
        raise ValueError(str(e)) from None
    shutdown_distributed()  # torchrun's group or a one-device FSDP2 group: destroyed before interpreter exit
    if result.stopped_by is not None:
        return 0  # checkpointed; the trainer printed how to resume
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    print(f"done: {result.steps} steps, {result.tokens:,} tokens, loss {result.final_loss:.4f}, val loss {val}, "
          f"{result.wall_seconds:.0f} s")
    print(f"run directory: {result.run_dir} (model in {result.run_dir}/model, metrics in metrics.jsonl)")
    return 0
