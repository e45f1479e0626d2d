"""Paged attention with log-sum-exp over a block table: a Triton kernel (CUDA) and a torch reference.

Decode: ``paged_attention(q, k_cache, v_cache, tables, lens)``: for each sequence b, the queries q[b]
(K kv heads x Qn queries per kv head) attend to the first ``lens[b]`` tokens stored in the blocks
``tables[b]``. Decode rows use Qn = H/K (the query heads sharing a kv head); a shared prefix uses
Qn = members x H/K, so its KV is read once for the whole group (Hydragen/cascade). The log-sum-exp
lets the caller merge the prefix and suffix parts exactly.

The Triton kernel reads KV in place (no gather copy), one program per (sequence, kv head, query
tile), online softmax in fp32; when those programs are too few to fill the GPU (few rows, long contexts) each
one's keys are split over several programs whose partial results a second kernel merges by their log-sum-exps
(``decode_splits``). It is used only on CUDA, and only after it matched the torch
reference once on real inputs (``Runner`` checks); anything else uses the torch path, which
gathers the blocks (one extra copy of the KV it reads) and is what the CPU tests run. The kernel is
also tested on CPU under ``TRITON_INTERPRET=1`` when triton is installed.

Prefill: ``prefill_attention(q, k_cache, v_cache, chunks)``: causal attention of each prefill chunk's queries over
its request's context in the cache (the group prefix, the tokens before the chunk, the chunk itself: the K/V of
the chunk are written before attention runs). Query i of a chunk of n tokens over a context of L tokens sees keys
0 .. L - n + i (causal, aligned to the context's end). The Triton kernel reads each key's cache slot from a flat
slot list (one program per (tile of a chunk's query rows, kv head); a tile's rows are (token, query head of the
kv head) pairs, so the G heads sharing a kv head read its K/V once), skips the key tiles above the tile's last
query, and needs no mask tensor, no gathered copy of the keys and no per-shape set-up: the packed SDPA path it
replaces on CUDA spent ~4.7 ms of host time per layer call in the CLI job's profile (issue 15, one H200). The
torch reference runs one SDPA per chunk with an explicit mask.
Shape legend: B sequences, K kv heads, Qn queries per kv head, E head dim, S cache slots, L context.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch path only
    triton = None


def gather_blocks(cache: torch.Tensor, tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """(K, S, E) cache, (B, nb) block ids -> (K, B, nb * block_size, E) copy of those blocks."""
    K, _, E = cache.shape
    return cache.view(K, -1, block_size, E)[:, tables].flatten(2, 3)


def attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, K, Qn, E) over k/v (K, B, L, E) where valid (B, L); softmax in fp32 -> (B, K, Qn, E), lse (B, K, Qn)."""
    qk = q.transpose(0, 1)  # (K, B, Qn, E)
    k, v = k.to(q.dtype), v.to(q.dtype)  # an fp32 q makes an fp32 reference (no-op otherwise)
    scores = (qk @ k.transpose(-1, -2)).float() * (1.0 / math.sqrt(q.shape[-1]))  # (K, B, Qn, L)
    scores = scores.masked_fill(~valid[None, :, None, :], float("-inf"))
    lse = scores.logsumexp(dim=-1)
    out = (scores - lse[..., None]).exp().to(v.dtype) @ v  # (K, B, Qn, E)
    return out.transpose(0, 1), lse.transpose(0, 1)


