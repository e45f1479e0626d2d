"""``batchpilot serve --model DIR``: an OpenAI-compatible HTTP server (see ``batchpilot/serve/``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def add_parser(sub: argparse._SubParsersAction) -> None:
    from batchpilot.generate.scheduler import ADMISSIONS

    p = sub.add_parser("serve", help="serve a model over the OpenAI HTTP API (completions, chat, streaming)",
                       description="An OpenAI-compatible server: /v1/completions, /v1/chat/completions, /v1/models, "
                                   "/health, /metrics; SLO-aware step budgets and Past-Future admission.")
    p.add_argument("--model", required=True, help="HF model directory, batchpilot export, or preset name")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or a directory (default: the model's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the directory name)")
    p.add_argument("--admission", choices=ADMISSIONS, default="past_future",
                   help="admission policy: past_future (predicted future KV peak), aggressive (preempt on "
                        "exhaustion, as vLLM), conservative (reserve max_tokens)")
    p.add_argument("--ttft-slo", type=float, default=None, help="time-to-first-token SLO, seconds (goodput metric)")
    p.add_argument("--tpot-slo", type=float, default=None,
                   help="time-per-output-token SLO, seconds: each step's token budget is sized to meet it")
    p.add_argument("--max-queue", type=int, default=512, help="requests in flight before 429 Retry-After")
    p.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of a request")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds to finish running requests")
    p.add_argument("--kv-block-size", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV cache size in tokens (default: what --gpu-memory-utilization leaves after the weights); "
                        "a smaller cache is what a larger model or a shared GPU leaves")
    p.add_argument("--decode-steps", type=int, default=4,
                   help="greedy decode steps per host round trip while nothing waits (low: new requests wait less)")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-graph-warmup", action="store_true",
                   help="capture decode graphs on first use instead of at start-up (faster start, stalls later)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto")
    p.set_defaults(func=run)


def build_server_app(args: argparse.Namespace):
    from batchpilot import load_model
    from batchpilot.data.chat_template import chat_template_of
    from batchpilot.data.tokenizer import Tokenizer
    from batchpilot.generate.engine import Engine, EngineConfig
    from batchpilot.serve import ServeConfig, build_app

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    dtype = dtypes.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = load_model(args.model, device=device, dtype=dtype)
    model_dir = Path(args.model) if Path(args.model).is_dir() else None
    tok_path = args.tokenizer or (model_dir if model_dir and (model_dir / "tokenizer.json").is_file() else None)
    tokenizer = Tokenizer.from_path(tok_path) if tok_path else None
    template_dir = Path(tok_path).parent if tok_path and Path(tok_path).is_file() else tok_path
    template, special = chat_template_of(template_dir)
    engine = Engine(model, tokenizer, EngineConfig(
        block_size=args.kv_block_size, max_batch_tokens=args.max_batch_tokens, max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=args.gpu_memory_utilization, num_blocks=kv_blocks(args),
        cuda_graphs=not args.no_cuda_graphs, compile=not args.no_compile, decode_steps=args.decode_steps,
        prefix_sharing=False))
    cfg = ServeConfig(served_model_name=args.served_model_name or Path(str(args.model)).name, admission=args.admission,
                      ttft_slo_s=args.ttft_slo, tpot_slo_s=args.tpot_slo, max_queue=args.max_queue,
                      max_tokens=args.max_tokens, shutdown_timeout_s=args.shutdown_timeout, chat_template=template,
                      special_tokens=special, warm_up_graphs=not args.no_graph_warmup)
    return build_app(engine, cfg), cfg


def kv_blocks(args: argparse.Namespace) -> int | None:
    """``--kv-cache-tokens`` as whole KV blocks (None: the engine sizes the cache from free memory)."""
    if args.kv_cache_tokens is None:
        return None
    if args.kv_cache_tokens < args.kv_block_size:
        raise ValueError(f"--kv-cache-tokens {args.kv_cache_tokens}: must hold at least one block "
                         f"(--kv-block-size {args.kv_block_size})")
    return args.kv_cache_tokens // args.kv_block_size


def run(args: argparse.Namespace) -> int:
    import uvicorn

    app, cfg = build_server_app(args)
    print(f"serving {cfg.served_model_name} on http://{args.host}:{args.port}/v1 (admission {cfg.admission})",
          flush=True)
    # The engine thread gives up the GIL at every device sync and must get it back from the HTTP thread: under the
    # default 5 ms switch interval each such hand-back can cost up to 5 ms of the step while the HTTP side is busy
    # streaming; 0.5 ms bounds that wait at a small cost in switches.
    sys.setswitchinterval(5e-4)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=int(cfg.shutdown_timeout_s) + 5)
    return 0
