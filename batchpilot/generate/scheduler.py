"""Policy: who runs in the next step, under one token budget. Pure Python over requests and blocks.

Each step (Sarathi-Serve, Agrawal et al., OSDI 2024, arXiv 2403.02310, section 4: stall-free batching): every
running request in decode gets one
token first; running requests still in prefill get the next chunk of what is left of the budget;
then waiting requests are admitted first come first served (the queue is in prefix-group order),
each with a first chunk, until one does not fit. Admission asks whether the *future peak* of KV
memory still fits (Past-Future, LightLLM's router: the peak of the running batch over its future): remaining
output lengths are
estimated from this job's own finished requests (an EMA), so admission is neither greedy nor
reserving ``max_tokens`` for everyone. ``admission`` selects the policy, so that a server can compare them:
``past_future`` (above; Gong et al., "Past-Future Scheduler for LLM Serving under SLA Guarantees", ASPLOS 2025,
arXiv 2507.10150), ``aggressive`` (admit while blocks for the first chunk are free and preempt on exhaustion, as
vLLM does) and ``conservative`` (reserve every request's ``max_tokens``). If the estimate was wrong and a decode cannot get a block,
the most recently admitted request is preempted without loss: its blocks are freed, it goes back
to the front of the queue and its prompt + output are recomputed later (same tokens out).

Admission in bursts (``admit_min_free`` > 1, the offline engine's default): while requests wait, a running
batch admits again only once that many rows are free, then keeps admitting until the rows are full or the next
request does not fit. Between bursts every step is decode-only, so it can run on a CUDA graph several steps per
host round trip; admitting one request per finished one (``admit_min_free`` 1, the server's choice for latency)
makes nearly every step of a long-tailed job a mixed prefill + decode step. The cost is the free rows' share of
the batch while they accumulate (on average half of ``admit_min_free``).

A group's prefix pseudo-request is admitted like a request; members wait until it is computed.
The prefix KV is referenced by the group until its last member finishes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from batchpilot.generate.kv_cache import BlockPool
from batchpilot.generate.request import Request, Status

OUTPUT_MARGIN = 6  # tokens added to every remaining-length estimate (LightLLM's ADDED_OUTPUT_LEN)
ADMISSIONS = ("past_future", "aggressive", "conservative")


@dataclass(slots=True)
class Chunk:
    request: Request
    start: int  # own-token index of the first token computed
    num_tokens: int
    sample: bool  # reaches the request's last token: sample the next one
    decode: bool = False  # one generated token (not prompt or recompute)


@dataclass(slots=True)
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


def estimate_peak(items: list[tuple[int, int]]) -> int:
    """Peak KV tokens of requests (a_i held now, r_i still to generate) if each grows until it ends.

    When the k-th longest-remaining request ends, requests 1..k are alive and each grew by r_k.
    """
    peak, held = 0, 0
    for k, (a, r) in enumerate(sorted(items, key=lambda x: -x[1]), start=1):
        held += a
        peak = max(peak, k * r + held)
    return peak


class OutputLengthEMA:
    """LightLLM's running estimate of output length: starts at 2048; step size 0.5 decaying to 0.04."""

    def __init__(self, start: int = 2048) -> None:
        self.value, self.rate = start, 0.5

    def update(self, num_output_tokens: int) -> None:
        out = max(num_output_tokens, 64)
        self.value = max(64, int(self.value * (1 - self.rate) + out * self.rate))
        self.rate = max(0.04, 0.8 * self.rate)


def pack_worst_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Prepacking's bin packing (Zhao et al. 2024, arXiv 2404.09529): worst-fit decreasing, longest first, each
    into the least-loaded bin it fits."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if loads[b] + lengths[i] <= capacity]
        if fits:
            b = min(fits, key=loads.__getitem__)
            bins[b].append(i)
            loads[b] += lengths[i]
        else:
            bins.append([i])
            loads.append(lengths[i])
    return bins


