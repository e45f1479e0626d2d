"""Streaming backprop gives the plain path's loss and gradients (fp32, tight), with GQA, packed documents and
chunk sizes that do and do not divide the sequence; and a streamed block saves only its input for backward."""

from __future__ import annotations

import pytest
import torch

from batchpilot.model.attention import DocumentMask, attend_rows, document_ids_from_positions
from batchpilot.model.llama import build_model, get_preset
from batchpilot.train.stream import (StreamingBlock, apply_streaming, estimate_stream_activation_bytes,
                                     stream_backward_working_bytes)

T = 37  # prime: no chunk size below it divides it


def config(**changes):
    # tiny's width (4 heads over 2 kv heads: GQA), 2 layers; qwen2-style q/k/v bias optional
    return get_preset("tiny").with_(num_layers=2, vocab_size=97, **changes)


def batch(docs: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, T), generator=g)
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    if not docs:
        return ids, targets, None, None
    # row 0: documents of 10, 20, 7 tokens; row 1: 25 and 12
    pos = torch.stack([torch.cat([torch.arange(10), torch.arange(20), torch.arange(7)]),
                       torch.cat([torch.arange(25), torch.arange(12)])])
    return ids, targets, pos, DocumentMask(document_ids=document_ids_from_positions(pos))


def loss_and_grads(cfg, docs: bool, chunk_tokens: int | None):
    model = build_model(cfg, seed=0)
    if chunk_tokens is not None:
        apply_streaming(model, chunk_tokens)
    ids, targets, pos, meta = batch(docs)
    loss = model(ids, targets=targets, position_ids=pos, attn_meta=meta)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("docs", [False, True], ids=["causal", "packed"])
@pytest.mark.parametrize("chunk_tokens", [1, 5, 16, 37, 64])
def test_streamed_gradients_equal_plain(docs, chunk_tokens):
    ref_loss, ref = loss_and_grads(config(), docs, None)
    loss, got = loss_and_grads(config(), docs, chunk_tokens)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == ref.keys()  # parameter names unchanged by streaming
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_streamed_gradients_with_qkv_bias_and_multi_query():
    cfg = config(attention_bias=True, num_kv_heads=1, tie_word_embeddings=False)
    ref_loss, ref = loss_and_grads(cfg, True, None)
    loss, got = loss_and_grads(cfg, True, 8)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_streamed_under_bf16_autocast_matches_plain_autocast():
    """The backward recomputes under the forward's autocast state: bf16 rounding, same as the plain path's."""
    def run(chunk):
        model = build_model(config(), seed=0)
        if chunk:
            apply_streaming(model, chunk)
        ids, targets, pos, meta = batch(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, targets=targets, position_ids=pos, attn_meta=meta)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    (ref_loss, ref), (loss, got) = run(None), run(8)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    cosine = torch.nn.functional.cosine_similarity(got, ref, dim=0)
    assert cosine > 0.999


