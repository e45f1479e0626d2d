"""``benchmarks/serve_sim.py``: the server's scheduler on a fake step. Its step is the engine's step, plan for plan."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

from batchpilot.generate.request import Request, SamplingParams
from batchpilot.generate.scheduler import Scheduler


@pytest.fixture(scope="module")
def sim():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_sim.py"
    spec = importlib.util.spec_from_file_location("serve_sim", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_sim"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _args(**kw):
    base = dict(block_size=16, max_batch_tokens=64, max_num_seqs=4, tpot_slo=0.05, ttft_slo=1.0, decode_steps=1,
                drain_seconds=60.0)
    return argparse.Namespace(**base | kw)


def _recording(scheduler, log):
    schedule = scheduler.schedule

    def recorded():
        plan = schedule()
        log.append([(c.request.index, c.start, c.num_tokens, c.sample) for c in plan.chunks])
        return plan
    scheduler.schedule = recorded


@pytest.mark.parametrize("admission", ["aggressive", "past_future", "conservative"])
def test_the_simulated_step_plans_exactly_as_the_engine_step(sim, admission):
    """The real engine (tiny CPU model) and the simulation on the same requests (lengths = max_tokens), a cache
    small enough to preempt: the same plans step after step, the same preemptions."""
    from batchpilot import build_model
    from batchpilot.generate.engine import Engine, EngineConfig
    from batchpilot.model.llama import get_preset

    lengths = [(40, 30), (20, 50), (70, 12), (33, 41), (16, 25), (50, 20)]  # (prompt, output)
    engine = Engine(build_model(get_preset("tiny").with_(num_layers=1), device="cpu", seed=0), None,
                    EngineConfig(max_num_seqs=4, num_blocks=16, max_batch_tokens=64, prefix_sharing=False))
    real = Scheduler(engine.pool, max_batch_tokens=64, max_num_seqs=4, admission=admission)
    real.add([Request(i, [3 + i] * p, SamplingParams(max_tokens=o, ignore_eos=True, seed=i))
              for i, (p, o) in enumerate(lengths)])
    real_plans = []
    _recording(real, real_plans)
    while real.has_work():
        engine.step(real)
    preempted = engine.stats.preemptions

    from batchpilot.generate.kv_cache import BlockPool

    pool = BlockPool(16, 16)
    pool.allocate(1)  # the engine's trash block
    s = sim.Sim(Scheduler(pool, max_batch_tokens=64, max_num_seqs=4, admission=admission), sim.StepCost(), 0.05, 1)
    by_request = {}
    for i, (p, o) in enumerate(lengths):
        r = sim.SimRequest(0.0, p, o, o, request=Request(i, [0] * p, SamplingParams(max_tokens=o, ignore_eos=True)))
        by_request[i] = r
        s.scheduler.add([r.request])
    sim_plans = []
    _recording(s.scheduler, sim_plans)
    while s.scheduler.has_work():
        s.step(by_request)
    assert sim_plans == real_plans
    assert s.preemptions == preempted
    assert preempted > 0 if admission == "aggressive" else True  # the cache is small enough to matter
    assert all(r.end_s is not None for r in by_request.values()) and pool.num_free == pool.num_blocks - 1


def test_under_memory_pressure_aggressive_preempts_and_conservative_never_does(sim):
    reqs = [(200 + 37 * (i % 5), 40 + 29 * (i % 7), 300) for i in range(40)]  # (prompt, output, max_tokens)
    rows = {p: sim.simulate(p, reqs, 20.0, kv_tokens=2048, args=_args(max_num_seqs=16, max_batch_tokens=512),
                            cost=sim.StepCost(), seed=0) for p in ("aggressive", "past_future", "conservative")}
    assert all(r["finished"] == 40 and r["kv_blocks_leaked"] == 0 for r in rows.values())
    assert rows["aggressive"]["preemptions"] > 0 and rows["conservative"]["preemptions"] == 0


def test_step_cost_follows_its_model(sim):
    from batchpilot.generate.scheduler import Chunk, StepPlan

    r = Request(0, [1] * 10)
    cost = sim.StepCost(decode_fixed_s=1.0, decode_per_row_s=0.1, decode_per_kv_token_s=0.01, mixed_fixed_s=5.0,
                        mixed_per_token_s=0.5)
    decode = StepPlan([Chunk(r, 9, 1, True, decode=True), Chunk(r, 19, 1, True, decode=True)])
    assert cost.seconds(decode, 1) == pytest.approx(1.0 + 0.2 + 0.01 * 30)
    assert cost.seconds(decode, 2) == pytest.approx(2 * 1.2 + 0.01 * (30 + 32))  # each step reads a token more
    assert cost.seconds(StepPlan([Chunk(r, 0, 8, True), Chunk(r, 9, 1, True, decode=True)]), 1) == 5.0 + 0.5 * 9


def test_saturation_runs_every_request_under_both_schedules(sim):
    reqs = [(100 + 17 * (i % 9), 20 + 11 * (i % 5), 200) for i in range(48)]
    args = _args(max_num_seqs=16, max_batch_tokens=512, decode_steps=4)
    server = sim.saturation("past_future", reqs, kv_tokens=4096, args=args, cost=sim.StepCost(), offline=False)
    offline = sim.saturation("past_future", reqs, kv_tokens=4096, args=args, cost=sim.StepCost(), offline=True)
    total = sum(o for _, o, _ in reqs)
    for row in (server, offline):
        assert row["output_tokens_per_s"] == pytest.approx(total / row["seconds"], rel=1e-3)
    assert offline["steps"] > 0 and server["mixed_steps"] > 0


def test_an_interruptible_round_ends_at_the_step_an_arrival_lands_in(sim):
    from batchpilot.generate.kv_cache import BlockPool

    def one_round(interruptible, next_arrival_s):
        pool = BlockPool(64, 16)
        pool.allocate(1)
        cost = sim.StepCost(decode_fixed_s=1.0, decode_per_row_s=0.0, decode_per_kv_token_s=0.0)
        s = sim.Sim(Scheduler(pool, max_batch_tokens=64, max_num_seqs=4), cost, 0.05, 4, interruptible=interruptible)
        r = sim.SimRequest(0.0, 8, 50, 50, request=Request(0, [0] * 8, SamplingParams(max_tokens=50)))
        s.scheduler.add([r.request])
        s.step({0: r})  # the prefill (a mixed step), then a decode round
        start, steps = s.now, s.steps
        s.step({0: r}, next_arrival_s=start + next_arrival_s)
        return s.steps - steps, len(r.request.output_ids)

    assert one_round(False, 1.5) == (4, 5)  # the whole 4-step round: the arrival waits for it
    assert one_round(True, 1.5) == (2, 3)  # it lands in the second step: the round ends there
    assert one_round(True, 10.0) == (4, 5)  # none during the round: nothing changes
