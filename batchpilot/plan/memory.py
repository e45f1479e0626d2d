"""Bytes per GPU for one training step of ``model/llama.py``, counted from the config (no tensors are built).

What we model is what the trainer runs (``train/trainer.py``, ``train/parallel.py``):
- one GPU: fp32 parameters (they are the master weights), bf16 autocast, fp32 grads, fused AdamW;
- several GPUs: FSDP2 with ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: sharded fp32
  parameters, grads and optimizer states, bf16 compute copies gathered one block at a time.
``predicted allocated`` is comparable with ``torch.cuda.max_memory_allocated``; ``overhead_bytes`` adds
what the CUDA context and the caching allocator take on top of it.

Saved activations, per token of one block (reasoned op by op; D hidden, Q = H E, KV = K E, I intermediate).
fp32 params + autocast (residual stream x is fp32, because the embedding output is fp32):
  input_layernorm   pow saves x (4D); the fp32 normalised tensor is saved by ``weight *`` (4D)      8D
  q/k/v_proj        autocast casts the fp32 norm output to bf16 once per linear, each saves its copy 6D
  RoPE              q*cos, rotate(q)*sin save only cos/sin (no grad), shared by all layers          0
  SDPA (flash)      autocast casts fp32 q, k to bf16; saves q, k, v, out (bf16) + fp32 logsumexp     4Q + 4KV + 4H
                    (memory-efficient kernels: no T^2 term); o_proj's input is a view of ``out``    0
  post_attn_norm    as input_layernorm                                                           8D
  gate/up_proj      two bf16 casts of the norm output                                             4D
  SwiGLU            silu saves gate (2I), mul saves silu(gate) and up (4I), down saves the product 8I
  => 26D + 4Q + 4KV + 8I + 4H bytes.  (Korthikanti et al.'s GeLU/MHA/dropout layer is 34D + 5 a s.)
bf16 params (FSDP2; autocast then casts nothing): the norms save the fp32 upcast of x (4D) and a bf16
normalised tensor (2D); the projections share one bf16 input (2D) => 16D + 4Q + 4KV + 8I + 4H bytes.
Activation checkpointing per block (``torch.utils.checkpoint``, non-reentrant) keeps only each block's
input x, and recomputes one block at a time in backward.

Outside the blocks: the autocast bf16 copies of the block weights (2 bytes/param) are saved for backward;
the final norm saves 8D (6D); the fused loss (``model/loss.py``) keeps grad_hidden (tokens x D, residual
dtype) and the V x D head grad, and while it runs, bf16 logits and their gradient per chunk of 2^29 logits
(1 GiB each), plus bf16 copies of the hidden states and the head weight (``estimate_loss_bytes``). This
follows loss.py's GPU path (compiled softmax/CE kernel); its eager fallback needs more.

Peak = max over three moments: inside the loss, the first block's backward (its recomputation under
checkpointing), the end of backward (all grads + the embedding's dense grad). Parameters and optimizer
states are held throughout (the states exist from the first step on); with gradient accumulation the grads of
the earlier micro-steps are held too. Compiled and float8 blocks: ``compiled_block_terms`` (what the
partitioner keeps, rule by rule); CPU offload: ``estimate_offload_peak`` / ``predict_offload_peak_bytes``.
Checked on H200s (torch 2.11): the eager block formula matches the bytes the block saves exactly; measured
peaks of llama-125m/1b at micro-batch 1-16, checkpointing on and off, one GPU and FSDP2 on two, are
0.985-1.04x the prediction (benchmarks/results/mem_validation_20261128_*.json); compiled, float8 (tensorwise
and rowwise), bf16-parameter and selective-checkpointing llama-1b peaks through the trainer's step
(train_throughput_2026-11-28e.json) are within 1% (tests/plan/test_memory.py); benchmarks/memory_validation.py
measures held-out shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from collections.abc import Callable
from typing import Literal

from batchpilot.model.llama import LlamaConfig
from batchpilot.model.counting import block_params, non_vocab_params, total_params

Sharding = Literal["none", "fsdp"]
Precision = Literal["fp32", "bf16_fp32_master"]
GIB = 1 << 30

# Optimizer state tensors per parameter (fp32 each): AdamW/LAMB keep m and v; LARS and SGD one momentum.
OPTIMIZER_STATES = {"adamw": 2, "lamb": 2, "lars": 1, "sgd": 1}
# Device memory outside max_memory_allocated: CUDA context + library handles (0.75 GiB on one H200, torch 2.11),
# and NCCL communicators with several GPUs (1.57 GiB in all on 2 H200s); benchmarks/memory_validation.py.
CUDA_CONTEXT_BYTES = 3 * GIB // 4
NCCL_BYTES = 7 * GIB // 8
LOSS_CHUNK_BYTES = 1 << 30  # model/loss.py: chunk_tokens = max(256, CHUNK_BYTES // (V x 2 bytes))
MICRO_BATCH_GRID = tuple(2**i for i in range(10))  # 1 .. 512 sequences
# Below this many tokens per micro-batch a GPU runs small matmuls; we prefer checkpointing to go past it.
REASONABLE_MICRO_BATCH_TOKENS = 8192


@dataclass(frozen=True, slots=True)
class ModelStateBytes:
    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def estimate_model_state_bytes(num_params: float, *, optimizer: str = "adamw", precision: Precision = "fp32",
                               num_shards: int = 1, zero_stage: int = 3) -> ModelStateBytes:
    """Parameters, gradients and optimizer states per GPU (ZeRO, Rajbhandari et al. 2019, Figure 1).

    ``bf16_fp32_master``: 2 + 2 + (4 master + 4 x states) bytes/param (ZeRO's K = 12 for Adam);
    ``fp32``: 4 + 4 + 4 x states (ours: the fp32 params are the master copy). ``zero_stage`` 1 shards the
    optimizer states over ``num_shards``, 2 also the grads, 3 (= FSDP full shard) also the params.
    """
    states = OPTIMIZER_STATES[optimizer]
    param_b, grad_b, opt_b = (2, 2, 4 + 4 * states) if precision == "bf16_fp32_master" else (4, 4, 4 * states)
    shard = [num_shards if zero_stage >= s else 1 for s in (3, 2, 1)]
    return ModelStateBytes(params=param_b * num_params / shard[0], grads=grad_b * num_params / shard[1],
                           optimizer=opt_b * num_params / shard[2])


def korthikanti_layer_bytes(*, seq_len: int, micro_batch_size: int, hidden_size: int, num_heads: int) -> float:
    """Reference: s b h (34 + 5 a s / h), a GPT layer with fp16 activations and dropout, no parallelism."""
    s, b, h, a = seq_len, micro_batch_size, hidden_size, num_heads
    return s * b * h * (34 + 5 * a * s / h)


def activation_bytes_per_token(config: LlamaConfig, *, param_bytes: int = 4, compile: bool = False,
                               float8: str | None = None) -> int:
    """Bytes one block saves for backward per token; ``param_bytes`` 4 = autocast, 2 = bf16 parameters (FSDP2).

    Eager: the op-by-op table of the module docstring. ``compile`` (``train/parallel.py`` compiles each block)
    and ``float8`` (torchao ``Float8Linear``) are derived from what the compiled graph keeps, not fitted:
    ``compiled_block_terms`` lists every saved tensor and the rule that keeps it. ``float8`` without
    ``compile`` saves as eager does on the norms and SDPA and stores each linear's input in float8
    (torchao's eager autograd function keeps the high-precision input: counted as eager, 2 bytes).
    """
    if compile:
        return sum(b for _, b in compiled_block_terms(config, param_bytes=param_bytes, float8=float8))
    d, i = config.hidden_size, config.intermediate_size
    q, kv, h = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.num_heads
    norms_and_inputs = 26 * d if param_bytes == 4 else 16 * d
    return norms_and_inputs + 4 * q + 4 * kv + 4 * h + 8 * i


def compiled_block_terms(config: LlamaConfig, *, param_bytes: int = 4,
                         float8: str | None = None) -> list[tuple[str, int]]:
    """(tensor, bytes per token) a compiled block keeps for backward.

    Rules of AOTAutograd's min-cut partitioner (torch/_functorch/partitioners.py,
    ``min_cut_rematerialization_partition``, torch 2.4+ defaults; after "Min-cut rematerialization",
    Chen et al. 2016, arXiv 1604.06174, as a graph cut): matmuls, SDPA and ``_scaled_mm`` are never
    recomputed; a tensor that a matmul reads in backward is "materialized in backward" and saved, not
    recomputed; reductions (RMSNorm's mean) are saved (4 bytes per row); any other pointwise tensor is
    recomputed when that saves bytes; parameters are free to save. CSE merges the casts autocast repeats per
    linear. Applied to ``model/llama.py``'s block (D hidden, Q = H E, KV = K E, I intermediate; r = residual
    bytes: 4 under autocast (fp32 residual), 2 with bf16 parameters):
      input_layernorm  its input x (r D: the norm's backward needs it), rstd (4); the normed output cast to
                       the compute dtype once, shared by q/k/v (2 D), read by their weight-gradient matmuls
      SDPA (flash)     q, k (after RoPE), v, out (bf16) and the fp32 logsumexp: 4Q + 4KV + 4H
      o_proj           its input is ``out`` (a view); its bf16 output (2 D) is kept, the residual sum
                       x + o (r D) is recomputed from x and it
      post_attn_norm   rstd (4); the normed bf16 output shared by gate/up (2 D)
      SwiGLU           gate and up (matmul outputs, needed by the pointwise backward: 4 I) and their product
                       (read by down_proj's weight-gradient matmul: 2 I); silu(gate) is recomputed
    => r D + 6 D + 4Q + 4KV + 4H + 6I + 8 (autocast 10 D; bf16 parameters 8 D). Eager: 26 D ... + 8 I.
    float8 (torchao ``Float8Linear``, https://github.com/pytorch/ao/tree/main/torchao/float8, tensorwise or
    rowwise): its autograd function (``matmul_with_hp_or_float8_args``) saves the HIGH-precision input and
    weight and casts them to float8 again in backward, for the grad-input and grad-weight GEMMs (other layouts
    and scaling axes than the forward's casts, so CSE does not merge them). A linear's bf16 input is then read
    in backward only by a pointwise cast, so it is no longer "materialized in backward": the partitioner
    recomputes it (the normed inputs from x and rstd, the SwiGLU product from gate and up, o_proj's float8
    input from ``out``). Saved: r D + 2 D + 4Q + 4KV + 4H + 4I + 8. The weights' casts are recomputed from the
    fp32 parameters (free): no weight copies. Rowwise scales are reductions of the backward's own casts:
    nothing more is saved (the measured rowwise peaks equal the tensorwise ones).
    """
    d, i = config.hidden_size, config.intermediate_size
    q, kv, h = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.num_heads
    terms = [("block input x (norm backward)", param_bytes * d), ("rstd x 2 (saved reductions)", 8),
             ("SDPA q, k, v, out", 2 * q + 4 * kv + 2 * q), ("SDPA logsumexp", 4 * h),
             ("o_proj output (residual recomputed)", 2 * d), ("SwiGLU gate and up", 4 * i)]
    if float8 is None:  # bf16 GEMM inputs, read by the weight-gradient matmuls
        terms += [("q/k/v input (normed, cast once)", 2 * d), ("gate/up input (normed, cast once)", 2 * d),
                  ("down_proj input (gate x up)", 2 * i)]
    return terms


def moe_mlp_bytes_per_token(config: LlamaConfig, *, param_bytes: int = 4) -> int:
    """Bytes a sparse MoE MLP (``model/moe.py``, grouped path, bf16 compute) saves per token for backward.

    E experts, K per token, I' expert intermediate, Is shared intermediate. Autocast (``param_bytes`` 4) casts
    the fp32 norm output once per linear (router 2D, shared gate/up 4D, shared gate 2D); with bf16 parameters
    one 2D input is shared. Router: the fp32 softmax (4E), the routing record's softmax, fp32 logits for
    logsumexp and z (8E + 8), top-k ids and the (renormalised) weights (12K). Per routed slot (the permutation
    buffers, ``moe.DispatchRows`` / ``moe.CombineRows``): the inverse permutation (8), the gathered bf16 input
    the first grouped GEMM saves (2D), SwiGLU on the grouped outputs (8I'), the expert output (gathered per
    token) and its weight for the combine (2D + 2), the sort order (8). Shared expert: SwiGLU (8Is), its gate's
    sigmoid (4) and the gated product's input (2D).
    """
    d, e, k = config.hidden_size, config.num_experts, config.num_experts_per_tok
    i_exp, i_shared = config.moe_intermediate_size, config.shared_expert_intermediate_size
    casts = 4 if param_bytes == 4 else 0  # autocast's bf16 copy of the fp32 input, per linear
    router = casts // 2 * d + 12 * e + 12 * k + 8
    slots = k * (4 * d + 8 * i_exp + 18)
    shared = 0
    if i_shared:
        gate = (casts // 2 * d + 4 + 2 * d) if config.shared_expert_gate else 0
        shared = casts * d + 8 * i_shared + gate
    return (0 if param_bytes == 4 else 2 * d) + router + slots + shared


def layer_activation_bytes_per_token(config: LlamaConfig, layer_idx: int, *, param_bytes: int = 4,
                                     compile: bool = False, float8: str | None = None) -> int:
    """``activation_bytes_per_token`` for block ``layer_idx``: a sparse layer swaps the dense MLP's share
    (gate/up inputs 4D with autocast, 2D with bf16 parameters, and SwiGLU 8I) for ``moe_mlp_bytes_per_token``."""
    if not config.is_moe_layer(layer_idx):
        return activation_bytes_per_token(config, param_bytes=param_bytes, compile=compile, float8=float8)
    dense = activation_bytes_per_token(config, param_bytes=param_bytes)  # MoE layers: eager counts (not derived)
    dense_mlp = (4 if param_bytes == 4 else 2) * config.hidden_size + 8 * config.intermediate_size
    return dense - dense_mlp + moe_mlp_bytes_per_token(config, param_bytes=param_bytes)


@dataclass(frozen=True, slots=True)
class LossBytes:
    saved: float  # held from the end of forward to backward: grad_hidden and the head grad
    forward_peak: float  # everything the loss holds at its worst moment in forward (incl. ``saved``'s buffers)


def estimate_loss_bytes(config: LlamaConfig, *, tokens: int, fsdp: bool) -> LossBytes:
    """``model/loss.py`` on GPU, line by line (bytes; t tokens, P/C elements of the previous/current chunk).

    Chunks hold 2^29 bf16 logits (``CHUNK_BYTES`` = 1 GiB). Autocast (fp32 hidden and weight): bf16 copies of
    hidden (2tD) and weight (2VD), bf16 grad_hidden (2tD), fp32 head grad (4VD); per chunk the previous bf16
    grad (2P) next to the new logits and grad (4C); at the end grad_hidden is upcast to fp32 (4tD).
    bf16 params: no copies; the fp32 head grad is cast to bf16 (2VD) at the end. Backward scales in place.
    """
    v, d = config.vocab_size, config.hidden_size
    chunk = max(256, LOSS_CHUNK_BYTES // (2 * v))
    sizes = [min(chunk, tokens - start) * v for start in range(0, tokens, chunk)]
    in_chunks = max(2 * prev + 4 * cur for prev, cur in zip([0, *sizes], sizes))
    if fsdp:
        held = 2 * tokens * d + 4 * v * d
        return LossBytes(saved=2 * tokens * d + 2 * v * d,
                         forward_peak=held + max(in_chunks, 2 * sizes[-1] + 2 * v * d))
    held = 4 * tokens * d + 6 * v * d
    return LossBytes(saved=4 * tokens * d + 4 * v * d,
                     forward_peak=held + max(in_chunks, 2 * sizes[-1] + 4 * tokens * d))


# --- streaming backprop (train/stream.py), StreamBP (Luo et al., arXiv 2506.03077) ---------------------------------------------------------------------------------


def stream_backward_working_bytes(config: LlamaConfig, *, seq_len: int, chunk_tokens: int,
                                  micro_batch_size: int = 1, param_bytes: int = 4) -> float:
    """Bytes one streamed block holds on top of the saved block inputs while it is differentiated.

    Counted op by op from ``_backward`` (N = B T tokens, C = B x chunk rows; Q = H E, KV = K E; compute
    dtype 2 bytes: autocast bf16 over fp32 parameters, ``param_bytes`` 4, or bf16 parameters, 2):
      K, V of the sequence (no graph, compute dtype)                          4 KV N
      their fp32 gradient accumulators                                        8 KV N
      the chunk's spliced K, V (``torch.cat``, compute dtype)                 4 KV N
      attention backward's dK, dV of all keys, then the prefix grads          4 KV N
      grad_x (residual dtype)                                                 p D N
      the chunk's graph: what a plain block saves per token, for C tokens    (plain block) C
      parameter gradients: the accumulated sum and one chunk's               2 x 4 x block params
      autocast's bf16 weight copies (cached across the chunks; autocast only) 2 x block params
    (The incoming grad_out and the saved input are counted by the caller, as for checkpointing. The forward's
    weight copies are gone by then: a streamed block saves none of them.)
    """
    tokens = micro_batch_size * seq_len
    chunk = micro_batch_size * min(chunk_tokens, seq_len)
    kv = config.num_kv_heads * config.head_dim
    kv_bytes = (4 + 8 + 4 + 4) * kv * tokens
    grad_x = param_bytes * config.hidden_size * tokens
    graph = activation_bytes_per_token(config, param_bytes=param_bytes) * chunk
    grads = 2 * 4 * block_params(config)
    weight_copies = 2 * block_params(config) if param_bytes == 4 else 0
    return kv_bytes + grad_x + graph + grads + weight_copies


def stream_saved_inputs_bytes(config: LlamaConfig, *, seq_len: int, micro_batch_size: int = 1,
                              param_bytes: int = 4) -> float:
    """Every streamed block's saved input: on the GPU, or in pinned host memory with ``--parallel.stream_offload``."""
    return param_bytes * config.hidden_size * micro_batch_size * seq_len * config.num_layers


def estimate_stream_activation_bytes(config: LlamaConfig, *, seq_len: int, chunk_tokens: int,
                                     micro_batch_size: int = 1, param_bytes: int = 4) -> float:
    """Activation bytes at the first streamed block's backward: every block's saved input plus its working set.

    The planner's ``estimate_peak_bytes`` uses this in place of checkpointing's ``kept x L + recompute``.
    """
    saved_inputs = stream_saved_inputs_bytes(config, seq_len=seq_len, micro_batch_size=micro_batch_size,
                                             param_bytes=param_bytes)
    return saved_inputs + stream_backward_working_bytes(config, seq_len=seq_len, chunk_tokens=chunk_tokens,
                                                        micro_batch_size=micro_batch_size,
                                                        param_bytes=param_bytes)


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryEstimate:
    """Predicted peak bytes per GPU, split by what holds them at the peak."""

    params: float
    grads: float
    optimizer: float
    activations: float  # saved for backward, incl. final norm (and the recomputed block under checkpointing)
    compute_copies: float  # bf16 weight copies: autocast casts, or FSDP2's gathered blocks
    loss: float  # fused loss: saved grads + the temporaries at the peak moment
    overhead_bytes: float  # CUDA context, NCCL: outside max_memory_allocated
    peak_moment: str

    @property
    def allocated_bytes(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.compute_copies + self.loss

    @property
    def total_bytes(self) -> float:
        return self.allocated_bytes + self.overhead_bytes


Checkpointing = Literal["none", "full", "selective"]


def checkpointed_layers(num_layers: int, mode: str) -> list[bool]:
    """Which blocks ``train/parallel.py``'s ``apply_ac`` checkpoints: all (full), every other from block 0
    (selective), none."""
    if mode not in ("none", "full", "selective"):
        raise ValueError(f"activation checkpointing {mode!r}: choose none, full or selective")
    return [mode == "full" or (mode == "selective" and i % 2 == 0) for i in range(num_layers)]


def weight_copy_bytes(config: LlamaConfig, *, compile: bool, float8: str | None) -> float:
    """Compute copies of the block weights held from forward to backward on one GPU (autocast, fp32 params).

    Autocast saves a bf16 copy of every block weight for backward (2 bytes/param; compiled too: the cast is
    read by the input-gradient matmul, so the partitioner keeps it). torchao's ``Float8Linear`` keeps the
    fp32 parameter itself (free to save) and casts it again in backward, eager and compiled: 0.
    """
    del compile  # the same either way (docstring)
    return 2.0 * non_vocab_params(config) if float8 is None else 0.0


def estimate_peak_bytes(config: LlamaConfig, *, micro_batch_size: int, seq_len: int, optimizer: str = "adamw",
                        num_gpus: int = 1, sharding: Sharding = "none", checkpointing: bool | str = False,
                        stream_chunk_tokens: int | None = None, compile: bool = False,
                        float8: str | None = None, grad_accum_steps: int = 1,
                        stream_offload: bool = False) -> MemoryEstimate:
    """Peak bytes per GPU of forward + backward + optimizer step (module docstring).

    ``checkpointing``: True / "full" (every block), "selective" (every other block, ``apply_ac``), False / "none".
    ``stream_chunk_tokens``: streaming backprop (``--parallel.activation_checkpointing stream``): every block
    keeps its input, as under checkpointing, and the block being differentiated holds
    ``stream_backward_working_bytes`` instead of a recomputed block (its bf16 weight copies included, so
    without FSDP2 no other block's copies are held then). ``stream_offload`` (``--parallel.stream_offload``): the
    saved inputs live in host memory (``stream_saved_inputs_bytes``) and the GPU holds the one of the block being
    run or differentiated.
    ``compile`` / ``float8``: the derived per-token terms (``compiled_block_terms``) and weight copies
    (``weight_copy_bytes``). ``grad_accum_steps`` > 1: from the second micro-step on the gradients of the
    earlier ones are held through forward and backward (the trainer zeroes them only after the step).
    """
    mode = {True: "full", False: "none"}.get(checkpointing, checkpointing)  # type: ignore[call-overload]
    ckpt = checkpointed_layers(config.num_layers, mode)
    streaming = stream_chunk_tokens is not None
    fsdp = sharding == "fsdp"
    n = num_gpus if fsdp else 1
    pbytes = 2 if fsdp else 4  # residual stream / compute dtype of params
    d, v, tokens = config.hidden_size, config.vocab_size, micro_batch_size * seq_len
    state = estimate_model_state_bytes(total_params(config), optimizer=optimizer, num_shards=n)
    block = block_params(config)

    per_layer = [layer_activation_bytes_per_token(config, i, param_bytes=pbytes, compile=compile, float8=float8)
                 * tokens
                 for i in range(config.num_layers)]  # MoE layers differ from dense ones
    block_input = pbytes * d * tokens
    if streaming:  # every streamed block keeps only its input (in host memory when offloaded)
        kept = block_input * (1 if stream_offload else config.num_layers)
    else:
        kept = sum(block_input if c else b for c, b in zip(ckpt, per_layer))
    activations = kept + (8 if pbytes == 4 else 6) * d * tokens  # + final norm (eager: not compiled)
    # autocast keeps a compute copy of every block weight for backward; FSDP2 gathers ~2 blocks (current +
    # prefetch) plus the root (embedding/head) in bf16.
    copies = 2 * (2 * block + v * d) if fsdp else weight_copy_bytes(config, compile=compile, float8=float8)

    loss = estimate_loss_bytes(config, tokens=tokens, fsdp=fsdp)
    # the first checkpointed block that backward reaches is recomputed; the blocks after it (not checkpointed
    # under selective) have been differentiated and freed by then
    last = max((i for i, c in enumerate(ckpt) if c), default=None)
    recompute = 0.0 if last is None else per_layer[last] - sum(per_layer[last + 1:])
    if streaming:
        recompute = stream_backward_working_bytes(config, seq_len=seq_len, chunk_tokens=stream_chunk_tokens,
                                                  micro_batch_size=micro_batch_size, param_bytes=pbytes)
    backward_copies = 0.0 if streaming and not fsdp else copies
    fsdp_grads = 3 * 2 * block if fsdp else 0  # FSDP2: bf16 block grads + their fp32 reduce-scatter copy
    held_grads = state.grads if grad_accum_steps > 1 else 0.0
    # in backward the head grad becomes a parameter grad; grad_hidden flows into the blocks next to its input
    moments = {
        "loss forward": (activations, copies, loss.forward_peak, held_grads),
        "first block backward": (activations + recompute, backward_copies + fsdp_grads,
                                 loss.saved + pbytes * d * tokens, held_grads),
        # all grads, plus the embedding's dense grad (and its bf16 form under FSDP2) before accumulation
        "backward end": (0.0, copies if fsdp else 0.0, 4 * v * d + (2 * v * d if fsdp else 0), state.grads),
    }
    name = max(moments, key=lambda k: sum(moments[k]))
    acts, cps, loss_at_peak, grads = moments[name]
    overhead = CUDA_CONTEXT_BYTES + (NCCL_BYTES if num_gpus > 1 else 0)
    return MemoryEstimate(params=state.params, grads=grads, optimizer=state.optimizer, activations=acts,
                          compute_copies=cps, loss=loss_at_peak, overhead_bytes=overhead, peak_moment=name)


# --- fitting a micro-batch ---------------------------------------------------------------------------------


STREAM_CHUNK_TOKENS = 4096  # --parallel.stream_chunk the planner assumes (train/parallel.py's default)


@dataclass(frozen=True, slots=True)
class MemoryFit:
    micro_batch_size: int
    checkpointing: bool
    sharding: Sharding
    estimate: MemoryEstimate
    streaming: bool = False  # streaming backprop (activation_checkpointing "stream") instead of checkpointing
    reason: str = ""  # why this mode, for Plan.explain

    @property
    def mode(self) -> str:
        return "stream" if self.streaming else "full" if self.checkpointing else "none"


def recompute_factor(config: LlamaConfig, mode: str) -> float:
    """Training FLOPs relative to no checkpointing: 6N per token, +2N for a full forward recomputation (8N/6N,
    Korthikanti et al., arXiv 2205.05198, section 5); streaming also recomputes every block and projects the keys
    and values once more in backward (``train/stream.py``): + 2 x (K and V projection params) per token."""
    if mode == "none":
        return 1.0
    if mode == "full":
        return 4 / 3
    kv_proj = 2 * config.hidden_size * config.num_kv_heads * config.head_dim * config.num_layers
    return 4 / 3 + 2 * kv_proj / (6 * non_vocab_params(config))


MAX_MICRO_BATCH = 512  # sequences; the search bisects 1 .. min(this, the step's rows per GPU)


def fit_micro_batch(config: LlamaConfig, *, seq_len: int, optimizer: str, num_gpus: int, gpu_memory_gib: float,
                    headroom: float, max_micro_batch: int, compile: bool = False,
                    float8: str | None = None) -> MemoryFit:
    """Largest micro-batch (any whole number) <= ``max_micro_batch`` that fits with headroom (FSDP on > 1 GPU).

    ``max_micro_batch`` is the step's rows per GPU: a smaller micro-batch accumulates, so the gradients of the
    earlier micro-steps are held (``grad_accum_steps`` > 1 in ``estimate_peak_bytes``). No checkpointing when
    that fits at a reasonable micro-batch (``REASONABLE_MICRO_BATCH_TOKENS``, or the cap if smaller). Otherwise
    the mode of full checkpointing and streaming backprop (its memory does not grow with a block's T x I
    activations, only with T x D inputs and O(T) keys/values) that fits the larger micro-batch; at equal
    micro-batches the cheaper in time (``recompute_factor``: full < stream). ``MemoryFit.micro_batch_size`` is
    the largest that fits: the planner then picks, among all that fit, the one with the highest predicted
    tokens/s.
    """
    sharding: Sharding = "fsdp" if num_gpus > 1 else "none"
    limit = gpu_memory_gib * GIB * (1 - headroom)
    cap = max(1, min(max_micro_batch, MAX_MICRO_BATCH))

    def estimate(mb: int, mode: str) -> MemoryEstimate:
        return estimate_peak_bytes(config, micro_batch_size=mb, seq_len=seq_len, optimizer=optimizer,
                                   num_gpus=num_gpus, sharding=sharding, checkpointing=mode == "full",
                                   stream_chunk_tokens=STREAM_CHUNK_TOKENS if mode == "stream" else None,
                                   compile=compile and mode != "stream", float8=float8,
                                   grad_accum_steps=1 if mb >= max_micro_batch else 2)

    def largest(mode: str) -> MemoryFit | None:
        mb = largest_fitting(lambda m: estimate(m, mode).total_bytes <= limit, cap)
        if mb == 0:
            return None
        return MemoryFit(mb, mode == "full", sharding, estimate(mb, mode), streaming=mode == "stream")

    plain = largest("none")
    if plain and plain.micro_batch_size * seq_len >= min(cap * seq_len, REASONABLE_MICRO_BATCH_TOKENS):
        return replace(plain, reason="no checkpointing: it fits at a reasonable micro-batch")
    fits = [f for f in (plain, largest("full"), largest("stream")) if f is not None]
    if not fits:
        raise ValueError(cannot_fit_message(config, seq_len=seq_len, optimizer=optimizer, num_gpus=num_gpus,
                                            gpu_memory_gib=gpu_memory_gib, headroom=headroom))
    best = max(fits, key=lambda f: (f.micro_batch_size, -recompute_factor(config, f.mode)))
    others = ", ".join(f"{f.mode} fits micro-batch {f.micro_batch_size}" for f in fits if f is not best)
    absent = [m for m in ("none", "full", "stream") if m not in {f.mode for f in fits}]
    why = (f"{best.mode}: largest micro-batch {best.micro_batch_size}, time x{recompute_factor(config, best.mode):.3g}"
           + (f" ({others})" if others else "") + (f"; {', '.join(absent)} does not fit at micro-batch 1"
                                                    if absent else ""))
    return replace(best, reason=why)


def largest_fitting(fits: Callable[[int], bool], cap: int) -> int:
    """Largest m in 1..cap with ``fits(m)`` (0 if none). Memory grows with the micro-batch, except at ``cap``
    itself (no accumulation, so no held gradients): ``cap`` is tried first, then 1..cap-1 is bisected."""
    if fits(cap):
        return cap
    lo, hi = 0, cap - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def cannot_fit_message(config: LlamaConfig, *, seq_len: int, optimizer: str, num_gpus: int, gpu_memory_gib: float,
                       headroom: float) -> str:
    """What would fit instead: the GPU count (powers of two) or the memory per GPU at micro-batch 1."""
    def need(n: int) -> float:
        est = min((estimate_peak_bytes(config, micro_batch_size=1, seq_len=seq_len, optimizer=optimizer, num_gpus=n,
                                       sharding="fsdp" if n > 1 else "none", checkpointing=chunk is None,
                                       stream_chunk_tokens=chunk).total_bytes for chunk in (None, STREAM_CHUNK_TOKENS)))
        return est / (1 - headroom)

    need_gib = need(num_gpus) / GIB
    gpus = next((n for n in (2**i for i in range(1, 13)) if n > num_gpus and need(n) <= gpu_memory_gib * GIB), None)
    more_gpus = f">= {gpus} GPUs of {gpu_memory_gib:g} GiB, or " if gpus else ""
    sharding = "FSDP" if num_gpus > 1 else "no"
    # one GPU, a long row: streaming with its saved inputs in host memory may fit where nothing else does
    offloaded = estimate_peak_bytes(config, micro_batch_size=1, seq_len=seq_len, optimizer=optimizer,
                                    stream_chunk_tokens=STREAM_CHUNK_TOKENS, stream_offload=True).total_bytes
    offload = (f"; or --parallel.activation_checkpointing stream --parallel.stream_offload: "
               f"{offloaded / (1 - headroom) / GIB:.1f} GiB per GPU and "
               f"{stream_saved_inputs_bytes(config, seq_len=seq_len) / GIB:.1f} GiB of pinned host memory"
               if num_gpus == 1 and offloaded / (1 - headroom) <= gpu_memory_gib * GIB else "")
    return (f"the model does not fit on {num_gpus} GPU(s) of {gpu_memory_gib:g} GiB even at micro-batch 1 with "
            f"{sharding} sharding and activation checkpointing or streaming (needs {need_gib:.1f} GiB per GPU incl. {headroom:.0%}"
            f" headroom at seq_len {seq_len}); use {more_gpus}>= {math.ceil(need_gib)} GiB per GPU{offload}")


# --- CPU offload: FSDP2 with CPUOffloadPolicy (--parallel.offload cpu) ----------------------------------------------
# fp32 parameter shards, their gradients and the AdamW states live in host memory; the GPU holds what is being
# computed. Per micro-step the parameters cross the host link twice (the forward's and the backward's all-gather;
# FSDP2 reshards after forward) and the gradients once; the AdamW step runs on the CPU and streams parameter,
# gradient and both moments in and parameter and moments out, 7 x 4 bytes per parameter (ZeRO-Offload, Ren et
# al., arXiv 2101.06840, sec. 4; Fuyou, Liao et al., arXiv 2403.06504, sec. 2, names the host link and the CPU
# step as the bottlenecks). Transfers overlap compute (FSDP2 prefetches the next block), the CPU step does not.
# [ours] fp32 scores of one query chunk against one key block in the ring attention of
# train/context_parallel.py (which takes this constant): 256 MiB, so its transient memory is O(chunk x L)
RING_SCORE_CHUNK_BYTES = 1 << 28
OFFLOAD_BYTES_PER_PARAM = 4  # [ours] fp32 shards cross the link, cast to bf16 on the GPU
CPU_ADAM_BYTES_PER_PARAM = 28  # [ZeRO-Offload] p, g, m, v read; p, m, v written; fp32
PCIE_GB_S = 50.0  # [ours] effective PCIe Gen5 x16 host-to-device bandwidth (64 GB/s nominal)
CPU_MEMORY_GB_S = 100.0  # [ours] host DRAM bandwidth one process's AdamW reaches on a 2-socket server
OFFLOAD_GATHERED_BLOCKS = 2  # FSDP2: the block being computed and the one prefetched


def estimate_offload_peak(config: LlamaConfig, seq_len: int, *, micro_batch_size: int = 1,
                          checkpointing: bool = True, compile: bool = False, float8: str | None = None,
                          num_gpus: int = 1, master_bytes: int = 4) -> MemoryEstimate:
    """Peak GPU bytes of FSDP2 + ``CPUOffloadPolicy`` (bf16 compute, fp32 reduction), by what holds them.

    On the GPU (P = one block's parameters, R = the root's: embedding, head, final norm; n GPUs; m =
    ``master_bytes``, the shards' bytes per parameter: 4 for fp32 masters, 2 for ``--parallel.master_dtype
    bfloat16``):
      gathered blocks   ``OFFLOAD_GATHERED_BLOCKS`` x (bf16 unsharded 2P + the shard copied in, mP/n: the
                        prefetched block's copy is in flight while the current one computes)
      root              bf16 unsharded 2R, gathered for the whole step (FSDP2 keeps the root's); its shard's
                        host-to-device copy is the all-gather's input and is freed once the gather is done
      gradients         in flight for one block: bf16 2P + the fp32 copy reduced and copied out 4P
                        (the planner's FSDP term 6P); at the end of backward the root's (fp32 4R + bf16 2R)
      activations       bf16 block inputs (or every saved tensor without checkpointing), the block
                        recomputed in backward, the final norm; the fused loss (``estimate_loss_bytes``)
    Parameters, gradients and optimizer states: 0 on the GPU. ``overhead_bytes``: the CUDA context, outside
    ``max_memory_allocated`` (what the caching allocator reserves beyond the allocated blocks is left to the
    planner's headroom). Peak = max over the loss forward, the first block's backward and the end of backward.
    Measured on one H200 (llama-8b, seq 4096, micro-batch 1, bf16 masters, full checkpointing:
    ``benchmarks/finetune.py --cases offload_8b``): see docs/finetune.md for the measured peak against this.
    """
    if num_gpus < 1 or micro_batch_size < 1:
        raise ValueError("num_gpus and micro_batch_size must be >= 1")
    if master_bytes not in (2, 4):
        raise ValueError(f"master_bytes must be 2 (bf16 masters) or 4 (fp32), got {master_bytes}")
    d, tokens = config.hidden_size, micro_batch_size * seq_len
    block = block_params(config)
    root = total_params(config) - block * config.num_layers
    gathered = OFFLOAD_GATHERED_BLOCKS * (2 + master_bytes / num_gpus) * block
    root_bytes = 2.0 * root
    per_layer = [layer_activation_bytes_per_token(config, i, param_bytes=2, compile=compile, float8=float8) * tokens
                 for i in range(config.num_layers)]
    inputs = 2 * d * tokens
    kept = inputs * config.num_layers if checkpointing else sum(per_layer)
    activations = kept + 6 * d * tokens
    recompute = max(per_layer) if checkpointing else 0.0
    loss = estimate_loss_bytes(config, tokens=tokens, fsdp=True)
    moments = {
        "loss forward": (activations, root_bytes + (2 + master_bytes / num_gpus) * block, loss.forward_peak, 0.0),
        "first block backward": (activations + recompute, root_bytes + gathered, loss.saved + inputs, 6.0 * block),
        "backward end": (0.0, root_bytes + gathered, 0.0, 6.0 * root),
    }
    name = max(moments, key=lambda k: sum(moments[k]))
    acts, cps, loss_at_peak, grads = moments[name]
    return MemoryEstimate(params=0.0, grads=grads, optimizer=0.0, activations=acts, compute_copies=cps,
                          loss=loss_at_peak, overhead_bytes=CUDA_CONTEXT_BYTES, peak_moment=name)


def predict_offload_peak_bytes(config: LlamaConfig, seq_len: int, *, micro_batch_size: int = 1,
                               checkpointing: bool = True, compile: bool = False, float8: str | None = None,
                               num_gpus: int = 1, master_bytes: int = 4, include_overhead: bool = False) -> int:
    """Predicted peak GPU bytes per GPU under ``--parallel.offload cpu``: comparable with
    ``torch.cuda.max_memory_allocated`` (``include_overhead``: plus the CUDA context, for fitting a GPU).
    The breakdown is ``estimate_offload_peak``."""
    est = estimate_offload_peak(config, seq_len, micro_batch_size=micro_batch_size, checkpointing=checkpointing,
                                compile=compile, float8=float8, num_gpus=num_gpus, master_bytes=master_bytes)
    return int(est.total_bytes if include_overhead else est.allocated_bytes)


def offload_step_seconds(config: LlamaConfig, *, compute_seconds: float, micro_steps: int, num_gpus: int = 1,
                         pcie_gb_s: float = PCIE_GB_S, cpu_memory_gb_s: float = CPU_MEMORY_GB_S) -> float:
    """Seconds per optimizer step under CPU offload: max(compute, the host link's 3 x 4 bytes/param per
    micro-step: parameters in twice, gradients out once) + the CPU AdamW step (28 bytes/param over host DRAM,
    each GPU's process its own shard); constants above."""
    params = total_params(config)
    link = 3 * params * OFFLOAD_BYTES_PER_PARAM * max(1, micro_steps) / (pcie_gb_s * 1e9)
    cpu_step = params / num_gpus * CPU_ADAM_BYTES_PER_PARAM / (cpu_memory_gb_s * 1e9)
    return max(compute_seconds, link) + cpu_step
