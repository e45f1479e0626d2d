"""Mechanism: a step's chunks -> one packed forward over the paged KV cache -> sampled tokens.

The only tensor code of ``generate``. Every step runs ONE forward over the flat concatenation of
all scheduled tokens (decode tokens first, then prefill chunks): no padding in the projections and
MLPs (the bulk of the FLOPs). Attention goes through the model's ``attn_meta`` protocol
(``StepAttention.attend``), which first writes the step's new K/V into their cache slots, then:

- decode rows (one query each) gather their context KV block by block and attend in fp32 with an
  explicit log-sum-exp. With cascade on, a group's shared prefix is *not* in the rows: all of the
  group's decoding queries attend to the prefix KV together, read once per step (Hydragen), and
  the two partial results are merged with their log-sum-exps;
- prefill chunks are bin-packed into rows (Prepacking's worst-fit decreasing on context length),
  each row a block-diagonal causal mask over its chunks' contexts, and run through SDPA.

Cost of this design: context KV is gathered (copied) per step instead of read in place by a paged
kernel; a FlexAttention/Triton paged kernel would remove the copy (see docs/generate.md).
Shape legend: N step tokens, D decode rows, H heads, K kv heads, G = H/K, E head dim, L context,
S cache slots (= num_blocks * block_size), R rows, Q queries per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchpilot.generate.request import Request
from batchpilot.generate.sampling import sample
from batchpilot.generate.scheduler import Chunk, pack_worst_fit_decreasing


@dataclass(slots=True)
class DecodeMeta:
    tables: torch.Tensor  # (D, Pb + Ob) block ids: [prefix region | own region], padded with 0
    prefix_lens: torch.Tensor  # (D,) prefix tokens in the row's own table (0 with cascade)
    own_lens: torch.Tensor  # (D,)
    prefix_blocks: int  # Pb
    group_tables: torch.Tensor | None = None  # (Gn, Gb) cascade: each group's prefix blocks
    group_lens: torch.Tensor | None = None  # (Gn,)
    group_rows: torch.Tensor | None = None  # (Gn, M) decode row of each member, D = padding
    member_rows: torch.Tensor | None = None  # (n,) decode rows that have a group ...
    member_pos: torch.Tensor | None = None  # (n,) ... and their flat index into (Gn * M)


@dataclass(slots=True)
class PrefillMeta:
    q_index: torch.Tensor  # (R, Q) index into the step's prefill queries, Np = padding
    q_gather: torch.Tensor  # (Np,) flat (R * Q) position of each prefill query
    k_slots: torch.Tensor  # (R, Lk) cache slots of the keys, 0 = padding
    mask: torch.Tensor  # (R, 1, Q, Lk) bool


class StepAttention:
    """``attn_meta`` for one step: write new K/V to the cache, then paged attention (decode + prefill)."""

    def __init__(self, runner: Runner, slot_mapping: torch.Tensor, decode: DecodeMeta | None,
                 prefill: PrefillMeta | None) -> None:
        self.runner, self.slot_mapping, self.decode, self.prefill = runner, slot_mapping, decode, prefill

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
        kc, vc = self.runner.k_cache[layer_idx], self.runner.v_cache[layer_idx]  # (S, K, E)
        kc[self.slot_mapping] = k[0].transpose(0, 1)  # (N, K, E)
        vc[self.slot_mapping] = v[0].transpose(0, 1)
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
        bs = self.runner.block_size
        D, H, E = q.shape
        K = kc.shape[1]
        k = kc.view(-1, bs, K, E)[m.tables].flatten(1, 2)  # (D, L, K, E)
        v = vc.view(-1, bs, K, E)[m.tables].flatten(1, 2)
        idx = torch.arange(k.shape[1], device=q.device)[None]  # (1, L)
        pre_end = m.prefix_blocks * bs
        valid = torch.where(idx < pre_end, idx < m.prefix_lens[:, None], idx - pre_end < m.own_lens[:, None])
        out, lse = attend_with_lse(q.view(D, K, H // K, E), k, v, valid)  # (D, K, G, E), (D, K, G)
        if m.group_tables is None:
            return out.view(D, H, E)
        Gn, M = m.group_rows.shape
        kp = kc.view(-1, bs, K, E)[m.group_tables].flatten(1, 2)  # (Gn, Lp, K, E)
        vp = vc.view(-1, bs, K, E)[m.group_tables].flatten(1, 2)
        qg = torch.cat([q, q.new_zeros(1, H, E)])[m.group_rows]  # (Gn, M, H, E)
        qg = qg.view(Gn, M, K, H // K, E).transpose(1, 2).reshape(Gn, K, M * (H // K), E)  # members' queries
        valid_p = torch.arange(kp.shape[1], device=q.device)[None] < m.group_lens[:, None]  # (Gn, Lp)
        out_p, lse_p = attend_with_lse(qg, kp, vp, valid_p)  # (Gn, K, M*G, E), (Gn, K, M*G)
        out_p = out_p.view(Gn, K, M, H // K, E).transpose(1, 2).reshape(Gn * M, K, H // K, E)
        lse_p = lse_p.view(Gn, K, M, H // K).transpose(1, 2).reshape(Gn * M, K, H // K)
        rows, pos = m.member_rows, m.member_pos
        out_m, lse_m = merge_lse(out[rows], lse[rows], out_p[pos], lse_p[pos])
        out = out.index_copy(0, rows, out_m)
        return out.view(D, H, E)

    def _prefill(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, m: PrefillMeta) -> torch.Tensor:
        Np, H, E = q.shape
        qr = torch.cat([q, q.new_zeros(1, H, E)])[m.q_index].transpose(1, 2)  # (R, H, Q, E)
        kr = kc[m.k_slots].transpose(1, 2)  # (R, K, Lk, E)
        vr = vc[m.k_slots].transpose(1, 2)
        out = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=m.mask, enable_gqa=kr.shape[1] != H)
        return out.transpose(1, 2).reshape(-1, H, E)[m.q_gather]  # (Np, H, E); padded rows dropped


def attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, K, Q, E) over k/v (B, L, K, E) where valid (B, L); softmax in fp32.

    Returns out (B, K, Q, E) and the log-sum-exp of the scores (B, K, Q) for merging partial results.
    """
    scores = torch.einsum("bkqe,blke->bkql", q, k).float() * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = scores.logsumexp(dim=-1)  # (B, K, Q)
    probs = (scores - lse[..., None]).exp().to(v.dtype)
    return torch.einsum("bkql,blke->bkqe", probs, v), lse


