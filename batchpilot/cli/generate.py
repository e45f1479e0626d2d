"""``batchpilot generate``: run an offline job (OpenAI Batch JSONL or one prompt per line) to JSONL.

Flags map onto ``EngineConfig`` and the default ``SamplingParams`` (a request's body overrides
them). Under torchrun every rank runs its share of the prefix groups on its own GPU and writes a
part file; rank 0 merges them in input order. ``_distributed`` below is the one place in generate
that uses torch.distributed (a barrier), by design kept out of the engine.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="run an offline generation job (OpenAI Batch JSONL or prompts.txt)",
                       description="Plan the whole job (shared-prefix groups), then generate with a paged KV cache.")
    p.add_argument("--model", required=True, help="HF model directory, batchpilot checkpoint, or preset name")
    p.add_argument("--input", required=True, help="JOB.jsonl (OpenAI Batch) or a text file, one prompt per line")
    p.add_argument("--output", required=True,
                   help="results JSONL: new, or a results file of this job (lines already answered are skipped)")
    p.add_argument("--retry-errors", action="store_true", help="re-run the lines whose record is an error")
    p.add_argument("--ordered", action="store_true", help="rewrite the results in input order at the end")
    p.add_argument("--served-model-name", default=None,
                   help="the `model` of every response (default: the model directory's name)")
    p.add_argument("--max-prompt-bytes", type=int, default=4 * 2**20,
                   help="longer prompts (or rendered chats) get an error record")
    p.add_argument("--template-timeout", type=float, default=2.0,
                   help="seconds a chat template may take to render one request")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or a directory (default: the model's)")
    add_sampling_flags(p)
    p.add_argument("--kv-block-size", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--no-prefix-sharing", action="store_true", help="no shared-prefix groups")
    p.add_argument("--no-cascade", action="store_true", help="groups, but decode reads the prefix per request")
    p.add_argument("--no-triton", action="store_true", help="torch paged attention instead of the Triton kernel")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly")
    p.add_argument("--no-compile", action="store_true",
                   help="capture the eager decode forward (no torch.compile fusion; no compile time)")
    p.add_argument("--decode-steps", type=int, default=None,
                   help="greedy graph decode steps per host round trip once the queue is empty (default 32); more "
                        "amortizes host work, but tokens after an EOS inside the run are computed and dropped")
    p.add_argument("--dtype", choices=["auto", *_DTYPES], default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens (benchmarks)")


def load(args: argparse.Namespace, device: torch.device):
    """(model, tokenizer or None, model directory or None) from --model/--tokenizer/--dtype."""
    from batchpilot import load_model
    from batchpilot.data.tokenizer import Tokenizer

    dtype = _DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = load_model(args.model, device=device, dtype=dtype)
    model_dir = Path(args.model) if Path(args.model).is_dir() else None
    tok_path = args.tokenizer or (model_dir if model_dir and (model_dir / "tokenizer.json").is_file() else None)
    return model, (Tokenizer.from_path(tok_path) if tok_path else None), (Path(tok_path) if tok_path else None)


def run(args: argparse.Namespace) -> int:
    from batchpilot.data.chat_template import RenderLimits, chat_template_of
    from batchpilot.generate.engine import Engine, EngineConfig
    from batchpilot.generate.jobs import JobLimits, JobWriteError, answered, check_output, drop_errors, read_job
    from batchpilot.generate.request import SamplingParams
    from batchpilot.io import FileLock, LockedError

    if args.max_prompt_bytes < 1 or not args.template_timeout > 0:
        raise ValueError("--max-prompt-bytes must be >= 1 and --template-timeout > 0")
    inp, out = Path(args.input), Path(args.output)
    if not inp.is_file():
        raise FileNotFoundError(f"--input {inp}: no such file")
    check_output(out, inp)
    rank, world_size, barrier = _distributed()
    lock = FileLock(out.with_name(f".{out.name}.lock" + (f".{rank}" if rank else "")), what=f"--output {out}")
    try:
        lock.acquire()
    except LockedError as e:
        raise ValueError(str(e)) from None
    try:
        defaults = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
        limits = JobLimits(max_prompt_bytes=args.max_prompt_bytes, max_line_bytes=2 * args.max_prompt_bytes + 2**16,
                           template=RenderLimits(max_seconds=args.template_timeout))
        device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        model, tokenizer, tok_dir = load(args, device)
        template, special = chat_template_of(tok_dir.parent if tok_dir and tok_dir.is_file() else tok_dir)
        items = read_job(inp, defaults, chat_template=template, special_tokens=special, limits=limits)
        done = answered(out, items, world_size)  # refuses a file that is not results of this job
        if args.retry_errors and rank == 0:
            drop_errors(out, items)
        todo = done.todo(items, retry_errors=args.retry_errors)
        barrier()  # every rank has read what is done before any rank writes
        engine = Engine(model, tokenizer, _engine_config(args, EngineConfig))
        try:
            summary = _run(args, engine, items, todo, out, model, rank, world_size, barrier)
        except JobWriteError as e:
            raise ValueError(e.strerror) from None
    finally:
        lock.release()
    if rank == 0:
        _report(summary, model, engine, world_size)
    return 0


def served_model_name(args: argparse.Namespace) -> str:
    """--served-model-name, else the model directory's name (never its local path), else the preset name."""
    if args.served_model_name:
        return args.served_model_name
    return Path(args.model).resolve().name if Path(args.model).exists() else args.model


