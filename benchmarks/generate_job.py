"""The product path of generation: ``batchpilot generate`` on realistic OpenAI Batch files, next to the warm engine.

    python benchmarks/generate_job.py                        # llama-1b shape, random bf16 weights, one GPU
    python benchmarks/generate_job.py --model qwen2-0.5b     # any preset, or a real HF directory (--tokenizer)
    python benchmarks/generate_job.py --smoke                # tiny preset, a few lines; runs on CPU

The benchmark writes its own jobs: shared system prompts and few-shot prefixes of varied lengths,
chat (``/v1/chat/completions``) and completion lines, output lengths from a long-tailed (log-normal)
distribution with EOS and stop strings active, greedy and sampled lines mixed. For random-weight
presets it trains a small BPE tokenizer with a chat template (model ids outside its vocabulary
decode to nothing, so EOS and stops end few lines: the long tail is max_tokens' own).

Rows: the CLI as a fresh process on 8,000 and 1,000 lines (wall clock from process start to the last
output byte: cold start, load, tokenization, compile and all); the warm engine on the same requests
in this process (second run of the job); greedy vs sampled (temperature 0.8, top-p 0.95) decode on
the same requests with fixed lengths; a long-output job (16 x 32k tokens, sampled) with its decode
steps' share of the bytes bound (Pope et al. 2022, arXiv 2211.05102, section 2). Each row has a wall cap
(``CAPS``) and all rows together ``--budget-s`` (default 270 s; all rows uncapped need ~450 s); a capped engine row
still reports its tokens/s from the engine's own count. Writes ``<out>/generate_job_<date>.json`` after every
row (``complete`` false until the end) with ``summary`` keys ``cli_vs_warm_8000``, ``cli_vs_warm_1000``,
``sampled_vs_greedy``, ``long_output_bytes_share``.
"""

from __future__ import annotations

import argparse
import gc
import datetime
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from provenance import provenance

import batchpilot
from batchpilot.cli.generate import OFFLINE_MAX_BATCH_TOKENS
from batchpilot.data.tokenizer import Tokenizer
from batchpilot.generate.engine import Engine, EngineConfig
from batchpilot.generate.request import Request, SamplingParams
from batchpilot.generate.roofline import roofline_share

WORDS = ("the model reads a batch of requests and writes every answer to a file in order while the cache holds "
         "shared prefixes once so that decode steps stay fast under a token budget with chunked prefill").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
STOPS = ("\n\n", "###", "Question:")


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_job(path: Path, lines: int, *, seed: int, scale: float, max_tokens_cap: int) -> None:
    """An OpenAI Batch file: 8 system prompts (20-400 words), 6 few-shot blocks (50-800 words), long-tailed
    output lengths (log-normal, median ~100 tokens x scale), 1/3 chat, 1/3 sampled lines, stops on half."""
    rng = random.Random(seed)
    systems = [_text(rng, max(2, int(rng.randint(20, 400) * scale))) for _ in range(8)]
    shots = [_text(rng, max(2, int(rng.randint(50, 800) * scale))) for _ in range(6)]
    with path.open("w") as f:
        for i in range(lines):
            question = _text(rng, max(1, int(rng.randint(5, 60) * scale)))
            max_tokens = max(1, min(max_tokens_cap, int(rng.lognormvariate(math.log(100 * scale), 1.0))))
            body: dict = {"max_tokens": max_tokens, "seed": i}
            if rng.random() < 1 / 3:
                body |= {"temperature": 0.8, "top_p": 0.95}
            if rng.random() < 0.5:
                body["stop"] = list(rng.sample(STOPS, 2))
            if rng.random() < 1 / 3:
                url = "/v1/chat/completions"
                body["messages"] = [{"role": "system", "content": rng.choice(systems)},
                                    {"role": "user", "content": question}]
            else:
                url = "/v1/completions"
                body["prompt"] = f"{rng.choice(systems)}\n{rng.choice(shots)}\nQuestion: {question}\nAnswer:"
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}) + "\n")


