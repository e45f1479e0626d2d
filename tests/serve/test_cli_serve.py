"""``batchpilot serve`` flags that size the engine: ``--kv-cache-tokens`` becomes whole KV blocks."""

import argparse

import pytest

from batchpilot.cli.serve import kv_blocks


def test_kv_cache_tokens_become_whole_blocks():
    assert kv_blocks(argparse.Namespace(kv_cache_tokens=65536, kv_block_size=16)) == 4096
    assert kv_blocks(argparse.Namespace(kv_cache_tokens=100, kv_block_size=16)) == 6  # rounded down
    assert kv_blocks(argparse.Namespace(kv_cache_tokens=None, kv_block_size=16)) is None


def test_kv_cache_smaller_than_a_block_is_refused():
    with pytest.raises(ValueError, match="--kv-cache-tokens 8"):
        kv_blocks(argparse.Namespace(kv_cache_tokens=8, kv_block_size=16))


def test_slo_budget_never_starves_running_decodes():
    """Sarathi-Serve's budget limits prefill chunks; every running decode still gets its token."""
    from types import SimpleNamespace

    from batchpilot.generate.request import Status
    from batchpilot.generate.scheduler import StepTimeModel
    from batchpilot.serve.loop import EngineLoop

    loop = EngineLoop.__new__(EngineLoop)
    loop.step_time = StepTimeModel(min_budget=16)
    for tokens in (16, 64, 256, 1024):
        loop.step_time.observe(tokens, 0.010 + 1e-4 * tokens)  # budget at a 30 ms SLO: 200 tokens
    decoding = [SimpleNamespace(status=Status.RUNNING, in_decode=True) for _ in range(300)]
    loop.scheduler = SimpleNamespace(running=decoding)
    loop.engine = SimpleNamespace(config=SimpleNamespace(max_batch_tokens=2048))
    assert loop._step_budget(0.030) == 300 + loop.step_time.min_budget
    loop.scheduler = SimpleNamespace(running=decoding[:50])
    assert loop._step_budget(0.030) in (199, 200)


def test_step_time_model_learns_from_steps_with_prefill_only():
    """Decode-only steps replay graphs (a few ms) and mixed steps run eagerly: fitting both as one line would read the
    eager overhead as a per-token cost and shrink every budget. The loop feeds the model its mixed steps alone."""
    from types import SimpleNamespace

    from batchpilot.generate.scheduler import StepTimeModel
    from batchpilot.generate.stats import EngineStats
    from batchpilot.serve.loop import EngineLoop

    loop = EngineLoop.__new__(EngineLoop)
    loop.step_time, loop.tpot_slo_s, loop.streams, loop._outbox = StepTimeModel(), None, {}, []
    loop.rounds, loop.stream_seconds = 0, 0.0
    stats = EngineStats()

    def step(scheduler, stop=None):  # alternately a mixed step (decodes + a prefill chunk) and a decode-only step
        if stats.round_trips % 2 == 0:
            stats.prefill_tokens += 100 * (1 + stats.round_trips)
        stats.output_tokens += 8
        stats.round_trips += 1
        return []

    loop.engine = SimpleNamespace(stats=stats, step=step)
    loop.scheduler = None
    for _ in range(10):
        loop._step()
    assert [n for n, _ in loop.step_time.samples] == [8 + 100 * (1 + k) for k in range(0, 10, 2)]


def test_one_engine_step_hands_its_events_to_the_event_loop_in_one_call():
    from batchpilot.serve.loop import EngineLoop, Event

    calls = []
    loop = EngineLoop.__new__(EngineLoop)
    loop._outbox = []
    loop.event_loop = type("L", (), {"call_soon_threadsafe": lambda self, fn, arg: calls.append(arg)})()
    streams = [object() for _ in range(5)]
    for s in streams:
        loop._send(s, Event("delta", "x"))
    loop._flush()
    loop._flush()  # nothing pending: no call
    assert len(calls) == 1 and [s for s, _ in calls[0]] == streams


def test_a_lagging_stream_catches_up_with_one_merged_delta():
    import asyncio

    from batchpilot.serve.app import _pending
    from batchpilot.serve.loop import Event

    async def run():
        q = asyncio.Queue()
        for e in (Event("delta", "a"), Event("delta", "b"), Event("done", "ab"), Event("delta", "late")):
            q.put_nowait(e)
        return await _pending(type("S", (), {"events": q})())

    assert asyncio.run(run()) == [Event("delta", "ab"), Event("done", "ab"), Event("delta", "late")]


@pytest.mark.gpu
def test_warm_up_captures_every_bucket_and_kind_before_serving():
    """After the warm-up, requests of any batch size and sampling kind replay graphs: none is captured later."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from batchpilot import build_model
    from batchpilot.generate.engine import Engine, EngineConfig
    from batchpilot.generate.request import SamplingParams
    from batchpilot.model.llama import get_preset
    from batchpilot.serve.loop import WARMUP_PARAMS, warm_up_graphs

    model = build_model(get_preset("tiny"), device="cuda", seed=0).to(torch.bfloat16)
    engine = Engine(model, None, EngineConfig(max_num_seqs=64, num_blocks=4096, prefix_sharing=False))
    engine.runner.begin_job(1024)
    assert warm_up_graphs(engine) > 0
    graphs = engine.runner.graphs
    assert graphs.enabled, graphs.off_reason
    captured = len(graphs.graphs)
    assert captured == len([b for b in graphs.buckets if b <= 64]) * len(WARMUP_PARAMS)
    engine.generate([[5, 6, 7]] * 37, SamplingParams(max_tokens=6, temperature=0.7, top_p=0.9, seed=1))
    assert len(graphs.graphs) == captured


@pytest.mark.gpu
def test_an_interrupted_decode_round_gives_the_same_tokens():
    """Interruptible decode rounds (docs/serve.md): a round that ``stop`` ends early yields fewer tokens per round
    trip and exactly the tokens of the uncut run (each row's draw is keyed by its seed and step)."""
    import itertools

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from batchpilot import build_model
    from batchpilot.generate.engine import Engine, EngineConfig
    from batchpilot.generate.request import Request, SamplingParams
    from batchpilot.generate.scheduler import Scheduler
    from batchpilot.model.llama import get_preset
    from batchpilot.serve.loop import warm_up_graphs

    model = build_model(get_preset("tiny"), device="cuda", seed=0).to(torch.bfloat16)
    engine = Engine(model, None, EngineConfig(max_num_seqs=8, num_blocks=1024, prefix_sharing=False, decode_steps=8,
                                              compile=False))
    engine.runner.begin_job(1024)
    warm_up_graphs(engine)  # no graph's first use (a one-step round) inside the runs below

    def run(stop):
        scheduler = Scheduler(engine.pool, max_batch_tokens=2048, max_num_seqs=8)
        reqs = [Request(i, [5 + i] * 12, SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.8), seed=i)
                for i in range(4)]
        scheduler.add(reqs)
        rounds = 0
        while scheduler.has_work():
            engine.step(scheduler, stop=stop)
            rounds += 1
        return [r.output_ids for r in reqs], rounds

    full, full_rounds = run(None)
    checks = itertools.count()
    cut, cut_rounds = run(lambda: next(checks) % 3 == 2)  # every third check between steps ends the round
    assert cut == full and cut_rounds > full_rounds
