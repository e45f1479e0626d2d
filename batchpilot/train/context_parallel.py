"""Context parallelism: the sequence split over a group of ranks, attention by ring communication.

Sequence parallelism with Ring Self-Attention (Li et al. 2021, "Sequence Parallelism: Long Sequence Training
from System Perspective", arXiv 2105.13120, Section 3.1): each rank holds a slice of every row's tokens; all
token-wise work (embedding, projections, MLP, norms, loss) is local, and attention passes the key/value
blocks around the ring of ranks, W - 1 hops in forward. Each rank merges the partial results of the blocks it
sees with the online-softmax (log-sum-exp) rule (Milakov & Gimelshein 2018, arXiv 1805.02867; as in
Ring Attention, Liu et al. 2023, arXiv 2310.01889), so the output is exact. Backward runs the ring again:
each block's key/value gradients travel with it and are home after W hops.

Load balance under the causal mask: the sequence is cut into 2W chunks and rank r holds chunks r and
2W - 1 - r (as PyTorch's ``context_parallel`` and Megatron's CP do), so every rank has the same amount of
visible keys. Position ids (RoPE) and document ids are sharded with the tokens; the mask compares global
token indices (causal) and document ids (packed rows), so documents may cross shard boundaries.

PyTorch's own ``torch.distributed.tensor.experimental.context_parallel`` dispatches SDPA's flash/efficient
CUDA kernels through DTensor and has no gloo/CPU path, and it cannot take a document mask; this ring uses
``torch.distributed`` point-to-point ops (``batch_isend_irecv``), any backend. Its attention math is plain
fp32 matmuls over (query chunk x block) scores: exact and testable on CPU, not a fused kernel. The queries are
taken ``query_chunk_rows`` at a time (default: as many as keep one chunk's scores near 256 MiB), so the transient
scores, probabilities and mask are O(chunk x L), not O(L^2), per block; the saved state is q, k, v, out, lse.

With FSDP2 on a ``dp x cp`` mesh (``apply_fsdp_dp_cp``), parameters are sharded over all dp x cp ranks and
gradients are averaged over all of them, as in plain data parallelism: each cp rank's loss is weighted by
W x its share of the group's target tokens (``shard_batch``), so the mean over the cp group of the weighted
losses is the group's mean loss, and the mean of their gradients its gradient.

Shape legend: B batch, T sequence, L local tokens (T / W), H heads, K kv heads, G = H / K, E head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from batchpilot.model.attention import document_ids_from_positions
from batchpilot.model.loss import IGNORE_INDEX
from batchpilot.plan.memory import RING_SCORE_CHUNK_BYTES


def shard_indices(seq_len: int, rank: int, world_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Global row indices of rank's load-balanced shard: chunks ``rank`` and ``2W - 1 - rank`` of 2W. (L,)."""
    if seq_len % (2 * world_size):
        raise ValueError(f"--seq-len {seq_len} must be a multiple of 2 x context-parallel size ({2 * world_size})")
    chunk = seq_len // (2 * world_size)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * world_size - 1 - rank) * chunk, (2 * world_size - rank) * chunk, device=device)
    return torch.cat([first, second])