def make_tokenizer(path: Path, vocab_size: int) -> Path:
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4 + list(STOPS) * 8
    tok = Tokenizer.train_bpe(texts, min(vocab_size, 2048), special_tokens=("<|endoftext|>", "<|assistant|>"))
    tok.chat_template = CHAT_TEMPLATE
    tok.save(path)
    return path


def run_cli(args: argparse.Namespace, job: Path, out: Path, tokenizer: Path, cap_s: float) -> dict:
    """``batchpilot generate`` as a fresh process: wall clock from its start to its last output byte; killed
    after ``cap_s`` seconds (the row then says so and counts the lines written by then)."""
    cmd = [sys.executable, "-c", "import sys; from batchpilot.cli import main; sys.exit(main())", "generate",
           "--model", args.model, "--tokenizer", str(tokenizer), "--input", str(job), "--output", str(out),
           "--no-progress", "--max-batch-tokens", str(args.max_batch_tokens), "--gpu-memory-utilization", "0.85",
           *args.cli_flags.split()]
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cap_s)
        capped, stdout = False, proc.stdout
        if proc.returncode != 0:
            raise RuntimeError(f"CLI failed ({proc.returncode}): {proc.stderr[-1500:]}")
    except subprocess.TimeoutExpired as e:
        capped, stdout = True, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        stdout += stderr[-900:]  # a killed run's warnings (graphs or compile switched off) say where its time went
    end = time.time()
    records = [json.loads(t) for t in out.read_text().splitlines() if t.strip()] if out.exists() else []
    tokens = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in records
                 if (r.get("response") or {}).get("body", {}).get("usage"))
    last_byte = (out.stat().st_mtime if out.exists() else end) - start
    return {"lines": len(records), "output_tokens": tokens, "process_seconds": round(end - start, 3),
            "wall_seconds_to_last_byte": round(last_byte, 3), "out_tok_s": round(tokens / max(last_byte, 1e-9), 1),
            "capped_at_s": cap_s if capped else None, "stdout_tail": stdout[-1200:]}


def job_requests(engine: Engine, job: Path, template_dir: Path) -> list[Request]:
    """The job's requests as the CLI builds them (same prompts, params and custom_id-keyed seeds)."""
    from batchpilot.data.chat_template import chat_template_of
    from batchpilot.generate.jobs import encode_job, item_seed, read_job

    template, special = chat_template_of(template_dir)
    items = read_job(job, SamplingParams(max_tokens=128), chat_template=template, special_tokens=special)
    encoded = encode_job(engine, items)  # the CLI's batched tokenization and its seeds (jobs.item_seed)
    reqs = []
    for it in items:
        if it.error is not None:
            continue
        for p, ids in enumerate(encoded[it.line]):
            reqs.append(Request(len(reqs), ids, item_seed(it, p, engine.config.seed)))
    return reqs


def run_warm(engine: Engine, requests: list[Request], warmup: list[Request] | None, cap_s: float) -> dict:
    """The requests on a warm engine (``warmup`` first, if given: compiles and captures the big batches), capped at
    ``cap_s`` seconds; tokens/s from the engine's own count, so a capped row still measures its speed."""
    row_start = time.perf_counter()
    graphs = engine.runner.graphs

    def captured() -> tuple[int, float]:  # graphs captured so far, and their seconds
        return (graphs.captures, graphs.capture_seconds) if graphs else (0, 0.0)

    before = captured()
    if warmup:
        list(engine.run([Request(r.index, r.prompt_ids, r.params) for r in warmup],
                        deadline=row_start + cap_s / 3))
        _sync()
    # what the warm-up paid (its first uses: graph captures, kernel compiles), which the measured run then does not
    first_run = {"warmup_seconds": round(time.perf_counter() - row_start, 3),
                 "warmup_captures": captured()[0] - before[0],
                 "warmup_capture_seconds": round(captured()[1] - before[1], 3)}
    before = captured()
    engine.stats = type(engine.stats)()
    fresh = [Request(r.index, r.prompt_ids, r.params) for r in requests]
    _sync()
    start = time.perf_counter()
    cap_s -= start - row_start  # the warm-up is part of the row's cap (the budget-s arithmetic counts on it)
    done = list(engine.run(fresh, deadline=start + cap_s))
    _sync()
    seconds = time.perf_counter() - start
    lengths = [(len(c.prompt_ids), len(c.output_ids)) for c in done]
    tokens = engine.stats.output_tokens
    return {**first_run, "captures": captured()[0] - before[0], "requests": len(requests), "finished": len(done),
            "output_tokens": tokens, "seconds": round(seconds, 3),
            "out_tok_s": round(tokens / seconds, 1), "capped_at_s": cap_s if len(done) < len(requests) else None,
            **engine.stats.to_dict(),
            "mean_decode_batch": round(engine.stats.decode_batch_sum / max(1, engine.stats.decode_steps), 1),
            "cuda_graphs": bool(graphs and graphs.enabled), "cuda_graphs_off_reason": graphs and graphs.off_reason,
            "roofline": roofline_share(engine.model, engine.stats, lengths, seconds)}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _ratio(a: dict | None, b: dict | None, key: str = "out_tok_s") -> float | None:
    return round(a[key] / b[key], 3) if a and b and "error" not in a and "error" not in b and b[key] else None