def merge_lse(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
              lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets from their outputs and log-sum-exps."""
    lse = torch.logaddexp(lse1, lse2)
    w1, w2 = (lse1 - lse).exp()[..., None], (lse2 - lse).exp()[..., None]
    return (o1.float() * w1 + o2.float() * w2).to(o1.dtype), lse


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                          lens: torch.Tensor, block_size: int, q_lens: torch.Tensor | None = None,
                          q_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query row (``q_lens`` only marks rows whose results nobody reads: computing them is harmless).

    ``q_rows`` (B, M): sequence b's queries are the rows ``q_rows[b]`` of q (D, K, G, E) (D = padding, a zero
    query), all G heads of each; the results land in those rows of a (D, K, G, E) output, whose other rows hold a
    zero output and a -inf log-sum-exp (they merge as "no keys")."""
    if q_rows is not None:
        D, K, G, E = q.shape
        B, M = q_rows.shape
        qg = torch.cat([q, q.new_zeros(1, K, G, E)])[q_rows]  # (B, M, K, G, E)
        o, lse = paged_attention_torch(qg.transpose(1, 2).reshape(B, K, M * G, E), k_cache, v_cache, tables, lens,
                                       block_size)
        out = q.new_zeros(D + 1, K, G, E).index_put_((q_rows.flatten(),), o.view(B, K, M, G, E).transpose(1, 2)
                                                      .reshape(B * M, K, G, E))  # row D: padding, dropped
        out_lse = lse.new_full((D + 1, K, G), float("-inf")).index_put_(
            (q_rows.flatten(),), lse.view(B, K, M, G).transpose(1, 2).reshape(B * M, K, G))
        return out[:D], out_lse[:D]
    k, v = gather_blocks(k_cache, tables, block_size), gather_blocks(v_cache, tables, block_size)
    valid = torch.arange(k.shape[2], device=q.device)[None] < lens[:, None]
    return attend_with_lse(q, k, v, valid)


@dataclass(slots=True)
class PrefillChunks:
    """Where each prefill chunk of a step is: its queries in the step's prefill tokens, its keys in the cache."""

    q_start: torch.Tensor  # (C,) first query of the chunk in the step's (Np,) prefill tokens
    q_len: torch.Tensor  # (C,) n: the chunk's tokens
    ctx_len: torch.Tensor  # (C,) L: context tokens through the chunk's last one (prefix + earlier + the chunk)
    k_start: torch.Tensor  # (C,) offset of the chunk's context in ``k_slots``
    k_slots: torch.Tensor  # (sum L,) cache slot of every context token, chunk after chunk
    tile_chunk: torch.Tensor  # (T,) kernel tiles: the chunk of each tile
    tile_row: torch.Tensor  # (T,) its first query row (rows: token * G + query head within the kv head)
    host: list[tuple[int, int, int, int]]  # (q_start, n, L, k_start) per chunk: the torch path's loop bounds


def prefill_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            m: PrefillChunks) -> torch.Tensor:
    """Reference: q (Np, H, E) -> (Np, H, E), one masked SDPA per chunk over its gathered context."""
    Np, H, E = q.shape
    G = H // k_cache.shape[0]
    out = torch.empty_like(q)
    for q0, n, L, k0 in m.host:
        slots = m.k_slots[k0:k0 + L]
        k = k_cache[:, slots].repeat_interleave(G, dim=0)[None].to(q.dtype)  # (1, H, L, E)
        v = v_cache[:, slots].repeat_interleave(G, dim=0)[None].to(q.dtype)
        causal = torch.arange(L, device=q.device)[None] <= torch.arange(L - n, L, device=q.device)[:, None]  # (n, L)
        o = torch.nn.functional.scaled_dot_product_attention(q[q0:q0 + n].transpose(0, 1)[None], k, v,
                                                             attn_mask=causal)
        out[q0:q0 + n] = o[0].transpose(0, 1)
    return out


