"""Mechanism: a step's chunks -> one packed forward over the paged KV cache -> sampled tokens (and logprobs).

The runner owns the KV tensors. Every step runs ONE forward over the flat concatenation of all
scheduled tokens (decode tokens first, then prefill chunks): no padding in the projections and MLPs
(the bulk of the FLOPs). The step's arrays come from ``batch.py`` (host-side assembly), its
attention from ``step_attention.py``; greedy decode-only steps can replay a CUDA graph
(``graphs.py``), to which the runner hands what it needs explicitly (the model, the KV tensors, the
paged-attention function). Every other step (prefill chunks, logprobs, batches beyond the graphs' sizes) runs
eagerly; compiling that forward (dynamic in the step's tokens) was measured no faster on one H200 (llama-1b,
2,048-token mixed steps: 14.8 ms eager, 15.8 ms compiled; a 256-token prefill 10 vs 12 ms) and cost 15 s of compile.

Logits are computed only where they are used: the last token of a chunk that samples, and every
position of a chunk whose request asked for prompt logprobs (never (T, V) for a whole prompt
otherwise). Sampled tokens come from processed logits (penalties, logit_bias, min_tokens; see
``sampling.penalise``); output logprobs are the log-softmax of those processed logits at temperature 1
(vLLM's "processed logprobs"), prompt logprobs the log-softmax of the model's own logits.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from batchpilot.generate.batch import decode_arrays, flatten, prefill_arrays, prefill_chunk_arrays
from batchpilot.generate.graphs import REUSE_FIRST_USES, DecodeGraphs
from batchpilot.generate.kernels import (PrefillChunks, paged_attention_torch, paged_attention_triton,
                                         prefill_attention_torch, prefill_attention_triton, triton)
from batchpilot.generate.request import Request, TokenLogprob
from batchpilot.generate.sampling import penalise, sample, token_logprobs
from batchpilot.generate.scheduler import Chunk
from batchpilot.generate.step_attention import DecodeMeta, KVCache, PrefillMeta, StepAttention
from batchpilot.model.llama import Llama


@dataclass(slots=True)
class ChunkOutput:
    tokens: list[int]  # sampled tokens (several on a multi-step decode); empty unless the chunk samples
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for them
    prompt_logprobs: dict[int, TokenLogprob] | None = None  # prompt position -> logprob of its token
    last_logprobs: torch.Tensor | None = None  # a group prefix's (V,) log-probs at its last position


# cascade groups a decode graph takes: a real job's batch spans many shared prefixes (the job benchmark: 8 system
# prompts x 6 few-shot blocks), and a batch with more groups than this decodes eagerly (issue 15). The
# padded member slots of a group cost no attention work (the kernel skips them), only the query gather.
MAX_GRAPH_GROUPS = 64


class Runner:
    def __init__(self, model: Llama, *, num_blocks: int, block_size: int, cascade: bool = True,
                 use_triton: bool = True, cuda_graphs: bool = True, compile: bool = True, max_num_seqs: int = 1024,
                 trash_block: int = 0) -> None:
        cfg = model.config
        self.model, self.block_size, self.cascade = model, block_size, cascade
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        shape = (cfg.num_layers, cfg.num_kv_heads, num_blocks * block_size, cfg.head_dim)
        self.kv = KVCache(torch.zeros(shape, dtype=p.dtype, device=p.device),  # (layers, K, S, E)
                          torch.zeros(shape, dtype=p.dtype, device=p.device), block_size)
        # shared with the decode graphs: it holds no reference back to the runner, so dropping an engine frees
        # its KV cache at once (a runner <-> graphs cycle kept it until the next garbage collection)
        self.paged_attention = CheckedPagedAttention(
            block_size, use_triton=use_triton and triton is not None and p.device.type == "cuda")
        self.trash_block = trash_block  # padding rows of a decode batch write their K/V here
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and self.use_triton:
            self.attach_graphs(max_rows=max_num_seqs, compile=compile)

    def attach_graphs(self, *, max_rows: int, max_groups: int = MAX_GRAPH_GROUPS, capture: bool = True,
                      compile: bool = False, reuse_first_uses: int = REUSE_FIRST_USES) -> DecodeGraphs:
        """Decode graphs over this runner's cache (``capture=False``: the same static buffers run eagerly, CPU)."""
        self.graphs = DecodeGraphs(self.model, self.kv, self.paged_attention, trash_block=self.trash_block,
                                   cascade=self.cascade, max_rows=max_rows, max_groups=max_groups,
                                   capture=capture, compile=compile, reuse_first_uses=reuse_first_uses)
        return self.graphs

    def begin_job(self, max_tokens: int) -> None:
        """Size static decode buffers for a job whose longest request holds ``max_tokens`` tokens."""
        if self.graphs is not None:
            self.graphs.begin_job(max_tokens)

    @property
    def use_triton(self) -> bool:
        return self.paged_attention.use_triton

    @property
    def triton_verified(self) -> bool:
        return self.paged_attention.verified

    def graphs_usable(self, chunks: list[Chunk]) -> bool:
        g = self.graphs
        return (g is not None and g.enabled and (self.triton_verified or not g.capture)
                and all(c.decode and _plain(c.request) for c in chunks) and g.fits(chunks))

    @torch.inference_mode()
    def step(self, chunks: list[Chunk], *, steps: int = 1, eos_ids: frozenset[int] = frozenset(),
             stop: Callable[[], bool] | None = None) -> list[ChunkOutput]:
        """Run the chunks; one output per chunk, in chunk order (tokens only for chunks with ``sample`` set).

        ``steps`` > 1 (greedy decode-only batches on CUDA graphs, blocks reserved by the caller): that
        many consecutive decode steps, so each token list holds up to ``steps`` tokens.
        """
        if self.graphs_usable(chunks):
            def eager() -> tuple[list[int], torch.Tensor]:
                outs, logits = self._forward(chunks, eos_ids)
                assert logits is not None  # a decode-only step samples every chunk
                return [o.tokens[0] for o in outs], logits
            assert self.graphs is not None  # graphs_usable
            return [ChunkOutput(t) for t in self.graphs.run(chunks, eager, steps=steps, eos_ids=eos_ids, stop=stop)]
        return self._forward(chunks, eos_ids)[0]

    def _forward(self, chunks: list[Chunk], eos_ids: frozenset[int]) -> tuple[list[ChunkOutput], torch.Tensor | None]:
        """One eager step: outputs in chunk order, and the (sampled chunks, V) processed logits the tokens came
        from (decode chunks first; for a decode-only step that is chunk order)."""
        dec = [c for c in chunks if c.num_tokens == 1]
        pre = [c for c in chunks if c.num_tokens > 1]
        order = dec + pre
        flat = flatten(order, self.block_size)
        meta = StepAttention(self.kv, self.paged_attention, self._tensor(flat.slots),
                             self._decode_meta(dec) if dec else None, self._prefill_meta(pre) if pre else None,
                             self.paged_attention.prefill)
        hidden = self.model.hidden_states(self._tensor(flat.ids)[None], position_ids=self._tensor(flat.pos)[None],
                                          attn_meta=meta)[0]  # (N, D)
        outs = {id(c): ChunkOutput([]) for c in chunks}
        for i, c in enumerate(order):
            if c.request.params.prompt_logprobs is not None:
                self._prompt_logprobs(c, hidden, flat.first[i], outs[id(c)])
        sampled = [(i, c) for i, c in enumerate(order) if c.sample]
        if not sampled:
            return [outs[id(c)] for c in chunks], None
        logits = self.model.lm_head(hidden[self._tensor([flat.last[i] for i, _ in sampled])])  # (R, V)
        reqs = [c.request for _, c in sampled]
        tokens, logprobs, processed = self._sample(logits, reqs, eos_ids)
        for (_, c), t, lp in zip(sampled, tokens, logprobs, strict=True):
            outs[id(c)].tokens, outs[id(c)].logprobs = [t], lp
        return [outs[id(c)] for c in chunks], processed

    def _prompt_logprobs(self, c: Chunk, hidden: torch.Tensor, first: int, out: ChunkOutput) -> None:
        """Logprobs of the prompt tokens this chunk predicts: position p's logits give token p + 1's."""
        r, k = c.request, c.request.params.prompt_logprobs
        assert k is not None  # only chunks that asked for prompt logprobs come here
        lo = r.prefix_len + c.start  # position of the chunk's first token
        m = max(0, min(c.num_tokens, len(r.prompt_ids) - 1 - lo))  # positions whose next token is a prompt token
        keep_last = r.is_prefix and lo + c.num_tokens == len(r.prompt_ids)  # predicts each member's first own token
        rows = m + keep_last
        if rows == 0:
            return
        lp = self.model.lm_head(hidden[first:first + rows]).float().log_softmax(dim=-1)  # (rows, V)
        if keep_last:
            out.last_logprobs = lp[-1]
        if m == 0:
            return
        targets = self._tensor(r.prompt_ids[lo + 1:lo + 1 + m])
        chosen, top_v, top_i = token_logprobs(lp[:m], targets, k)
        out.prompt_logprobs = {lo + 1 + j: t for j, t in enumerate(_token_logprobs(targets, chosen, top_v, top_i))}

    def _tensor(self, values: list | np.ndarray, dtype: type = np.int64) -> torch.Tensor:
        """Host list -> device tensor (through numpy: several times faster than torch.tensor on lists)."""
        return torch.from_numpy(np.asarray(values, dtype=dtype)).to(self.device, non_blocking=True)

    def _decode_meta(self, dec: list[Chunk]) -> DecodeMeta:
        a = decode_arrays(dec, block_size=self.block_size, cascade=self.cascade, trash_block=self.trash_block)
        t = {k: self._tensor(v) for k, v in a.named().items()}
        return DecodeMeta(prefix_blocks=a.prefix_blocks, **t)

    def _prefill_meta(self, pre: list[Chunk]) -> PrefillMeta | PrefillChunks:
        if self.paged_attention.prefill_triton:
            cfg = self.model.config
            c = prefill_chunk_arrays(pre, self.block_size, heads_per_kv=cfg.num_heads // cfg.num_kv_heads,
                                     block_m=PREFILL_BLOCK_M)
            host = list(zip(*(x.tolist() for x in (c.q_start, c.q_len, c.ctx_len, c.k_start)), strict=True))
            t = self._tensor
            return PrefillChunks(t(c.q_start), t(c.q_len), t(c.ctx_len), t(c.k_start), t(c.k_slots), t(c.tile_chunk),
                                 t(c.tile_row), host)
        a = prefill_arrays(pre, self.block_size)
        qd, kd, qp, kp = (self._tensor(x) for x in (a.q_chunk, a.k_chunk, a.q_pos, a.k_pos))
        mask = (qd[:, :, None] == kd[:, None, :]) & (kp[:, None, :] <= qp[:, :, None])  # (R, Q, Lk)
        return PrefillMeta(self._tensor(a.q_index), self._tensor(a.q_gather), self._tensor(a.k_slots), mask[:, None])

    def _sample(self, logits: torch.Tensor, reqs: list[Request],
                eos_ids: frozenset[int]) -> tuple[list[int], list[list[TokenLogprob] | None], torch.Tensor]:
        """Tokens, their logprobs where asked, and the processed logits they were drawn from."""
        ps = [r.params for r in reqs]
        x = self._penalise(logits, reqs, eos_ids) if any(p.penalised for p in ps) else logits
        tokens = x.argmax(dim=-1)
        rows = [i for i, p in enumerate(ps) if p.temperature > 0]
        if rows:  # only the sampled rows pay for the noise and the top-p/top-k threshold (each row's draw is its own)
            sub = [ps[i] for i in rows]
            at = self._tensor(rows)
            drawn = sample(x[at], temperature=self._tensor([p.temperature for p in sub], np.float32),
                           top_k=self._tensor([p.top_k for p in sub]),
                           top_p=self._tensor([p.top_p for p in sub], np.float32),
                           seeds=self._tensor([reqs[i].seed for i in rows]),
                           steps=self._tensor([len(reqs[i].output_ids) for i in rows]), any_random=True,
                           any_filter=any(p.top_k > 0 or p.top_p < 1 for p in sub))
            tokens = tokens.index_copy(0, at, drawn)
        if all(p.logprobs is None for p in ps):
            return tokens.tolist(), [None] * len(reqs), x
        chosen, top_v, top_i = token_logprobs(x, tokens, max(p.logprobs or 0 for p in ps))
        lps = _token_logprobs(tokens, chosen, top_v, top_i)
        return tokens.tolist(), [None if p.logprobs is None else [t.truncated(p.logprobs)]
                                 for p, t in zip(ps, lps, strict=True)], x

    def _penalise(self, logits: torch.Tensor, reqs: list[Request], eos_ids: frozenset[int]) -> torch.Tensor:
        """Per-request penalty tensors built on the host from the requests' tokens, applied on the device."""
        ps, (R, V) = [r.params for r in reqs], logits.shape
        counts = seen = bias = banned = None
        if any(p.presence_penalty or p.frequency_penalty for p in ps):
            rows, toks = _scatter_index([r.output_ids for r in reqs])
            counts = torch.zeros(R, V, device=self.device).index_put_(
                (self._tensor(rows), self._tensor(toks)), torch.ones(len(toks), device=self.device), accumulate=True)
        if any(p.repetition_penalty != 1 for p in ps):
            rows, toks = _scatter_index([r.prompt_ids + r.output_ids if r.params.repetition_penalty != 1 else []
                                         for r in reqs])
            seen = torch.zeros(R, V, dtype=torch.bool, device=self.device)
            seen[self._tensor(rows), self._tensor(toks)] = True
        if any(p.logit_bias for p in ps):
            rows, toks = _scatter_index([[t for t, _ in p.logit_bias] for p in ps])
            bias = torch.zeros(R, V, device=self.device)
            bias[self._tensor(rows), self._tensor(toks)] = self._tensor([b for p in ps for _, b in p.logit_bias],
                                                                        np.float32)
        ban = [sorted(eos_ids) if not r.params.ignore_eos and len(r.output_ids) < r.params.min_tokens else []
               for r in reqs]
        if any(ban):
            rows, toks = _scatter_index(ban)
            banned = torch.zeros(R, V, dtype=torch.bool, device=self.device)
            banned[self._tensor(rows), self._tensor(toks)] = True
        return penalise(logits, output_counts=counts, seen=seen, banned=banned, bias=bias,
                        presence=self._tensor([p.presence_penalty for p in ps], np.float32),
                        frequency=self._tensor([p.frequency_penalty for p in ps], np.float32),
                        repetition=self._tensor([p.repetition_penalty for p in ps], np.float32))


