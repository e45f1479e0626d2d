"""Memory model: ZeRO and Korthikanti oracles, the op-by-op block formula, and its monotonic structure."""

import pytest

from batchpilot.model.llama import get_preset
from batchpilot.model import counting
from batchpilot.plan import memory


@pytest.mark.parametrize("stage, gb", [(0, 120.0), (1, 31.41), (2, 16.64), (3, 1.875)])
def test_zero_figure_1(stage, gb):
    est = memory.estimate_model_state_bytes(7.5e9, precision="bf16_fp32_master", num_shards=64, zero_stage=stage)
    assert est.total / 1e9 == pytest.approx(gb, rel=1e-3)


def test_korthikanti_gpt3_layer():
    assert memory.korthikanti_layer_bytes(seq_len=2048, micro_batch_size=1, hidden_size=12288,
                                          num_heads=96) == pytest.approx(2.869e9, rel=1e-3)


def test_block_activation_formula():
    c = get_preset("llama-1b")  # D 2048, Q 2048, KV 512, I 8192, H 32
    assert memory.activation_bytes_per_token(c) == 26 * 2048 + 4 * 2048 + 4 * 512 + 4 * 32 + 8 * 8192
    assert memory.activation_bytes_per_token(c, param_bytes=2) == 16 * 2048 + 4 * 2048 + 4 * 512 + 4 * 32 + 8 * 8192


def test_kv_bytes_per_token():
    c = get_preset("llama-8b")  # 32 layers, 8 KV heads of 128
    assert counting.kv_bytes_per_token(c) == 2 * 32 * 8 * 128 * 2 == 131072


def test_optimizer_states_and_precision():
    adam = memory.estimate_model_state_bytes(1e9, optimizer="adamw", zero_stage=0)
    sgd = memory.estimate_model_state_bytes(1e9, optimizer="sgd", zero_stage=0)
    assert (adam.params, adam.grads, adam.optimizer) == (4e9, 4e9, 8e9)
    assert sgd.optimizer == 4e9


def test_peak_grows_with_micro_batch_and_checkpointing_saves():
    c = get_preset("llama-1b")
    peaks = [memory.estimate_peak_bytes(c, micro_batch_size=mb, seq_len=2048).allocated_bytes for mb in (1, 2, 4, 8)]
    assert peaks == sorted(peaks)
    ckpt = memory.estimate_peak_bytes(c, micro_batch_size=8, seq_len=2048, checkpointing=True)
    assert ckpt.allocated_bytes < peaks[-1]
    assert ckpt.total_bytes == ckpt.allocated_bytes + memory.CUDA_CONTEXT_BYTES


def test_fsdp_shards_model_state():
    c = get_preset("llama-8b")
    one = memory.estimate_peak_bytes(c, micro_batch_size=1, seq_len=2048)
    eight = memory.estimate_peak_bytes(c, micro_batch_size=1, seq_len=2048, num_gpus=8, sharding="fsdp")
    assert eight.params == pytest.approx(one.params / 8) and eight.optimizer == pytest.approx(one.optimizer / 8)
    assert eight.allocated_bytes < one.allocated_bytes / 3


def test_loss_bytes_follow_model_loss():
    c = get_preset("llama-1b")  # chunks of 2^30 // (2 x 128256) = 4185 tokens
    t, v, d = 2048, 128256, 2048
    one = memory.estimate_loss_bytes(c, tokens=t, fsdp=False)
    assert one.saved == 4 * t * d + 4 * v * d
    assert one.forward_peak == 4 * t * d + 6 * v * d + max(4 * t * v, 2 * t * v + 4 * t * d)
    three = memory.estimate_loss_bytes(c, tokens=3 * 4185, fsdp=True)
    assert three.forward_peak == 2 * 3 * 4185 * d + 4 * v * d + 6 * 4185 * v


def test_moe_layer_swaps_the_dense_mlp_for_router_slots_and_shared_expert():
    c = get_preset("moe-1b")  # D 1024, E 32, K 4, I' 576, Is 2048 (gated)
    d, e, k, i_exp, i_sh = 1024, 32, 4, 576, 2048
    router = 2 * d + 12 * e + 12 * k + 8
    slots = k * (4 * d + 8 * i_exp + 18)
    shared = 4 * d + 8 * i_sh + (2 * d + 4 + 2 * d)
    assert memory.moe_mlp_bytes_per_token(c) == router + slots + shared
    dense = memory.activation_bytes_per_token(c)
    dense_mlp = 4 * d + 8 * c.intermediate_size
    assert memory.layer_activation_bytes_per_token(c, 0) == dense - dense_mlp + router + slots + shared
    tiny = get_preset("tiny-moe")  # layer 0 dense
    assert memory.layer_activation_bytes_per_token(tiny, 0) == memory.activation_bytes_per_token(tiny)
    assert memory.layer_activation_bytes_per_token(tiny, 1) != memory.activation_bytes_per_token(tiny)