def shard_sequence(t: torch.Tensor, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
    """This rank's load-balanced slice of ``t`` along ``dim`` (the sequence)."""
    return t.index_select(dim, shard_indices(t.shape[dim], rank, world_size, t.device))


def unshard_sequence(shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of ``shard_sequence`` given every rank's slice, in rank order."""
    world_size = len(shards)
    seq_len = sum(s.shape[dim] for s in shards)
    order = torch.cat([shard_indices(seq_len, r, world_size) for r in range(world_size)])
    out = torch.cat(shards, dim=dim)
    return out.index_select(dim, torch.argsort(order).to(out.device))


@dataclass(kw_only=True, slots=True)
class RingAttention:
    """``AttnMeta`` for one context-parallel micro-batch: every rank's token indices and document ids.

    Built by ``shard_batch`` (one all-gather of the small index tensors, shared by all layers).
    """

    group: dist.ProcessGroup
    token_index: torch.Tensor  # (W, L) global row index of each rank's tokens
    document_ids: torch.Tensor | None  # (W, B, L) document of each rank's tokens, or None (one document per row)
    query_chunk_rows: int = 0  # queries per score chunk; 0: SCORE_CHUNK_BYTES of fp32 scores per chunk
    _peers: tuple[int, int] = field(default=(0, 0))

    def __post_init__(self) -> None:
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self._peers = (dist.get_global_rank(self.group, (rank + 1) % world),
                       dist.get_global_rank(self.group, (rank - 1) % world))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
        return _RingAttentionFn.apply(q, k, v, self)

    def block_mask(self, q_rank: int, kv_rank: int, rows: slice = slice(None)) -> torch.Tensor:
        """Which keys of kv_rank's shard the queries ``rows`` of q_rank's shard see: (B or 1, 1, 1, C, L)."""
        qi, ki = self.token_index[q_rank, rows], self.token_index[kv_rank]
        mask = qi[:, None] >= ki[None, :]  # (C, L) causal by global index
        if self.document_ids is not None:
            qd, kd = self.document_ids[q_rank][:, rows], self.document_ids[kv_rank]
            mask = mask & (qd[:, :, None] == kd[:, None, :])  # (B, C, L)
        return mask.reshape(-1, 1, 1, *mask.shape[-2:])

    def query_chunks(self, batch: int, heads: int, local: int) -> list[slice]:
        """Query row ranges whose (batch x heads x rows x local) fp32 scores stay near ``SCORE_CHUNK_BYTES``."""
        rows = self.query_chunk_rows or max(1, SCORE_CHUNK_BYTES // (4 * batch * heads * local))
        return [slice(start, min(start + rows, local)) for start in range(0, local, rows)]


@dataclass(kw_only=True, slots=True)
class ContextParallelBatch:
    """One rank's slice of a micro-batch, ready for ``model(input_ids, targets=..., position_ids=..., attn_meta=...)``."""

    input_ids: torch.Tensor  # (B, L)
    targets: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L) RoPE positions of the rank's tokens
    attn_meta: RingAttention
    loss_weight: float  # W x rank's target tokens / the group's: the cp mean of weight x local mean loss = mean loss


def shard_batch(input_ids: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup, *,
                position_ids: torch.Tensor | None = None, query_chunk_rows: int = 0) -> ContextParallelBatch:
    """Slice a full micro-batch (every rank of the cp group holds the same one) for this rank.

    ``position_ids`` that restart at 0 mark packed documents (as ``DocumentMask``); without them each row
    is one causal sequence.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    B, T = input_ids.shape
    device = input_ids.device
    packed = position_ids is not None
    if position_ids is None:
        position_ids = torch.arange(T, device=device).expand(B, T)
    docs = document_ids_from_positions(position_ids) if packed else None
    local_targets = shard_sequence(targets, rank, world)
    valid_local = int((local_targets != IGNORE_INDEX).sum())
    valid_all = int((targets != IGNORE_INDEX).sum())
    token_index = torch.stack([shard_indices(T, r, world, device) for r in range(world)])  # (W, L)
    doc_shards = None if docs is None else torch.stack([shard_sequence(docs, r, world) for r in range(world)])
    meta = RingAttention(group=group, token_index=token_index, document_ids=doc_shards,
                         query_chunk_rows=query_chunk_rows)
    return ContextParallelBatch(input_ids=shard_sequence(input_ids, rank, world), targets=local_targets,
                                position_ids=shard_sequence(position_ids, rank, world), attn_meta=meta,
                                loss_weight=world * valid_local / max(valid_all, 1))


# --- the ring ------------------------------------------------------------------------------------------------

SCORE_CHUNK_BYTES = RING_SCORE_CHUNK_BYTES  # fp32 scores of one query chunk against one key block (plan/memory.py)


def _rotate(buffer: torch.Tensor, meta: RingAttention) -> tuple[torch.Tensor, list]:
    """Start sending ``buffer`` to the next rank and receiving the previous rank's into a new buffer."""
    incoming = torch.empty_like(buffer)
    to_next, from_prev = meta._peers
    ops = [dist.P2POp(dist.isend, buffer, to_next, meta.group), dist.P2POp(dist.irecv, incoming, from_prev, meta.group)]
    return incoming, dist.batch_isend_irecv(ops)


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Masked fp32 scores: q (B, K, G, L, E), k (B, K, L, E) -> (B, K, G, L, L), -inf where not visible."""
    s = torch.einsum("bkgqe,bkte->bkgqt", q, k) * scale
    return s.masked_fill(~mask, float("-inf"))


class _RingAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: RingAttention) -> torch.Tensor:
        B, H, L, E = q.shape
        K = k.shape[1]
        world, rank = dist.get_world_size(meta.group), dist.get_rank(meta.group)
        scale = E ** -0.5
        q32 = q.float().view(B, K, H // K, L, E)
        out = torch.zeros_like(q32)
        lse = torch.full(q32.shape[:-1], float("-inf"), device=q.device)  # (B, K, G, L)
        kv = torch.stack([k, v]).float().contiguous()  # (2, B, K, L, E), the block that travels
        chunks = meta.query_chunks(B, H, L)
        for step in range(world):
            pending = _rotate(kv, meta) if step < world - 1 else None
            src = (rank - step) % world
            for rows in chunks:  # out and lse of these query rows, merged with this block's
                s = _scores(q32[..., rows, :], kv[0], meta.block_mask(rank, src, rows), scale)
                old = lse[..., rows]
                new_lse = torch.logaddexp(old, torch.logsumexp(s, dim=-1))  # finite from step 0 (the diagonal)
                out[..., rows, :] = out[..., rows, :] * torch.exp(old - new_lse)[..., None] + torch.einsum(
                    "bkgqt,bkte->bkgqe", torch.exp(s - new_lse[..., None]), kv[1])
                lse[..., rows] = new_lse
            if pending is not None:
                kv, reqs = pending
                for r in reqs:
                    r.wait()
        ctx.meta, ctx.scale = meta, scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out.view(B, H, L, E).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        meta, scale = ctx.meta, ctx.scale
        B, H, L, E = q.shape
        K = k.shape[1]
        world, rank = dist.get_world_size(meta.group), dist.get_rank(meta.group)
        q32 = q.float().view(B, K, H // K, L, E)
        dout = grad_out.float().reshape(B, K, H // K, L, E)
        delta = (dout * out).sum(-1)  # (B, K, G, L): rowsum(dO o O), the softmax backward's correction
        dq = torch.zeros_like(q32)
        # the travelling block: k, v and their gradient sums so far, (4, B, K, L, E)
        block = torch.cat([torch.stack([k, v]).float(), torch.zeros(2, *k.shape, device=k.device)]).contiguous()
        chunks = meta.query_chunks(B, H, L)
        for step in range(world):
            src = (rank - step) % world
            kb, vb = block[0], block[1]
            for rows in chunks:
                q_c, dout_c = q32[..., rows, :], dout[..., rows, :]
                p = torch.exp(_scores(q_c, kb, meta.block_mask(rank, src, rows), scale)
                              - lse[..., rows, None])  # (B, K, G, C, L)
                dp = torch.einsum("bkgqe,bkte->bkgqt", dout_c, vb)
                ds = p * (dp - delta[..., rows, None]) * scale
                dq[..., rows, :] += torch.einsum("bkgqt,bkte->bkgqe", ds, kb)
                block[2] += torch.einsum("bkgqt,bkgqe->bkte", ds, q_c)
                block[3] += torch.einsum("bkgqt,bkgqe->bkte", p, dout_c)
            block, reqs = _rotate(block, meta)  # W hops: the block and its gradients are home at the end
            for r in reqs:
                r.wait()
        return dq.view(B, H, L, E).to(q.dtype), block[2].to(k.dtype), block[3].to(v.dtype), None


# --- FSDP2 on a dp x cp mesh ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContextParallelMesh:
    """The ranks as a ``dp x cp`` grid: ``cp_group`` shares one micro-batch, ``dp`` ranks see different ones."""

    dp_size: int
    cp_size: int
    cp_group: dist.ProcessGroup
    dp_rank: int


def init_dp_cp_mesh(device_type: str, *, cp_size: int) -> ContextParallelMesh:
    """Split the started process group into dp x cp (cp ranks adjacent, so they share a host's NVLink)."""
    world = dist.get_world_size()
    if cp_size < 1 or world % cp_size:
        raise ValueError(f"--context-parallel {cp_size} must divide the number of ranks ({world})")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (world // cp_size, cp_size), mesh_dim_names=("dp", "cp"))
    return ContextParallelMesh(dp_size=world // cp_size, cp_size=cp_size, cp_group=mesh.get_group("cp"),
                               dp_rank=mesh.get_local_rank("dp"))


def apply_fsdp_dp_cp(model: nn.Module, mesh: ContextParallelMesh, *, param_dtype: torch.dtype | None) -> None:
    """FSDP2 over all dp x cp ranks (each block, then the root): gradients averaged over all of them.

    A cp group's ranks hold different tokens of the same rows; with each rank's loss scaled by its
    ``loss_weight`` the average over the cp ranks is the gradient of the group's mean loss, and the average
    over dp that of plain data parallelism (FSDP2's default mean: no PREMUL_SUM, which gloo lacks).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device_type = next(model.parameters()).device.type
    flat = init_device_mesh(device_type, (dist.get_world_size(),))  # = the dp x cp grid, flattened
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for i, block in enumerate(model.layers):
        fully_shard(block, mesh=flat, mp_policy=mp, reshard_after_forward=i < len(model.layers) - 1)
    fully_shard(model, mesh=flat, mp_policy=mp)
