"""BlockPool: fixed-size KV blocks with reference counts. Pure Python over integers, no tensors.

A block holds ``block_size`` token slots (slot = block * block_size + offset) in every layer's KV
tensor (``runner.py`` owns the tensors). A group's shared prefix blocks are referenced once by the
group and once by each admitted member (``share``); they return to the free list when the last
reference is dropped. Prefix sharing is planned ahead of the run (``prefix_tree.py``), so there is no
hash index and no LRU: a block is either referenced or free.
"""

from __future__ import annotations


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
        return blocks

    def reset(self, keep: list[int]) -> None:
        """Every block free again but ``keep`` (one reference each): after a run abandoned mid-way."""
        self.ref_counts = [0] * self.num_blocks
        for b in keep:
            self.ref_counts[b] = 1
        self._free = [b for b in range(self.num_blocks - 1, -1, -1) if not self.ref_counts[b]]

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.ref_counts[b] > 0, f"sharing free block {b}"
            self.ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks nobody references go back to the free list."""
        for b in blocks:
            assert self.ref_counts[b] > 0, f"double free of block {b}"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free.append(b)

    def grow(self, blocks: list[int], num_tokens: int) -> bool:
        """Extend ``blocks`` in place to hold ``num_tokens``; False (nothing allocated) if the pool is short."""
        if num_tokens <= len(blocks) * self.block_size:
            return True
        need = blocks_for(num_tokens, self.block_size) - len(blocks)
        if need <= 0:
            return True
        if not self.can_allocate(need):
            return False
        blocks.extend(self.allocate(need))
        return True
