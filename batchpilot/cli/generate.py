"""``batchpilot generate``: run an offline job (OpenAI Batch JSONL or one prompt per line) to JSONL.

Flags map onto ``EngineConfig`` and the default ``SamplingParams`` (a request's body overrides
them). Under torchrun every rank runs its share of the prefix groups on its own GPU and writes a
part file; rank 0 merges them in input order. ``_distributed`` below is the one place in generate
that uses torch.distributed (a barrier), by design kept out of the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# An offline job's step token budget. Steps that prefill run eagerly, and at llama-1b on an H200 such a step costs
# ~40 ms of host launches whatever its size (~11 ms of kernels at 2,048 tokens): a larger budget makes fewer of
# them. A 3,000-line job's warm engine: 24.8k tok/s at 2,048, 28.3k at 4,096, 29.8k at 8,192, 33.5k at 16,384
# (benchmarks/results/generate_job_diag_budget_20261201.json); 8,192 is also what generate_throughput.py runs. The
# server keeps 2,048: there a larger prefill step lengthens every running request's next token.
OFFLINE_MAX_BATCH_TOKENS = 8192


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
    p.add_argument("--max-batch-tokens", type=int, default=OFFLINE_MAX_BATCH_TOKENS,
                   help="tokens per step, decodes and prefill chunks together")
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--no-prefix-sharing", action="store_true", help="no shared-prefix groups")
    p.add_argument("--no-cascade", action="store_true", help="groups, but decode reads the prefix per request")
    p.add_argument("--no-triton", action="store_true", help="torch paged attention instead of the Triton kernel")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the decode graphs: auto = when the job's expected decode steps pay for the "
                        "compile time (about 20 s); on / off force it")
    p.add_argument("--compile-cost-s", type=float, default=None,
                   help="the compile time --compile auto weighs against the job (default: measured by an earlier "
                        f"compiled run on this machine, kept in the cache directory; else {COMPILE_COST_S:.0f} s)")
    p.add_argument("--admit-fraction", type=float, default=None,
                   help="while lines wait, admit new ones only once this share of --max-num-seqs rows is free "
                        "(default 0.125; 0 = one for each finished line): decode runs on the graphs between")
    p.add_argument("--no-compile", action="store_true", help="same as --compile off")
    p.add_argument("--decode-steps", type=int, default=None,
                   help="greedy graph decode steps per host round trip once the queue is empty (default 32); more "
                        "amortizes host work, but tokens after an EOS inside the run are computed and dropped")
    p.add_argument("--dtype", choices=["auto", *_DTYPES], default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is also off when stdout is not a terminal)")
    p.set_defaults(func=run)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens (benchmarks)")


def load(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any, Path | None]:
    """(model, tokenizer or None, tokenizer path or None) from --model/--tokenizer/--dtype."""
    tokenizer, tok_path = load_tokenizer(args)
    return load_model_for(args, device), tokenizer, tok_path


def load_model_for(args: argparse.Namespace, device: torch.device) -> Any:
    dtype = _DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return load_for_serving(args.model, device=device, dtype=dtype)


def load_tokenizer(args: argparse.Namespace) -> tuple[Any, Path | None]:
    """(tokenizer or None, its path or None): --tokenizer, else the model directory's tokenizer.json."""
    from batchpilot.data.tokenizer import Tokenizer

    model_dir = Path(args.model) if Path(args.model).is_dir() else None
    tok_path = args.tokenizer or (model_dir if model_dir and (model_dir / "tokenizer.json").is_file() else None)
    return (Tokenizer.from_path(tok_path) if tok_path else None), (Path(tok_path) if tok_path else None)


