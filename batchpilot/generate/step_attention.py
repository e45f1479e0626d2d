"""Attention metadata of one engine step (``DecodeMeta``, ``PrefillMeta``) and the ``attn_meta`` that uses it.

``StepAttention`` is what the model's ``attn_meta`` protocol calls: it writes the step's new K/V into
their cache slots, then runs

- decode rows (one query each, the G query heads of a kv head together) over their own blocks with
  a paged-attention function that returns a log-sum-exp. With cascade on, a group's shared prefix is
  not in the rows: all of the group's decoding queries attend to the prefix KV in one call, reading it
  once per step (Hydragen, Juravsky et al. 2024, arXiv 2402.05099, section 3), and the two partial
  results are merged with their log-sum-exps;
- prefill chunks: on CUDA with Triton, the paged prefill kernel over each chunk's context in place
  (``kernels.prefill_attention``, metadata ``kernels.PrefillChunks``); otherwise chunks bin-packed into
  rows, each row a block-diagonal causal mask over its chunks' contexts (Prepacking, Zhao et al. 2024,
  arXiv 2404.09529), through SDPA, with the keys gathered from the cache (a copy).

It receives everything it reads explicitly (the KV tensors, the paged-attention function, the block
size); it never reads the runner. KV layout: (layers, K, S, E). Shape legend: N step tokens, D decode
rows, H heads, K kv heads, G = H/K, E head dim, L context, S cache slots, R rows, Q queries per row.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchpilot.generate.kernels import PrefillChunks, attend_with_lse, gather_blocks, merge_lse

# (q (B, K, Qn, E), k_cache (K, S, E), v_cache, tables (B, nb), lens (B,), q_lens (B,) or None, q_rows or None)
#   -> (out (B, K, Qn, E), lse (B, K, Qn)); with q_lens, query rows >= q_lens[b] are padding: their results are
#   unspecified and never read. q_rows (B, M): cascade groups, sequence b's queries are the G heads of the decode
#   rows q_rows[b] of q (D, K, G, E), and out/lse come back in q's rows (kernels.paged_attention_torch)
PagedAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                           torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]
# (q (Np, H, E), k_cache (K, S, E), v_cache, chunks) -> (Np, H, E)
PrefillAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PrefillChunks], torch.Tensor]


@dataclass(slots=True)
class DecodeMeta:
    tables: torch.Tensor  # (D, Pb + Ob) block ids: [prefix region | own region], padded
    prefix_lens: torch.Tensor  # (D,) prefix tokens in the row's own table (0 with cascade)
    own_lens: torch.Tensor  # (D,)
    prefix_blocks: int  # Pb
    group_tables: torch.Tensor | None = None  # (Gn, Gb) cascade: each group's prefix blocks
    group_lens: torch.Tensor | None = None  # (Gn,)
    group_rows: torch.Tensor | None = None  # (Gn, M) decode row of each member, D = padding
    group_sizes: torch.Tensor | None = None  # (Gn,) members of each group: the kernel skips the padded slots


@dataclass(slots=True)
class PrefillMeta:
    q_index: torch.Tensor  # (R, Q) index into the step's prefill queries, Np = padding
    q_gather: torch.Tensor  # (Np,) flat (R * Q) position of each prefill query
    k_slots: torch.Tensor  # (R, Lk) cache slots of the keys, 0 = padding
    mask: torch.Tensor  # (R, 1, Q, Lk) bool


@dataclass(slots=True)
class KVCache:
    """The engine's paged KV tensors, (layers, K, S, E) each; S = num_blocks * block_size slots."""

    k: torch.Tensor
    v: torch.Tensor
    block_size: int


