"""Ring-attention context parallelism on 2 gloo ranks: loss and gradients equal one process's, with GQA, packed
documents crossing the shard boundaries, query chunks that do not divide the shard, and FSDP2 on a dp x cp mesh."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_parallel import run_ranks  # noqa: E402  (tests/train is on sys.path under pytest)

from batchpilot.model.llama import build_model, get_preset
from batchpilot.train import context_parallel as cp

T = 32  # 4 chunks of 8 over 2 ranks: rank 0 holds rows 0-7 and 24-31, rank 1 rows 8-23


def config():
    return get_preset("tiny").with_(num_layers=2, vocab_size=97)  # 4 heads over 2 kv heads


def batch(packed: bool):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, T), generator=g)
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    targets[1, 5:9] = -100  # unequal target counts per shard: the loss weights must handle them
    if not packed:
        return ids, targets, None
    # documents of 11 + 15 + 6 and 20 + 12 tokens: both cross a shard boundary (8, 24)
    pos = torch.stack([torch.cat([torch.arange(11), torch.arange(15), torch.arange(6)]),
                       torch.cat([torch.arange(20), torch.arange(12)])])
    return ids, targets, pos


def reference(packed: bool):
    from batchpilot.model.attention import DocumentMask, document_ids_from_positions

    model = build_model(config(), seed=0)
    ids, targets, pos = batch(packed)
    meta = None if pos is None else DocumentMask(document_ids=document_ids_from_positions(pos))
    loss = model(ids, targets=targets, position_ids=pos, attn_meta=meta)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _ring_worker(packed: bool, fsdp: bool, query_chunk_rows: int = 0) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    ref_loss, ref_grads = reference(packed)
    model = build_model(config(), seed=0)
    mesh = cp.init_dp_cp_mesh("cpu", cp_size=2)
    if fsdp:
        cp.apply_fsdp_dp_cp(model, mesh, param_dtype=None)
    ids, targets, pos = batch(packed)
    local = cp.shard_batch(ids, targets, mesh.cp_group, position_ids=pos, query_chunk_rows=query_chunk_rows)
    assert local.input_ids.shape == (2, T // 2)
    loss = model(local.input_ids, targets=local.targets, position_ids=local.position_ids,
                 attn_meta=local.attn_meta) * local.loss_weight
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=mesh.cp_group)
    torch.testing.assert_close(total / 2, ref_loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        grad = p.grad
        if fsdp:
            grad = grad.full_tensor()  # FSDP2 averaged it over the dp x cp ranks
        else:
            dist.all_reduce(grad, group=mesh.cp_group)
            grad = grad / 2
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _both_masks_worker() -> None:
    for packed in (False, True):
        _ring_worker(packed, False)
    _ring_worker(True, False, query_chunk_rows=3)  # 16 local queries in chunks of 3, 3, 3, 3, 3, 1


def test_ring_attention_matches_one_process_causal_and_packed():
    run_ranks(_both_masks_worker, timeout=120.0)


def test_ring_attention_under_fsdp2_dp_cp_mesh_matches_one_process():
    run_ranks(_ring_worker, True, True, timeout=120.0)


def test_load_balanced_shards_roundtrip_and_balance():
    x = torch.arange(2 * 24).view(2, 24)
    shards = [cp.shard_sequence(x, r, 3) for r in range(3)]
    assert shards[0][0].tolist() == [0, 1, 2, 3, 20, 21, 22, 23]  # chunks 0 and 5 of 6
    torch.testing.assert_close(cp.unshard_sequence(shards), x)
    # causal work per rank: sum over its rows of (row index + 1) visible keys, equal for every rank
    work = [int((cp.shard_indices(24, r, 3) + 1).sum()) for r in range(3)]
    assert len(set(work)) == 1
    with pytest.raises(ValueError, match="multiple of 2 x context-parallel"):
        cp.shard_indices(25, 0, 3)
