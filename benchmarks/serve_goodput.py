"""Goodput of ``batchpilot serve`` under latency SLOs, per admission policy, with an open-loop Poisson client.

For each admission policy (past_future, aggressive, conservative) the benchmark starts the product itself,
``python -m batchpilot serve`` (a subprocess: the client does not share its interpreter), warms it up, then replays
each workload at a sweep of request rates, each for ``--seconds-per-rate`` of arrivals: arrivals are Poisson (open loop: a slow server does not slow the
arrivals), every request streams, and the client records its time to first token (TTFT) and mean time per output
token after the first (TPOT). Goodput = requests per second that met both SLOs.

Workloads (token counts; prompts are random token ids, the model has random weights):
  chat       prompt lognormal(median 256, sigma 0.6), output mean 200, cap 1024
  summarize  prompt lognormal(median 1536, sigma 0.4), output mean 96, cap 512
  code       prompt lognormal(median 512, sigma 0.7), output mean 320, cap 1024
Output lengths are not known to the server: each request asks for ``max_tokens`` = the cap, samples at temperature
1, and carries an OpenAI ``logit_bias`` on the EOS id that makes EOS come after a geometric number of tokens with the
drawn mean (a random-weight model's logits are near uniform over V tokens, so a bias b gives P(EOS) ~ e^b / V per
step). That is what a real model does to a scheduler: the lengths follow a distribution it can learn (Past-Future)
but not know (conservative reserves the cap). With ``--lengths exact`` requests instead carry ignore_eos and
max_tokens = the drawn length (then conservative admission knows every length; use it when logit_bias is missing).

The servers get a KV cache of ``--kv-cache-tokens`` (32,768 by default on a GPU, 1 GiB for llama-1b): the memory
pressure a larger model or a shared GPU leaves, where admission policies differ; with the whole H200 free a 1B
model's cache holds millions of tokens and every policy admits everything. The default rates (25, 50, 100 per
second) and cache come from ``benchmarks/serve_sim.py``, a simulation of the same scheduler on the H200's measured
step times: the aggressive policy's goodput peaks at 50 (chat) and 25 (summarisation) requests/s there, where it
starts to preempt. Each rate's requests get ``--drain-seconds`` (4) after the last arrival; requests still open
then count as unfinished (not good).

Phases, per policy: a low-load phase (past_future only: ``LOW_LOAD_REQUESTS`` at ``LOW_LOAD_RATE``, with the
server's own split of TTFT from ``/metrics``), the rates, then a saturation phase (``--saturation-policies``:
``--saturation-requests`` requests all at once, output tokens/s from the first sent to the last byte). Before the
servers, in-process on the same GPU: the offline engine on the saturation requests (same ``--max-num-seqs`` and
cache; graphs captured first, as the servers capture theirs) and on each low-load request alone (prefill with its
own sampling parameters, decode step). After them, the low-load phase again on each ``--low-load-variants`` flag
set (default ``--decode-steps 1``: the decode round a new request may wait behind). docs/serve.md states every
definition. Every row carries the server's own counts over it (``server``: steps by kind, token budget, host CPU
microseconds per generated token by thread).
Result: ``serve_goodput_*.json`` with summary keys ``goodput_vs_aggressive``, ``goodput_vs_conservative`` (the worse
workload, at the rate where the aggressive policy's goodput peaks), ``saturation_vs_offline`` (past_future's
saturation phase over the offline job, the worse workload) and ``low_load_ttft_vs_prefill`` (the worse workload).

Usage (one H200): python benchmarks/serve_goodput.py
CPU smoke:        python benchmarks/serve_goodput.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance import provenance  # noqa: E402

WORKLOADS = {"chat": (256, 0.6, 200, 1024), "summarize": (1536, 0.4, 96, 512), "code": (512, 0.7, 320, 1024)}
POLICIES = ("past_future", "aggressive", "conservative")
LOW_LOAD_RATE, LOW_LOAD_REQUESTS = 1.0, 8  # about one request in flight: the latency floor
VARIANT_SECONDS = 60  # a low-load variant on one H200: server start with graph capture (~30 s), two 8 s phases
EOS_ID = 2


def make_requests(workload: str, n: int, *, vocab: int, seed: int, scale: float, lengths: str) -> list[dict]:
    median, sigma, mean_out, cap = WORKLOADS[workload]
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        prompt_len = max(4, min(int(4 * median * scale), int(rng.lognormvariate(math.log(median * scale), sigma))))
        target = max(2.0, rng.expovariate(1 / (mean_out * scale)))  # drawn mean of this request's geometric length
        body: dict[str, Any] = {"model": "m", "prompt": [rng.randrange(3, vocab) for _ in range(prompt_len)],
                                "stream": True, "stream_options": {"include_usage": True}}
        if lengths == "exact":
            body |= {"max_tokens": int(min(target, cap * scale)), "ignore_eos": True, "temperature": 0}
        else:  # P(EOS) per step ~ e^b / (V + e^b) = 1 / target
            body |= {"max_tokens": int(cap * scale), "temperature": 1.0, "seed": rng.randrange(2**31),
                     "logit_bias": {str(EOS_ID): round(math.log(vocab / max(target - 1, 1.0)), 3)}}
        reqs.append(body)
    return reqs


async def one_request(client: Any, body: dict, start: float, at: float, light: bool = False) -> dict:
    """One streamed request sent at ``start + at``: its TTFT, TPOT and output tokens. ``light`` (saturation):
    only the first chunk and the usage chunk are parsed, so the client's JSON work does not bound the rate."""
    await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
    sent, first, tokens, error = time.perf_counter(), None, 0, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"status": r.status_code, "sent": sent - start}
            async for line in r.aiter_lines():
                if light and first is not None and '"usage"' not in line and '"error"' not in line:
                    continue
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                elif chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None:
                    first = time.perf_counter()
    except Exception as e:  # noqa: BLE001 -- a failed request is a result (not good), not a crash
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    ttft = (first - sent) if first else None
    tpot = (end - first) / (tokens - 1) if first and tokens > 1 else None
    return {"status": 200 if error is None else 500, "sent": sent - start, "end": end - start, "ttft": ttft, "tpot": tpot,
            "tokens": tokens, "error": error}