def prefill_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, m: PrefillChunks,
                             *, block_m: int, block_n: int = 64, num_warps: int = 4,
                             num_stages: int = 2) -> torch.Tensor:
    Np, H, E = q.shape
    K = k_cache.shape[0]
    q = q.contiguous()
    out = torch.empty_like(q)
    grid = (m.tile_chunk.shape[0], K)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, m.k_slots, m.q_start, m.q_len, m.ctx_len, m.k_start, m.tile_chunk, m.tile_row, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), H // K, 1.0 / math.sqrt(E),
        E=E, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")  # fp32 models get fp32 products, not TF32
    return out


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                           lens: torch.Tensor, block_size: int, q_lens: torch.Tensor | None = None,
                           q_rows: torch.Tensor | None = None, *, block_n: int | None = None, num_warps: int = 4,
                           num_stages: int = 3, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``q_lens``: query tiles at or past q_lens[b] do no work (their rows' results are left unwritten).
    ``q_rows``: as in ``paged_attention_torch``, read and written in place (no gathered copy of the queries).
    ``splits``: programs per (sequence, kv head, query tile), each over its share of the keys, merged by their
    log-sum-exps (``decode_splits`` when None; always 1 with ``q_rows``)."""
    q = q.contiguous()
    K, E = q.shape[1], q.shape[3]
    if q_rows is None:
        B, _, Qn, _ = q.shape
        out, lse = torch.empty_like(q), torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        G, rows, sr_b = 1, lens, 0  # rows: unused without INDIRECT
    else:
        (B, M), G = q_rows.shape, q.shape[2]
        Qn = M * G
        out, lse = torch.zeros_like(q), torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        rows, sr_b = q_rows.contiguous(), q_rows.stride(0)
    tables = tables.to(torch.int32).contiguous()
    lens = lens.to(torch.int32).contiguous()
    block_m = 16 if Qn <= 16 else 64
    if block_n is None:  # decode rows read 128 keys a loop (~100% of the copy bandwidth on an H200, 64: 77-97%)
        block_n = 128 if block_m == 16 else 64
    tiles = triton.cdiv(Qn, block_m)
    if q_rows is not None:
        splits = 1
    elif splits is None:
        splits = decode_splits(B * K * tiles, q.device)
    # split partials: (splits, B, K, Qn, E) fp32 outputs and (splits, B, K, Qn) log-sum-exps
    part = out if splits == 1 else torch.empty((splits, B, K, Qn, E), dtype=torch.float32, device=q.device)
    part_lse = lse if splits == 1 else torch.empty((splits, B, K, Qn), dtype=torch.float32, device=q.device)
    q_lens = lens if q_lens is None else q_lens.to(torch.int32).contiguous()  # (B,) ignored without HAS_QLENS
    _paged_attention_kernel[(B, K, tiles * splits)](
        q, k_cache, v_cache, tables, lens, q_lens, rows, part, part_lse,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), tables.stride(0), sr_b,
        Qn, G, B, splits, 1.0 / math.sqrt(E), BS=block_size, E=E, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_QLENS=q_lens is not lens, INDIRECT=q_rows is not None, SPLIT=splits > 1, num_warps=num_warps,
        num_stages=num_stages)
    if splits > 1:  # the split count is a runtime argument: a job's many batch sizes compile two variants, not 16
        _merge_splits_kernel[(B, K, tiles)](part, part_lse, q_lens, out, lse, q.stride(0), q.stride(1), q.stride(2),
                                            Qn, B, splits, E=E, BLOCK_M=block_m, HAS_QLENS=q_lens is not lens)
    return out, lse


# Split the keys only when the programs fill the SMs fewer than FULL_WAVES times, into enough splits for
# PROGRAMS_PER_SM programs per SM (benchmarks/decode_attention.py, one H200: 16 rows x 32k tokens go from 33% of
# the copy bandwidth at one split to 96-100% at five; 64 rows x 8k tokens, 512 programs, are fastest unsplit)
FULL_WAVES = 2
PROGRAMS_PER_SM = 4
MAX_SPLITS = 16


def decode_splits(programs: int, device: torch.device) -> int:
    """Key splits per program: 1 where ``programs`` fill the GPU's SMs ``FULL_WAVES`` times, else enough for
    ``PROGRAMS_PER_SM`` programs per SM. Few long sequences (long outputs: 16 rows x 8 kv heads = 128 programs on
    132 SMs) otherwise leave each SM one program walking 32k keys alone. The split of the keys with a log-sum-exp
    merge is Flash-Decoding's (Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for long-context inference"; also
    FlashDecoding++, Hong et al. 2023, arXiv 2311.01282, section 3)."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= FULL_WAVES * sms:
        return 1
    return max(1, min(MAX_SPLITS, -(-PROGRAMS_PER_SM * sms // max(1, programs))))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


if triton is not None:

    # Triton compiles one variant per value class of each int argument (1, multiples of 16, others): the per-step
    # sizes (rows, queries, table widths, splits) are not specialised, so a job's varying batches reuse one compile
    @triton.jit(do_not_specialize=["st_b", "sr_b", "Qn", "B", "splits"])
    def _paged_attention_kernel(Q, Kc, Vc, Tables, Lens, QLens, QRows, Out, Lse, sq_b, sq_k, sq_q, sc_k, sc_s, st_b,
                                sr_b, Qn, G, B, splits, scale, BS: tl.constexpr, E: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_QLENS: tl.constexpr,
                                INDIRECT: tl.constexpr, SPLIT: tl.constexpr):
        b, kh, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        mt, sp = pid // splits, pid % splits
        rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < Qn
        n = tl.load(Lens + b)
        if HAS_QLENS:  # a tile of padding queries reads no keys and writes nothing
            q_len = tl.load(QLens + b)
            rmask = rmask & (rows < q_len)
            n = tl.where(mt * BLOCK_M < q_len, n, 0)
        lo, hi = 0, n
        if SPLIT:  # this split's keys: an equal share of the n keys, in whole key tiles
            per = tl.cdiv(tl.cdiv(n, splits), BLOCK_N) * BLOCK_N
            lo = sp * per
            hi = tl.minimum(n, lo + per)
        e = tl.arange(0, E)
        if INDIRECT:  # row r: head r % G of decode row QRows[b, r // G], in place in a (D, K, G, E) tensor
            d = tl.load(QRows + b * sr_b + rows // G, mask=rmask, other=0).to(tl.int64)
            head_off = d * sq_b + kh * sq_k + (rows % G) * sq_q
        else:
            head_off = b * sq_b + kh * sq_k + rows * sq_q
        q_off = head_off[:, None] + e[None, :]
        q = tl.load(Q + q_off, mask=rmask[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, E], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            tmask = t < hi
            blk = tl.load(Tables + b * st_b + t // BS, mask=tmask, other=0)
            kv_off = kh.to(tl.int64) * sc_k + (blk.to(tl.int64) * BS + t % BS)[:, None] * sc_s + e[None, :]
            k = tl.load(Kc + kv_off, mask=tmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale  # (BLOCK_M, BLOCK_N) fp32
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            v = tl.load(Vc + kv_off, mask=tmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        if not SPLIT:
            tl.store(Out + q_off, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=rmask[:, None])
            tl.store(Lse + head_off // E, m_i + tl.log(l_i), mask=rmask)  # lse: q's layout without E
        else:  # partials (splits, B, K, Qn, E): a split without keys says so by lse = -inf (weight 0 in the merge)
            prow = ((sp * B + b) * tl.num_programs(1) + kh).to(tl.int64) * Qn + rows
            some = l_i > 0
            o = acc / tl.where(some, l_i, 1.0)[:, None]
            tl.store(Out + prow[:, None] * E + e[None, :], o, mask=rmask[:, None])
            tl.store(Lse + prow, tl.where(some, m_i + tl.log(tl.where(some, l_i, 1.0)), float("-inf")), mask=rmask)

    @triton.jit(do_not_specialize=["Qn", "B", "splits"])
    def _merge_splits_kernel(Part, PartLse, QLens, Out, Lse, sq_b, sq_k, sq_q, Qn, B, splits, E: tl.constexpr,
                             BLOCK_M: tl.constexpr, HAS_QLENS: tl.constexpr):
        b, kh, mt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < Qn
        if HAS_QLENS:
            rmask = rmask & (rows < tl.load(QLens + b))
        e = tl.arange(0, E)
        base = (b * tl.num_programs(1) + kh).to(tl.int64) * Qn + rows  # row in one split's (B, K, Qn)
        split_rows = B * tl.num_programs(1) * Qn
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for sp in range(splits):
            m = tl.maximum(m, tl.load(PartLse + sp * split_rows + base, mask=rmask, other=float("-inf")))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        acc = tl.zeros([BLOCK_M, E], tl.float32)
        den = tl.zeros([BLOCK_M], tl.float32)
        for sp in range(splits):
            w = tl.exp(tl.load(PartLse + sp * split_rows + base, mask=rmask, other=float("-inf")) - m_safe)
            o = tl.load(Part + (sp * split_rows + base)[:, None] * E + e[None, :], mask=rmask[:, None], other=0.0)
            acc += w[:, None] * o
            den += w
        some = den > 0
        head_off = b * sq_b + kh * sq_k + rows * sq_q
        tl.store(Out + head_off[:, None] + e[None, :], (acc / tl.where(some, den, 1.0)[:, None])
                 .to(Out.dtype.element_ty), mask=rmask[:, None])
        tl.store(Lse + head_off // E, tl.where(some, m_safe + tl.log(tl.where(some, den, 1.0)), float("-inf")),
                 mask=rmask)

    @triton.jit
    def _prefill_attention_kernel(Q, Kc, Vc, Slots, QStart, QLen, CtxLen, KStart, TileChunk, TileRow, Out,
                                  sq_n, sq_h, sc_k, sc_s, G, scale,
                                  E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  PRECISION: tl.constexpr):
        tile, kh = tl.program_id(0), tl.program_id(1)
        c = tl.load(TileChunk + tile)
        rows = tl.load(TileRow + tile) + tl.arange(0, BLOCK_M)  # (token, head within the kv head) pairs
        q0, n, L, k0 = tl.load(QStart + c), tl.load(QLen + c), tl.load(CtxLen + c), tl.load(KStart + c)
        rmask = rows < n * G
        tok = tl.where(rmask, rows // G, 0)
        head = kh * G + rows % G
        limit = L - n + tok  # the last key each row sees (>= 0: key 0 is valid for every row, padding included)
        e = tl.arange(0, E)
        q_off = (q0 + tok).to(tl.int64)[:, None] * sq_n + head[:, None] * sq_h + e[None, :]
        q = tl.load(Q + q_off, mask=rmask[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, E], tl.float32)
        end = tl.max(tl.where(rmask, limit, 0)) + 1  # keys above the tile's last query are never read
        for start in range(0, end, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            tmask = t < end
            slot = tl.load(Slots + k0 + t, mask=tmask, other=0)
            kv_off = kh.to(tl.int64) * sc_k + slot.to(tl.int64)[:, None] * sc_s + e[None, :]
            k = tl.load(Kc + kv_off, mask=tmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_M, BLOCK_N) fp32
            s = tl.where(t[None, :] <= limit[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            v = tl.load(Vc + kv_off, mask=tmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        tl.store(Out + q_off, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=rmask[:, None])