def test_streamed_block_saves_only_its_input():
    """A streamed block saves x (B T D) and cos/sin (shared by all layers) for backward, nothing else."""
    model = build_model(config(), seed=0)
    apply_streaming(model, 8)
    ids, targets, pos, meta = batch(True)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    x = model.embed_tokens(ids).detach().requires_grad_()
    cos, sin = torch.ones(1, 1, T, 32), torch.zeros(1, 1, T, 32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[0](x, cos, sin, meta)
    assert sorted(t.numel() for t in saved) == sorted([x.numel(), cos.numel(), sin.numel()])


def test_no_grad_forward_equals_plain():
    ids, _, pos, meta = batch(True)
    plain = build_model(config(), seed=0)
    streamed = build_model(config(), seed=0)
    apply_streaming(streamed, 6)
    assert all(isinstance(b, StreamingBlock) for b in streamed.layers)
    with torch.no_grad():
        torch.testing.assert_close(streamed(ids, position_ids=pos, attn_meta=meta),
                                   plain(ids, position_ids=pos, attn_meta=meta), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_start", [0, 9, 30])
def test_attend_rows_equals_rows_of_full_attention(q_start):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, T, 8, generator=g)
    k, v = torch.randn(2, 2, T, 8, generator=g), torch.randn(2, 2, T, 8, generator=g)
    _, _, _, meta = batch(True)
    full = meta.attend(q, k, v, 0)
    rows = slice(q_start, min(q_start + 7, T))
    torch.testing.assert_close(meta.attend_rows(q[:, :, rows], k, v, 0, q_start), full[:, :, rows])
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(attend_rows(q[:, :, rows], k, v, q_start=q_start), causal[:, :, rows])


def test_stream_chunk_validated():
    with pytest.raises(ValueError, match="--stream-chunk"):
        apply_streaming(build_model(config(), seed=0), 0)


def test_stream_memory_estimate_grows_with_the_chunk_not_the_sequence_graph():
    """The chunk graph term is the plain block's per-token bytes times the chunk; the rest is O(T) K/V bytes."""
    cfg = get_preset("llama-1b")
    small = stream_backward_working_bytes(cfg, seq_len=131072, chunk_tokens=1024)
    large = stream_backward_working_bytes(cfg, seq_len=131072, chunk_tokens=2048)
    from batchpilot.plan.memory import activation_bytes_per_token

    assert large - small == activation_bytes_per_token(cfg) * 1024
    saved_inputs = 4 * cfg.hidden_size * 131072 * cfg.num_layers
    streamed = estimate_stream_activation_bytes(cfg, seq_len=131072, chunk_tokens=4096)
    checkpointed = saved_inputs + activation_bytes_per_token(cfg) * 131072  # + one block recomputed whole
    assert streamed - saved_inputs < (checkpointed - saved_inputs) / 4


def test_streamed_blocks_under_fsdp2_match_plain():
    """FSDP2 frees and re-gathers the block parameters between forward and backward; the gradients survive."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ref_loss, ref = loss_and_grads(config(), True, None)
    ours = not dist.is_initialized()  # an earlier one-device FSDP2 test in this process may have left its group
    if ours:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = build_model(config(), seed=0)
        apply_streaming(model, 8)
        mesh = init_device_mesh("cpu", (1,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)  # reshard_after_forward: parameters freed until backward
        fully_shard(model, mesh=mesh)
        ids, targets, pos, meta = batch(True)
        loss = model(ids, targets=targets, position_ids=pos, attn_meta=meta)
        loss.backward()
        torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad.full_tensor(), ref[name], rtol=1e-5, atol=1e-6, msg=name)
    finally:
        if ours:
            dist.destroy_process_group()


def test_stream_offload_is_plumbed_and_validated():
    """--parallel.stream_offload needs streaming; parallelize hands it to every streamed block; on CPU (nothing to
    offload) the gradients are the plain ones."""
    from batchpilot.train.parallel import ParallelConfig, ParallelDims, parallelize

    with pytest.raises(ValueError, match="stream_offload needs"):
        ParallelConfig(stream_offload=True)
    ParallelConfig(activation_checkpointing="stream", stream_offload=True)
    model = build_model(config(), seed=0)
    parallelize(model, ParallelDims(device=torch.device("cpu")), activation_checkpointing="stream", stream_chunk=8,
                stream_offload=True)
    assert all(isinstance(b, StreamingBlock) and b.offload_inputs for b in model.layers)
    ids, targets, pos, meta = batch(True)
    model(ids, targets=targets, position_ids=pos, attn_meta=meta).backward()
    _, ref = loss_and_grads(config(), True, None)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_stream_offload_memory_estimate_keeps_one_block_input():
    from batchpilot.plan.memory import estimate_peak_bytes, stream_saved_inputs_bytes

    cfg = get_preset("llama-1b")
    kw = dict(micro_batch_size=1, seq_len=262144, stream_chunk_tokens=4096)
    kept = estimate_peak_bytes(cfg, **kw).activations - estimate_peak_bytes(cfg, **kw, stream_offload=True).activations
    block_input = 4 * cfg.hidden_size * 262144
    assert kept == pytest.approx(block_input * (cfg.num_layers - 1))
    assert stream_saved_inputs_bytes(cfg, seq_len=262144) == block_input * cfg.num_layers


@pytest.mark.gpu
def test_stream_offload_on_cuda_saves_inputs_in_pinned_host_memory():
    """On CUDA the saved inputs are pinned host tensors, the gradients equal the GPU-kept ones (fp32), and the
    peak holds fewer block inputs."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = get_preset("tiny").with_(num_layers=4, vocab_size=97)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (1, 4096), generator=g).cuda()
    targets = ids.roll(-1, dims=1)

    def run(offload: bool):
        model = build_model(cfg, device="cuda", seed=0)
        apply_streaming(model, 512, offload_inputs=offload)
        saved: list[torch.Tensor] = []

        def pack(t):
            saved.append(t)
            return t

        torch.cuda.reset_peak_memory_stats()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, targets=targets)
        loss.backward()
        peak = torch.cuda.max_memory_allocated()
        return peak, saved, {n: p.grad for n, p in model.named_parameters()}

    (peak_on, saved_on, got), (peak_off, _, ref) = run(True), run(False)
    hosted = [t for t in saved_on if t.device.type == "cpu"]
    assert len(hosted) == cfg.num_layers and all(t.is_pinned() for t in hosted)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    assert peak_on < peak_off


def test_a_row_too_long_for_the_gpu_is_told_about_stream_offload():
    """One GPU, a row whose streamed saved inputs do not fit: the planner's error names --parallel.stream_offload
    with its GPU and host memory."""
    from batchpilot.plan.memory import cannot_fit_message

    cfg = get_preset("llama-1b")
    msg = cannot_fit_message(cfg, seq_len=1 << 20, optimizer="adamw", num_gpus=1, gpu_memory_gib=139, headroom=0.1)
    assert "--parallel.stream_offload" in msg and "GiB of pinned host memory" in msg
    assert "stream_offload" not in cannot_fit_message(cfg, seq_len=1 << 20, optimizer="adamw", num_gpus=1,
                                                      gpu_memory_gib=8, headroom=0.1)
