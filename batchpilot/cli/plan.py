"""``batchpilot plan``: turn a budget into a plan (batch, LR, micro-batch, memory, time) and explain it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

from batchpilot.plan import laws
from batchpilot.plan.memory import CPU_MEMORY_GB_S, GIB, PCIE_GB_S
from batchpilot.plan.planner import Budget, Plan, compare, make_plan


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="derive batch size, LR, micro-batch and memory from a budget",
                              description=__doc__)
    p.add_argument("--recipe", choices=("pretrain", "sft"), default="pretrain",
                   help="sft: the supervised fine-tuning recipe (plan/sft.py) from --examples and --tokens-per-example")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", help="sft: the HF model directory to fine-tune")
    model.add_argument("--preset", help="model preset name (batchpilot.model.llama.PRESETS)")
    model.add_argument("--hf-config", help="HF model directory or config.json")
    model.add_argument("--params", type=float, help="non-vocabulary parameters N; a Llama-like shape is derived")
    p.add_argument("--examples", type=int, help="sft: conversations / instruction pairs in the training set")
    p.add_argument("--tokens-per-example", type=int, help="sft: mean tokens of one rendered example")
    p.add_argument("--epochs", type=int, default=0, help="sft: epochs (0: the recipe's choice)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--tokens", type=float, help="training tokens D")
    amount.add_argument("--compute", type=float, help="training FLOPs C (D = C / FLOPs per token)")
    amount.add_argument("--hours", type=float, help="wall-clock hours (D from GPUs x peak x MFU)")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--seq-len", type=int, default=None, help="default 2048 (sft: max(2048, tokens per example))")
    p.add_argument("--law", default="step", help="step | deepseek | path to a law.json (batchpilot fit)")
    p.add_argument("--optimizer", default="adamw", choices=laws.OPTIMIZERS)
    p.add_argument("--schedule", choices=laws.SCHEDULES, help="default: the schedule the law was fitted with")
    p.add_argument("--gpu-peak-tflops", type=float, default=989.0)
    mfu = p.add_mutually_exclusive_group()
    mfu.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    mfu.add_argument("--mfu-from", help="measured MFU per shape: a benchmarks/results/train_throughput_*.json, an MFU "
                     "table JSON (docs/plan.md) or a run's metrics.jsonl (the mean of its mfu field)")
    p.add_argument("--headroom", type=float, default=0.1, help="share of GPU memory kept free")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="plan eager blocks (default: GPU plans compile every block; the memory model follows)")
    p.add_argument("--float8", choices=("tensorwise", "rowwise"), default=None,
                   help="plan float8 matmuls in the blocks (torchao; --parallel.float8)")
    p.add_argument("--offload", choices=("auto", "none", "cpu"), default="auto",
                   help="CPU offload (FSDP2 CPUOffloadPolicy): auto = only when nothing else fits on the GPU")
    p.add_argument("--pcie-gb-s", type=float, default=PCIE_GB_S, help="host link GB/s, for the offloaded step time")
    p.add_argument("--cpu-memory-gb-s", type=float, default=CPU_MEMORY_GB_S,
                   help="host DRAM GB/s the CPU AdamW step reaches, for the offloaded step time")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", help="save the plan as JSON (atomic) for `batchpilot train --plan`")
    p.add_argument("--compare", action="store_true", help="show what each law recommends side by side")
    p.add_argument("--config", help="a .toml/.json/.yaml file of these options by flag name (tokens = 1e11, "
                   "gpu_memory_gib = 24, compile = false, ...); a flag given with a value other than its default wins")
    actions = {a.dest: a for a in p._actions if a.dest not in ("help", "config")}
    p.set_defaults(func=run, plan_actions=actions)


def apply_config_file(args: argparse.Namespace) -> None:
    """Options from ``--config``: a key sets its option unless the command line set it (differs from the
    default); unknown keys are a one-line error."""
    from batchpilot.cli.config import load_config_file

    actions: dict[str, argparse.Action] = args.plan_actions
    for key, value in load_config_file(args.config).items():
        name = key.replace("-", "_")
        if name not in actions or name in ("func", "plan_actions"):
            raise ValueError(f"config file {args.config}: unknown key {key!r}; use the option names of "
                             f"`batchpilot plan --help` ({', '.join(sorted(actions))})")
        action = actions[name]
        if isinstance(value, str) and callable(action.type):
            value = action.type(value)
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"config file {args.config}: {key} = {value!r}; choose one of "
                             f"{', '.join(map(str, action.choices))}")
        if getattr(args, name) == action.default:
            setattr(args, name, value)


def budget_from_args(args: argparse.Namespace) -> Budget:
    if args.model is not None:
        raise ValueError("--model is for --recipe sft; pretraining plans take --preset, --hf-config or --params")
    if args.preset is None and args.hf_config is None and args.params is None:
        raise ValueError("give the model: --preset, --hf-config or --params")
    if args.tokens is None and args.compute is None and args.hours is None:
        raise ValueError("give the amount of training: --tokens, --compute or --hours")
    for flag in ("tokens", "compute", "hours"):  # inf, nan or <= 0 would plan nonsense (or divide by zero)
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{flag} must be a finite number > 0")
    return Budget(seq_len=args.seq_len or 2048, preset=args.preset, hf_config=args.hf_config, params=args.params,
                  tokens=args.tokens,
                  compute_flops=args.compute, hours=args.hours, num_gpus=args.gpus,
                  gpu_memory_gib=args.gpu_memory_gib, law=args.law, optimizer=args.optimizer,
                  schedule=args.schedule, gpu_peak_tflops=args.gpu_peak_tflops, mfu=args.mfu,
                  mfu_from=args.mfu_from, headroom=args.headroom, compile=args.compile, float8=args.float8,
                  offload=args.offload, pcie_gb_s=args.pcie_gb_s, cpu_memory_gb_s=args.cpu_memory_gb_s)


COMPARE_ROWS = (("law batch (tokens)", lambda p: f"{p.law['batch_tokens']:,.0f}"),
                ("law peak LR", lambda p: f"{p.law['peak_lr']:.4g}"),
                ("global batch (tokens)", lambda p: f"{p.global_batch_tokens:,}"),
                ("micro-batch x accum", lambda p: f"{p.micro_batch_size} x {p.grad_accum_steps}"),
                ("peak LR", lambda p: f"{p.peak_lr:.4g}"),
                ("schedule (min LR)", lambda p: f"{p.schedule} ({p.min_lr:.3g})"),
                ("steps (warmup)", lambda p: f"{p.total_steps:,} ({p.warmup_steps:,})"),
                ("memory / GPU (GiB)", lambda p: f"{p.predicted_peak_memory_bytes / GIB:.1f}"),
                ("tokens/s (predicted)", lambda p: f"{p.predicted_tokens_per_second:,.0f}"),
                ("total hours", lambda p: f"{p.predicted_total_seconds / 3600:.3g}"),
                ("extrapolated", lambda p: "yes" if any("fitted range" in w for w in p.warnings) else "no"))

def data_ranks(p: Plan) -> str:
    """``8 GPUs``, or with context parallelism ``2 data-parallel ranks of 4 GPUs``."""
    cp = getattr(p, "context_parallel", 1)
    return f"{p.num_gpus} GPUs" if cp == 1 else f"{p.num_gpus // cp} data-parallel ranks of {cp} GPUs"


SUMMARY_ROWS = (("model", lambda p: p.model if isinstance(p.model, str) else "custom shape"),
                ("global batch", lambda p: f"{p.global_batch_tokens:,} tokens = {p.micro_batch_size} x "
                                           f"{p.grad_accum_steps} accum x {data_ranks(p)} x {p.seq_len}"),
                ("peak LR / min LR", lambda p: f"{p.peak_lr:.4g} / {p.min_lr:.3g} ({p.schedule})"),
                ("steps / warmup", lambda p: f"{p.total_steps:,} / {p.warmup_steps:,}"),
                ("checkpointing / sharding", lambda p: f"{p.activation_checkpointing} / {p.sharding}"
                                                       + (" / CPU offload" if p.offload == "cpu" else "")
                                                       + (f" / context parallel {p.context_parallel}"
                                                          if p.context_parallel > 1 else "")),
                ("compile / float8", lambda p: f"{'on' if p.compile else 'off'} / {p.float8 or 'off'}"),
                ("memory per GPU", lambda p: f"{p.predicted_peak_memory_bytes / GIB:.1f} of "
                                             f"{p.gpu_memory_bytes / GIB:g} GiB"),
                ("time", lambda p: f"{p.predicted_step_seconds:.3g} s/step, {p.predicted_tokens_per_second:,.0f} "
                                   f"tokens/s, {p.predicted_total_seconds / 3600:.3g} h"))


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for row in [columns, *rows]:
            print("  ".join(f"{cell:<24}" for cell in row))
        return
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def run_sft(args: argparse.Namespace) -> int:
    """``plan --recipe sft``: the SFT plan (plan/sft.py) with its explanation; ``--out`` saves it for ``train --plan``."""
    from batchpilot.model.hf import read_config
    from batchpilot.model.llama import get_preset
    from batchpilot.plan.sft import SftBudget, plan_sft, to_plan

    model = args.model or args.hf_config or args.preset
    if model is None or args.examples is None or args.tokens_per_example is None:
        raise ValueError("--recipe sft needs --model HF_DIR (or --preset), --examples and --tokens-per-example")
    config = get_preset(args.preset) if args.preset else read_config(model)
    budget = SftBudget(config=config, examples=args.examples, tokens_per_example=args.tokens_per_example,
                       num_gpus=args.gpus, gpu_memory_gib=args.gpu_memory_gib, seq_len=args.seq_len or 0,
                       headroom=args.headroom, epochs=args.epochs, gpu_peak_tflops=args.gpu_peak_tflops,
                       mfu=args.mfu, pcie_gb_s=args.pcie_gb_s, cpu_memory_gb_s=args.cpu_memory_gb_s)
    sft = plan_sft(budget)
    plan = to_plan(sft, budget, model)
    if args.out:
        plan.save(args.out)
    if args.json:
        print(json.dumps({"sft": dataclasses.asdict(sft), "plan": plan.to_dict()}, indent=2))
        return 0
    rows = [["batch", f"{sft.batch_examples:,} examples = {sft.rows_per_step} rows of {sft.seq_len} tokens"],
            ["peak LR (schedule)", f"{sft.peak_lr:.3g} ({sft.schedule}, {sft.warmup_steps} warmup steps)"],
            ["epochs / steps", f"{sft.epochs} / {sft.steps:,}"],
            ["micro-batch x accum x GPUs", f"{sft.micro_batch_rows} x {sft.grad_accum_steps} x {budget.num_gpus}"],
            ["offload", sft.offload], ["step time", f"{sft.predicted_step_seconds:.3g} s"]]
    print_table("SFT plan", ["", ""], rows)
    print("\n".join(f"{i}. {line}" for i, line in enumerate(sft.explanation, 1)))
    if args.out:
        print(f"saved {args.out} (run it: batchpilot train --plan {args.out} --recipe sft --data CHAT.jsonl --out RUN)")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.config:
        apply_config_file(args)
    if args.recipe == "sft":
        return run_sft(args)
    budget = budget_from_args(args)
    if args.compare:
        plans = compare(budget)
        if args.json:
            print(json.dumps({name: plan.to_dict() for name, plan in plans.items()}, indent=2))
        else:
            rows = [[label, *(fmt(p) for p in plans.values())] for label, fmt in COMPARE_ROWS]
            print_table("what each law recommends", ["", *plans], rows)
        return 0
    plan = make_plan(budget)
    if args.out:
        plan.save(args.out)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    print_table("plan", ["", ""], [[label, fmt(plan)] for label, fmt in SUMMARY_ROWS])
    print(plan.explain())
    if args.out:
        print(f"saved {args.out}")
    return 0
