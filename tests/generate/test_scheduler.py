from batchpilot.generate.kv_cache import BlockPool
from batchpilot.generate.request import Request, SamplingParams, Status
from batchpilot.generate.scheduler import OutputLengthEMA, Scheduler, estimate_peak, pack_worst_fit_decreasing


def _running(s: Scheduler, r: Request, computed: int) -> Request:
    assert s.pool.grow(r.blocks, computed + 1)
    r.num_computed, r.status = computed, Status.RUNNING
    s.running.append(r)
    return r


def test_sarathi_oracle_decode_first_then_one_chunk_no_admission():
    """laws.md 16: tau 512, 100 decodes + a prefill with 1000 left -> 100 + 412, nobody admitted."""
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
    """laws.md 15: peak 365; EMA 2048 -> 1074 -> 684 -> 497."""
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
    """laws.md 13: binpacking.to_constant_volume results."""
    assert pack_worst_fit_decreasing([5, 3, 2, 7], 7) == [[3], [0], [1, 2]]
    assert pack_worst_fit_decreasing([10, 4, 6, 3, 9, 2], 10) == [[0], [4], [2, 1], [3, 5]]