# per-row wall caps (s), scaled down by what is left of --budget-s: the rows in the order they run
CAPS = {"cli_8000": 110, "warm_8000": 70, "cli_1000": 40, "warm_1000": 25, "decode_greedy": 25,
        "decode_sampled": 25, "long_output": 100}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny preset, a few short lines; runs on CPU")
    p.add_argument("--model", default=None, help="preset or HF directory (default llama-1b; tiny with --smoke)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: a small BPE trained here)")
    p.add_argument("--lines", default=None, help="comma-separated job sizes (default 8000,1000)")
    p.add_argument("--long-requests", type=int, default=None, help="long-output job: requests (default 16)")
    p.add_argument("--long-tokens", type=int, default=None, help="long-output job: tokens each (default 32768)")
    p.add_argument("--max-batch-tokens", type=int, default=OFFLINE_MAX_BATCH_TOKENS,
                   help="the CLI's and the warm engine's step token budget (default: the CLI's)")
    p.add_argument("--cli-flags", default="", help="extra flags for the CLI and the warm engine, e.g. --no-compile")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="wall seconds for all rows together (each row also has its own cap); rows past it are skipped")
    p.add_argument("--rows", default=None,
                   help="comma-separated rows to run (default all): cli_N, warm_N, decode_greedy, decode_sampled, "
                        "long_output")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    t0 = time.perf_counter()
    args.model = args.model or ("tiny" if args.smoke else "llama-1b")
    sizes = [int(n) for n in (args.lines or ("12,6" if args.smoke else "8000,1000")).split(",")]
    long_n, long_t = args.long_requests or (2 if args.smoke else 16), args.long_tokens or (48 if args.smoke else 32768)
    scale = 0.05 if args.smoke else 1.0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = batchpilot.load_model(args.model, device=device, dtype=dtype)
    rows: list[dict] = []
    now = datetime.datetime.now(datetime.timezone.utc)
    path = Path(args.out) / f"generate_job_{'smoke_' if args.smoke else ''}{now:%Y%m%d_%H%M%S}.json"

    def cap(row: str) -> float:
        own = CAPS.get(row, CAPS.get(row.split("_")[0] + "_1000", 60))  # smoke sizes: the 1000-line caps
        return max(0.0, min(own, args.budget_s - (time.perf_counter() - t0)))

    wanted = set(args.rows.split(",")) if args.rows else None

    def record(name: str, fn, *fn_args) -> None:
        if wanted is not None and name not in wanted:
            return
        c = cap(name)
        row = {"row": name, **(_guarded(fn, *fn_args, c) if c > 1 else {"error": "skipped: --budget-s spent"})}
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(path, args, sizes, rows)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok_dir = Path(args.tokenizer) if args.tokenizer else make_tokenizer(tmp / "tok", model.config.vocab_size)
        flags = args.cli_flags.split()
        # The warm engine and the CLI's process share the GPU: the warm engine takes 40% of it, the CLI (whose
        # --gpu-memory-utilization is the share it may bring the GPU up to) the next 45%: equal KV budgets.
        cfg = EngineConfig(max_batch_tokens=args.max_batch_tokens, compile="--no-compile" not in flags,
                           cuda_graphs="--no-cuda-graphs" not in flags, gpu_memory_utilization=0.4)
        engine = Engine(model, Tokenizer.from_path(tok_dir), cfg)
        if device == "cuda":  # first uses (compile, kernel JIT, greedy and sampled graphs) outside every row's cap:
            # the first row would otherwise carry them (the fifth session's greedy rows: ~1 s of extra non-decode time)
            rng = random.Random(2)
            ids = [[rng.randrange(model.config.vocab_size) for _ in range(rng.randint(16, 300))] for _ in range(256)]
            engine.generate(ids, SamplingParams(max_tokens=8, ignore_eos=True))
            engine.generate(ids, SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.8, top_p=0.95))
        warm = False
        for n in sizes:
            job = tmp / f"job_{n}.jsonl"
            write_job(job, n, seed=n, scale=scale, max_tokens_cap=2048)
            record(f"cli_{n}", run_cli, args, job, tmp / f"out_{n}.jsonl", tok_dir)
            reqs = job_requests(engine, job, tok_dir)
            warmup = None if warm else [Request(r.index, r.prompt_ids, replace(r.params, max_tokens=min(
                r.params.max_tokens, 48))) for r in reqs[:2048]]
            record(f"warm_{n}", run_warm, engine, reqs, warmup)
            warm = True
        reqs = job_requests(engine, tmp / f"job_{sizes[-1]}.jsonl", tok_dir)
        fixed = max(8, int(128 * scale * 4))
        for mode, extra in (("greedy", dict(temperature=0.0)), ("sampled", dict(temperature=0.8, top_p=0.95))):
            same = [Request(r.index, r.prompt_ids, replace(r.params, max_tokens=fixed, ignore_eos=True, stop=(),
                                                           **extra)) for r in reqs]
            short = [Request(r.index, r.prompt_ids, replace(r.params, max_tokens=4)) for r in same]  # captures
            record(f"decode_{mode}", run_warm, engine, same, short)
        rng = random.Random(1)
        long_reqs = [Request(i, [rng.randrange(model.config.vocab_size) for _ in range(64)],
                             SamplingParams(max_tokens=long_t, temperature=0.8, top_p=0.95, seed=i, ignore_eos=True))
                     for i in range(long_n)]
        tokenizer = engine.tokenizer
        del engine  # its KV cache: the long-output engine allocates its own
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        long_engine = Engine(model, tokenizer, replace(cfg, output_len_prior=long_t, max_num_seqs=max(8, long_n)))
        record("long_output", run_warm, long_engine, long_reqs, None)
    print(json.dumps(write(path, args, sizes, rows, final=True)))
    print(f"wrote {path}")


