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
    loop.step_time = StepTimeModel()
    for tokens in (16, 64, 256, 1024):
        loop.step_time.observe(tokens, 0.010 + 1e-4 * tokens)  # budget at a 30 ms SLO: 200 tokens
    decoding = [SimpleNamespace(status=Status.RUNNING, in_decode=True) for _ in range(300)]
    loop.scheduler = SimpleNamespace(running=decoding)
    loop.engine = SimpleNamespace(config=SimpleNamespace(max_batch_tokens=2048))
    assert loop._step_budget(0.030) == 300 + loop.step_time.min_budget
    loop.scheduler = SimpleNamespace(running=decoding[:50])
    assert loop._step_budget(0.030) in (199, 200)
