"""The engine loop of the server: one thread runs the engine; HTTP handlers talk to it through queues.

Design: the engine and its scheduler are single-threaded Python over GPU work, so exactly one thread owns them.
HTTP handlers (asyncio) ``submit`` and ``cancel`` through a thread-safe inbox; after every engine step the loop
pushes each request's new text to its handler's ``asyncio.Queue`` with ``call_soon_threadsafe``. Between steps the
loop sets the step's token budget from the measured step-time model so that the decodes of a step meet the TPOT SLO
(Sarathi-Serve, arXiv 2403.02310, section 4.3) and admission follows the scheduler's policy (Past-Future by default,
arXiv 2507.10150). Cost: one host thread; text deltas are decoded incrementally (``detok.IncrementalText``: the new
tokens in the context of the previous ones), and stop strings hold back that many characters so a stop string is
never streamed.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from batchpilot.generate.detok import IncrementalText
from batchpilot.generate.engine import Engine
from batchpilot.generate.request import Completion, Request, SamplingParams, Status, request_seed, sample_seed
from batchpilot.generate.scheduler import Scheduler, StepTimeModel

EventKind = Literal["delta", "done", "error"]


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    text: str = ""  # delta text ("delta"), the whole output ("done"), or the message ("error")
    completion: Completion | None = None


EMPTY_DELTA = Event("delta", "")


@dataclass(eq=False, slots=True)
class Stream:
    """One request in the server: the engine's Request and the queue its HTTP handler reads."""

    request: Request
    events: asyncio.Queue[Event]
    arrival_s: float  # the HTTP handler got the request (before its body is parsed): TTFT counts from here
    submitted_s: float = 0.0  # put in the engine loop's inbox (after parsing and tokenization)
    picked_s: float | None = None  # the engine thread took it from the inbox into its scheduler
    submitted_round: int = 0  # the engine loop's round counter when it was submitted
    first_round: int | None = None  # the round whose step computed its first token
    first_step_s: float | None = None  # that step's start
    first_token_s: float | None = None  # that step's end
    delivered_s: float | None = None  # the event loop put its first delta in ``events``
    sent_s: float | None = None  # the handler yielded its first chunk to the HTTP layer
    last_token_s: float | None = None
    sent_chars: int = 0
    deltas: bool = True  # send text deltas as they come (streams); False: only the final event (whole answers)
    finished: bool = False
    token_gaps_s: list[float] = field(default_factory=list)
    # the output's text, read incrementally (a short decode of the new tokens per step, not the whole output)
    text: IncrementalText = field(default_factory=lambda: IncrementalText(()))


@dataclass(frozen=True, slots=True)
class LoopStats:
    waiting: int
    running: int
    kv_blocks_used: int
    kv_blocks_total: int
    preemptions: int
    steps: int
    decode_steps: int  # steps with decodes only (CUDA graphs, several per round trip)
    decode_seconds: float
    mixed_steps: int  # steps with prefill chunks (eager)
    mixed_seconds: float
    token_budget: int  # the last step's token budget (the SLO's, from the step-time model)
    output_tokens: int  # generated so far
    engine_thread_cpu_s: float  # CPU seconds of the engine thread; the process's others are the HTTP side's
    stream_seconds: float  # of the engine thread's time: making stream events after each step (detok, deltas)