def test_moe_peak_counts_every_layer_and_recomputes_the_largest():
    c = get_preset("moe-1b")
    tokens = 4 * 2048
    plain = memory.estimate_peak_bytes(c, micro_batch_size=4, seq_len=2048)
    per_layer = [memory.layer_activation_bytes_per_token(c, i) * tokens for i in range(c.num_layers)]
    if plain.peak_moment == "loss forward":
        assert plain.activations == pytest.approx(sum(per_layer) + 8 * c.hidden_size * tokens)
    ckpt = memory.estimate_peak_bytes(c, micro_batch_size=4, seq_len=2048, checkpointing=True)
    assert ckpt.allocated_bytes < plain.allocated_bytes


def test_streaming_keeps_block_inputs_and_one_working_set():
    c = get_preset("llama-1b")
    seq, mb = 131072, 1
    tokens = seq * mb
    ckpt = memory.estimate_peak_bytes(c, micro_batch_size=mb, seq_len=seq, checkpointing=True)
    stream = memory.estimate_peak_bytes(c, micro_batch_size=mb, seq_len=seq, stream_chunk_tokens=4096)
    assert stream.allocated_bytes < ckpt.allocated_bytes
    working = memory.stream_backward_working_bytes(c, seq_len=seq, chunk_tokens=4096)
    if stream.peak_moment == "first block backward":
        assert stream.activations == pytest.approx(4 * c.hidden_size * tokens * c.num_layers
                                                   + 8 * c.hidden_size * tokens + working)
        assert stream.compute_copies == 0  # streamed blocks save no weight copies; the working set has its own
    smaller = memory.estimate_peak_bytes(c, micro_batch_size=mb, seq_len=seq, stream_chunk_tokens=1024)
    assert smaller.allocated_bytes <= stream.allocated_bytes


def test_compiled_and_float8_block_terms():
    """Derived from the partitioner's rules (compiled_block_terms), not fitted: the terms, term by term."""
    c = get_preset("llama-1b")  # D 2048, Q 2048, KV 512, I 8192, H 32
    d, q, kv, h, i = 2048, 2048, 512, 32, 8192
    assert memory.activation_bytes_per_token(c, compile=True) == 10 * d + 4 * q + 4 * kv + 4 * h + 6 * i + 8
    assert memory.activation_bytes_per_token(c, param_bytes=2, compile=True) == (
        8 * d + 4 * q + 4 * kv + 4 * h + 6 * i + 8)
    # float8: the linears' bf16 inputs are recomputed (only a pointwise cast reads them in backward)
    assert memory.activation_bytes_per_token(c, compile=True, float8="tensorwise") == (
        6 * d + 4 * q + 4 * kv + 4 * h + 4 * i + 8)
    assert memory.activation_bytes_per_token(c, param_bytes=2, compile=True, float8="rowwise") == (
        4 * d + 4 * q + 4 * kv + 4 * h + 4 * i + 8)
    assert memory.activation_bytes_per_token(c, float8="tensorwise") == memory.activation_bytes_per_token(c)
    n = counting.non_vocab_params(c)  # weight copies: bf16 2/param; float8 keeps the fp32 weight (free)
    assert [memory.weight_copy_bytes(c, compile=cp, float8=f) for cp, f in
            ((False, None), (True, None), (False, "tensorwise"), (True, "rowwise"))] == [2 * n, 2 * n, 0, 0]
    assert sum(b for _, b in memory.compiled_block_terms(c)) == memory.activation_bytes_per_token(c, compile=True)


# Peaks measured on one H200 (torch 2.11) through the trainer's step (benchmarks/train_throughput.py, compiled
# blocks, torch.cuda.max_memory_allocated, benchmarks/results/train_throughput_2026-11-28e.json): llama-1b,
# (system, seq, micro-batch, accumulation steps, checkpointing, GiB); the float8 rows are tensorwise (rowwise
# measured the same: train_throughput_float8_rowwise_2026-11-28.json). benchmarks/memory_validation.py checks
# shapes these tests do not use.
MEASURED_COMPILED = [("autocast", 2048, 16, 1, "none", 60.17), ("autocast", 8192, 4, 2, "none", 64.78),
                     ("bf16", 2048, 16, 1, "none", 56.09), ("bf16", 8192, 4, 2, "none", 60.69),
                     ("bf16", 8192, 8, 1, "selective", 58.73)]
