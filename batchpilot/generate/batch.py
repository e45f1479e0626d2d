"""Host-side batch assembly: a step's chunks -> the numpy arrays its forward needs. Pure numpy, no tensors.

Used by the runner (eager steps) and the decode graphs (static buffers): ``flatten`` gives the step's
token ids, positions and cache slots; ``decode_arrays`` the block tables and lengths of decode rows
(optionally padded to a graph's static rows, width and groups), with the cascade groups' tables
(Hydragen, arXiv 2402.05099); ``prefill_arrays`` the bin-packed rows of prefill chunks for the masked SDPA
path (Prepacking's worst-fit decreasing on context length, arXiv 2404.09529), ``prefill_chunk_arrays`` the
per-chunk bounds, context slots and query tiles of the Triton prefill kernel. A request's KV slot of own token j is
``blocks[j // block_size] * block_size + j % block_size``; padding rows read and write the trash block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchpilot.generate.request import Request
from batchpilot.generate.scheduler import Chunk, pack_worst_fit_decreasing


@dataclass(slots=True)
class FlatTokens:
    ids: list[int]  # (N,) token ids of the step, chunk after chunk
    pos: list[int]  # (N,) positions in their sequences
    slots: list[int]  # (N,) cache slots their K/V go to
    first: list[int]  # flat index of each chunk's first token, in chunk order
    last: list[int]  # flat index of each chunk's last token, in chunk order


def flatten(chunks: list[Chunk], block_size: int) -> FlatTokens:
    bs = block_size
    flat = FlatTokens([], [], [], [], [])
    for c in chunks:
        r, j = c.request, c.start
        lo = r.prefix_len + j
        flat.first.append(len(flat.ids))
        if c.num_tokens == 1:  # decode: the common case, kept cheap
            flat.ids.append(r.token_at(j))
            flat.pos.append(lo)
            flat.slots.append(r.blocks[j // bs] * bs + j % bs)
        else:
            flat.ids += (r.prompt_ids + r.output_ids)[lo:lo + c.num_tokens]
            flat.pos += range(lo, lo + c.num_tokens)
            flat.slots += [r.blocks[i // bs] * bs + i % bs for i in range(j, j + c.num_tokens)]
        flat.last.append(len(flat.ids) - 1)
    return flat


@dataclass(slots=True)
class DecodeArrays:
    tables: np.ndarray  # (D, Pb + Ob) block ids: [prefix region | own region], padded with the trash block
    prefix_lens: np.ndarray  # (D,) prefix tokens inline in the row's table (0 with cascade)
    own_lens: np.ndarray  # (D,)
    prefix_blocks: int  # Pb
    group_tables: np.ndarray | None = None  # (Gn, Gb) cascade: each group's prefix blocks
    group_lens: np.ndarray | None = None  # (Gn,)
    group_rows: np.ndarray | None = None  # (Gn, M) decode row of each member; D (= rows) indexes a zero query
    group_sizes: np.ndarray | None = None  # (Gn,) members of each group (0: a padding group)

    def named(self) -> dict[str, np.ndarray]:
        """The array fields that are set, by name (the names of the graphs' static input buffers)."""
        names = ("tables", "prefix_lens", "own_lens", "group_tables", "group_lens", "group_rows", "group_sizes")
        return {k: a for k in names if (a := getattr(self, k)) is not None}


def decode_arrays(dec: list[Chunk], *, block_size: int, cascade: bool, trash_block: int, rows: int = 0,
                  width: int = 0, groups: int = 0) -> DecodeArrays:
    """Arrays of a decode batch, optionally padded to ``rows`` x ``width`` blocks and ``groups`` cascade groups.

    Padding rows attend to one token of the trash block.
    """
    reqs = [c.request for c in dec]
    D = len(reqs)
    rows = max(rows, D)
    inline = not cascade and any(r.prefix_len > 0 for r in reqs)  # each row holds its prefix too
    pre = [r.shared.prefix.blocks if r.prefix_len > 0 else [] for r in reqs] if inline else []
    pb = max(map(len, pre)) if inline else 0
    width = max(width, pb + max(len(r.blocks) for r in reqs))
    a = DecodeArrays(np.full((rows, width), trash_block, dtype=np.int64), np.zeros(rows, dtype=np.int64),
                     np.ones(rows, dtype=np.int64), pb)
    for i, r in enumerate(reqs):
        a.tables[i, pb:pb + len(r.blocks)] = r.blocks
        a.own_lens[i] = dec[i].start + 1
        if inline and pre[i]:
            a.tables[i, :len(pre[i])] = pre[i]
            a.prefix_lens[i] = r.prefix_len
    if cascade and (groups or any(r.prefix_len > 0 for r in reqs)):
        _group_arrays(a, reqs, rows, groups, trash_block)
    return a


def _group_arrays(a: DecodeArrays, reqs: list[Request], rows: int, groups: int, trash_block: int) -> None:
    """Cascade: each group's prefix blocks, member rows and member count."""
    members: dict[int, list[int]] = {}
    prefixes: dict[int, Request] = {}
    for i, r in enumerate(reqs):
        if r.prefix_len > 0:
            members.setdefault(id(r.group), []).append(i)
            prefixes[id(r.group)] = r.shared.prefix
    Gn = max(groups, len(members))
    M = rows if groups else max(map(len, members.values()))
    width = max([len(p.blocks) for p in prefixes.values()] + [a.tables.shape[1] if groups else 1])
    a.group_tables = np.full((Gn, width), trash_block, dtype=np.int64)
    a.group_lens = np.zeros(Gn, dtype=np.int64)
    a.group_rows = np.full((Gn, M), rows, dtype=np.int64)
    a.group_sizes = np.zeros(Gn, dtype=np.int64)
    for gi, (key, rs) in enumerate(members.items()):
        prefix = prefixes[key]
        a.group_tables[gi, :len(prefix.blocks)] = prefix.blocks
        a.group_lens[gi] = len(prefix.prompt_ids)
        a.group_rows[gi, :len(rs)] = rs
        a.group_sizes[gi] = len(rs)


@dataclass(slots=True)
class PrefillArrays:
    q_index: np.ndarray  # (R, Q) index into the step's prefill queries, Np = padding
    q_gather: np.ndarray  # (Np,) flat (R * Q) position of each prefill query
    k_slots: np.ndarray  # (R, Lk) cache slots of the keys, 0 = padding
    q_chunk: np.ndarray  # (R, Q) chunk of each query, -1 = padding
    q_pos: np.ndarray  # (R, Q) position of each query in its sequence
    k_chunk: np.ndarray  # (R, Lk) chunk of each key, -2 = padding (never equals a query's chunk)
    k_pos: np.ndarray  # (R, Lk)


def prefill_arrays(pre: list[Chunk], block_size: int) -> PrefillArrays:
    """Chunks bin-packed into rows by context length; the mask is ``q_chunk == k_chunk and k_pos <= q_pos``."""
    ctx = [c.request.prefix_len + c.start + c.num_tokens for c in pre]
    rows = pack_worst_fit_decreasing(ctx, max(ctx))
    q_off = np.cumsum([0] + [c.num_tokens for c in pre])
    Np, R = int(q_off[-1]), len(rows)
    Q = max(sum(pre[ci].num_tokens for ci in row) for row in rows)
    Lk = -(-max(sum(ctx[ci] for ci in row) for row in rows) // 16) * 16  # aligned mask rows for fused SDPA
    a = PrefillArrays(np.full((R, Q), Np, dtype=np.int64), np.zeros(Np, dtype=np.int64),
                      np.zeros((R, Lk), dtype=np.int64), np.full((R, Q), -1, dtype=np.int64),
                      np.zeros((R, Q), dtype=np.int64), np.full((R, Lk), -2, dtype=np.int64),
                      np.zeros((R, Lk), dtype=np.int64))
    for ri, row in enumerate(rows):
        qo = ko = 0
        for ci in row:
            n, L, q0 = pre[ci].num_tokens, ctx[ci], int(q_off[ci])
            a.q_index[ri, qo:qo + n] = np.arange(q0, q0 + n)
            a.q_gather[q0:q0 + n] = ri * Q + qo + np.arange(n)
            a.q_chunk[ri, qo:qo + n], a.q_pos[ri, qo:qo + n] = ci, np.arange(L - n, L)
            a.k_chunk[ri, ko:ko + L], a.k_pos[ri, ko:ko + L] = ci, np.arange(L)
            a.k_slots[ri, ko:ko + L] = context_slots(pre[ci].request, L, block_size)
            qo, ko = qo + n, ko + L
    return a


@dataclass(slots=True)
class PrefillChunkArrays:
    q_start: np.ndarray  # (C,) first query of each chunk in the step's prefill tokens
    q_len: np.ndarray  # (C,)
    ctx_len: np.ndarray  # (C,) context through the chunk's last token
    k_start: np.ndarray  # (C,) offset of each chunk's context in k_slots
    k_slots: np.ndarray  # (sum ctx_len,) cache slots of the contexts, chunk after chunk
    tile_chunk: np.ndarray  # (T,) chunk of each kernel tile
    tile_row: np.ndarray  # (T,) first query row of each tile (a chunk has q_len * G rows)


def prefill_chunk_arrays(pre: list[Chunk], block_size: int, *, heads_per_kv: int, block_m: int) -> PrefillChunkArrays:
    """Bounds and context slots of each prefill chunk, and the kernel's tiles of ``block_m`` query rows."""
    q_len = np.asarray([c.num_tokens for c in pre], dtype=np.int64)
    ctx_len = np.asarray([c.request.prefix_len + c.start + c.num_tokens for c in pre], dtype=np.int64)
    tiles = -(-q_len * heads_per_kv // block_m)  # (C,) tiles per chunk
    tile_chunk = np.repeat(np.arange(len(pre), dtype=np.int64), tiles)
    tile_first = np.repeat(np.cumsum(tiles) - tiles, tiles)  # each tile's chunk's first tile
    return PrefillChunkArrays(
        np.cumsum(q_len) - q_len, q_len, ctx_len, np.cumsum(ctx_len) - ctx_len,
        np.concatenate([context_slots(c.request, int(n), block_size) for c, n in zip(pre, ctx_len, strict=True)]),
        tile_chunk, (np.arange(len(tile_chunk), dtype=np.int64) - tile_first) * block_m)


def context_slots(r: Request, n: int, block_size: int) -> np.ndarray:
    """Cache slots of r's first n tokens: the group prefix blocks, then its own blocks."""
    p = r.prefix_len
    own = _block_slots(r.blocks, block_size)[:n - p]
    if p == 0:
        return own
    return np.concatenate([_block_slots(r.shared.prefix.blocks, block_size)[:min(p, n)], own])


def _block_slots(blocks: list[int], block_size: int) -> np.ndarray:
    return (np.asarray(blocks, dtype=np.int64)[:, None] * block_size + np.arange(block_size)).ravel()