class StepTimeModel:
    """Step seconds ~ fixed + per_token x tokens in the step, fitted online by least squares over recent steps.

    Sarathi-Serve sizes the token budget of a step so that the decodes in it meet the time-between-tokens SLO
    (arXiv 2403.02310, section 4.3: the budget is set from profiling the deployment); here the profile is the
    server's own recent steps, so the budget follows the model, the GPU and the context lengths in use.
    """

    # min_budget: a mixed step's time is mostly its fixed cost at small sizes (llama-1b on one H200: 30-55 ms at
    # 20 tokens, eager; serve_goodput 2026-12-01), so chunks under a few hundred tokens save no time and only
    # stretch prefill over more steps; the floor also keeps the fit's sizes spread out, so its slope stays measured
    def __init__(self, *, window: int = 256, min_budget: int = 256, max_budget: int = 8192) -> None:
        self.window, self.min_budget, self.max_budget = window, min_budget, max_budget
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)

    def observe(self, num_tokens: int, seconds: float) -> None:
        self.samples.append((num_tokens, seconds))

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token), or None until the steps span at least two sizes.

        Least squares, then once more without the steps whose residual is over 3x the median absolute residual:
        a step that captured a CUDA graph or compiled a shape takes 100-1000x an ordinary one, and a single such
        step in the window would otherwise set the slope and with it every budget."""
        fitted = _line(list(self.samples))
        if fitted is None:
            return None
        fixed, slope = fitted
        residuals = [abs(y - fixed - slope * x) for x, y in self.samples]
        cut = max(3 * sorted(residuals)[len(residuals) // 2], 1e-6)  # a microsecond: an exact line keeps all
        kept = [s for s, r in zip(self.samples, residuals) if r <= cut]
        return _line(kept) or fitted

    def budget(self, tpot_slo_s: float, default: int) -> int:
        """The largest step (tokens) whose predicted time stays within the SLO; ``default`` until fitted."""
        fitted = self.fit()
        if fitted is None:
            return default
        fixed, per_token = fitted
        if fixed >= tpot_slo_s:
            # no step with prefill meets the SLO whatever its size (its fixed cost alone is over it). Shrinking the
            # chunks would spread prefill over ever more of these slow steps (budgets of 16 tokens, TTFT of seconds:
            # measured on one H200); instead a step may take up to twice its fixed cost: prefill then runs at half
            # or more of its largest-chunk rate while the gap between tokens stays within 2x the least possible
            return int(min(default, self.max_budget, max(self.min_budget, fixed / per_token)))
        return int(min(self.max_budget, max(self.min_budget, (tpot_slo_s - fixed) / per_token)))


def _line(samples: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares (intercept >= 0, slope > 0) of seconds on tokens; None under 4 samples or one size."""
    n = len(samples)
    xs = [x for x, _ in samples]
    if n < 4 or max(xs) == min(xs):
        return None
    mx, my = sum(xs) / n, sum(y for _, y in samples) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in samples) / sxx
    return max(0.0, my - slope * mx), max(slope, 1e-9)


