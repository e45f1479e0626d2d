"""``Engine(model, tokenizer, EngineConfig).generate(prompts)``: the loop and the public API.

The engine plans the whole job before it runs: shared-prefix groups over all prompts
(``prefix_tree.py``), decode-heavy groups first; then it loops ``schedule -> run -> advance ->
finish`` until the queue is empty. ``run`` yields completions in completion order (for incremental
output); ``generate`` returns them in input order. Data parallelism: every rank plans the same
groups and runs every ``world_size``-th one (``rank``/``world_size`` of ``run``); the process group
itself lives in ``cli/generate.py`` only (the one place in generate that touches torch.distributed).

Fidelity features ride on the same machinery: ``n`` samples are n requests with one prompt (the
prefix groups share its KV); prompt logprobs and ``score`` come from prefill logits of the positions
asked for; penalties, logit_bias and min_tokens are applied to the logits on the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from batchpilot.data.tokenizer import Tokenizer
from batchpilot.generate import roofline
from batchpilot.generate.detok import IncrementalText
from batchpilot.generate.kv_cache import BlockPool
from batchpilot.generate.prefix_tree import PrefixGroup, build_groups, order_groups, split_for_rank
from batchpilot.generate.request import (Completion, Group, Request, SamplingParams, Score, TokenLogprob,
                                         request_seed, sample_seed)
from batchpilot.generate.runner import ChunkOutput, Runner
from batchpilot.generate.sampling import peak_vocab_floats
from batchpilot.generate.scheduler import Scheduler, StepPlan
from batchpilot.generate.stats import EngineStats
from batchpilot.model.llama import Llama

__all__ = ["Engine", "EngineConfig", "EngineStats"]


@dataclass(kw_only=True, slots=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    max_batch_tokens: int = 2048  # token budget of one step (decodes + prefill chunks)
    max_num_seqs: int = 1024  # running requests at most
    gpu_memory_utilization: float = 0.9  # share of GPU memory for weights + KV + activations
    num_blocks: int | None = None  # KV blocks; None = from free GPU memory, or cpu_kv_tokens on CPU
    cpu_kv_tokens: int = 65536
    prefix_sharing: bool = True  # group requests by shared prefix, prefill each prefix once
    min_prefix_len: int = 16  # shorter common prefixes are not worth a group
    cascade: bool = True  # read a group's prefix KV once per decode step (needs prefix_sharing)
    triton: bool = True  # Triton paged-attention kernel on CUDA (checked against the torch path first)
    cuda_graphs: bool = True  # capture greedy decode-only steps per batch-size bucket (CUDA + Triton only)
    compile: bool = True  # torch.compile the captured decode forward (fuses its elementwise work; CUDA graphs only)
    # graph decode steps per host round trip (1 = one per step). Multi-step runs only once nothing waits, so a
    # larger n costs only the rows that ended (EOS) inside a run; 32 vs 8: 55% vs 45% of the decode roofline
    decode_steps: int = 32
    output_len_prior: int = 2048  # first guess of output length for admission, until requests finish
    # while requests wait, admit again only once this share of max_num_seqs rows is free (scheduler.py: admission
    # in bursts): between bursts the steps are decode-only and run several per round trip on a CUDA graph, at the
    # cost of about half this share of the batch; 0 = admit one for each finished request (mixed steps)
    admit_fraction: float = 0.125
    seed: int = 0  # seeds requests that have none (request_seed(seed, str(index)))

    def __post_init__(self) -> None:
        if min(self.block_size, self.max_batch_tokens, self.max_num_seqs, self.decode_steps) < 1:
            raise ValueError("block_size, max_batch_tokens, max_num_seqs and decode_steps must be >= 1")
        if not 0 <= self.admit_fraction <= 1:
            raise ValueError(f"admit_fraction must be in [0, 1], got {self.admit_fraction}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


class Engine:
    def __init__(self, model: Llama, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        cfg = self.config
        self.cost = roofline.model_cost(model)
        num_blocks = cfg.num_blocks or self._blocks_that_fit()
        self.pool = BlockPool(num_blocks, cfg.block_size)
        trash = self.pool.allocate(1)[0]  # never freed: padding rows of CUDA-graph batches write here
        self.runner = Runner(model, num_blocks=num_blocks, block_size=cfg.block_size,
                             cascade=cfg.cascade and cfg.prefix_sharing, use_triton=cfg.triton,
                             cuda_graphs=cfg.cuda_graphs, compile=cfg.compile, max_num_seqs=cfg.max_num_seqs,
                             trash_block=trash)
        eos = (tokenizer.eos_id if tokenizer is not None else None, model.config.eos_token_id)
        self.eos_ids = {i for i in eos if i is not None}
        self.stats = EngineStats()

    def generate(self, prompts: Sequence[str | list[int]] | Sequence[Request],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Completions in input order (a request with ``n`` > 1: its n samples in sample order).

        Prompts are text (needs a tokenizer), token ids, or ``Request``s.
        """
        given = [p for p in prompts if isinstance(p, Request)]
        if prompts and len(given) == len(prompts):
            requests = [Request(i, r.prompt_ids, r.params) for i, r in enumerate(given)]  # fresh state
        else:
            requests = self.make_requests([p for p in prompts if not isinstance(p, Request)], params)
        done = {(c.index, c.sample_index): c for c in self.run(requests)}
        return [done[r.index, j] for r in requests for j in range(r.params.n)]

    def score(self, contexts: Sequence[list[int]], continuations: Sequence[list[int]]) -> list[Score]:
        """log p(continuation | context) per continuation token, from prefill only (no decoding).

        Contexts that share a prefix share its KV through the prefix groups. An empty context needs a
        continuation of >= 2 tokens; its first token is then not scored (the caller puts a BOS/EOS first).
        """
        requests = []
        for i, (ctx, cont) in enumerate(zip(contexts, continuations, strict=True)):
            if len(cont) < (1 if ctx else 2):
                raise ValueError(f"score {i}: need a non-empty continuation (>= 2 tokens with an empty context)")
            requests.append(Request(i, [*ctx, *cont], SamplingParams(max_tokens=0, prompt_logprobs=1)))
        done = {c.index: c for c in self.run(requests)}
        scores = []
        for i, ctx in enumerate(contexts):
            plps = done[i].prompt_logprobs
            assert plps is not None  # asked for above
            lps = [lp for lp in plps[max(1, len(ctx)):] if lp is not None]
            scores.append(Score([lp.logprob for lp in lps], all(lp.top[0][0] == lp.token_id for lp in lps)))
        return scores

    def make_requests(self, prompts: Sequence[str | list[int]],
                      params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Request]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        return [Request(i, self.encode(p), sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (pass token ids, or --tokenizer)")
            return self.tokenizer.encode_prompt(prompt)
        return list(prompt)

    def run(self, requests: list[Request], *, rank: int = 0, world_size: int = 1,
            deadline: float | None = None) -> Iterator[Completion]:
        """Completions in completion order, one per sample (n of them for a request with ``n`` > 1, told apart by
        ``sample_index``); with world_size > 1 only this rank's share of the groups. Requests without a seed
        get ``request_seed(config.seed, str(index))``; sample j of a request gets ``sample_seed(seed, j)``.
        ``deadline`` (a ``time.perf_counter()`` value; benchmarks capping a row's wall time): no step starts after
        it, and the requests unfinished then are not returned (``stats`` counts what ran)."""
        for r in requests:
            self.check(r)
        requests = self._samples(requests)
        self.runner.begin_job(max((r.num_tokens + r.params.max_tokens for r in requests), default=0))
        scheduler = Scheduler(self.pool, max_batch_tokens=self.config.max_batch_tokens,
                              max_num_seqs=self.config.max_num_seqs, output_len_prior=self.config.output_len_prior,
                              admit_min_free=self.admit_min_free)
        for r in requests:
            if _nothing_to_compute(r) and r.index % world_size == rank:
                r.finish_reason = "length"
                yield Completion.of(r)
        scheduler.add(self._plan([r for r in requests if not _nothing_to_compute(r)], rank, world_size))
        while scheduler.has_work() and (deadline is None or time.perf_counter() < deadline):
            yield from self.step(scheduler)
        if scheduler.has_work():  # stopped at the deadline: the unfinished requests' blocks are free again
            self.pool.reset([self.runner.trash_block])

    @property
    def admit_min_free(self) -> int:
        """Free rows before a running batch admits again (``EngineConfig.admit_fraction`` of max_num_seqs)."""
        return max(1, int(self.config.admit_fraction * self.config.max_num_seqs))

    def step(self, scheduler: Scheduler, stop: Callable[[], bool] | None = None) -> list[Completion]:
        """One host round trip: a step, or a multi-step decode round. ``stop`` (the server: a request arrived) is
        polled between the steps of a round, which then ends early: its later steps are not run (the blocks
        reserved for them stay with their requests), and a row's tokens do not depend on where a round ends."""
        start = time.perf_counter()
        plan = scheduler.schedule()
        assert plan.chunks, "scheduler made no progress (KV cache too small for one request?)"
        on_graph = self.runner.graphs_usable(plan.chunks)  # an O(rows) check: once per step
        steps = self._decode_steps(plan, scheduler, on_graph)
        outputs = self.runner.step(plan.chunks, steps=steps, eos_ids=frozenset(self.eos_ids), stop=stop)
        scheduler.advance(plan)
        done, new_tokens = [], 0
        for chunk, out in zip(plan.chunks, outputs, strict=True):
            r = chunk.request
            _keep_prompt_logprobs(r, out)
            if not chunk.sample:
                continue
            if r.params.max_tokens == 0:  # prefill only (prompt logprobs, scoring): the sampled token is dropped
                scheduler.finish(r, "length")
                done.append(Completion.of(r))
                continue
            kept, reason = self._accept(r, out.tokens)
            if out.logprobs is not None:
                r.logprobs += out.logprobs[:kept]
            r.num_computed += kept - 1  # step k of a multi-step run computed the KV of step k-1's token
            new_tokens += kept
            if reason is not None:
                scheduler.finish(r, reason)
                done.append(Completion.of(r))
        self._record(plan, time.perf_counter() - start, new_tokens, max(1, *(len(o.tokens) for o in outputs)),
                     on_graph)
        return done

    def _samples(self, requests: list[Request]) -> list[Request]:
        """Resolve every request's seed; a request with n > 1 becomes n requests (sample j: its own seed stream).

        The n copies have the same prompt, so the prefix groups share its KV (all but its last token)."""
        out = []
        for r in requests:
            base = r.params.seed if r.params.seed is not None else request_seed(self.config.seed, str(r.index))
            r.seed = base
            out.append(r)
            out += [Request(r.index, r.prompt_ids, r.params, sample_index=j, seed=sample_seed(base, j))
                    for j in range(1, r.params.n)]
        return out

    def _decode_steps(self, plan: StepPlan, scheduler: Scheduler, on_graph: bool) -> int:
        """Decode steps to run on this plan: several once the batch runs on a decode graph and no request would be
        admitted next step (nothing waits, or an admission burst waits for free rows: then until enough are)."""
        n = self.config.decode_steps
        if n == 1 or scheduler.admission_open() or not on_graph:
            return 1
        n = min(n, max(c.request.params.max_tokens - len(c.request.output_ids) for c in plan.chunks),
                scheduler.steps_until_admission(n))
        return n if n > 1 and scheduler.reserve_steps(plan, n) else 1

    def _plan(self, requests: list[Request], rank: int, world_size: int) -> list[Request]:
        """Requests (and group prefix pseudo-requests) in run order for this rank."""
        cfg = self.config
        first = self._longest_first(requests)  # run alone, before the groups
        taken = {id(x) for x in first}
        rest = [r for r in requests if id(r) not in taken]
        prompts = [r.prompt_ids for r in rest]
        groups = (build_groups(prompts, min_prefix_len=cfg.min_prefix_len) if cfg.prefix_sharing
                  else [PrefixGroup(0, [i]) for i in range(len(prompts))])
        groups = order_groups(groups, [len(p) for p in prompts], [r.params.max_tokens for r in rest])
        groups = [PrefixGroup(0, [len(rest) + i]) for i in range(len(first))] + groups
        requests = rest + first
        queue: list[Request] = []
        for g in split_for_rank(groups, rank, world_size):
            members = [requests[i] for i in g.members]
            if g.prefix_len == 0:
                queue += members
                continue
            ks = [m.params.prompt_logprobs for m in members if m.params.prompt_logprobs is not None]
            prefix = Request(-1, members[0].prompt_ids[:g.prefix_len],
                             SamplingParams(max_tokens=0, prompt_logprobs=max(ks) if ks else None), is_prefix=True)
            group = Group(prefix, members, num_unfinished=len(members))
            prefix.group = group
            for m in members:
                m.group, m.prefix_len = group, g.prefix_len
            queue += [prefix, *members]
        return queue

    def _longest_first(self, requests: list[Request]) -> list[Request]:
        """The requests whose ``max_tokens`` is far above the job's median (over 4x), at most a quarter of
        ``max_num_seqs`` of them, longest first: they start the job outside their prefix groups, so that the job
        does not end on a tail of a few long requests admitted last (longest processing time first: Graham, "Bounds
        on multiprocessing timing anomalies", SIAM J. Appl. Math. 1969). Their shared prefix is prefilled once
        more each; a job without such a tail (uniform lengths) is unchanged."""
        if len(requests) <= self.config.max_num_seqs:  # one wave: every request starts at once anyway
            return []
        lengths = sorted(r.params.max_tokens for r in requests)
        median = lengths[len(lengths) // 2]
        long = sorted((r for r in requests if r.params.max_tokens > 4 * median), key=lambda r: -r.params.max_tokens)
        return long[:self.config.max_num_seqs // 4]

    def check(self, r: Request) -> None:
        """Raise ValueError if r cannot run on this engine (empty, too long for the model or the cache)."""
        if not r.prompt_ids:
            raise ValueError(f"request {r.index}: empty prompt")
        need = len(r.prompt_ids) + r.params.max_tokens
        if need > self.model.config.max_position_embeddings:
            raise ValueError(f"request {r.index}: prompt + max_tokens = {need} exceeds the model's "
                             f"{self.model.config.max_position_embeddings} positions")
        if need + 3 * self.pool.block_size > self.pool.capacity_tokens:  # partial blocks + the trash block
            raise ValueError(f"request {r.index}: {need} tokens do not fit the KV cache "
                             f"({self.pool.capacity_tokens} tokens)")

    def _accept(self, r: Request, tokens: list[int]) -> tuple[int, str | None]:
        """Append r's new tokens up to its end (later ones of a multi-step run are dropped): (kept, finish reason).

        Stop strings are looked for incrementally (``detok.IncrementalText``): one short decode for all the new
        tokens; only when they complete a stop (or hold an EOS) is the end found token by token."""
        p = r.params
        tokens = tokens[:p.max_tokens - len(r.output_ids)]
        no_eos = p.ignore_eos or self.eos_ids.isdisjoint(tokens)
        if not self._stops(r) and no_eos:  # only length can end it
            r.output_ids += tokens
            return len(tokens), self._finish_reason(r, -1)
        text = self._text(r)
        if text is not None and no_eos and len(r.output_ids) + len(tokens) >= p.min_tokens:
            state = text.state()
            r.output_ids += tokens
            if (cut := text.add(self._tokenizer, r.output_ids)) < 0:  # no stop in the new text: all tokens stay
                return len(tokens), self._finish_reason(r, -1)
            del r.output_ids[len(r.output_ids) - len(tokens):]
            text.restore(state)
        for k, token in enumerate(tokens, start=1):
            r.output_ids.append(token)
            cut = text.add(self._tokenizer, r.output_ids) if text is not None else -1
            if (reason := self._finish_reason(r, cut)) is not None:
                return k, reason
        return len(tokens), None

    def _stops(self, r: Request) -> bool:
        return bool(r.params.stop) and self.tokenizer is not None

    def _text(self, r: Request) -> IncrementalText | None:
        """r's incremental text when it has stop strings (made on first use; it survives preemption, as the
        output does)."""
        if not self._stops(r):
            return None
        if r.detok is None:
            r.detok = IncrementalText(r.params.stop)
        return r.detok

    @property
    def _tokenizer(self) -> Tokenizer:
        assert self.tokenizer is not None  # only requests with stop strings (which need one) get here
        return self.tokenizer

    def _finish_reason(self, r: Request, stop_at: int) -> str | None:
        """Why r ends after its last token (None: it goes on); ``stop_at``: where in r's incremental text the first
        stop string that its last tokens completed starts, -1 if none."""
        p, last = r.params, r.output_ids[-1]
        if len(r.output_ids) < p.min_tokens:  # EOS is masked on the device before min_tokens; stops wait too
            return None
        if not p.ignore_eos and last in self.eos_ids:
            r.text = self._decode(r.output_ids[:-1])
            return "stop"
        if stop_at >= 0:
            assert r.detok is not None  # stop_at comes from it
            r.text = r.detok.text[:stop_at]
            return "stop"
        if len(r.output_ids) >= p.max_tokens:
            r.text = self._decode(r.output_ids)
            return "length"
        return None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _record(self, plan: StepPlan, seconds: float, new_tokens: int, steps: int, on_graph: bool) -> None:
        s = self.stats
        s.steps += steps
        s.round_trips += 1
        s.seconds += seconds
        s.preemptions += len(plan.preempted)
        s.output_tokens += new_tokens
        s.prefill_tokens += sum(c.num_tokens for c in plan.chunks if not c.decode)
        if all(c.decode for c in plan.chunks):
            s.decode_steps += steps
            s.decode_seconds += seconds
            s.decode_batch_sum += len(plan.chunks) * steps
            s.graph_steps += steps if on_graph else 0
            kv = self._kv_tokens_read(plan)  # each further step reads one more token per row
            s.decode_bytes += sum(roofline.decode_step_bytes(self.cost, kv + k * len(plan.chunks))
                                  for k in range(steps))

    def _kv_tokens_read(self, plan: StepPlan) -> int:
        """KV tokens a decode step must read: own tokens, plus each group prefix once (cascade) or per member."""
        own = sum(c.start + 1 for c in plan.chunks)
        groups = {id(c.request.group): c.request.prefix_len for c in plan.chunks if c.request.prefix_len > 0}
        per_member = sum(c.request.prefix_len for c in plan.chunks)
        return own + (sum(groups.values()) if self.runner.cascade else per_member)

    def _blocks_that_fit(self) -> int:
        cfg, mc = self.config, self.model.config
        block_bytes = self.cost.kv_bytes_per_token * cfg.block_size
        device = next(self.model.parameters()).device
        if device.type != "cuda":
            return max(1, cfg.cpu_kv_tokens // cfg.block_size)
        free, total = torch.cuda.mem_get_info(device)
        # headroom for activations: a full decode batch's sampling at its peak (sampling.peak_vocab_floats), step
        # activations
        reserve = (peak_vocab_floats(device) * cfg.max_num_seqs * mc.vocab_size * 4
                   + 24 * cfg.max_batch_tokens * mc.intermediate_size * 4)
        budget = free - (1 - cfg.gpu_memory_utilization) * total - reserve - 2 * 2**30
        if budget < block_bytes * 64:
            raise ValueError(f"not enough GPU memory for the KV cache ({budget / 2**30:.1f} GiB left)")
        return int(budget // block_bytes)




def _nothing_to_compute(r: Request) -> bool:
    return r.params.max_tokens == 0 and r.params.prompt_logprobs is None


def _keep_prompt_logprobs(r: Request, out: ChunkOutput) -> None:
    """Store a chunk's prompt logprobs on its request; a group prefix's last row serves every member."""
    if out.prompt_logprobs:
        r.prompt_logprobs.update(out.prompt_logprobs)
    if out.last_logprobs is not None and r.group is not None:
        r.group.last_logprobs = out.last_logprobs
    k, p = r.params.prompt_logprobs, r.prefix_len
    if k is None or r.is_prefix or p == 0 or p in r.prompt_logprobs:
        return
    # a member: the prefix's positions (cut to its own k), and its first own token from the prefix's last row
    assert r.group is not None and r.group.last_logprobs is not None, "a member's prefix runs first"
    r.prompt_logprobs.update({i: t.truncated(k) for i, t in r.group.prefix.prompt_logprobs.items()})
    last, token = r.group.last_logprobs, r.prompt_ids[p]
    top_v, top_i = last.topk(k) if k else (last[:0], last[:0])
    r.prompt_logprobs[p] = TokenLogprob(token, float(last[token]), tuple(zip(top_i.tolist(), top_v.tolist())))