def load_for_serving(model: str | os.PathLike, *, device: torch.device, dtype: torch.dtype) -> Any:
    """A model directory's weights straight into the serving dtype on the device: the module is built on the
    meta device and each stored tensor is cast and moved once (no fp32 copy of the model on the host, no
    second pass over it on the device). A shape the config does not describe is refused by load_state_dict;
    presets (random weights) go through ``load_model``."""
    from batchpilot import load_model
    from batchpilot.model import hf
    from batchpilot.model.llama import Llama, rope_inv_freq

    path = Path(model)
    if not path.is_dir():
        return load_model(model, device=device, dtype=dtype)
    config = hf.read_config(path)
    state = hf.fuse_experts(hf.load_state_dict(path), config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    with torch.device("meta"):
        built = Llama(config)
    missing, unexpected = built.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    built.tie_weights()
    built.inv_freq = rope_inv_freq(config).to(device=device, dtype=torch.float32)
    return built.eval()


# torch.compile of the decode graphs, decided by the job. Cost: issue 15's llama-1b job on one H200 ran 51.6 s wall
# with compile and 31.2 s without (8,000 lines x 128 tokens), i.e. about 20 s of compilation, until this machine has
# measured its own (``CompileRecords``). Gain per decode step, until measured: compile fuses the elementwise work
# between the matrix products (norms, RoPE, SiLU x up, residual adds, casts), which the captured graph runs as
# separate small kernels; its cost grows with the rows and layers of the step and falls with the GPU's bandwidth.
# [ours] measured on one H200 (4.8 TB/s), llama-1b bf16, 875 rows x 16 layers, CUDA graphs both ways: 13.94 ms
# eager vs 9.86 ms compiled per decode step (benchmarks/results/generate_decode_diag_20261201.json), i.e. 4.08 ms /
# (875 x 16) x 4.8e12 B/s ~ 1.4 MB of effective unfused traffic per row and layer.
COMPILE_COST_S = 20.0
COMPILE_GAIN_BYTES_PER_ROW_LAYER = 1.4e6


def cache_root() -> Path:
    """Per-user cache of batchpilot: $BATCHPILOT_CACHE_DIR, else $XDG_CACHE_HOME/batchpilot, else ~/.cache/batchpilot."""
    if env := os.environ.get("BATCHPILOT_CACHE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "batchpilot"


def use_persistent_compile_cache() -> Path:
    """Point torch.compile's caches (inductor's FX-graph and AOT-autograd caches, its Triton kernels) at a per-user
    directory that outlives /tmp, unless $TORCHINDUCTOR_CACHE_DIR already names one: a second run of the same model
    loads the compiled decode forward instead of compiling it again."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


class CompileRecords:
    """Measured compile costs and decode step times per (torch, GPU, model shape), kept in the cache directory: what
    ``--compile auto`` weighs, once a run has measured them (``source`` says which numbers it used)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def key(model: Any) -> str:
        c = model.config
        device = next(model.parameters()).device
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        shape = (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
                 next(model.parameters()).dtype)
        return f"torch {torch.__version__} | {gpu} | {shape}"

    def get(self, key: str) -> dict[str, float]:
        try:
            value = json.loads(self.path.read_text()).get(key, {})
        except (OSError, ValueError):
            return {}
        return {k: float(v) for k, v in value.items() if isinstance(v, int | float)} if isinstance(value, dict) else {}

    def update(self, key: str, values: dict[str, float]) -> None:
        """Merge ``values`` into the key's record (atomic rewrite; an unreadable file starts afresh)."""
        from batchpilot.io import write_text_atomic

        try:
            data = json.loads(self.path.read_text())
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        data[key] = {**self.get(key), **values}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(data, indent=1) + "\n")


def expected_decode_steps(max_tokens: list[int], max_num_seqs: int) -> int:
    """Decode steps the job needs at least: the requests run in waves of ``max_num_seqs``, each wave as long as
    its longest request (longest first, as the engine orders decode-heavy groups)."""
    lengths = sorted(max_tokens, reverse=True)
    return sum(lengths[i] for i in range(0, len(lengths), max(1, max_num_seqs)))


def decide_compile(mode: str, steps: int, gain_per_step_s: float, compile_cost_s: float = COMPILE_COST_S) -> bool:
    """--compile auto: compile when the job's expected decode steps times the gain per step outweigh the compile
    cost; on / off force it."""
    if mode != "auto":
        return mode == "on"
    return steps * gain_per_step_s > compile_cost_s


def compile_numbers(record: dict[str, float], assumed_gain_s: float, cost_flag_s: float | None) -> tuple[float, float, str]:
    """(gain per decode step, compile cost, source): measured where a run recorded them, else the defaults
    (``assumed_gain_s``: ``assumed_compile_gain_s`` of the job's batch)."""
    cost, source = (record["compile_s"], "measured") if "compile_s" in record else (COMPILE_COST_S, "assumed")
    if cost_flag_s is not None:
        cost, source = cost_flag_s, "--compile-cost-s"
    if "step_s_compiled" in record and "step_s_eager" in record:
        return max(0.0, record["step_s_eager"] - record["step_s_compiled"]), cost, source + ", gain measured"
    return assumed_gain_s, cost, source + ", gain assumed"


def assumed_compile_gain_s(rows: int, num_layers: int, bandwidth_bytes_s: float) -> float:
    """Seconds compile saves per decode step of ``rows`` rows before this machine has measured it: the unfused
    elementwise traffic (``COMPILE_GAIN_BYTES_PER_ROW_LAYER``) over the GPU's memory bandwidth."""
    return COMPILE_GAIN_BYTES_PER_ROW_LAYER * rows * num_layers / bandwidth_bytes_s


def run(args: argparse.Namespace) -> int:
    from batchpilot.data.chat_template import RenderLimits, chat_template_of
    from batchpilot.generate.engine import Engine, EngineConfig
    from batchpilot.generate.jobs import (JobLimits, JobWriteError, answered, check_output, drop_errors, encode_job,
                                          read_job)
    from batchpilot.generate.request import SamplingParams
    from batchpilot.io import FileLock, LockedError

    started = time.perf_counter()
    if args.admit_fraction is not None and not 0 <= args.admit_fraction <= 1:
        raise ValueError(f"--admit-fraction must be in [0, 1], got {args.admit_fraction}")
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
        tokenizer, tok_dir = load_tokenizer(args)
        template, special = chat_template_of(tok_dir.parent if tok_dir and tok_dir.is_file() else tok_dir)
        items = read_job(inp, defaults, chat_template=template, special_tokens=special, limits=limits)
        done = answered(out, items, world_size)  # refuses a file that is not results of this job
        if args.retry_errors and rank == 0:
            drop_errors(out, items)
        todo = done.todo(items, retry_errors=args.retry_errors)
        # the job is tokenized while the weights load (the tokenizers library encodes without the GIL)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchpilot-tokenize")
        encoding = pool.submit(_timed, encode_job, SimpleNamespace(tokenizer=tokenizer), todo)
        pool.shutdown(wait=False)  # the submitted encoding still runs; result() below waits for it
        read = time.perf_counter()
        model = load_model_for(args, device)
        loaded = time.perf_counter()
        barrier()  # every rank has read what is done before any rank writes
        records = CompileRecords(cache_root() / "compile_costs.json")
        compile_on, compile_why = _decide_compile(args, model, todo, records)
        compile_cache = use_persistent_compile_cache() if compile_on else None
        engine = Engine(model, tokenizer, _engine_config(args, EngineConfig, compile_on))
        ready = time.perf_counter()
        try:
            encoded, tokenize_seconds = encoding.result()
            summary = _run(args, engine, items, todo, out, model, rank, world_size, barrier, encoded)
            summary["tokenize_seconds"] = tokenize_seconds
        except JobWriteError as e:
            raise ValueError(e.strerror) from None
    finally:
        lock.release()
    _record_compile(records, model, engine)
    if rank == 0:
        summary["compile"] = compile_on
        summary["compile_why"] = compile_why
        summary["compile_cache"] = str(compile_cache) if compile_on else None
        process_start = _process_start(started)
        # where the cold part goes: imports (process start to this command), reading the job, loading the
        # weights, the engine's set-up (its KV cache and kernels)
        summary["cold_parts_seconds"] = {"imports": started - process_start, "read": read - started,
                                         "load": loaded - read, "engine_init": ready - loaded}
        summary["wall_seconds"] = time.perf_counter() - process_start
        _report(summary, model, engine, world_size)
    return 0


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


def _process_start(fallback: float) -> float:
    """perf_counter() at the process's start (imports included), from the OS; ``fallback`` where unknown."""
    try:
        import psutil

        return time.perf_counter() - (time.time() - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - psutil missing or no /proc: time from the command's start
        return fallback


def _decide_compile(args: argparse.Namespace, model: Any, todo: list, records: CompileRecords) -> tuple[bool, str]:
    """(compile?, why) for the end line."""
    from batchpilot.generate import roofline

    mode = "off" if args.no_compile else args.compile
    if mode != "auto":
        return mode == "on", f"--compile {mode}"
    spec = roofline.gpu_spec(next(model.parameters()).device)
    if spec is None or args.no_cuda_graphs:  # compile only acts on the CUDA decode graphs
        return False, "auto: no CUDA decode graphs"
    lengths = [it.params.max_tokens for it in todo if it.params is not None for _ in it.prompts
               for _ in range(it.params.n)]
    steps = expected_decode_steps(lengths, args.max_num_seqs)
    rows = min(len(lengths), args.max_num_seqs)  # the batch the decode steps run at while the job is full
    gain, cost, source = compile_numbers(records.get(records.key(model)),
                                         assumed_compile_gain_s(rows, model.config.num_layers, spec[0]),
                                         args.compile_cost_s)
    on = decide_compile(mode, steps, gain, cost)
    return on, f"auto: {steps} decode steps x {gain * 1e3:.2f} ms gain vs {cost:.1f} s compile ({source})"


def _record_compile(records: CompileRecords, model: Any, engine: Any) -> None:
    """What this run measured: the compile time, and the mean decode step time with or without compile."""
    graphs, stats = engine.runner.graphs, engine.stats
    if graphs is None or not graphs.enabled or not graphs.capture or stats.decode_steps < 64:
        return
    from batchpilot.generate.graphs import greedy_tokens

    compiled = graphs.tokens is not greedy_tokens
    values = {"step_s_compiled" if compiled else "step_s_eager": stats.decode_seconds / stats.decode_steps}
    if compiled and graphs.compile_seconds > 0:
        values["compile_s"] = graphs.compile_seconds
    try:
        records.update(records.key(model), values)
    except OSError:  # a read-only home: the numbers are only lost, the job is done
        pass


def served_model_name(args: argparse.Namespace) -> str:
    """--served-model-name, else the model directory's name (never its local path), else the preset name."""
    if args.served_model_name:
        return args.served_model_name
    return Path(args.model).resolve().name if Path(args.model).exists() else args.model


def _engine_config(args: argparse.Namespace, EngineConfig: type, compile_on: bool) -> Any:
    return EngineConfig(block_size=args.kv_block_size, max_batch_tokens=args.max_batch_tokens,
                        max_num_seqs=args.max_num_seqs, gpu_memory_utilization=args.gpu_memory_utilization,
                        prefix_sharing=not args.no_prefix_sharing, cascade=not args.no_cascade,
                        triton=not args.no_triton, cuda_graphs=not args.no_cuda_graphs,
                        compile=compile_on, seed=args.seed,
                        **({} if args.decode_steps is None else {"decode_steps": args.decode_steps}),
                        **({} if args.admit_fraction is None else {"admit_fraction": args.admit_fraction}))


def _run(args: argparse.Namespace, engine: object, items: list, todo: list, out: Path, model: object, rank: int,
         world_size: int, barrier: Callable[[], None], encoded: dict | None = None) -> dict:
    from batchpilot.generate.jobs import merge_parts, run_job, sort_results

    summary = run_job(engine, items, out, model=served_model_name(args), todo=todo, rank=rank,
                      world_size=world_size, progress=False if args.no_progress else None, encoded=encoded)
    barrier()
    if world_size > 1 and rank == 0:
        merge_parts(out, world_size, items)
    elif args.ordered and rank == 0:
        sort_results(out, items)
    return summary


def _report(summary: dict, model: Any, engine: Any, world_size: int) -> None:
    """The end line: lines, tokens, wall time from the process's start, the cold part (everything but the engine's
    steps: imports, loading, reading, tokenizing, planning, writing), tokens/s over the wall time and over the
    engine's time, and the roofline share of the part it can attribute (the engine's steps)."""
    from batchpilot.generate.roofline import roofline_share

    wall, engine_s = summary["wall_seconds"], summary["engine_seconds"]
    tokens = summary["output_tokens"]
    cold = summary["cold_parts_seconds"]
    between = max(0.0, wall - engine_s - sum(cold.values()))  # scheduling, detokenizing, writing: outside the steps
    parts = ", ".join([f"{k.replace('_', ' ')} {v:.1f} s" for k, v in cold.items()] + [f"between steps {between:.1f} s"])
    print(f"lines: done {summary['requests']}, errors {summary['errors']}, skipped {summary['skipped']}; "
          f"output tokens {tokens}{' on rank 0' if world_size > 1 else ''}; wall {wall:.1f} s "
          f"(cold {max(0.0, wall - engine_s):.1f} s: {parts}, tokenize "
          f"{summary['tokenize_seconds']:.1f} s while loading; engine {engine_s:.1f} s); {tokens / max(wall, 1e-9):,.0f} tok/s "
          f"wall, {tokens / max(engine_s, 1e-9):,.0f} tok/s engine; compile {'on' if summary['compile'] else 'off'} "
          f"({summary['compile_why']}{'; cache ' + summary['compile_cache'] if summary['compile_cache'] else ''})")
    graphs = engine.runner.graphs
    if graphs is not None and graphs.enabled and graphs.capture:
        # the engine's own first-use cost: each new decode shape is captured once (its warm-ups, the capture and
        # the eager reference step), which a warm process has already paid
        print(f"decode graphs: {graphs.captures} captured in {graphs.capture_seconds:.1f} s"
              f"{' (compile included)' if graphs.compile_seconds else ''}, {graphs.borrowed_steps} rounds on a "
              f"larger captured graph; {engine.stats.graph_steps} of {engine.stats.decode_steps} decode steps on graphs")
    share = roofline_share(model, engine.stats, summary["lengths"], engine_s)
    if share:
        decode = (f", decode steps {share['decode_share']:.0%} of the bandwidth bound"
                  if "decode_share" in share else "")
        print(f"roofline: engine steps {share['job_share']:.0%} of the job's bytes/FLOPs bound "
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