MEASURED_FLOAT8 = [("autocast", 2048, 16, 1, "none", 46.36), ("autocast", 8192, 4, 2, "none", 50.97),
                   ("bf16", 2048, 16, 1, "none", 44.09), ("bf16", 8192, 4, 2, "none", 48.70)]


@pytest.mark.parametrize("float8", [None, "tensorwise"])
def test_compiled_and_float8_predictions_against_the_measured_h200_peaks(float8):
    """Within 1% of every peak measured (derived, not fitted: no constant here was tuned to them)."""
    for system, seq, mb, accum, ac, gib in MEASURED_FLOAT8 if float8 else MEASURED_COMPILED:
        est = memory.estimate_peak_bytes(get_preset("llama-1b"), micro_batch_size=mb, seq_len=seq, compile=True,
                                         float8=float8, checkpointing=ac, grad_accum_steps=accum,
                                         sharding="fsdp" if system == "bf16" else "none")
        assert est.allocated_bytes / memory.GIB == pytest.approx(gib, rel=0.01), (system, seq, mb, ac)


def test_selective_checkpointing_keeps_every_other_block():
    c = get_preset("llama-1b")
    kw = dict(micro_batch_size=8, seq_len=2048, compile=True)
    none, sel, full = (memory.estimate_peak_bytes(c, checkpointing=m, **kw).allocated_bytes
                       for m in ("none", "selective", "full"))
    assert full < sel < none
    assert memory.checkpointed_layers(4, "selective") == [True, False, True, False]
    with pytest.raises(ValueError, match="activation checkpointing 'some'"):
        memory.checkpointed_layers(4, "some")


def test_accumulation_holds_the_gradients():
    c = get_preset("llama-125m")
    one = memory.estimate_peak_bytes(c, micro_batch_size=4, seq_len=2048)
    two = memory.estimate_peak_bytes(c, micro_batch_size=4, seq_len=2048, grad_accum_steps=2)
    assert one.peak_moment == two.peak_moment == "loss forward"
    assert two.allocated_bytes - one.allocated_bytes == pytest.approx(4 * counting.total_params(c))


def test_offload_peak_is_what_the_gpu_holds():
    """FSDP2 + CPUOffloadPolicy: no parameters, gradients or states on the GPU; two gathered bf16 blocks, the
    root, one block's gradients in flight, checkpointed activations and the loss."""
    c = get_preset("llama-8b")
    est = memory.estimate_offload_peak(c, 2048, micro_batch_size=4)
    assert est.params == est.optimizer == 0
    block, root = counting.block_params(c), counting.total_params(c) - 32 * counting.block_params(c)
    if est.peak_moment == "first block backward":
        tokens = 4 * 2048
        acts = 2 * 4096 * tokens * 32 + 6 * 4096 * tokens + memory.activation_bytes_per_token(c, param_bytes=2) * tokens
        assert est.activations == pytest.approx(acts)
        assert est.compute_copies == pytest.approx(2 * root + 2 * 6 * block) and est.grads == 6 * block
    # bf16 masters: the shards copied in are half the bytes; the unsharded bf16 copies and gradients are the same
    full, half = (memory.estimate_offload_peak(c, 4096, master_bytes=m) for m in (4, 2))
    assert full.peak_moment == half.peak_moment == "backward end"  # the root's gradients are reduced
    assert full.compute_copies - half.compute_copies == pytest.approx(2 * 2 * block)
    assert half.grads == full.grads == 6 * root and half.activations == full.activations == 0
    with pytest.raises(ValueError, match="master_bytes"):
        memory.estimate_offload_peak(c, 2048, master_bytes=8)
    peaks = [memory.predict_offload_peak_bytes(c, 2048, micro_batch_size=mb) for mb in (1, 4, 16)]
    assert peaks == sorted(peaks) and isinstance(peaks[0], int)
    assert memory.predict_offload_peak_bytes(c, 2048, include_overhead=True) == peaks[0] + memory.CUDA_CONTEXT_BYTES
    on_gpu = memory.estimate_peak_bytes(c, micro_batch_size=1, seq_len=2048, checkpointing=True)
    assert peaks[0] < on_gpu.allocated_bytes / 5  # 8B: ~128 GB of state stays on the host