class EngineLoop:
    def __init__(self, engine: Engine, *, admission: str, tpot_slo_s: float | None,
                 event_loop: asyncio.AbstractEventLoop,
                 on_first_token: Callable[[float], None] | None = None,
                 on_token_gap: Callable[[float], None] | None = None, warm_up: bool = True) -> None:
        self.engine, self.tpot_slo_s, self.event_loop = engine, tpot_slo_s, event_loop
        cfg = engine.config
        self.scheduler = Scheduler(engine.pool, max_batch_tokens=cfg.max_batch_tokens, max_num_seqs=cfg.max_num_seqs,
                                   output_len_prior=cfg.output_len_prior, admission=admission)
        self.step_time = StepTimeModel()
        self.inbox: queue.SimpleQueue[tuple[str, Stream]] = queue.SimpleQueue()
        self.streams: dict[int, Stream] = {}  # request index -> stream
        self._indices = itertools.count()
        self.rounds = 0  # engine steps run (each one host round trip: one step, or a multi-step decode round)
        self.thread_cpu_s = 0.0  # CPU seconds of the engine thread (time.thread_time at its last turn)
        self.stream_seconds = 0.0  # the engine thread's time turning steps into stream events (detok, deltas)
        self._round_start_s = 0.0
        self._stop, self._wake = threading.Event(), threading.Event()
        self._on_first_token, self._on_token_gap = on_first_token, on_token_gap
        # the events of one loop iteration, handed to the event loop in one call: a callback per stream per step
        # wakes the HTTP side thousands of times a second under load, and its Python work then competes with this
        # thread for the GIL
        self._outbox: list[tuple[Stream, Event]] = []
        # graphs size their block tables for the longest request the server can take
        engine.runner.begin_job(min(engine.model.config.max_position_embeddings, engine.pool.capacity_tokens))
        self.warmup_seconds = warm_up_graphs(engine) if warm_up else 0.0
        self.thread = threading.Thread(target=self._run, name="batchpilot-engine", daemon=True)

    # --- called from the HTTP side (any thread) ---

    def start(self) -> None:
        self.thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, *, sample_index: int = 0,
               arrival_s: float | None = None, deltas: bool = True) -> Stream:
        """A new request (one sample: ``sample_index`` of ``params.n``); ValueError (prompt too long for the model
        or the KV cache) before it is queued. ``arrival_s``: when its HTTP request arrived (``time.perf_counter()``;
        default now). ``deltas`` False (a non-streamed answer): no text deltas, only the final event, so such a
        request costs neither incremental detokenization per step nor an event-loop wake per token. Its seed is
        resolved as the engine resolves it (``params.seed``, else ``request_seed(engine seed, str(index))``;
        sample j: ``sample_seed``)."""
        index = next(self._indices)
        base = params.seed if params.seed is not None else request_seed(self.engine.config.seed, str(index))
        r = Request(index, list(prompt_ids), params, sample_index=sample_index, seed=sample_seed(base, sample_index))
        self.engine.check(r)
        now = time.perf_counter()
        stream = Stream(r, asyncio.Queue(), now if arrival_s is None else arrival_s, submitted_s=now,
                        submitted_round=self.rounds, deltas=deltas)
        self.inbox.put(("add", stream))
        self._wake.set()
        return stream

    def cancel(self, stream: Stream) -> None:
        self.inbox.put(("cancel", stream))
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return sum(not s.finished for s in list(self.streams.values())) + self.inbox.qsize()

    def stats(self) -> LoopStats:
        pool, s = self.engine.pool, self.engine.stats
        return LoopStats(waiting=len(self.scheduler.waiting),
                         running=sum(r.status is Status.RUNNING for r in self.scheduler.running),
                         kv_blocks_used=pool.num_blocks - pool.num_free, kv_blocks_total=pool.num_blocks,
                         preemptions=s.preemptions, steps=s.steps, decode_steps=s.decode_steps,
                         decode_seconds=s.decode_seconds, mixed_steps=s.steps - s.decode_steps,
                         mixed_seconds=s.seconds - s.decode_seconds, token_budget=self.scheduler.max_batch_tokens,
                         output_tokens=s.output_tokens, engine_thread_cpu_s=self.thread_cpu_s,
                         stream_seconds=self.stream_seconds)

    def stop(self, *, drain_timeout_s: float) -> None:
        """Finish running requests for up to ``drain_timeout_s``, cancel the rest, stop the thread."""
        deadline = time.perf_counter() + drain_timeout_s
        while self.in_flight and time.perf_counter() < deadline:
            time.sleep(0.02)
        for stream in list(self.streams.values()):
            self.cancel(stream)
        self._stop.set()
        self._wake.set()
        self.thread.join(timeout=30)

    # --- the engine thread ---

    def _run(self) -> None:
        while not self._stop.is_set():
            self.turn()
            self.thread_cpu_s = time.thread_time()
        self._flush()

    def turn(self, idle_wait_s: float = 0.05) -> bool:
        """One turn of the engine thread: take what the inbox holds, then one engine round trip (a step, or a
        multi-step decode round when nothing waits) and hand its events to the event loop; with no work, sleep
        until ``submit`` or ``cancel`` sets the wake event (at most ``idle_wait_s``). A request submitted while a
        round runs is therefore in the scheduler of the next round (``Stream.first_round`` = its
        ``submitted_round`` + 1 when it is admitted at once). True if a round ran."""
        self._drain_inbox()
        if not self.scheduler.has_work():
            self._flush()
            self._wake.wait(idle_wait_s)
            self._wake.clear()
            return False
        try:
            self._step()
        except Exception as e:  # noqa: BLE001 -- a failed step fails its requests, never the server
            self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
        self._flush()
        return True

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, stream = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                stream.picked_s = time.perf_counter()
                self.streams[stream.request.index] = stream
                self.scheduler.add([stream.request])
            elif not stream.finished:
                self.scheduler.abort(stream.request)
                self._close(stream, Event("error", "cancelled"))

    def _step(self) -> None:
        stats = self.engine.stats
        if self.tpot_slo_s:
            self.scheduler.max_batch_tokens = self._step_budget(self.tpot_slo_s)
        tokens0, prefill0 = stats.output_tokens, stats.prefill_tokens
        t0 = self._round_start_s = time.perf_counter()
        self.rounds += 1
        done = self.engine.step(self.scheduler, stop=lambda: not self.inbox.empty())
        seconds = time.perf_counter() - t0
        if stats.prefill_tokens > prefill0:  # the budget sizes steps with prefill chunks: fit those alone
            self.step_time.observe(stats.output_tokens - tokens0 + stats.prefill_tokens - prefill0, seconds)
        now = time.perf_counter()
        finished = {c.index: c for c in done}
        for index, stream in list(self.streams.items()):
            if index in finished:
                self._finish(stream, finished[index], now)
            elif stream.request.status is Status.RUNNING:
                self._push_delta(stream, now)
        self.stream_seconds += time.perf_counter() - now

    def _step_budget(self, tpot_slo_s: float) -> int:
        """Tokens of the next step: the SLO's budget from the step-time model, but never fewer than the running
        decodes. Stall-free batching (Sarathi-Serve, arXiv 2403.02310, section 4.3) sizes the prefill chunks so that
        the step stays within the SLO; the decodes themselves always run, or a tight budget would starve them."""
        decodes = sum(r.status is Status.RUNNING and r.in_decode for r in self.scheduler.running)
        budget = self.step_time.budget(tpot_slo_s, default=self.engine.config.max_batch_tokens)
        return max(budget, decodes + self.step_time.min_budget)

    def _push_delta(self, stream: Stream, now: float) -> None:
        r = stream.request
        if not r.output_ids:
            return
        self._mark_tokens(stream, now)
        if not stream.deltas:
            return
        if self.engine.tokenizer is None:  # token-id prompts without a tokenizer: an empty chunk per step, for timing
            self._send(stream, EMPTY_DELTA)
            return
        if r.detok is None:  # requests with stop strings: the engine reads their text already (engine._accept)
            stream.text.add(self.engine.tokenizer, r.output_ids)  # holds back a character split over tokens
        text = (r.detok or stream.text).text
        hold = max((len(s) for s in r.params.stop), default=0)  # never stream the start of a stop string
        visible = len(text) - hold
        if visible > stream.sent_chars:
            self._send(stream, Event("delta", text[stream.sent_chars:visible]))
            stream.sent_chars = visible

    def _finish(self, stream: Stream, completion: Completion, now: float) -> None:
        self._mark_tokens(stream, now)
        if stream.deltas and len(completion.text) > stream.sent_chars:
            self._send(stream, Event("delta", completion.text[stream.sent_chars:]))
        self._close(stream, Event("done", completion.text, completion))

    def _mark_tokens(self, stream: Stream, now: float) -> None:
        if stream.first_token_s is None:
            stream.first_token_s, stream.first_step_s, stream.first_round = now, self._round_start_s, self.rounds
            if self._on_first_token:
                self._on_first_token(now - stream.arrival_s)
        elif stream.last_token_s is not None and now > stream.last_token_s:
            gap = now - stream.last_token_s
            stream.token_gaps_s.append(gap)
            if self._on_token_gap:
                self._on_token_gap(gap)
        stream.last_token_s = now

    def _close(self, stream: Stream, event: Event) -> None:
        stream.finished = True
        self.streams.pop(stream.request.index, None)
        self._send(stream, event)

    def _send(self, stream: Stream, event: Event) -> None:
        self._outbox.append((stream, event))

    def _flush(self) -> None:
        if self._outbox:
            events, self._outbox = self._outbox, []
            self.event_loop.call_soon_threadsafe(_deliver, events)

    def _fail_all(self, message: str) -> None:
        for stream in list(self.streams.values()):
            self.scheduler.abort(stream.request)
            self._close(stream, Event("error", message))
        self.scheduler = Scheduler(self.engine.pool, max_batch_tokens=self.scheduler.max_batch_tokens,
                                   max_num_seqs=self.scheduler.max_num_seqs, admission=self.scheduler.admission)


