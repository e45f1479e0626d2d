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
