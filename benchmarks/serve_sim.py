"""Where the admission policies of ``batchpilot serve`` separate: a CPU simulation of the server's scheduler.

The real scheduler (``generate/scheduler.py``: ``Scheduler`` with each admission policy, the server's choices
``admit_min_free`` 1 and the TPOT-SLO budget from ``StepTimeModel``, as ``serve/loop.py`` sets them) runs against
a fake engine step: no model, the step's duration from a step-time model fitted to one H200's server measurements,
and each request ends at an output length drawn as ``benchmarks/serve_goodput.py`` draws it (the same request sets:
``make_requests``, same seeds). Arrivals are the benchmark's open-loop Poisson process; goodput, TTFT and TPOT are
computed as the benchmark's client computes them (requests within both SLOs per second of arrivals; requests open
``--drain-seconds`` after the last arrival are not good).

Step-time model (llama-1b, random weights, bf16, one H200; ``serve_goodput_20261201_184535.json``, the servers' own
``/metrics`` step counts): a decode-only step (CUDA graph) costs 4.0 ms + 0.01 ms per row + 0.03 ms per 1,000 KV
tokens read (4.2-4.5 ms at 25 requests/s, 5.8 ms at 50/s on chat, 7.5 ms on summarisation's longer contexts); a
step with prefill chunks (eager) costs 34 ms + 0.43 us per token in it: the least-squares line through the four
past_future rows' (mixed steps, their seconds, the prompt tokens prefilled) -- chat and summarisation at 25 and 50
requests/s; the fixed cost dominates, and under load it is ~10 ms over the offline engine's 20-25 ms prefill of one
prompt. With these constants the simulation reproduces that run within a few percent where the server kept up (chat
25 and 50/s, summarisation 25/s: goodput, TTFT P50, mixed-step counts) and is 10-25% optimistic on summarisation at
50/s (goodput 27.9 / 29.1 / 22.8 against the measured 22.2 / 22.8 / 20.1 for past_future / aggressive /
conservative); chat at 50/s: 49.5 / 49.5 / 22.4 against 48.5 / 48.6 / 18.4. A multi-step decode round of n
steps (the server's ``--decode-steps`` 4, run only when nothing waits) costs n decode steps. Every constant is a flag.

What the policies are (Gong et al., "Past-Future Scheduler for LLM Serving under SLA Guarantees", ASPLOS 2025,
arXiv 2507.10150, section 3; aggressive as vLLM, Kwon et al. SOSP 2023, arXiv 2309.06180): see scheduler.py.
Preemption is by recompute: a preempted request's blocks are freed and its prompt and output prefilled again.

Usage:  python benchmarks/serve_sim.py                      (the default sweep, a few minutes on one core)
        python benchmarks/serve_sim.py --kv-cache-tokens 16384,65536 --rates 25,50,100 --workloads chat
Result: ``serve_sim_*.json``: every (KV size, workload, policy, rate) row, and per (KV size, workload) the rate where
aggressive's goodput peaks, the first rate with preemptions, and the goodput ratios there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import json
import math
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from batchpilot.generate.kv_cache import BlockPool  # noqa: E402
from batchpilot.generate.request import Request, SamplingParams, Status  # noqa: E402
from batchpilot.generate.scheduler import ADMISSIONS, Scheduler, StepPlan, StepTimeModel  # noqa: E402

LLAMA_1B_VOCAB = 128256


@dataclass(frozen=True, slots=True)
class StepCost:
    """Seconds of one simulated engine step (the module docstring's H200 model)."""

    decode_fixed_s: float = 4.0e-3
    decode_per_row_s: float = 1.0e-5
    decode_per_kv_token_s: float = 3.0e-8
    mixed_fixed_s: float = 34.0e-3
    mixed_per_token_s: float = 0.43e-6

    def seconds(self, plan: StepPlan, steps: int) -> float:
        return sum(self.each_step(plan, steps))

    def each_step(self, plan: StepPlan, steps: int) -> list[float]:
        """Seconds of each step of a round (a decode-only round's steps read one more KV token per row each)."""
        if all(c.decode for c in plan.chunks):
            kv = sum(c.start + 1 for c in plan.chunks)
            rows = len(plan.chunks)
            return [self.decode_fixed_s + self.decode_per_row_s * rows + self.decode_per_kv_token_s * (kv + k * rows)
                    for k in range(steps)]
        return [self.mixed_fixed_s + self.mixed_per_token_s * plan.num_tokens]


@dataclass(slots=True)
class SimRequest:
    arrival_s: float
    prompt_len: int
    output_len: int  # tokens until EOS (counting it), or max_tokens
    max_tokens: int
    request: Request | None = None
    first_s: float | None = None
    end_s: float | None = None
    preemptions: int = 0


@dataclass(slots=True)
class Sim:
    """One server: a scheduler, a clock, the step-time model the server fits online, and its requests."""

    scheduler: Scheduler
    cost: StepCost
    tpot_slo_s: float
    decode_steps: int
    # multi-step rounds end once a step finishes after an arrival (the generate/graphs.py patch in docs/serve.md)
    interruptible: bool = False
    fit: StepTimeModel = field(default_factory=StepTimeModel)
    now: float = 0.0
    steps: int = 0
    mixed_steps: int = 0
    preemptions: int = 0

    def budget(self, default: int) -> None:
        """``serve/loop.py`` ``_step_budget``: the SLO's budget from the fitted model, never under the decodes."""
        decodes = sum(r.status is Status.RUNNING and r.in_decode for r in self.scheduler.running)
        self.scheduler.max_batch_tokens = max(self.fit.budget(self.tpot_slo_s, default=default),
                                              decodes + self.fit.min_budget)

    def step(self, by_request: dict[int, SimRequest], next_arrival_s: float | None = None) -> None:
        """``Engine.step`` without a model: plan, the multi-step rule, advance, append tokens, finish at the end.
        ``next_arrival_s``: when the next request arrives (an interruptible round ends at the step it lands in)."""
        s = self.scheduler
        plan = s.schedule()
        assert plan.chunks, "no progress: the KV cache is too small for one request"
        n = 1
        if self.decode_steps > 1 and all(c.decode for c in plan.chunks) and not s.admission_open():
            n = min(self.decode_steps, max(c.request.params.max_tokens - len(c.request.output_ids)
                                           for c in plan.chunks), s.steps_until_admission(self.decode_steps))
            n = n if n > 1 and s.reserve_steps(plan, n) else 1
        if self.interruptible and n > 1 and next_arrival_s is not None:
            ends, t = [], self.now
            for step_s in self.cost.each_step(plan, n):
                t += step_s
                ends.append(t)
            n = next((k + 1 for k, end in enumerate(ends) if end >= next_arrival_s), n)
        seconds = self.cost.seconds(plan, n)
        self.now += seconds
        self.steps += n
        self.preemptions += len(plan.preempted)
        for r in plan.preempted:
            by_request[r.index].preemptions += 1
        if not all(c.decode for c in plan.chunks):
            self.mixed_steps += 1
            self.fit.observe(plan.num_tokens, seconds)
        s.advance(plan)
        for c in plan.chunks:
            if not c.sample:
                continue
            r, sr = c.request, by_request[c.request.index]
            kept = min(n, sr.output_len - len(r.output_ids))
            r.output_ids += [0] * kept
            r.num_computed += kept - 1
            if sr.first_s is None:
                sr.first_s = self.now
            if len(r.output_ids) >= sr.output_len:
                sr.end_s = self.now
                s.finish(r, "stop" if sr.output_len < sr.max_tokens else "length")


def workload_requests(workload: str, n: int, seed: int, lengths: str) -> list[tuple[int, int, int]]:
    """(prompt tokens, output tokens, max_tokens) of the benchmark's first n requests of ``workload`` (its seed):
    output lengths geometric with the request's drawn mean (EOS by logit_bias), capped at max_tokens."""
    import random

    from serve_goodput import make_requests

    bodies = make_requests(workload, n, vocab=LLAMA_1B_VOCAB, seed=seed, scale=1.0, lengths=lengths)
    rng = random.Random(seed + 1000)
    out = []
    for b in bodies:
        if lengths == "exact":
            out.append((len(b["prompt"]), b["max_tokens"], b["max_tokens"]))
            continue
        bias = b["logit_bias"][str(2)]
        p_eos = math.exp(bias) / (LLAMA_1B_VOCAB + math.exp(bias))  # per step, over near-uniform random logits
        length = 1 + int(math.log(1 - rng.random()) / math.log(1 - p_eos))  # geometric, counting the EOS
        out.append((len(b["prompt"]), min(length, b["max_tokens"]), b["max_tokens"]))
    return out


def simulate(policy: str, reqs: list[tuple[int, int, int]], rate: float, *, kv_tokens: int, args: argparse.Namespace,
             cost: StepCost, seed: int, decode_steps: int | None = None, interruptible: bool = False) -> dict[str, Any]:
    import random

    rng = random.Random(seed)
    t, arrivals = 0.0, []
    for _ in reqs:
        t += rng.expovariate(rate)
        arrivals.append(t)
    pool = BlockPool(kv_tokens // args.block_size, args.block_size)
    pool.allocate(1)  # the engine's trash block
    sim = Sim(Scheduler(pool, max_batch_tokens=args.max_batch_tokens, max_num_seqs=args.max_num_seqs,
                        output_len_prior=2048, admission=policy), cost, args.tpot_slo,
              decode_steps or args.decode_steps, interruptible=interruptible)
    sreqs = [SimRequest(a, p, o, m) for a, (p, o, m) in zip(arrivals, reqs)]
    by_request: dict[int, SimRequest] = {}
    pending = [(sr.arrival_s, i) for i, sr in enumerate(sreqs)]
    heapq.heapify(pending)
    wall = arrivals[-1] + args.drain_seconds
    while sim.now < wall:
        while pending and pending[0][0] <= sim.now:  # the loop drains its inbox before each round
            _, i = heapq.heappop(pending)
            sr = sreqs[i]
            sr.request = Request(i, [0] * sr.prompt_len, SamplingParams(max_tokens=sr.max_tokens, temperature=1.0))
            by_request[i] = sr
            sim.scheduler.add([sr.request])
        if not sim.scheduler.has_work():
            if not pending:
                break
            sim.now = pending[0][0]  # idle until the next arrival (the loop wakes on an event)
            continue
        sim.budget(args.max_batch_tokens)
        sim.step(by_request, pending[0][0] if pending else None)
    # blocks still held (the trash block aside) once every request has finished: 0, or the simulation leaks
    leaked = pool.num_blocks - 1 - pool.num_free if all(r.end_s is not None for r in sreqs) else None
    return summarize(sreqs, rate, sim, args) | {"policy": policy, "kv_cache_tokens": kv_tokens,
                                                "kv_blocks_leaked": leaked}


# the offline engine's defaults (generate/engine.py EngineConfig), which serve_goodput.py's offline reference keeps
OFFLINE_MAX_BATCH_TOKENS, OFFLINE_DECODE_STEPS, OFFLINE_ADMIT_FRACTION = 2048, 32, 0.125


def saturation(policy: str, reqs: list[tuple[int, int, int]], *, kv_tokens: int, args: argparse.Namespace,
               cost: StepCost, offline: bool) -> dict[str, Any]:
    """serve_goodput.py's saturation phase: every request at t = 0; output tokens per simulated second. ``offline``:
    the offline engine's scheduling instead of the server's (admission in bursts of ``OFFLINE_ADMIT_FRACTION`` of
    the rows, 32-step decode rounds, a fixed 2,048-token budget, decode-heavy requests first as ``order_groups``),
    on the same step costs: the ratio is what scheduling alone makes of saturation_vs_offline."""
    pool = BlockPool(kv_tokens // args.block_size, args.block_size)
    pool.allocate(1)  # the engine's trash block
    scheduler = Scheduler(pool, max_batch_tokens=OFFLINE_MAX_BATCH_TOKENS if offline else args.max_batch_tokens,
                          max_num_seqs=args.max_num_seqs, admission=policy,
                          admit_min_free=max(1, int(OFFLINE_ADMIT_FRACTION * args.max_num_seqs)) if offline else 1)
    sim = Sim(scheduler, cost, args.tpot_slo, OFFLINE_DECODE_STEPS if offline else args.decode_steps)
    order = list(range(len(reqs)))
    if offline:  # prefix_tree.order_groups with one group per request: max_tokens / prompt length, descending
        order.sort(key=lambda i: reqs[i][2] / max(1, reqs[i][0]), reverse=True)
    by_request = {}
    for i in order:
        p, o, m = reqs[i]
        by_request[i] = SimRequest(0.0, p, o, m, request=Request(i, [0] * p, SamplingParams(max_tokens=m)))
        scheduler.add([by_request[i].request])
    while scheduler.has_work():
        if not offline:
            sim.budget(args.max_batch_tokens)
        sim.step(by_request)
    return {"offline": offline, "policy": policy, "kv_cache_tokens": kv_tokens, "requests": len(reqs),
            "seconds": round(sim.now, 3), "output_tokens_per_s": round(sum(o for _, o, _ in reqs) / sim.now, 1),
            "steps": sim.steps, "mixed_steps": sim.mixed_steps, "preemptions": sim.preemptions}


def summarize(sreqs: list[SimRequest], rate: float, sim: Sim, args: argparse.Namespace) -> dict[str, Any]:
    done = [r for r in sreqs if r.end_s is not None]
    ttft = [r.first_s - r.arrival_s for r in sreqs if r.first_s is not None]
    tpot = [(r.end_s - r.first_s) / (r.output_len - 1) for r in done if r.first_s is not None and r.output_len > 1]
    good = [r for r in done if r.first_s - r.arrival_s <= args.ttft_slo and
            (r.output_len <= 1 or (r.end_s - r.first_s) / (r.output_len - 1) <= args.tpot_slo)]
    span = max(r.arrival_s for r in sreqs)
    pct = (lambda xs, q: round(statistics.quantiles(xs, n=100)[q - 1], 4) if len(xs) > 1 else None)
    end = max((r.end_s for r in done), default=0.0)
    return {"rate": rate, "requests": len(sreqs), "finished": len(done), "good": len(good),
            "goodput_rps": round(len(good) / span, 3),
            "output_tokens_per_s": round(sum(r.output_len for r in done) / end, 1) if end else 0.0,
            "preemptions": sim.preemptions, "preempted_requests": sum(r.preemptions > 0 for r in sreqs),
            "steps": sim.steps, "mixed_steps": sim.mixed_steps, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99)}


def findings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (KV size, workload): the rate where aggressive's goodput peaks, the lowest rate where it preempts,
    and past_future's goodput over each other policy's at the peak rate and at every rate."""
    out = []
    for key in dict.fromkeys((r["kv_cache_tokens"], r["workload"]) for r in rows):
        mine = [r for r in rows if (r["kv_cache_tokens"], r["workload"]) == key]
        by = {p: {r["rate"]: r for r in mine if r["policy"] == p} for p in ADMISSIONS}
        agg = by["aggressive"]
        peak = max(agg.values(), key=lambda r: r["goodput_rps"])["rate"]
        preempting = [rate for rate, r in sorted(agg.items()) if r["preemptions"]]

        def ratio(rate: float, other: str) -> float | None:
            pf, o = by["past_future"].get(rate), by[other].get(rate)
            return round(pf["goodput_rps"] / o["goodput_rps"], 3) if pf and o and o["goodput_rps"] else None

        out.append({"kv_cache_tokens": key[0], "workload": key[1], "aggressive_peak_rate": peak,
                    "aggressive_first_preempting_rate": preempting[0] if preempting else None,
                    "at_peak": {"goodput": {p: by[p][peak]["goodput_rps"] for p in ADMISSIONS if peak in by[p]},
                                "past_future_vs_aggressive": ratio(peak, "aggressive"),
                                "past_future_vs_conservative": ratio(peak, "conservative")},
                    "by_rate": {rate: {"vs_aggressive": ratio(rate, "aggressive"),
                                       "vs_conservative": ratio(rate, "conservative")} for rate in sorted(agg)}})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="chat,summarize")
    p.add_argument("--kv-cache-tokens", default="16384,32768,65536", help="comma-separated")
    # the defaults are serve_goodput.py's: 5 s of arrivals per rate, 4 s of drain
    p.add_argument("--rates", default="25,50,75,100,150", help="requests/s, comma-separated")
    p.add_argument("--seconds-per-rate", type=float, default=5.0)
    p.add_argument("--drain-seconds", type=float, default=4.0)
    p.add_argument("--ttft-slo", type=float, default=1.0)
    p.add_argument("--tpot-slo", type=float, default=0.05)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batch-tokens", type=int, default=2048, help="the server's --max-batch-tokens")
    p.add_argument("--decode-steps", type=int, default=4, help="the server's --decode-steps")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--lengths", choices=("geometric", "exact"), default="geometric")
    for name, default in StepCost.__dataclass_fields__.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=default.default)
    p.add_argument("--saturation-requests", type=int, default=256,
                   help="the saturation phase's requests (serve_goodput.py's default), server vs offline; 0: none")
    p.add_argument("--low-load-requests", type=int, default=200,
                   help="requests at 1/s for the low-load TTFT of each decode-round rule; 0: none")
    p.add_argument("--low-load-mixed-fixed-s", type=float, default=0.022,
                   help="fixed cost of a step with prefill at low load (the offline prefill of one prompt: 20-25 ms)")
    p.add_argument("--offline-mixed-fixed-s", type=float, default=None,
                   help="the offline engine's fixed cost of a step with prefill (default: the server's)")
    p.add_argument("--tag", default="", help="a name in the result file's (serve_sim_<tag>_<time>.json)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cost = StepCost(**{name: getattr(args, name) for name in StepCost.__dataclass_fields__})
    rates = [float(r) for r in args.rates.split(",")]
    n = max(math.ceil(max(rates) * args.seconds_per_rate), args.saturation_requests, args.low_load_requests)
    # the benchmark's workload seeds: serve_goodput.py seeds workload i of --workloads with i
    sets = {w: workload_requests(w, n, seed=i, lengths=args.lengths) for i, w in enumerate(args.workloads.split(","))}
    rows = []
    for kv in (int(k) for k in args.kv_cache_tokens.split(",")):
        for w, reqs in sets.items():
            for policy in ADMISSIONS:
                for rate in rates:
                    count = math.ceil(rate * args.seconds_per_rate)
                    row = simulate(policy, reqs[:count], rate, kv_tokens=kv, args=args, cost=cost, seed=int(rate))
                    rows.append(row | {"workload": w})
                    print(json.dumps(rows[-1]), flush=True)
    low_load = []  # TTFT at 1 request/s on each round rule, over the same requests' lone prefill
    quiet = replace(cost, mixed_fixed_s=args.low_load_mixed_fixed_s)
    for w, reqs in sets.items() if args.low_load_requests else ():
        part = reqs[:args.low_load_requests]
        prefill = statistics.median(quiet.mixed_fixed_s + quiet.mixed_per_token_s * p for p, _, _ in part)
        for label, steps, cut in (("decode_steps 1", 1, False), ("decode_steps 4", 4, False),
                                  ("decode_steps 4, interruptible", 4, True)):
            row = simulate("past_future", part, 1.0, kv_tokens=max(int(k) for k in args.kv_cache_tokens.split(",")),
                           args=args, cost=quiet, seed=1, decode_steps=steps, interruptible=cut)
            low_load.append({"workload": w, "rounds": label, "ttft_p50": row["ttft_p50"], "prefill_p50": prefill,
                             "ttft_vs_prefill": round(row["ttft_p50"] / prefill, 3), "tpot_p50": row["tpot_p50"]})
            print(json.dumps(low_load[-1]), flush=True)
    # the offline job's steps may be cheaper than the server's (no HTTP side contending for the GIL)
    offline_cost = replace(cost, mixed_fixed_s=args.offline_mixed_fixed_s or cost.mixed_fixed_s)
    saturated = []
    for kv in (int(k) for k in args.kv_cache_tokens.split(",")) if args.saturation_requests else ():
        for w, reqs in sets.items():
            rows_w = {off: saturation("past_future", reqs[:args.saturation_requests], kv_tokens=kv, args=args,
                                      cost=offline_cost if off else cost, offline=off) for off in (False, True)}
            ratio = rows_w[False]["output_tokens_per_s"] / rows_w[True]["output_tokens_per_s"]
            saturated.append({"kv_cache_tokens": kv, "workload": w, "server": rows_w[False], "offline": rows_w[True],
                              "saturation_vs_offline": round(ratio, 3)})
            print(json.dumps(saturated[-1]), flush=True)
    result = {"benchmark": "serve_sim", "args": vars(args), "saturation": saturated, "low_load": low_load,
              "step_cost":
              {k: getattr(cost, k) for k in StepCost.__dataclass_fields__}, "rows": rows, "findings": findings(rows)}
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serve_sim_{args.tag + '_' if args.tag else ''}{dt.datetime.now().strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["findings"], indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
