"""Attention for packed training rows: causal within each document, nothing across documents.

``attend_rows`` is the chunk-aware variant used by streaming backprop (``train/stream.py``): the
queries of rows [q_start, q_start + C) against all T keys of the sequence, with the same mask.
``attend_causal_rows`` is its fast form for an unpacked row (one document): the chunk's queries against the
keys of rows [0, q_start + C) only, with SDPA's lower-right causal mask, which the CUDA flash and
memory-efficient kernels take without materialising it.

A packed row holds several documents back to back; ``document_ids`` (B, T) numbers them. On CPU
(and whenever FlexAttention is unavailable) this builds a boolean (B, 1, T, T) mask for SDPA,
which costs T^2 memory per row: fine for tests and the CPU demo. On CUDA it uses FlexAttention
with a block-sparse document mask, which skips fully-masked tiles and keeps memory linear in T.

Shape legend: B batch, H heads, K kv heads, T sequence, E head dim.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(kw_only=True, slots=True)
class DocumentMask:
    """``AttnMeta`` for training on packed rows. Build once per micro-batch, share across layers."""

    document_ids: torch.Tensor  # (B, T) int, non-decreasing along T
    _cache: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Build the block mask here, in eager code before the model runs: inside a compiled block it would be
        # traced (and its cache lookups guarded) once per micro-batch.
        flex = _flex_attention() if self.document_ids.is_cuda else None
        if flex is not None:
            flex_attention, create_block_mask = flex
            docs = self.document_ids

            def mask_mod(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (docs[b, q_idx] == docs[b, kv_idx])

            B, T = docs.shape
            self._cache["flex"] = flex_attention
            self._cache["block"] = create_block_mask(mask_mod, B, None, T, T, device=docs.device, _compile=True)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
        gqa = q.shape[1] != k.shape[1]
        if "block" in self._cache:
            return self._cache["flex"](q, k, v, block_mask=self._cache["block"], enable_gqa=gqa)
        if "dense" not in self._cache:
            T = self.document_ids.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            same_doc = self.document_ids[:, :, None] == self.document_ids[:, None, :]  # (B, T, T)
            self._cache["dense"] = (same_doc & causal)[:, None]  # (B, 1, T, T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self._cache["dense"], enable_gqa=gqa)

    def attend_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int,
                    q_start: int) -> torch.Tensor:
        """Queries of rows [q_start, q_start + C) (B, H, C, E) against all keys (B, K, T, E) of the rows."""
        return attend_rows(q, k, v, q_start=q_start, document_ids=self.document_ids)


def attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the query rows [q_start, q_start + C) over keys [0, T), within documents if given.

    Key j is visible to query i when j <= i (and both lie in one document). Keys past the chunk are
    masked, so callers may pass the whole sequence's keys (one shape for every chunk). On CUDA with
    FlexAttention the mask is block-sparse (fully masked tiles are skipped: the cost is that of the
    visible keys only); elsewhere a dense (B or 1, 1, C, T) boolean mask for SDPA.
    """
    C, T = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    flex = _flex_attention() if q.is_cuda else None
    if flex is not None:
        flex_attention, create_block_mask = flex
        offset = torch.tensor(q_start, device=q.device)  # a tensor, so the mask compiles once for all chunks
        if document_ids is None:
            def mask_mod(b, h, q_idx, kv_idx):
                return q_idx + offset >= kv_idx
            batch = None
        else:
            docs = document_ids

            def mask_mod(b, h, q_idx, kv_idx):
                return (q_idx + offset >= kv_idx) & (docs[b, q_idx + offset] == docs[b, kv_idx])
            batch = docs.shape[0]
        block = create_block_mask(mask_mod, batch, None, C, T, device=q.device, _compile=True)
        return flex_attention(q, k, v, block_mask=block, enable_gqa=gqa)
    rows = torch.arange(q_start, q_start + C, device=q.device)
    mask = rows[:, None] >= torch.arange(T, device=q.device)[None, :]  # (C, T)
    if document_ids is not None:
        same_doc = document_ids[:, q_start:q_start + C, None] == document_ids[:, None, :T]  # (B, C, T)
        mask = mask & same_doc
    mask = mask[:, None] if mask.dim() == 3 else mask  # (B, 1, C, T) or (C, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def attend_causal_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last C of S rows: queries (B, H, C, E) of rows [S - C, S), keys (B, K, S, E).

    Query i (row S - C + i) sees keys j <= S - C + i: the lower-right-aligned causal mask
    (``torch.nn.attention.bias.causal_lower_right``). On CUDA SDPA runs it in the flash kernel (Dao 2023,
    "FlashAttention-2", arXiv 2307.08691, Section 3.1.1: causal tiles past the diagonal skipped; GQA native)
    or the memory-efficient one, never as a (C x S) score or mask tensor, so a streamed chunk costs what
    its share of ``is_causal`` attention costs. C == S is plain ``is_causal``. Elsewhere (CPU) SDPA gets the
    (C, S) boolean mask. Equals ``attend_rows(q, k, v, q_start=S - C)`` with keys past the chunk dropped.
    """
    C, S = q.shape[2], k.shape[2]
    if C > S:
        raise ValueError(f"attend_causal_rows: {C} query rows but only {S} keys")
    gqa = q.shape[1] != k.shape[1]
    if C == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if not q.is_cuda:
        rows = torch.arange(S - C, S, device=q.device)
        mask = rows[:, None] >= torch.arange(S, device=q.device)[None, :]  # (C, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    from torch.nn.attention.bias import causal_lower_right

    # A CausalBias mask goes to the flash / efficient kernels past autocast's SDPA cast: cast as autocast would.
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if gqa and not _flash_takes(q, k, v):
        # the efficient kernel has no GQA: give it one key/value head per query head (the flash kernel's
        # GQA is native; without either kernel SDPA would fall back to a materialised mask)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(C, S), enable_gqa=gqa)


def _flash_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    return bool(can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, True)))


@functools.cache
def _flex_attention():
    """(compiled flex_attention, create_block_mask), or None where FlexAttention is missing.

    FlexAttention is only fast when compiled; the cache compiles it once per process.
    """
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention, dynamic=False), create_block_mask


def document_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index per token from positions that restart at 0 for every document. (B, T) -> (B, T)."""
    return (position_ids == 0).cumsum(dim=1)
