from batchpilot.generate.kv_cache import BlockPool
from batchpilot.generate.request import Request, SamplingParams, Status
import pytest

from batchpilot.generate.scheduler import (OutputLengthEMA, Scheduler, StepTimeModel, estimate_peak,
                                            pack_worst_fit_decreasing)


def _running(s: Scheduler, r: Request, computed: int) -> Request:
    assert s.pool.grow(r.blocks, computed + 1)
    r.num_computed, r.status = computed, Status.RUNNING
    s.running.append(r)
    return r


def test_sarathi_oracle_decode_first_then_one_chunk_no_admission():
    """Sarathi-Serve (arXiv 2403.02310) scheduler oracle: tau 512, 100 decodes + a prefill with 1000 left -> 100 + 412, nobody admitted."""
    s = Scheduler(BlockPool(10_000, 16), max_batch_tokens=512, max_num_seqs=1024)
    for i in range(100):
        r = Request(i, [1] * 10, SamplingParams(max_tokens=50), output_ids=[7])
        _running(s, r, 10)
    _running(s, Request(100, [1] * 1200), 200)
    s.add([Request(101, [2] * 30)])
    plan = s.schedule()
    assert [c.num_tokens for c in plan.chunks] == [1] * 100 + [412]
    assert not plan.chunks[-1].sample and len(s.waiting) == 1


def test_past_future_peak_and_ema_oracles():
    """LightLLM Past-Future peak oracle (arXiv 2507.10150): peak 365; EMA 2048 -> 1074 -> 684 -> 497."""
    assert estimate_peak([(100, 10), (50, 30), (200, 5)]) == 365
    ema, seen = OutputLengthEMA(), []
    for _ in range(3):
        ema.update(100)
        seen.append(ema.value)
    assert seen == [1074, 684, 497]


def test_admission_stops_when_the_future_peak_does_not_fit():
    s = Scheduler(BlockPool(64, 16), max_batch_tokens=4096, max_num_seqs=64)  # 1024 tokens
    s.add([Request(i, [1] * 100, SamplingParams(max_tokens=300, ignore_eos=True)) for i in range(5)])
    plan = s.schedule()
    # each: 100 + 16 held, 299 + 6 to go; 2 fit (2 * 305 + 232 = 842), 3 do not (915 + 348 > 1024)
    assert len(plan.chunks) == 2 and len(s.waiting) == 3


def test_preemption_frees_blocks_and_requeues_at_front():
    s = Scheduler(BlockPool(4, 4), max_batch_tokens=64, max_num_seqs=8)
    a = _running(s, Request(0, [1] * 8, output_ids=[5]), 7)  # 8 + 1 tokens: needs a third block
    b = _running(s, Request(1, [1] * 7, output_ids=[5]), 7)  # 8 tokens: fits its 2 blocks
    a.num_computed = 8
    assert s.pool.num_free == 0
    plan = s.schedule()
    assert plan.preempted == [b] and b.num_computed == 0 and b.blocks == [] and s.waiting[0] is b
    assert [c.request for c in plan.chunks] == [a] and len(a.blocks) == 3 and b.num_preemptions == 1


def test_worst_fit_decreasing_oracles():
    """Prepacking (arXiv 2404.09529): the binpacking package's to_constant_volume results."""
    assert pack_worst_fit_decreasing([5, 3, 2, 7], 7) == [[3], [0], [1, 2]]
    assert pack_worst_fit_decreasing([10, 4, 6, 3, 9, 2], 10) == [[0], [4], [2, 1], [3, 5]]


def _admitted(admission: str) -> int:
    """Requests of 100 prompt tokens and max_tokens 300 admitted into 1024 KV tokens, with a history that says
    outputs are short (50 tokens)."""
    s = Scheduler(BlockPool(64, 16), max_batch_tokens=4096, max_num_seqs=64, admission=admission)
    for _ in range(10):
        s.history.update(50)
    s.add([Request(i, [1] * 100, SamplingParams(max_tokens=300)) for i in range(8)])
    return len(s.schedule().chunks)


def test_admission_policies_order_aggressive_past_future_conservative():
    # aggressive: first chunks while blocks are free (8 x 7 blocks > 64: stops at the pool); conservative reserves
    # 100 + 16 + 305 per request (2 fit); past-future uses the short history (64 tokens out): more than conservative
    aggressive, past_future, conservative = (_admitted(a) for a in ("aggressive", "past_future", "conservative"))
    assert aggressive == 8 and conservative == 2
    assert conservative < past_future <= aggressive


def test_unknown_admission_is_a_one_line_error():
    with pytest.raises(ValueError, match="admission 'greedy'"):
        Scheduler(BlockPool(4, 16), max_batch_tokens=16, max_num_seqs=4, admission="greedy")


def test_abort_frees_blocks_of_running_and_removes_waiting():
    s = Scheduler(BlockPool(64, 16), max_batch_tokens=4096, max_num_seqs=64)
    a, b = Request(0, [1] * 40), Request(1, [1] * 40)
    s.add([a])
    s.schedule()
    s.add([b])
    free_before = s.pool.num_free
    s.abort(a)
    assert s.pool.num_free == free_before + 3 and a.finish_reason == "abort"
    s.abort(b)
    assert not s.waiting and not s.has_work()


def test_step_time_model_budget_meets_the_slo():
    m = StepTimeModel()
    assert m.budget(0.05, default=512) == 512  # not fitted yet
    for tokens in (64, 128, 256, 512, 1024):
        m.observe(tokens, 0.010 + 2e-5 * tokens)  # 10 ms fixed + 20 us per token
    fixed, per_token = m.fit()
    assert fixed == pytest.approx(0.010) and per_token == pytest.approx(2e-5)
    assert m.budget(0.030, default=512) in (999, 1000)  # (30 - 10) ms / 20 us, floored
    assert m.budget(0.012, default=512) == m.min_budget == 256  # 100 tokens by the line: the floor


def test_step_time_model_when_no_mixed_step_meets_the_slo():
    """Eager mixed steps whose fixed cost is over the TPOT SLO: shrinking chunks cannot help (the measured failure
    on one H200: budgets of 16-20 tokens, every step mixed, prompts prefilled 16 tokens a step, TTFT 5-8 s); a step
    may then cost up to twice its fixed cost."""
    m = StepTimeModel()
    for tokens in (20, 24, 300, 2048, 18, 600):
        m.observe(tokens, 0.055 + 3e-6 * tokens)  # GPU-like: 55 ms fixed, 3 us per token
    assert m.budget(0.050, default=2048) == 2048  # twice the fixed cost is 18k tokens: the largest chunk
    cpu = StepTimeModel()
    for tokens in (20, 24, 300, 2048, 18, 600):
        cpu.observe(tokens, 0.040 + 1.2e-4 * tokens)  # CPU-like: 40 ms fixed, 120 us per token
    assert cpu.budget(0.006, default=2048) in (332, 333)  # a step of at most 2 x 40 ms


def test_step_time_model_ignores_a_graph_capture_step():
    m = StepTimeModel()
    for tokens in (64, 128, 256, 512, 1024, 96, 200, 700):
        m.observe(tokens, 0.010 + 2e-5 * tokens)
    m.observe(32, 5.0)  # a step that captured a CUDA graph: 5 s
    fixed, per_token = m.fit()
    assert fixed == pytest.approx(0.010, rel=1e-6) and per_token == pytest.approx(2e-5, rel=1e-6)