def merge_lse(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
              lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets from their outputs and log-sum-exps."""
    lse = torch.logaddexp(lse1, lse2)
    w1, w2 = (lse1 - lse).exp()[..., None], (lse2 - lse).exp()[..., None]
    return (o1.float() * w1 + o2.float() * w2).to(o1.dtype), lse


class Runner:
    def __init__(self, model: torch.nn.Module, *, num_blocks: int, block_size: int, cascade: bool = True) -> None:
        cfg = model.config
        self.model, self.block_size, self.cascade = model, block_size, cascade
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        shape = (cfg.num_layers, num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=p.dtype, device=p.device)  # (layers, S, K, E)
        self.v_cache = torch.zeros(shape, dtype=p.dtype, device=p.device)

    @torch.inference_mode()
    def step(self, chunks: list[Chunk], *, seed: int) -> list[int]:
        """Run the chunks; return the sampled token of each chunk with ``sample`` set, in chunk order."""
        dec = [c for c in chunks if c.num_tokens == 1]
        pre = [c for c in chunks if c.num_tokens > 1]
        ids, pos, slots, last = self._flatten(dec + pre)
        meta = StepAttention(self, self._tensor(slots), self._decode_meta(dec) if dec else None,
                             self._prefill_meta(pre) if pre else None)
        hidden = self.model.hidden_states(self._tensor(ids)[None], position_ids=self._tensor(pos)[None],
                                          attn_meta=meta)  # (1, N, D)
        sampled = [c for c in dec + pre if c.sample]
        if not sampled:
            return []
        logits = self.model.lm_head(hidden[0, self._tensor([last[id(c)] for c in sampled])])  # (R, V)
        tokens = self._sample(logits, [c.request for c in sampled], seed).tolist()
        by_chunk = {id(c): t for c, t in zip(sampled, tokens)}
        return [by_chunk[id(c)] for c in chunks if c.sample]

    def _tensor(self, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _flatten(self, chunks: list[Chunk]) -> tuple[list[int], list[int], list[int], dict[int, int]]:
        """Token ids, positions, cache slots of the step's tokens; flat index of each chunk's last token."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        last: dict[int, int] = {}
        for c in chunks:
            r = c.request
            lo = r.prefix_len + c.start
            ids += (r.prompt_ids + r.output_ids)[lo:lo + c.num_tokens]
            pos += range(lo, lo + c.num_tokens)
            slots += [r.blocks[j // bs] * bs + j % bs for j in range(c.start, c.start + c.num_tokens)]
            last[id(c)] = len(ids) - 1
        return ids, pos, slots, last

    def _decode_meta(self, dec: list[Chunk]) -> DecodeMeta:
        reqs = [c.request for c in dec]
        own_lens = [c.start + 1 for c in dec]
        grouped = [r for r in reqs if r.group is not None]
        inline = set() if self.cascade else {id(r) for r in grouped}  # no cascade: prefix blocks in each row
        pre_tables = [r.group.prefix.blocks if id(r) in inline else [] for r in reqs]
        pb = max(map(len, pre_tables))
        ob = max(len(r.blocks) for r in reqs)
        tables = [_pad(p, pb) + _pad(r.blocks, ob) for p, r in zip(pre_tables, reqs)]
        pre_lens = [r.prefix_len if id(r) in inline else 0 for r in reqs]
        meta = DecodeMeta(self._tensor(tables), self._tensor(pre_lens), self._tensor(own_lens), pb)
        if self.cascade and grouped:
            self._add_groups(meta, reqs)
        return meta

    def _add_groups(self, meta: DecodeMeta, reqs: list[Request]) -> None:
        rows_of: dict[int, list[int]] = {}
        groups = {}
        for i, r in enumerate(reqs):
            if r.group is not None:
                rows_of.setdefault(id(r.group), []).append(i)
                groups[id(r.group)] = r.group
        gb = max(len(g.prefix.blocks) for g in groups.values())
        width = max(map(len, rows_of.values()))
        meta.group_tables = self._tensor([_pad(g.prefix.blocks, gb) for g in groups.values()])
        meta.group_lens = self._tensor([len(g.prefix.prompt_ids) for g in groups.values()])
        meta.group_rows = self._tensor([_pad(rows, width, len(reqs)) for rows in rows_of.values()])
        flat = [(row, gi * width + j) for gi, rows in enumerate(rows_of.values()) for j, row in enumerate(rows)]
        meta.member_rows = self._tensor([row for row, _ in flat])
        meta.member_pos = self._tensor([p for _, p in flat])

    def _prefill_meta(self, pre: list[Chunk]) -> PrefillMeta:
        bs = self.block_size
        ctx = [c.request.prefix_len + c.start + c.num_tokens for c in pre]
        rows = pack_worst_fit_decreasing(ctx, max(ctx))
        q_offsets = [0]
        for c in pre:
            q_offsets.append(q_offsets[-1] + c.num_tokens)
        q_rows, k_rows, qd, kd, qp, kp = [], [], [], [], [], []
        for row in rows:
            q_rows.append([i for ci in row for i in range(q_offsets[ci], q_offsets[ci + 1])])
            k_rows.append([s for ci in row for s in _context_slots(pre[ci].request, ctx[ci], bs)])
            qd.append([ci for ci in row for _ in range(pre[ci].num_tokens)])
            kd.append([ci for ci in row for _ in range(ctx[ci])])
            qp.append([p for ci in row for p in range(ctx[ci] - pre[ci].num_tokens, ctx[ci])])
            kp.append([p for ci in row for p in range(ctx[ci])])
        Q, Lk, Np = max(map(len, q_rows)), max(map(len, k_rows)), q_offsets[-1]
        qd_t, kd_t = self._tensor([_pad(x, Q, -1) for x in qd]), self._tensor([_pad(x, Lk, -2) for x in kd])
        qp_t, kp_t = self._tensor([_pad(x, Q) for x in qp]), self._tensor([_pad(x, Lk) for x in kp])
        mask = (qd_t[:, :, None] == kd_t[:, None, :]) & (kp_t[:, None, :] <= qp_t[:, :, None])  # (R, Q, Lk)
        gather = [0] * Np
        for ri, qs in enumerate(q_rows):
            for j, qi in enumerate(qs):
                gather[qi] = ri * Q + j
        return PrefillMeta(self._tensor([_pad(x, Q, Np) for x in q_rows]), self._tensor(gather),
                           self._tensor([_pad(x, Lk) for x in k_rows]), mask[:, None])

    def _sample(self, logits: torch.Tensor, reqs: list[Request], seed: int) -> torch.Tensor:
        ps = [r.params for r in reqs]
        any_random = any(p.temperature > 0 for p in ps)
        return sample(
            logits,
            temperature=self._tensor([p.temperature for p in ps], torch.float32),
            top_k=self._tensor([p.top_k for p in ps]),
            top_p=self._tensor([p.top_p for p in ps], torch.float32),
            seeds=self._tensor([p.seed if p.seed is not None else seed * 1_000_003 + r.index for p, r in zip(ps, reqs)]),
            steps=self._tensor([len(r.output_ids) for r in reqs]),
            any_random=any_random,
            any_filter=any_random and any(p.top_k > 0 or p.top_p < 1 for p in ps),
        )


def _pad(values: list[int], n: int, fill: int = 0) -> list[int]:
    return values + [fill] * (n - len(values))


def _context_slots(r: Request, n: int, bs: int) -> list[int]:
    """Cache slots of r's first n tokens: the group prefix blocks, then its own blocks."""
    pre = r.group.prefix.blocks if r.group is not None and not r.is_prefix else []
    p = r.prefix_len
    return ([pre[i // bs] * bs + i % bs for i in range(min(p, n))]
            + [r.blocks[j // bs] * bs + j % bs for j in range(n - p)])