class Scheduler:
    def __init__(self, pool: BlockPool, *, max_batch_tokens: int, max_num_seqs: int,
                 output_len_prior: int = 2048, admission: str = "past_future", admit_min_free: int = 1) -> None:
        if admission not in ADMISSIONS:
            raise ValueError(f"admission {admission!r}: choose one of {', '.join(ADMISSIONS)}")
        if not 1 <= admit_min_free <= max_num_seqs:
            raise ValueError(f"admit_min_free must be in [1, max_num_seqs = {max_num_seqs}], got {admit_min_free}")
        self.admit_min_free = admit_min_free
        self.admitting = False  # inside an admission burst (admit_min_free > 1)
        self.admission = admission
        self.pool = pool
        self.max_batch_tokens, self.max_num_seqs = max_batch_tokens, max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.history = OutputLengthEMA(output_len_prior)
        self.frozen_tokens = 0  # slots held by live groups' prefix blocks

    def add(self, requests: list[Request]) -> None:
        self.waiting.extend(requests)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r.status is Status.RUNNING for r in self.running)

    def schedule(self) -> StepPlan:
        plan, budget = StepPlan(), self.max_batch_tokens
        self.running = [r for r in self.running if r.status is Status.RUNNING]
        prefilling: list[Request] = []  # running requests still in prefill, in running order
        block_size = self.pool.block_size
        for r in list(self.running):  # 1. one token for every decode
            if budget == 0 or r.status is not Status.RUNNING:
                continue
            if not r.in_decode:
                prefilling.append(r)
                continue
            # the common case inline (the next token's slot is in a block it holds): this loop runs once per row
            # and step, ~1,000 rows of a large job (schedule() was ~3 ms a call at 4,000-8,000 requests)
            if r.num_computed < len(r.blocks) * block_size or self._reserve(r, 1, plan):
                plan.chunks.append(Chunk(r, r.num_computed, 1, True, decode=True))
                budget -= 1
        for r in prefilling:  # 2. next chunk of prefills already running
            if budget == 0:
                break
            if r.status is not Status.RUNNING or not self._prefix_ready(r):  # preempted by a decode above
                continue
            n = min(r.num_uncomputed, budget)
            if self.pool.grow(r.blocks, r.num_computed + n):
                plan.chunks.append(self._chunk(r, n))
                budget -= n
        future: list[tuple[int, int]] = []
        if self.admission_open() and budget > 0:
            future = self._futures([r for r in self.running if not r.is_prefix])
            self.admitting = True
        upper = sum(a + r for a, r in future)  # the peak is at most every request at its largest
        while self.admitting and self.waiting and budget > 0:  # 3. admit FCFS
            r = self.waiting[0]
            n = min(r.num_uncomputed, budget)
            if len(self.running) >= self.max_num_seqs or (
                    self._prefix_ready(r) and not (self._fits(r, future, upper) and self.pool.grow(r.blocks, n))):
                self.admitting = False  # rows full, or the next request does not fit: the burst ends
                break
            if not self._prefix_ready(r):  # members wait for their prefix: the burst goes on next step
                break
            self._admit(self.waiting.popleft())
            if not r.is_prefix:
                future.append(self._future(r))
                upper += sum(future[-1])
            plan.chunks.append(self._chunk(r, n))
            budget -= n
        if not self.waiting:
            self.admitting = False
        return plan

    def admission_open(self) -> bool:
        """Would the next schedule() admit waiting requests (a burst goes on, or enough rows are free)?"""
        if not self.waiting:
            return False
        free = self._free_rows()
        return free > 0 and (self.admitting or free >= min(self.admit_min_free, len(self.waiting)))

    def steps_until_admission(self, limit: int) -> int:
        """Decode steps (1..limit) until enough rows are free to admit again, counting the rows whose
        ``max_tokens`` ends them (EOS and stop strings can only end more of them sooner)."""
        need = min(self.admit_min_free, len(self.waiting)) - self._free_rows()
        if not self.waiting or need <= 0:
            return limit
        left = sorted(r.params.max_tokens - len(r.output_ids) for r in self.running
                      if not r.is_prefix and r.status is Status.RUNNING)
        return max(1, min(limit, left[need - 1] if need <= len(left) else limit))

    def advance(self, plan: StepPlan) -> None:
        """Record that the plan's chunks were computed; finished prefixes hand their blocks to the group."""
        for c in plan.chunks:
            r = c.request
            r.num_computed += c.num_tokens
            if r.is_prefix and r.num_uncomputed == 0:
                self.running.remove(r)
                r.status = Status.FINISHED

    def reserve_steps(self, plan: StepPlan, steps: int) -> bool:
        """Blocks for ``steps`` decode tokens of every chunk (never past a request's last token); False if short.

        Tokens past a request's end are computed but dropped; their KV goes to the trash block.
        """
        for c in plan.chunks:
            r = c.request
            last = len(r.prompt_ids) - r.prefix_len + r.params.max_tokens  # own tokens at its longest
            if not self.pool.grow(r.blocks, min(r.num_computed + steps, last)):
                return False
        return True

    def abort(self, r: Request) -> None:
        """Drop a request that has not finished (a client went away): its blocks are freed at once."""
        if r.status is Status.WAITING:
            self.waiting.remove(r)
            r.status = Status.FINISHED
        elif r.status is Status.RUNNING:
            r.finish_reason, r.status = "abort", Status.FINISHED
            self._release(r)

    def finish(self, r: Request, reason: str) -> None:
        r.finish_reason, r.status = reason, Status.FINISHED  # leaves self.running at the next schedule()
        self._release(r)
        self.history.update(len(r.output_ids))
        if r.group is not None:
            r.group.num_unfinished -= 1
            if r.group.num_unfinished == 0:
                self.pool.free(r.group.prefix.blocks)
                self.frozen_tokens -= len(r.group.prefix.blocks) * self.pool.block_size

    # --- helpers: values and state changes; control flow stays above ---

    def _free_rows(self) -> int:
        return self.max_num_seqs - sum(r.status is Status.RUNNING for r in self.running)

    def _chunk(self, r: Request, n: int) -> Chunk:
        return Chunk(r, r.num_computed, n, sample=not r.is_prefix and n == r.num_uncomputed)

    def _prefix_ready(self, r: Request) -> bool:
        return r.group is None or r.is_prefix or r.group.ready

    def _reserve(self, r: Request, n: int, plan: StepPlan) -> bool:
        """Blocks for n more tokens of r, preempting newer (not yet scheduled) requests, or else r itself."""
        while not self.pool.grow(r.blocks, r.num_computed + n):
            victims = [v for v in self.running[self.running.index(r) + 1:] if not v.is_prefix]
            victim = victims[-1] if victims else r
            self._preempt(victim)
            plan.preempted.append(victim)
            if victim is r:
                return False
        return True

    def _admit(self, r: Request) -> None:
        r.status = Status.RUNNING
        self.running.append(r)
        if r.is_prefix:
            self.frozen_tokens += len(r.prompt_ids) + self.pool.block_size
        elif r.group is not None:
            self.pool.share(r.group.prefix.blocks)

    def _preempt(self, r: Request) -> None:
        self.running.remove(r)
        self._release(r)
        r.num_computed, r.status = 0, Status.WAITING
        r.num_preemptions += 1
        self.waiting.appendleft(r)

    def _release(self, r: Request) -> None:
        self.pool.free(r.blocks)
        r.blocks = []
        if r.group is not None and not r.is_prefix:
            self.pool.free(r.group.prefix.blocks)

    def _future(self, r: Request) -> tuple[int, int]:
        """(a, r): KV tokens held once its prompt is in, and estimated tokens still to generate."""
        return self._futures([r])[0]

    def _futures(self, requests: list[Request]) -> list[tuple[int, int]]:
        """``_future`` of many requests, with the per-step constants read once (every running request's, at
        every step that admits: the server's steps nearly all do)."""
        block_size, prior = self.pool.block_size, self.history.value
        conservative = self.admission == "conservative"
        out = []
        for r in requests:
            generated, limit = len(r.output_ids), r.params.max_tokens
            reserve_all = conservative or r.params.ignore_eos
            estimate = limit if reserve_all else min(limit, max(int(1.1 * generated), prior))
            own = len(r.prompt_ids) + generated - r.prefix_len  # Request.num_own_tokens
            out.append((own + block_size, max(0, estimate - generated - 1) + OUTPUT_MARGIN))
        return out

    def _fits(self, cand: Request, future: list[tuple[int, int]], upper: int) -> bool:
        """Would the future peak of the running requests (``future``, summing to ``upper``) plus ``cand`` fit?"""
        free = self.pool.capacity_tokens - self.frozen_tokens
        if cand.is_prefix:
            return len(cand.prompt_ids) <= free
        if not future or self.admission == "aggressive":  # aggressive: only the first chunk's blocks must exist
            return True
        a, r = self._future(cand)
        return upper + a + r <= free or estimate_peak(future + [(a, r)]) <= free