def write(path: Path, args: argparse.Namespace, sizes: list[int], rows: list[dict], final: bool = False) -> dict:
    """The result file, rewritten after every row (a run cut short keeps the rows it finished)."""
    by = {r["row"]: r for r in rows}
    long_row = by.get("long_output") or {}
    summary = {
        "cli_vs_warm_8000": _ratio(by.get("cli_8000"), by.get("warm_8000")),
        "cli_vs_warm_1000": _ratio(by.get("cli_1000"), by.get("warm_1000")),
        "sampled_vs_greedy": _ratio(by.get("decode_sampled"), by.get("decode_greedy")),
        "long_output_bytes_share": (long_row.get("roofline") or {}).get("decode_share"),
    }
    if args.smoke:  # the smoke sizes have their own keys, so a smoke file is never read as the real one
        summary |= {f"cli_vs_warm_{n}": _ratio(by.get(f"cli_{n}"), by.get(f"warm_{n}")) for n in sizes}
    result = {"benchmark": "generate_job", **provenance(), "model": args.model, "smoke": args.smoke,
              "complete": final, "budget_s": args.budget_s, "summary": summary, "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return summary


def _guarded(fn, *args) -> dict:
    """A failing row is recorded and the other rows still run."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 -- a benchmark reports failures instead of losing the run
        return {"error": f"{type(e).__name__}: {e}"[:800]}


if __name__ == "__main__":
    main()