def _engine_config(args: argparse.Namespace, EngineConfig: type) -> object:
    return EngineConfig(block_size=args.kv_block_size, max_batch_tokens=args.max_batch_tokens,
                        max_num_seqs=args.max_num_seqs, gpu_memory_utilization=args.gpu_memory_utilization,
                        prefix_sharing=not args.no_prefix_sharing, cascade=not args.no_cascade,
                        triton=not args.no_triton, cuda_graphs=not args.no_cuda_graphs,
                        compile=not args.no_compile, seed=args.seed,
                        **({} if args.decode_steps is None else {"decode_steps": args.decode_steps}))


def _run(args: argparse.Namespace, engine: object, items: list, todo: list, out: Path, model: object, rank: int,
         world_size: int, barrier: Callable[[], None]) -> dict:
    from batchpilot.generate.jobs import merge_parts, run_job, sort_results

    summary = run_job(engine, items, out, model=served_model_name(args), todo=todo, rank=rank,
                      world_size=world_size, progress=not args.no_progress)
    barrier()
    if world_size > 1 and rank == 0:
        merge_parts(out, world_size, items)
    elif args.ordered and rank == 0:
        sort_results(out, items)
    return summary


def _report(summary: dict, model: object, engine: object, world_size: int) -> None:
    from batchpilot.generate.roofline import roofline_share

    print(f"requests {summary['requests']} (skipped {summary['skipped']}, errors {summary['errors']}), "
          f"output tokens {summary['output_tokens']}, {summary['output_tokens_per_s']:,.0f} tok/s"
          f"{' on rank 0' if world_size > 1 else ''}, {summary['seconds']:.1f} s")
    share = roofline_share(model, engine.stats, summary["lengths"], summary["seconds"])
    if share:
        decode = (f", decode steps {share['decode_share']:.0%} of the bandwidth bound"
                  if "decode_share" in share else "")
        print(f"roofline: job {share['job_share']:.0%} of the bytes/FLOPs bound "
              f"({share['job_bound_s']:.2f} s){decode}")


def _distributed() -> tuple[int, int, Callable[[], None]]:
    """(rank, world_size, barrier). Under torchrun: one GPU per rank and a gloo group for the final barrier."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, lambda: None
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("gloo", timeout=timedelta(hours=24))  # ranks finish at different times
    return dist.get_rank(), world_size, dist.barrier