def _plain(r: Request) -> bool:
    """Sampled by a decode graph (greedy, sampled, penalised): anything but logprobs."""
    return r.params.logprobs is None


def _scatter_index(per_row: list[list[int]]) -> tuple[list[int], list[int]]:
    """Row and column indices of every (row, token) pair."""
    rows = [i for i, toks in enumerate(per_row) for _ in toks]
    return rows, [t for toks in per_row for t in toks]


def _token_logprobs(tokens: torch.Tensor, chosen: torch.Tensor, top_v: torch.Tensor,
                    top_i: torch.Tensor) -> list[TokenLogprob]:
    """Device results -> one ``TokenLogprob`` per row (one host transfer for each tensor)."""
    t, c, v, i = tokens.tolist(), chosen.tolist(), top_v.tolist(), top_i.tolist()
    return [TokenLogprob(t[r], c[r], tuple(zip(i[r], v[r]))) for r in range(len(t))]


PREFILL_BLOCK_M = 64  # query rows per prefill kernel tile: 16 tokens of a kv head's 4 query heads (llama-1b)


class CheckedPagedAttention:
    """Paged attention, decode (``__call__``) and prefill (``prefill``): each Triton kernel once it has matched its
    torch path on a real call (an fp32 reference, once), the torch path otherwise or after any Triton failure."""

    def __init__(self, block_size: int, *, use_triton: bool) -> None:
        self.block_size, self.use_triton, self.verified = block_size, use_triton, False
        self.prefill_triton, self.prefill_verified = use_triton, False

    def prefill(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, m: PrefillChunks) -> torch.Tensor:
        if self.prefill_triton:
            try:
                out = prefill_attention_triton(q, kc, vc, m, block_m=PREFILL_BLOCK_M)
                if not self.prefill_verified:
                    _check_close(out, prefill_attention_torch(q.float(), kc, vc, m))
                    self.prefill_verified = True
                return out
            except Exception as e:  # compile/launch errors come in many types: any of them -> torch path
                warnings.warn(f"Triton prefill attention disabled, using the torch path: {e}", stacklevel=2)
                self.prefill_triton = False
        return prefill_attention_torch(q, kc, vc, m)

    def __call__(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, q_lens: torch.Tensor | None = None,
                 q_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.use_triton:
            try:
                out = paged_attention_triton(q, kc, vc, tables, lens, self.block_size, q_lens, q_rows)
                if not self.verified and q_rows is None:  # a step's own rows come first: checked on those
                    ref = paged_attention_torch(q[:8].float(), kc, vc, tables[:8], lens[:8], self.block_size)
                    for got, want in zip(out, ref):
                        _check_close(got[:8], want)
                    self.verified = True
                return out
            except Exception as e:  # compile/launch errors come in many types: any of them -> torch path
                warnings.warn(f"Triton paged attention disabled, using the torch path: {e}", stacklevel=2)
                self.use_triton = False
        return paged_attention_torch(q, kc, vc, tables, lens, self.block_size, q_lens, q_rows)


def _check_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """A kernel's first real output against its fp32 torch reference (bf16 rounding allowed)."""
    if not torch.allclose(got.float(), want, atol=2e-2, rtol=2e-2):
        raise RuntimeError(f"differs from the torch reference by {(got.float() - want).abs().max().item():.3g}")