def _deliver(events: list[tuple[Stream, Event]]) -> None:
    """On the event loop: every event of one engine-loop iteration into its stream's queue."""
    now = time.perf_counter()
    for stream, event in events:
        if stream.delivered_s is None and event.kind == "delta":  # a whole answer's first event is its last
            stream.delivered_s = now
        stream.events.put_nowait(event)


# What the warm-up captures: every sampling kind of graph (generate/graphs.py ``sampling_kind``): greedy, sampled,
# sampled with top-k/top-p, then each with logit processing (penalties, logit_bias, min_tokens), whose graphs hold
# (rows, V) static buffers (9 bytes per row and vocabulary entry), so they come last
WARMUP_PARAMS = tuple(SamplingParams(max_tokens=4, ignore_eos=True, seed=0, temperature=temperature, top_p=top_p,
                                     presence_penalty=presence)
                      for presence in (0.0, 0.1) for temperature, top_p in ((0.0, 1.0), (1.0, 1.0), (1.0, 0.95)))


def warm_up_graphs(engine: Engine) -> float:
    """Capture the decode graphs of every batch-size bucket up to ``max_num_seqs`` and every sampling kind before
    the server takes requests; seconds spent. Graphs are otherwise captured on first use, and a server meets a new
    bucket at every change of load: each capture (an eager reference step, the capture, a compile on first use)
    stalls every running request for that long, and a cold server misses its SLOs for minutes. vLLM captures its
    batch sizes at start-up for the same reason. No-op without graphs (CPU, ``--no-cuda-graphs``)."""
    graphs = engine.runner.graphs
    if graphs is None or not graphs.enabled:
        return 0.0
    start = time.perf_counter()
    rows = [b for b in graphs.buckets if b <= engine.config.max_num_seqs]
    for params in WARMUP_PARAMS:
        for b in rows:
            engine.generate([[3 + i % 61] * 8 for i in range(b)], params)  # b decode rows for 3 steps
    return time.perf_counter() - start
