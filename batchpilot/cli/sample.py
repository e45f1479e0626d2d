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
    if args.num_samples < 1 or args.max_tokens < 1:
        raise ValueError("--num-samples and --max-tokens must be >= 1")
    if not -2**63 <= args.seed < 2**63:
        raise ValueError(f"--seed must fit in 64 bits, got {args.seed}")
    prompts = args.prompt or [""]
    # the tokenizer owns the BOS policy; an empty prompt without a BOS starts from EOS (a document boundary)
    ids = [tokenizer.encode_prompt(p) or [tokenizer.eos_id] for p in prompts]
    jobs = [(i, k) for i in range(len(prompts)) for k in range(args.num_samples)]
    # seed=None: the engine's one seed rule gives every request (so every sample) its own seed from --seed
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    kv_tokens = len(jobs) * (max(map(len, ids)) + args.max_tokens + 64)
    engine = Engine(model, tokenizer, EngineConfig(cpu_kv_tokens=kv_tokens, seed=args.seed))
    for (i, k), c in zip(jobs, engine.generate([ids[i] for i, _ in jobs], params)):
        print(f"--- prompt {i}, sample {k} ({c.finish_reason}) ---\n{prompts[i]}{c.text}")
    return 0
