"""``/metrics`` in the Prometheus text format, through ``prometheus_client`` with a registry per server.

Gauges are read from the engine loop when scraped (queue length, running requests, KV blocks in use,
preemptions), so nothing is mirrored by hand; latency histograms and counters are updated as requests finish.
A request counts toward goodput when it met both SLOs that are set (its first token within ``ttft_slo_s`` and
every gap between its tokens within ``tpot_slo_s`` on average).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from batchpilot.serve.config import ServeConfig
    from batchpilot.serve.loop import EngineLoop, Stream

LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
PHASE_BUCKETS_S = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
# Where a request's time to first token goes, from the server's own timestamps (``loop.Stream``), in order:
#   parse       the HTTP handler got the request -> it is in the engine loop's inbox (body read, JSON, tokenization,
#               checks, seed)
#   handoff     inbox -> the engine thread takes it (the step or decode round running when it arrived ends)
#   queued      taken -> the start of the step that computes its first token (steps it waited for admission, and the
#               earlier chunks of a chunked prefill)
#   first_step  that step (its prefill chunk with the running decodes)
#   deliver     the step's end -> the event loop holds its first event (``call_soon_threadsafe``, the GIL)
#   send        -> the handler formatted its first chunk and gave it to the HTTP layer (streams only)
TTFT_PHASES = ("parse", "handoff", "queued", "first_step", "deliver", "send")


class _LoopCollector:
    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop

    def collect(self) -> Iterator[Metric]:
        s = self.loop.stats()
        yield GaugeMetricFamily("batchpilot_requests_waiting", "requests queued for admission", value=s.waiting)
        yield GaugeMetricFamily("batchpilot_requests_running", "requests admitted and not finished", value=s.running)
        yield GaugeMetricFamily("batchpilot_kv_cache_usage_ratio", "share of KV blocks in use",
                                value=s.kv_blocks_used / max(1, s.kv_blocks_total))
        yield CounterMetricFamily("batchpilot_preemptions", "requests preempted (recomputed later)", value=s.preemptions)
        yield CounterMetricFamily("batchpilot_engine_steps", "model steps run", value=s.steps)
        steps = CounterMetricFamily("batchpilot_engine_steps_by_kind", "model steps: decode-only (graphs) or with "
                                    "prefill chunks (mixed, eager)", labels=["kind"])
        seconds = CounterMetricFamily("batchpilot_engine_step_seconds", "seconds spent in model steps, by kind",
                                      labels=["kind"])
        for kind, n, t in (("decode", s.decode_steps, s.decode_seconds), ("mixed", s.mixed_steps, s.mixed_seconds)):
            steps.add_metric([kind], n)
            seconds.add_metric([kind], t)
        yield steps
        yield seconds
        yield CounterMetricFamily("batchpilot_output_tokens", "tokens generated", value=s.output_tokens)
        # host CPU by side (does the HTTP side need its own process? docs/serve.md): the engine thread's CPU time
        # (its share spent making stream events: incremental detokenization, deltas), the event loop's, and the
        # whole process's (on CPU that includes torch's intra-op threads; on a GPU the driver's)
        yield CounterMetricFamily("batchpilot_engine_thread_cpu_seconds", "CPU seconds of the engine thread",
                                  value=s.engine_thread_cpu_s)
        yield CounterMetricFamily("batchpilot_engine_stream_seconds", "seconds the engine thread spent turning steps "
                                  "into stream events (incremental detokenization, deltas)", value=s.stream_seconds)
        # /metrics is rendered on the event loop (an async route), so this thread's CPU time is the HTTP side's
        yield CounterMetricFamily("batchpilot_event_loop_thread_cpu_seconds", "CPU seconds of the thread serving "
                                  "/metrics: the event loop (HTTP parsing, JSON, SSE)", value=time.thread_time())
        yield CounterMetricFamily("batchpilot_process_cpu_seconds", "CPU seconds of the server process, all threads",
                                  value=time.process_time())
        yield GaugeMetricFamily("batchpilot_step_token_budget", "token budget of the last step (the TPOT SLO's)",
                                value=s.token_budget)


class ServeMetrics:
    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.registry = CollectorRegistry()
        self.ttft = Histogram("batchpilot_time_to_first_token_seconds", "arrival to first output token",
                              buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.tpot = Histogram("batchpilot_time_per_output_token_seconds", "gap between consecutive output tokens",
                              buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.finished = Counter("batchpilot_requests_finished", "requests answered", registry=self.registry)
        self.good = Counter("batchpilot_requests_within_slo", "requests that met every SLO set (goodput)",
                            registry=self.registry)
        self.phases = Histogram("batchpilot_ttft_phase_seconds", "where time to first token goes (serve/metrics.py "
                                "TTFT_PHASES)", labelnames=["phase"], buckets=PHASE_BUCKETS_S, registry=self.registry)
        self.rounds_waited = Histogram("batchpilot_rounds_before_first_token", "engine round trips that started "
                                       "between a request's submission and the one computing its first token",
                                       buckets=(0, 1, 2, 4, 8, 16, 64, 256), registry=self.registry)
        self.rejected = Counter("batchpilot_requests_rejected", "requests refused with 429", registry=self.registry)

    def bind(self, loop: EngineLoop) -> None:
        self.registry.register(_LoopCollector(loop))

    def finish(self, stream: Stream) -> None:
        """A request's end, on the event loop: its token gaps go into the TPOT histogram here, not per token on the
        engine thread (an observation costs ~1.6 us, times every running row at every step, while the GPU waits)."""
        self.finished.inc()
        for gap in stream.token_gaps_s:
            self.tpot.observe(gap)
        for phase, seconds in ttft_phases(stream).items():
            self.phases.labels(phase).observe(seconds)
        if stream.first_round is not None:
            self.rounds_waited.observe(stream.first_round - stream.submitted_round - 1)
        if meets_slo(stream, ttft_slo_s=self.cfg.ttft_slo_s, tpot_slo_s=self.cfg.tpot_slo_s):
            self.good.inc()

    def render(self) -> str:
        return generate_latest(self.registry).decode()


def meets_slo(stream: Stream, *, ttft_slo_s: float | None, tpot_slo_s: float | None) -> bool:
    if stream.first_token_s is None:
        return False
    if ttft_slo_s is not None and stream.first_token_s - stream.arrival_s > ttft_slo_s:
        return False
    gaps = stream.token_gaps_s
    return tpot_slo_s is None or not gaps or sum(gaps) / len(gaps) <= tpot_slo_s


def ttft_phases(stream: Stream) -> dict[str, float]:
    """The request's time to first token split into ``TTFT_PHASES`` (seconds; the phases it reached)."""
    marks = (stream.arrival_s, stream.submitted_s, stream.picked_s, stream.first_step_s, stream.first_token_s,
             stream.delivered_s, stream.sent_s)
    out = {}
    for phase, start, end in zip(TTFT_PHASES, marks, marks[1:]):
        if start is None or end is None:
            break
        out[phase] = max(0.0, end - start)
    return out
