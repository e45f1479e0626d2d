"""Mechanism: a step's chunks -> one packed forward over the paged KV cache -> sampled tokens.

Tensor code of ``generate`` lives here and in ``kernels.py`` / ``graphs.py``. Every step runs ONE
forward over the flat concatenation of all scheduled tokens (decode tokens first, then prefill
chunks): no padding in the projections and MLPs (the bulk of the FLOPs). Attention goes through the
model's ``attn_meta`` protocol (``StepAttention.attend``), which first writes the step's new K/V
into their cache slots, then:

- decode rows (one query each, the G query heads of a kv head together) attend over their own
  blocks with ``paged_attention`` (Triton on CUDA, reading KV in place; torch gather elsewhere),
  which returns a log-sum-exp. With cascade on, a group's shared prefix is not in the rows: all of
  the group's decoding queries attend to the prefix KV in one call, reading it once per step
  (Hydragen), and the two partial results are merged with their log-sum-exps;
- prefill chunks are bin-packed into rows (Prepacking's worst-fit decreasing on context length),
  each row a block-diagonal causal mask over its chunks' contexts, and run through SDPA. The keys
  are gathered from the cache (a copy; prefill is compute-bound, so it costs little).

Greedy decode-only steps can replay a CUDA graph (``graphs.py``). KV layout: (layers, K, S, E).
Shape legend: N step tokens, D decode rows, H heads, K kv heads, G = H/K, E head dim, L context,
S cache slots (= num_blocks * block_size), R rows, Q queries per row.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from batchpilot.generate.graphs import DecodeGraphs
from batchpilot.generate.kernels import (attend_with_lse, gather_blocks, merge_lse, paged_attention_torch,
                                         paged_attention_triton, triton)
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
    row_pos: torch.Tensor | None = None  # (D,) flat (Gn * M) index of each row's group result, Gn * M = none


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

    @torch.compiler.disable  # a compiled decode graph fuses around this; the Triton launch and its check are Python
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
        kc, vc = self.runner.k_cache[layer_idx], self.runner.v_cache[layer_idx]  # (K, S, E)
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
            out, lse = self.runner.paged_attention(qk, kc, vc, m.tables, m.own_lens)  # (D, K, G, E), (D, K, G)
        else:  # no cascade: [prefix region | own region] per row, torch path
            bs = self.runner.block_size
            k, v = gather_blocks(kc, m.tables, bs), gather_blocks(vc, m.tables, bs)  # (K, D, L, E)
            idx = torch.arange(k.shape[2], device=q.device)[None]  # (1, L)
            pre_end = m.prefix_blocks * bs
            valid = torch.where(idx < pre_end, idx < m.prefix_lens[:, None], idx - pre_end < m.own_lens[:, None])
            out, lse = attend_with_lse(qk, k, v, valid)
        if m.group_tables is None:
            return out.reshape(D, H, E)
        Gn, M = m.group_rows.shape
        qg = torch.cat([qk, qk.new_zeros(1, K, H // K, E)])[m.group_rows]  # (Gn, M, K, G, E)
        qg = qg.transpose(1, 2).reshape(Gn, K, M * (H // K), E)  # all members' queries per kv head
        out_p, lse_p = self.runner.paged_attention(qg, kc, vc, m.group_tables, m.group_lens)
        out_p = out_p.view(Gn, K, M, H // K, E).transpose(1, 2).reshape(Gn * M, K, H // K, E)
        lse_p = lse_p.view(Gn, K, M, H // K).transpose(1, 2).reshape(Gn * M, K, H // K)
        out_p = torch.cat([out_p, out_p.new_zeros(1, K, H // K, E)])  # + "no group": weight exp(-inf) = 0
        lse_p = torch.cat([lse_p, lse_p.new_full((1, K, H // K), float("-inf"))])
        out, _ = merge_lse(out, lse, out_p[m.row_pos], lse_p[m.row_pos])
        return out.reshape(D, H, E)

    def _prefill(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, m: PrefillMeta) -> torch.Tensor:
        Np, H, E = q.shape
        qr = torch.cat([q, q.new_zeros(1, H, E)])[m.q_index].transpose(1, 2)  # (R, H, Q, E)
        G = H // kc.shape[0]  # kv heads repeated: SDPA's fused kernels take a mask but not always GQA
        kr = kc[:, m.k_slots].transpose(0, 1).repeat_interleave(G, dim=1)  # (R, H, Lk, E)
        vr = vc[:, m.k_slots].transpose(0, 1).repeat_interleave(G, dim=1)
        out = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=m.mask)
        return out.transpose(1, 2).reshape(-1, H, E)[m.q_gather]  # (Np, H, E); padded rows dropped


class Runner:
    def __init__(self, model: torch.nn.Module, *, num_blocks: int, block_size: int, cascade: bool = True,
                 use_triton: bool = True, cuda_graphs: bool = True, compile: bool = True, max_num_seqs: int = 1024,
                 trash_block: int = 0) -> None:
        cfg = model.config
        self.model, self.block_size, self.cascade = model, block_size, cascade
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        shape = (cfg.num_layers, cfg.num_kv_heads, num_blocks * block_size, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=p.dtype, device=p.device)  # (layers, K, S, E)
        self.v_cache = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.use_triton = use_triton and triton is not None and p.device.type == "cuda"
        self.triton_verified = False
        self.trash_block = trash_block  # padding rows of a decode batch write their K/V here
        self.graphs = (DecodeGraphs(self, max_rows=max_num_seqs, compile=compile)
                       if cuda_graphs and self.use_triton else None)

    def begin_job(self, max_tokens: int) -> None:
        """Size static decode buffers for a job whose longest request holds ``max_tokens`` tokens."""
        if self.graphs is not None:
            self.graphs.begin_job(max_tokens)

    def paged_attention(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, tables: torch.Tensor,
                        lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Triton kernel once it has matched the torch path on a real call; the torch path otherwise."""
        if self.use_triton:
            try:
                out = paged_attention_triton(q, kc, vc, tables, lens, self.block_size)
                if not self.triton_verified:  # once: against an fp32 torch reference on a few rows
                    ref = paged_attention_torch(q[:8].float(), kc, vc, tables[:8], lens[:8], self.block_size)
                    for got, want in zip(out, ref):
                        if not torch.allclose(got[:8].float(), want, atol=2e-2, rtol=2e-2):
                            err = (got[:8].float() - want).abs().max().item()
                            raise RuntimeError(f"differs from the torch reference by {err:.3g}")
                    self.triton_verified = True
                return out
            except Exception as e:  # compile/launch errors come in many types: any of them -> torch path
                warnings.warn(f"Triton paged attention disabled, using the torch path: {e}", stacklevel=2)
                self.use_triton = False
        return paged_attention_torch(q, kc, vc, tables, lens, self.block_size)

    def graphs_usable(self, chunks: list[Chunk]) -> bool:
        return self.graphs is not None and all(c.decode for c in chunks) and self.graphs.usable(chunks)

    @torch.inference_mode()
    def step(self, chunks: list[Chunk], *, seed: int, steps: int = 1) -> list[list[int]]:
        """Run the chunks; the sampled tokens of each chunk with ``sample`` set, in chunk order.

        ``steps`` > 1 (greedy decode-only batches on CUDA graphs, blocks reserved by the caller): that
        many consecutive decode steps, so each list holds up to ``steps`` tokens.
        """
        if self.graphs_usable(chunks):
            return self.graphs.run(chunks, lambda: self._eager_step(chunks, seed), steps=steps)
        return [[t] for t in self._eager_step(chunks, seed)[0]]

    def _eager_step(self, chunks: list[Chunk], seed: int) -> tuple[list[int], torch.Tensor | None]:
        """Sampled tokens in chunk order, and the (sampled chunks, V) logits they came from."""
        dec = [c for c in chunks if c.num_tokens == 1]
        pre = [c for c in chunks if c.num_tokens > 1]
        ids, pos, slots, last = self._flatten(dec + pre)
        meta = StepAttention(self, self._tensor(slots), self._decode_meta(dec) if dec else None,
                             self._prefill_meta(pre) if pre else None)
        hidden = self.model.hidden_states(self._tensor(ids)[None], position_ids=self._tensor(pos)[None],
                                          attn_meta=meta)  # (1, N, D)
        sampled = [c for c in chunks if c.sample]
        if not sampled:
            return [], None
        logits = self.model.lm_head(hidden[0, self._tensor([last[id(c)] for c in sampled])])  # (R, V)
        return self._sample(logits, [c.request for c in sampled], seed).tolist(), logits

    def _tensor(self, values: list, dtype: type = np.int64) -> torch.Tensor:
        """Host list -> device tensor (through numpy: several times faster than torch.tensor on lists)."""
        return torch.from_numpy(np.asarray(values, dtype=dtype)).to(self.device, non_blocking=True)

    def _flatten(self, chunks: list[Chunk]) -> tuple[list[int], list[int], list[int], dict[int, int]]:
        """Token ids, positions, cache slots of the step's tokens; flat index of each chunk's last token."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        last: dict[int, int] = {}
        for c in chunks:
            r, j = c.request, c.start
            lo = r.prefix_len + j
            if c.num_tokens == 1:  # decode: the common case, kept cheap
                ids.append(r.token_at(j))
                pos.append(lo)
                slots.append(r.blocks[j // bs] * bs + j % bs)
            else:
                ids += (r.prompt_ids + r.output_ids)[lo:lo + c.num_tokens]
                pos += range(lo, lo + c.num_tokens)
                slots += [r.blocks[i // bs] * bs + i % bs for i in range(j, j + c.num_tokens)]
            last[id(c)] = len(ids) - 1
        return ids, pos, slots, last

    def decode_arrays(self, dec: list[Chunk], *, rows: int = 0, width: int = 0, groups: int = 0) -> dict:
        """Host arrays of a decode batch, optionally padded to ``rows`` x ``width`` blocks and ``groups``.

        Padding rows attend to one token of the trash block and write their K/V there.
        """
        reqs = [c.request for c in dec]
        D = len(reqs)
        rows = max(rows, D)
        inline = not self.cascade and any(r.prefix_len > 0 for r in reqs)  # each row holds its prefix too
        pre = [r.group.prefix.blocks if r.prefix_len > 0 else [] for r in reqs] if inline else []
        pb = max(map(len, pre)) if inline else 0
        width = max(width, pb + max(len(r.blocks) for r in reqs))
        a = {"tables": np.full((rows, width), self.trash_block, dtype=np.int64), "prefix_blocks": pb,
             "prefix_lens": np.zeros(rows, dtype=np.int64), "own_lens": np.ones(rows, dtype=np.int64)}
        for i, r in enumerate(reqs):
            a["tables"][i, pb:pb + len(r.blocks)] = r.blocks
            a["own_lens"][i] = dec[i].start + 1
            if inline and pre[i]:
                a["tables"][i, :len(pre[i])] = pre[i]
                a["prefix_lens"][i] = r.prefix_len
        if self.cascade and (groups or any(r.prefix_len > 0 for r in reqs)):
            self._group_arrays(a, reqs, rows, groups)
        return a

    def _group_arrays(self, a: dict, reqs: list[Request], rows: int, groups: int) -> None:
        """Cascade: each group's prefix blocks and member rows; ``row_pos`` = row -> flat (group, member) index."""
        members: dict[int, list[int]] = {}
        by_id = {}
        for i, r in enumerate(reqs):
            if r.prefix_len > 0:
                members.setdefault(id(r.group), []).append(i)
                by_id[id(r.group)] = r.group
        Gn = max(groups, len(members))
        M = rows if groups else max(map(len, members.values()))
        width = max([len(g.prefix.blocks) for g in by_id.values()] + [a["tables"].shape[1] if groups else 1])
        a["group_tables"] = np.full((Gn, width), self.trash_block, dtype=np.int64)
        a["group_lens"] = np.zeros(Gn, dtype=np.int64)
        a["group_rows"] = np.full((Gn, M), rows, dtype=np.int64)  # `rows` indexes the zero query
        a["row_pos"] = np.full(rows, Gn * M, dtype=np.int64)  # Gn * M indexes the empty partial result
        for gi, (key, rs) in enumerate(members.items()):
            g = by_id[key]
            a["group_tables"][gi, :len(g.prefix.blocks)] = g.prefix.blocks
            a["group_lens"][gi] = len(g.prefix.prompt_ids)
            a["group_rows"][gi, :len(rs)] = rs
            a["row_pos"][rs] = gi * M + np.arange(len(rs))

    def _decode_meta(self, dec: list[Chunk]) -> DecodeMeta:
        a = self.decode_arrays(dec)
        groups = {k: self._tensor(a[k]) for k in ("group_tables", "group_lens", "group_rows", "row_pos") if k in a}
        return DecodeMeta(self._tensor(a["tables"]), self._tensor(a["prefix_lens"]), self._tensor(a["own_lens"]),
                          a["prefix_blocks"], **groups)

    def _prefill_meta(self, pre: list[Chunk]) -> PrefillMeta:
        """Chunks bin-packed into rows by context length; each row is a block-diagonal causal mask."""
        bs = self.block_size
        ctx = [c.request.prefix_len + c.start + c.num_tokens for c in pre]
        rows = pack_worst_fit_decreasing(ctx, max(ctx))
        q_off = np.cumsum([0] + [c.num_tokens for c in pre])
        Np, R = int(q_off[-1]), len(rows)
        Q = max(sum(pre[ci].num_tokens for ci in row) for row in rows)
        Lk = -(-max(sum(ctx[ci] for ci in row) for row in rows) // 16) * 16  # aligned mask rows for fused SDPA
        q_index, gather = np.full((R, Q), Np), np.zeros(Np, dtype=np.int64)
        qd, qp = np.full((R, Q), -1), np.zeros((R, Q), dtype=np.int64)  # chunk id / position of each query
        kd, kp = np.full((R, Lk), -2), np.zeros((R, Lk), dtype=np.int64)  # ... and of each key
        k_slots = np.zeros((R, Lk), dtype=np.int64)
        for ri, row in enumerate(rows):
            qo = ko = 0
            for ci in row:
                n, L, q0 = pre[ci].num_tokens, ctx[ci], int(q_off[ci])
                q_index[ri, qo:qo + n] = np.arange(q0, q0 + n)
                gather[q0:q0 + n] = ri * Q + qo + np.arange(n)
                qd[ri, qo:qo + n], qp[ri, qo:qo + n] = ci, np.arange(L - n, L)
                kd[ri, ko:ko + L], kp[ri, ko:ko + L] = ci, np.arange(L)
                k_slots[ri, ko:ko + L] = _context_slots(pre[ci].request, L, bs)
                qo, ko = qo + n, ko + L
        qd_t, kd_t, qp_t, kp_t = (self._tensor(x) for x in (qd, kd, qp, kp))
        mask = (qd_t[:, :, None] == kd_t[:, None, :]) & (kp_t[:, None, :] <= qp_t[:, :, None])  # (R, Q, Lk)
        return PrefillMeta(self._tensor(q_index), self._tensor(gather), self._tensor(k_slots), mask[:, None])

    def _sample(self, logits: torch.Tensor, reqs: list[Request], seed: int) -> torch.Tensor:
        ps = [r.params for r in reqs]
        if all(p.temperature == 0 for p in ps):  # all greedy: skip building the per-request parameter tensors
            return logits.argmax(dim=-1)
        return sample(
            logits,
            temperature=self._tensor([p.temperature for p in ps], np.float32),
            top_k=self._tensor([p.top_k for p in ps]),
            top_p=self._tensor([p.top_p for p in ps], np.float32),
            seeds=self._tensor([seed * 1_000_003 + r.index if p.seed is None else p.seed for p, r in zip(ps, reqs)]),
            steps=self._tensor([len(r.output_ids) for r in reqs]),
            any_random=True,
            any_filter=any(p.top_k > 0 or p.top_p < 1 for p in ps),
        )


def _context_slots(r: Request, n: int, bs: int) -> np.ndarray:
    """Cache slots of r's first n tokens: the group prefix blocks, then its own blocks."""
    p = r.prefix_len
    own = _block_slots(r.blocks, bs)[:n - p]
    if p == 0:
        return own
    return np.concatenate([_block_slots(r.group.prefix.blocks, bs)[:min(p, n)], own])


def _block_slots(blocks: list[int], bs: int) -> np.ndarray:
    return (np.asarray(blocks, dtype=np.int64)[:, None] * bs + np.arange(bs)).ravel()
