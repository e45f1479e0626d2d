import pytest

from batchpilot.generate.kv_cache import BlockPool, blocks_for


def test_allocate_free_and_reuse():
    pool = BlockPool(4, 16)
    a = pool.allocate(3)
    assert a == [0, 1, 2] and pool.num_free == 1
    with pytest.raises(MemoryError):
        pool.allocate(2)
    pool.free(a[:2])
    assert pool.num_free == 3 and sorted(pool.allocate(3)) == [0, 1, 3]


def test_shared_blocks_live_until_last_reference():
    pool = BlockPool(4, 16)
    prefix = pool.allocate(2)
    pool.share(prefix)
    pool.share(prefix)
    assert pool.ref_counts[:2] == [3, 3]
    pool.free(prefix)
    pool.free(prefix)
    assert pool.num_free == 2
    pool.free(prefix)
    assert pool.num_free == 4
    with pytest.raises(AssertionError):
        pool.free(prefix)


def test_grow_allocates_only_what_is_missing():
    pool = BlockPool(3, 4)
    blocks: list[int] = []
    assert pool.grow(blocks, 5) and len(blocks) == 2
    assert pool.grow(blocks, 8) and len(blocks) == 2
    assert not pool.grow(blocks, 13) and len(blocks) == 2  # needs 2 more, 1 free: nothing taken
    assert blocks_for(13, 4) == 4 and blocks_for(0, 4) == 0