class StepAttention:
    """``attn_meta`` for one step: write new K/V to the cache, then paged attention (decode + prefill)."""

    def __init__(self, kv: KVCache, paged_attention: PagedAttention, slot_mapping: torch.Tensor,
                 decode: DecodeMeta | None, prefill: PrefillMeta | PrefillChunks | None,
                 prefill_attention: PrefillAttention | None = None) -> None:
        self.kv, self.paged_attention, self.prefill_attention = kv, paged_attention, prefill_attention
        self.slot_mapping, self.decode, self.prefill = slot_mapping, decode, prefill

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
        kc, vc = self.kv.k[layer_idx], self.kv.v[layer_idx]  # (K, S, E)
        kc[:, self.slot_mapping] = k[0]  # (K, N, E)
        vc[:, self.slot_mapping] = v[0]
        q = q[0].transpose(0, 1)  # (N, H, E)
        parts = []
        num_decode = 0
        if self.decode is not None:
            num_decode = self.decode.own_lens.shape[0]
            parts.append(self._decode(q[:num_decode], kc, vc, self.decode))
        if self.prefill is not None:
            parts.append(self._prefill(q[num_decode:], kc, vc, self.prefill))
        return torch.cat(parts).transpose(0, 1)[None]  # (1, H, N, E)

    def _decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, m: DecodeMeta) -> torch.Tensor:
        D, H, E = q.shape
        K = kc.shape[0]
        qk = q.view(D, K, H // K, E)  # query heads grouped by the kv head they share
        if m.prefix_blocks == 0:
            out, lse = self.paged_attention(qk, kc, vc, m.tables, m.own_lens, None, None)  # (D, K, G, E), (D, K, G)
        else:  # no cascade: [prefix region | own region] per row, torch path
            bs = self.kv.block_size
            k, v = gather_blocks(kc, m.tables, bs), gather_blocks(vc, m.tables, bs)  # (K, D, L, E)
            idx = torch.arange(k.shape[2], device=q.device)[None]  # (1, L)
            pre_end = m.prefix_blocks * bs
            valid = torch.where(idx < pre_end, idx < m.prefix_lens[:, None], idx - pre_end < m.own_lens[:, None])
            out, lse = attend_with_lse(qk, k, v, valid)
        if m.group_tables is None:
            return out.reshape(D, H, E)
        assert m.group_rows is not None and m.group_lens is not None and m.group_sizes is not None  # with the tables
        # each group's members' queries over its prefix, in their own rows (rows in no group: weight exp(-inf) = 0)
        out_p, lse_p = self.paged_attention(qk, kc, vc, m.group_tables, m.group_lens, m.group_sizes * (H // K),
                                            m.group_rows)  # (D, K, G, E), (D, K, G)
        out, _ = merge_lse(out, lse, out_p, lse_p)
        return out.reshape(D, H, E)

    def _prefill(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                 m: PrefillMeta | PrefillChunks) -> torch.Tensor:
        if isinstance(m, PrefillChunks):
            assert self.prefill_attention is not None  # the runner passes it with chunk metadata
            return self.prefill_attention(q, kc, vc, m)
        Np, H, E = q.shape
        qr = torch.cat([q, q.new_zeros(1, H, E)])[m.q_index].transpose(1, 2)  # (R, H, Q, E)
        G = H // kc.shape[0]  # kv heads repeated: SDPA's fused kernels take a mask but not always GQA
        kr = kc[:, m.k_slots].transpose(0, 1).repeat_interleave(G, dim=1)  # (R, H, Lk, E)
        vr = vc[:, m.k_slots].transpose(0, 1).repeat_interleave(G, dim=1)
        out = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=m.mask)
        return out.transpose(1, 2).reshape(-1, H, E)[m.q_gather]  # (Np, H, E); padded rows dropped


@functools.cache
def opaque_step_attention() -> type[StepAttention]:
    """``StepAttention`` whose ``attend`` dynamo does not trace: what compiled forwards get. A compiled forward fuses
    around the attention; the Triton launches and their checks are Python. Built on first use, because importing
    dynamo (what ``torch.compiler.disable`` does) costs seconds of a job's start that an eager job need not pay."""

    class OpaqueStepAttention(StepAttention):
        attend = torch.compiler.disable(StepAttention.attend)

    return OpaqueStepAttention
