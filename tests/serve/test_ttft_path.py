"""The path of a request's first token through the server, by counting engine rounds (no timing)."""

from types import SimpleNamespace

import pytest

from batchpilot.generate.request import SamplingParams


@pytest.fixture
def loop():
    """An engine loop over a tiny CPU engine, driven turn by turn from the test (its thread is not started);
    its events go straight into the streams' queues."""
    from batchpilot import build_model
    from batchpilot.generate.engine import Engine, EngineConfig
    from batchpilot.model.llama import get_preset
    from batchpilot.serve.loop import EngineLoop

    model = build_model(get_preset("tiny").with_(num_layers=1), device="cpu", seed=0)
    engine = Engine(model, None, EngineConfig(max_num_seqs=8, num_blocks=256, prefix_sharing=False))
    fake_event_loop = SimpleNamespace(call_soon_threadsafe=lambda fn, arg: fn(arg))
    return EngineLoop(engine, admission="past_future", tpot_slo_s=None, event_loop=fake_event_loop)


def _events(stream):
    out = []
    while not stream.events.empty():
        out.append(stream.events.get_nowait())
    return out


def test_a_request_arriving_while_others_decode_gets_its_prefill_in_the_next_round(loop):
    a = loop.submit(list(range(3, 40)), SamplingParams(max_tokens=30, ignore_eos=True))
    for _ in range(4):  # a's prefill, then decodes
        assert loop.turn()
    decoded = len(a.request.output_ids)
    assert decoded == 4 and a.first_round == 1
    b = loop.submit(list(range(5, 60)), SamplingParams(max_tokens=5, ignore_eos=True))  # while a decodes
    assert b.submitted_round == 4 and b.first_round is None
    assert loop.turn()
    # the very next round computed b's prefill and sampled its first token, and a's decode ran in it too
    assert b.first_round == b.submitted_round + 1 == loop.rounds
    assert len(b.request.output_ids) == 1 and len(a.request.output_ids) == decoded + 1
    assert [e.kind for e in _events(b)] == ["delta"]
    assert b.picked_s is not None and b.first_step_s is not None and b.delivered_s is not None


def test_an_idle_loop_takes_a_request_in_its_next_turn(loop):
    assert not loop.turn(idle_wait_s=0)  # no work: the turn only waits
    s = loop.submit([3, 4, 5], SamplingParams(max_tokens=2, ignore_eos=True))
    assert loop._wake.is_set()  # submit wakes the loop: no polling interval stands between them
    assert loop.turn() and s.first_round == s.submitted_round + 1


def test_ttft_phases_split_the_time_to_first_token_in_order():
    from batchpilot.serve.loop import Stream
    from batchpilot.serve.metrics import TTFT_PHASES, ttft_phases

    s = Stream(request=None, events=None, arrival_s=10.0, submitted_s=10.001, picked_s=10.003, first_step_s=10.004,
               first_token_s=10.024, delivered_s=10.0245, sent_s=10.025)
    phases = ttft_phases(s)
    assert list(phases) == list(TTFT_PHASES)
    assert phases["first_step"] == pytest.approx(0.020) and phases["handoff"] == pytest.approx(0.002)
    assert sum(phases.values()) == pytest.approx(s.sent_s - s.arrival_s)
    s.delivered_s = s.sent_s = None  # a request that never got its first token out: the phases it reached
    assert list(ttft_phases(s)) == ["parse", "handoff", "queued", "first_step"]


def test_a_whole_answer_gets_no_deltas_only_its_final_event(loop):
    """A non-streamed request costs no incremental detokenization and no event-loop wake per token; its TTFT and
    token gaps are still measured."""
    s = loop.submit([3, 4, 5, 6], SamplingParams(max_tokens=6, ignore_eos=True), deltas=False)
    while not s.finished:
        loop.turn()
    assert [e.kind for e in _events(s)] == ["done"]
    assert s.first_token_s is not None and len(s.token_gaps_s) == 5
    from batchpilot.serve.metrics import ttft_phases

    assert list(ttft_phases(s))[-1] == "first_step"  # its final event is no first delivery


def test_token_gaps_reach_the_tpot_histogram_when_the_request_ends(loop):
    from batchpilot.serve.config import ServeConfig
    from batchpilot.serve.metrics import ServeMetrics

    metrics = ServeMetrics(ServeConfig())
    s = loop.submit([3, 4, 5], SamplingParams(max_tokens=5, ignore_eos=True))
    while not s.finished:
        loop.turn()
    metrics.finish(s)
    count = metrics.registry.get_sample_value("batchpilot_time_per_output_token_seconds_count")
    total = metrics.registry.get_sample_value("batchpilot_time_per_output_token_seconds_sum")
    assert count == len(s.token_gaps_s) == 4 and total == pytest.approx(sum(s.token_gaps_s))
