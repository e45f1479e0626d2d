"""``batchpilot sample``: a few completions from a checkpoint, HF directory or preset, printed to stdout."""

from __future__ import annotations

import argparse

import torch


def add_parser(sub: argparse._SubParsersAction) -> None:
    from batchpilot.cli.generate import add_sampling_flags

    p = sub.add_parser("sample", help="print completions of a few prompts (quick look at a model)")
    p.add_argument("--model", required=True, help="HF model directory, batchpilot checkpoint, or preset name")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or a directory (default: the model's)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt, each with its own seed")
    add_sampling_flags(p)
    p.set_defaults(func=run, max_tokens=64, temperature=0.8)


def run(args: argparse.Namespace) -> int:
    from batchpilot.cli.generate import load
    from batchpilot.generate.engine import Engine, EngineConfig
    from batchpilot.generate.request import SamplingParams

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, _ = load(args, device)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.json; pass --tokenizer")
    prompts = args.prompt or [""]
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    ids = [bos + tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts]
    jobs = [(i, k) for i in range(len(prompts)) for k in range(args.num_samples)]
    params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed + 1_000_003 * i + k, stop=tuple(args.stop))
              for i, k in jobs]
    kv_tokens = len(jobs) * (max(map(len, ids)) + args.max_tokens + 64)
    engine = Engine(model, tokenizer, EngineConfig(cpu_kv_tokens=kv_tokens))
    for (i, k), c in zip(jobs, engine.generate([ids[i] for i, _ in jobs], params)):
        print(f"--- prompt {i}, sample {k} ({c.finish_reason}) ---\n{prompts[i]}{c.text}")
    return 0