async def run_rate(base_url: str, reqs: list[dict], rate: float, seed: int, drain_s: float = 600.0,
                   light: bool = False) -> list[dict]:
    """Poisson arrivals at ``rate`` (``math.inf``: all at once, the saturation phase)."""
    import httpx

    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in reqs:
        t += rng.expovariate(rate) if math.isfinite(rate) else 0.0
        arrivals.append(t)
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        tasks = [asyncio.create_task(one_request(client, b, start, a, light)) for b, a in zip(reqs, arrivals)]
        # the wall cap: requests still open after the last arrival + drain_s are results too (not good), so an
        # overloaded policy costs bounded benchmark time instead of draining its whole backlog
        done, pending = await asyncio.wait(tasks, timeout=arrivals[-1] + drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return [t.result() if t in done else {"status": 0, "sent": a, "ttft": None, "tpot": None, "tokens": 0,
                                              "error": "unfinished at the wall cap"}
                for t, a in zip(tasks, arrivals)]


def summarize_rate(rows: list[dict], rate: float, *, ttft_slo: float, tpot_slo: float) -> dict:
    span = max((r["sent"] for r in rows), default=0.0) or 1.0
    ok = [r for r in rows if r["status"] == 200 and r.get("ttft") is not None]
    good = [r for r in ok if r["ttft"] <= ttft_slo and (r["tpot"] is None or r["tpot"] <= tpot_slo)]
    pct = (lambda xs, q: statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else (xs[0] if xs else None))
    ttfts, tpots = [r["ttft"] for r in ok], [r["tpot"] for r in ok if r["tpot"] is not None]
    return {"rate": rate, "requests": len(rows), "answered": len(ok), "good": len(good),
            # goodput over the arrival span (= the offered rate x the share that met both SLOs); throughput
            # over the span until the last answer, so a backlog drained after the arrivals is not counted as fast
            "goodput_rps": len(good) / span,
            "throughput_tokens_per_s": sum(r["tokens"] for r in ok) / max((r["end"] for r in ok), default=1.0),
            "rejected": sum(r["status"] == 429 for r in rows), "errors": sum(r["status"] == 500 for r in rows),
            "unfinished": sum(r["status"] == 0 for r in rows),
            "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99), "tpot_p50": pct(tpots, 50),
            "tpot_p99": pct(tpots, 99)}


def start_server(model_dir: Path, policy: str, port: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "batchpilot", "serve", "--model", str(model_dir), "--port", str(port),
           "--admission", policy, "--tpot-slo", str(args.tpot_slo), "--ttft-slo", str(args.ttft_slo),
           "--max-queue", "100000", "--max-num-seqs", str(args.max_num_seqs)]
    if args.kv_cache_tokens:
        cmd += ["--kv-cache-tokens", str(args.kv_cache_tokens)]
    cmd += args.server_flags.split()
    # the server's output goes to a file: a pipe nobody reads blocks the server once its buffer (64 KiB) is full
    log = open(Path(tempfile.mkdtemp(prefix="serve_log_")) / f"{policy}.log", "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log  # type: ignore[attr-defined]
    import httpx

    deadline = time.time() + args.start_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_tail(proc)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def scrape(base_url: str) -> dict[str, float]:
    """The server's /metrics as {name{labels}: value} (counters and gauges; histogram sums and counts)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return {s.name + "".join(f"{{{v}}}" for v in s.labels.values()): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def wait_idle(base_url: str, timeout_s: float = 10.0) -> bool:
    """Until the server holds no request (the previous phase's cancelled streams are gone), at most timeout_s."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        m = scrape(base_url)
        if m.get("batchpilot_requests_running", 0) + m.get("batchpilot_requests_waiting", 0) == 0:
            return True
        time.sleep(0.2)
    return False


def server_side(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the server saw during one rate: its steps by kind and their mean time, its token budget, and its own
    count of requests within the SLOs (a cross-check of the client's timing, which shares a CPU with it)."""
    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    out: dict[str, Any] = {"token_budget": after.get("batchpilot_step_token_budget")}
    for kind in ("decode", "mixed"):
        n = d(f"batchpilot_engine_steps_by_kind_total{{{kind}}}")
        out[f"{kind}_steps"] = n
        out[f"{kind}_step_ms"] = round(1000 * d(f"batchpilot_engine_step_seconds_total{{{kind}}}") / n, 2) if n else None
    # host CPU per generated token, by side: is a separate engine process needed (docs/serve.md)?
    tokens = d("batchpilot_output_tokens_total")
    if tokens:
        engine_cpu = d("batchpilot_engine_thread_cpu_seconds_total")
        out["host_us_per_token"] = {
            "engine_thread_cpu": round(1e6 * engine_cpu / tokens, 2),
            "engine_thread_stream_events": round(1e6 * d("batchpilot_engine_stream_seconds_total") / tokens, 2),
            "event_loop_thread_cpu": round(1e6 * d("batchpilot_event_loop_thread_cpu_seconds_total") / tokens, 2),
            "process_cpu": round(1e6 * d("batchpilot_process_cpu_seconds_total") / tokens, 2)}
    out["finished"] = d("batchpilot_requests_finished_total")
    out["within_slo"] = d("batchpilot_requests_within_slo_total")
    for name in ("time_to_first_token", "time_per_output_token"):
        n = d(f"batchpilot_{name}_seconds_count")
        out[f"{name}_mean_s"] = round(d(f"batchpilot_{name}_seconds_sum") / n, 4) if n else None
    return out


def ttft_split(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The server's own split of time to first token over a phase (mean seconds per ``TTFT_PHASES`` phase,
    serve/metrics.py), its mean TTFT, and the mean engine round trips a request waited before its first token's."""
    from batchpilot.serve.metrics import TTFT_PHASES

    def mean(name: str) -> float | None:
        n = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
        return (after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)) / n if n else None

    phases = {}
    for ph in TTFT_PHASES:
        keys = [f"batchpilot_ttft_phase_seconds_{k}{{{ph}}}" for k in ("count", "sum")]
        n = after.get(keys[0], 0.0) - before.get(keys[0], 0.0)
        phases[ph] = (after.get(keys[1], 0.0) - before.get(keys[1], 0.0)) / n if n else None
    return {"ttft_phases_mean_s": phases, "ttft_mean_s": mean("batchpilot_time_to_first_token_seconds"),
            "rounds_waited_mean": mean("batchpilot_rounds_before_first_token")}


def low_load_reqs(reqs: list[dict]) -> list[dict]:
    return reqs[:LOW_LOAD_REQUESTS]


def low_load_phase(base_url: str, reqs: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """``LOW_LOAD_REQUESTS`` at ``LOW_LOAD_RATE``: the client's latencies, each request's TTFT, the server's split."""
    wait_idle(base_url)
    before = scrape(base_url)
    # a longer drain than the rates': a request cut at the wall cap would lose its TTFT from the sample
    rows = asyncio.run(run_rate(base_url, low_load_reqs(reqs), LOW_LOAD_RATE, seed=1,
                                drain_s=max(args.drain_seconds, 10.0)))
    out = summarize_rate(rows, LOW_LOAD_RATE, ttft_slo=args.ttft_slo, tpot_slo=args.tpot_slo)
    out |= {"ttft_s": [r["ttft"] for r in rows], "server": ttft_split(before, scrape(base_url))}
    print(json.dumps({"low_load": args.server_flags, "ttft_p50": out["ttft_p50"], "tpot_p50": out["tpot_p50"],
                      **out["server"]}), flush=True)
    return out


def free_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def log_tail(proc: subprocess.Popen, chars: int = 2000) -> str:
    """The last ``chars`` of a server's output (its warnings: why graphs or compile switched off)."""
    log = proc.log  # type: ignore[attr-defined]
    log.flush()
    return Path(log.name).read_text(errors="replace")[-chars:]


def build_model_dir(args: argparse.Namespace) -> Path:
    import torch

    from batchpilot import build_model, save_model
    from batchpilot.model.llama import get_preset

    config = get_preset(args.preset).with_(eos_token_id=EOS_ID)
    if args.max_positions:  # a small preset with room for the workloads' prompts + max_tokens (CPU experiments)
        config = config.with_(max_position_embeddings=args.max_positions)
    model = build_model(config, device="cuda" if torch.cuda.is_available() else "cpu", seed=0)
    path = Path(tempfile.mkdtemp(prefix="serve_model_")) / "model"
    save_model(model, path, dtype=torch.bfloat16 if torch.cuda.is_available() else None)
    return path


def saturation(base_url: str, reqs: list[dict], timeout_s: float) -> dict:
    """The server's capacity: every request at once (the queue takes them all: ``--max-queue`` 100,000), output
    tokens per second from the first request sent to the last byte received (``saturation_vs_offline`` against the
    offline engine on exactly these requests)."""
    rows = asyncio.run(run_rate(base_url, reqs, math.inf, seed=0, drain_s=timeout_s, light=True))
    ok = [r for r in rows if r["status"] == 200]
    span = max((r["end"] for r in ok), default=0.0) - min((r["sent"] for r in rows), default=0.0)
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(rows), "answered": len(ok), "output_tokens": tokens, "seconds": span,
            "output_tokens_per_s": tokens / span if span > 0 else None,
            "unfinished": sum(r["status"] == 0 for r in rows), "errors": sum(r["status"] == 500 for r in rows)}


def _params(body: dict) -> Any:
    """A benchmark body's SamplingParams by the server's own rules (``jobs.body_params``: the same fields)."""
    from batchpilot.generate import SamplingParams
    from batchpilot.generate.jobs import body_params

    return body_params({k: v for k, v in body.items() if k not in ("stream", "stream_options", "model")},
                       SamplingParams(), "completion")[0]


def offline_reference(model_dir: Path, workloads: dict[str, list[dict]], low_load: dict[str, list[dict]],
                      kv_cache_tokens: int | None, max_num_seqs: int, compile_graphs: bool = True) -> dict:
    """The offline engine (same ``max_num_seqs`` and KV cache as the servers) on each workload's saturation
    requests (output tokens/s), and on each low-load request alone: its prefill (the request's own sampling
    parameters, ``max_tokens`` 1: what the server's first token costs without a server) and its decode step.
    ``compile_graphs`` False when the servers run with ``--no-compile``: both sides then replay the same graphs."""
    import torch

    from batchpilot import load_model
    from batchpilot.generate import Engine, EngineConfig
    from batchpilot.serve.loop import warm_up_graphs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(model_dir, device=device, dtype=torch.bfloat16 if device == "cuda" else None)
    # the servers' KV cache size, so that saturation compares like with like
    engine = Engine(model, None, EngineConfig(prefix_sharing=False, max_num_seqs=max_num_seqs, compile=compile_graphs,
                                              num_blocks=kv_cache_tokens // 16 if kv_cache_tokens else None))
    # the graphs as the servers have them: block tables for the longest request, every bucket and sampling kind
    # captured before anything is timed (a capture inside the timed job would count against the offline side)
    engine.runner.begin_job(min(engine.model.config.max_position_embeddings, engine.pool.capacity_tokens))
    warm_up_graphs(engine)
    out: dict[str, Any] = {}
    for name, reqs in workloads.items():
        prompts, params = [b["prompt"] for b in reqs], [_params(b) for b in reqs]
        engine.generate(prompts[:8], params[:8])  # warm-up (graphs, compile)
        t0 = time.perf_counter()
        done = engine.generate(prompts, params)
        seconds = time.perf_counter() - t0
        out[name] = {"requests": len(reqs), "output_tokens": sum(len(c.output_ids) for c in done),
                     "output_tokens_per_s": sum(len(c.output_ids) for c in done) / seconds, "seconds": seconds}
        prefills, steps = [], []
        for body in low_load.get(name, []):
            p = _params(body)
            one = [body["prompt"]]
            engine.generate(one, replace(p, max_tokens=2))  # this size's first use (graph bucket 1, kernels)
            prefills.append(statistics.median(_timed(engine, one, replace(p, max_tokens=1)) for _ in range(3)))
            decode = _timed(engine, one, replace(p, max_tokens=65, ignore_eos=True))
            steps.append((decode - prefills[-1]) / 64)
        out[name] |= {"prefill_s": prefills, "decode_step_s": steps,
                      "prefill_p50_s": statistics.median(prefills) if prefills else None,
                      "decode_step_p50_s": statistics.median(steps) if steps else None}
    return out


def _timed(engine: Any, prompts: list, params: Any) -> float:
    t0 = time.perf_counter()
    engine.generate(prompts, params)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny preset on CPU, a few requests")
    p.add_argument("--preset", default=None)
    p.add_argument("--workloads", default="chat,summarize")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--rates", default=None, help="requests/s, comma-separated (default per mode)")
    p.add_argument("--requests-per-rate", type=int, default=None, help="a fixed count per rate (default: by time)")
    p.add_argument("--seconds-per-rate", type=float, default=5.0, help="arrival span of each rate's requests")
    p.add_argument("--ttft-slo", type=float, default=None)
    p.add_argument("--tpot-slo", type=float, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--lengths", choices=("geometric", "exact"), default="geometric")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="the servers' KV cache in tokens (default 32768 on GPU: the memory pressure of a larger "
                        "model or a shared GPU, where admission policies differ (benchmarks/serve_sim.py); None on "
                        "CPU)")
    p.add_argument("--drain-seconds", type=float, default=None,
                   help="per rate: seconds after the last arrival before open requests count as unfinished")
    p.add_argument("--max-positions", type=int, default=None,
                   help="the model's max_position_embeddings (e.g. 4096 with --preset tiny on CPU)")
    p.add_argument("--server-flags", default="", help="extra flags for every server, e.g. --no-compile")
    p.add_argument("--skip-offline", action="store_true",
                   help="no offline-engine reference (no saturation_vs_offline, no low-load ratios)")
    p.add_argument("--saturation-requests", type=int, default=None,
                   help="requests of the saturation phase, all sent at once (default 256; 6 with --smoke)")
    p.add_argument("--saturation-policies", default="past_future",
                   help="policies whose servers get the saturation phase (saturation_vs_offline takes past_future's)")
    p.add_argument("--saturation-timeout", type=float, default=60.0,
                   help="seconds the saturation phase may take per policy and workload")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds the whole run may take (e.g. 520 under a 540 s limit): the low-load variants are "
                        "skipped when less than their ~60 s is left; every phase prints its elapsed time")
    p.add_argument("--low-load-variants", default="--decode-steps 1",
                   help="';'-separated server flag sets whose low-load phase is measured too (past_future), e.g. "
                        "the decode round length; '' for none")
    p.add_argument("--port", type=int, default=18431)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    smoke = args.smoke
    args.preset = args.preset or ("tiny" if smoke else "llama-1b")
    # the GPU defaults come from benchmarks/serve_sim.py (docs/serve.md): with a 32,768-token cache the aggressive
    # policy's goodput peaks at 50 (chat) and 25 (summarisation) requests/s and it preempts from there on; 100 shows
    # every policy past its peak. Rates x workloads x policies + saturation + offline fit one 9-minute run.
    rates = [float(r) for r in (args.rates or ("2,4" if smoke else "25,50,100")).split(",")]
    # a steady load: each rate runs for --seconds-per-rate (rate x seconds requests), not a fixed count, which at a
    # high rate is a burst that ends before the batch reaches its steady state
    per_rate = {r: args.requests_per_rate or (6 if smoke else math.ceil(r * args.seconds_per_rate)) for r in rates}
    args.saturation_requests = args.saturation_requests or (6 if smoke else 256)
    n = max(*per_rate.values(), args.saturation_requests)
    args.ttft_slo = args.ttft_slo or (5.0 if smoke else 1.0)
    args.tpot_slo = args.tpot_slo or (1.0 if smoke else 0.05)
    scale = 0.05 if smoke else 1.0
    if args.kv_cache_tokens is None and not smoke:
        args.kv_cache_tokens = 32768
    args.drain_seconds = args.drain_seconds or (60.0 if smoke else 4.0)
    from batchpilot.model.llama import get_preset

    vocab = get_preset(args.preset).vocab_size
    started = time.perf_counter()
    model_dir = build_model_dir(args)
    workloads = {w: make_requests(w, n, vocab=vocab, seed=i, scale=scale, lengths=args.lengths)
                 for i, w in enumerate(args.workloads.split(","))}
    results: dict[str, Any] = {}
    low_load: dict[str, Any] = {}
    saturated: dict[str, Any] = {}  # policy -> workload -> the saturation phase
    low_load_variants: dict[str, Any] = {}  # server flags -> workload -> the low-load phase on them
    result: dict[str, Any] = {"benchmark": "serve_goodput", "preset": args.preset,
                              "workloads": {w: WORKLOADS[w] for w in workloads}, "lengths": args.lengths,
                              "ttft_slo_s": args.ttft_slo, "tpot_slo_s": args.tpot_slo, "rates": rates,
                              "requests_per_rate": per_rate, "seconds_per_rate": args.seconds_per_rate,
                              "max_num_seqs": args.max_num_seqs, "kv_cache_tokens": args.kv_cache_tokens,
                              "drain_seconds": args.drain_seconds, "saturation_requests": args.saturation_requests,
                              **provenance()}
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serve_goodput_{dt.datetime.now().strftime('%Y%m%d_%H%M%S')}.json"
    server_logs: dict[str, str] = {}  # per policy: the tail of the server's output
    # the offline reference first (then its GPU memory is given back): a run cut short keeps it and every server row
    offline = {} if args.skip_offline else offline_reference(
        model_dir, {w: reqs[:args.saturation_requests] for w, reqs in workloads.items()},
        {w: low_load_reqs(reqs) for w, reqs in workloads.items()}, args.kv_cache_tokens, args.max_num_seqs,
        compile_graphs="--no-compile" not in args.server_flags.split())
    free_gpu_memory()
    print(json.dumps({"offline": offline, "elapsed_s": round(time.perf_counter() - started)}), flush=True)
    result["offline"] = offline
    for policy in args.policies.split(","):
        server = start_server(model_dir, policy, args.port, args)
        try:
            base = f"http://127.0.0.1:{args.port}"
            asyncio.run(run_rate(base, next(iter(workloads.values()))[:16], 100.0, seed=99))  # warm-up
            for name, reqs in workloads.items():
                if policy == "past_future":  # low load: a request at a time, against the offline engine's step
                    low_load[name] = low_load_phase(base, reqs, args)
                for rate in rates:
                    wait_idle(base)
                    before = scrape(base)
                    rows = asyncio.run(run_rate(base, reqs[:per_rate[rate]], rate, seed=int(rate),
                                                drain_s=args.drain_seconds))
                    summary = summarize_rate(rows, rate, ttft_slo=args.ttft_slo, tpot_slo=args.tpot_slo)
                    summary["server"] = server_side(before, scrape(base))
                    results.setdefault(policy, {}).setdefault(name, []).append(summary)
                    elapsed = round(time.perf_counter() - started)
                    print(json.dumps({"policy": policy, "workload": name, "elapsed_s": elapsed, **summary}), flush=True)
                    # a cut run keeps its rows
                    write(result | {"results": results, "low_load": low_load, "saturation": saturated,
                                    "partial": True}, path)
                if policy not in args.saturation_policies.split(","):
                    continue
                wait_idle(base)
                before = scrape(base)
                sat = saturation(base, reqs[:args.saturation_requests], args.saturation_timeout)
                sat["server"] = server_side(before, scrape(base))
                saturated.setdefault(policy, {})[name] = sat
                print(json.dumps({"saturation": policy, "workload": name,
                                  "elapsed_s": round(time.perf_counter() - started), **sat}), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=120)
            server_logs[policy] = log_tail(server)
            write(result | {"results": results, "low_load": low_load, "saturation": saturated,
                            "server_logs": server_logs, "partial": True}, path)
    for flags in filter(None, args.low_load_variants.split(";")):  # the low-load phase on other server flags
        if args.time_budget and time.perf_counter() - started > args.time_budget - VARIANT_SECONDS:
            low_load_variants[flags] = {"skipped": f"under {VARIANT_SECONDS} s left of --time-budget"}
            continue
        variant = argparse.Namespace(**vars(args) | {"server_flags": f"{args.server_flags} {flags}"})
        server = start_server(model_dir, "past_future", args.port, variant)
        try:
            base = f"http://127.0.0.1:{args.port}"
            asyncio.run(run_rate(base, next(iter(workloads.values()))[:16], 100.0, seed=99))  # warm-up
            for name, reqs in workloads.items():
                low_load_variants.setdefault(flags, {})[name] = low_load_phase(base, reqs, variant)
        finally:
            server.terminate()
            server.wait(timeout=120)
        write(result | {"results": results, "low_load": low_load, "low_load_variants": low_load_variants,
                        "saturation": saturated, "server_logs": server_logs, "partial": True}, path)
    result["elapsed_s"] = round(time.perf_counter() - started)
    result |= {"results": results, "low_load": low_load, "low_load_variants": low_load_variants,
               "saturation": saturated, "offline": offline,
               "server_logs": server_logs,
               "summary": summarize(results, low_load, saturated, offline, low_load_variants)}
    print(json.dumps(result["summary"], indent=1))
    write(result, path)
    print(f"wrote {path}")


def write(result: dict, path: Path) -> None:
    """The result so far; a partial one carries the summary of what it has (a run cut at its time limit still
    answers what it measured)."""
    if result.get("partial"):
        result = result | {"summary": summarize(result.get("results", {}), result.get("low_load", {}),
                                                result.get("saturation", {}), result.get("offline", {}),
                                                result.get("low_load_variants"))}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def summarize(results: dict, low_load: dict, saturated: dict, offline: dict, variants: dict | None = None) -> dict:
    """Per workload: goodputs at the rate where aggressive peaks; the worse workload's ratios are the summary.

    ``saturation_vs_offline``: the default policy's (past_future) saturation phase, output tokens/s, over the
    offline engine's on the same requests. ``low_load_ttft_vs_prefill``: the client's TTFT P50 at low load over the
    offline prefill P50 of the same requests (each alone, its own sampling parameters)."""
    per: dict[str, Any] = {}
    for name in dict.fromkeys(n for by_workload in results.values() for n in by_workload):
        agg = results.get("aggressive", {}).get(name, [])
        peak = max(agg, key=lambda r: r["goodput_rps"]) if agg else None
        at = {p: next((r for r in results.get(p, {}).get(name, []) if peak and r["rate"] == peak["rate"]), None)
              for p in POLICIES}
        pf = at["past_future"]
        ratio = (lambda o: pf["goodput_rps"] / o["goodput_rps"] if pf and o and o["goodput_rps"] else None)
        low, off = low_load.get(name, {}), offline.get(name)  # no offline reference under --skip-offline
        sat = {p: saturated.get(p, {}).get(name, {}).get("output_tokens_per_s") for p in POLICIES}
        per[name] = {"rate": peak and peak["rate"], "goodput": {p: r and r["goodput_rps"] for p, r in at.items()},
                     "goodput_vs_aggressive": ratio(at["aggressive"]),
                     "goodput_vs_conservative": ratio(at["conservative"]),
                     "saturation_tokens_per_s": sat,
                     "saturation_vs_offline": _ratio(sat["past_future"], off and off["output_tokens_per_s"]),
                     "low_load_ttft_vs_prefill": _ratio(low.get("ttft_p50"), off and off.get("prefill_p50_s")),
                     "low_load_tpot_vs_decode_step": _ratio(low.get("tpot_p50"), off and off.get("decode_step_p50_s")),
                     "low_load_variants": {flags: _low_load_ratios(v.get(name, {}), off)
                                           for flags, v in (variants or {}).items()}}
    worst = (lambda key: min((v[key] for v in per.values() if v[key] is not None), default=None))
    return {"goodput_vs_aggressive": worst("goodput_vs_aggressive"),
            "goodput_vs_conservative": worst("goodput_vs_conservative"),
            "saturation_vs_offline": worst("saturation_vs_offline"),
            "low_load_ttft_vs_prefill": max((v["low_load_ttft_vs_prefill"] for v in per.values()
                                             if v["low_load_ttft_vs_prefill"] is not None), default=None),
            "per_workload": per}


def _low_load_ratios(low: dict, off: dict | None) -> dict[str, float | None]:
    return {"ttft_vs_prefill": _ratio(low.get("ttft_p50"), off and off.get("prefill_p50_s")),
            "tpot_vs_decode_step": _ratio(low.get("tpot_p50"), off and off.get("decode_step_p50_s"))}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
