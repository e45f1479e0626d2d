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
states are held throughout (the states exist from the first step on).
Checked on H200s (benchmarks/memory_validation.py, torch 2.11): the block formula matches the bytes the
block saves exactly; measured peaks of llama-125m/1b at micro-batch 1-16, checkpointing on and off, one GPU
and FSDP2 on two, are 0.985-1.04x the prediction (the planner's headroom covers the under-prediction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
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
    """Bytes one block saves for backward per token (module docstring); ``param_bytes`` 4 = autocast, 2 = bf16.

    ``compile`` and ``float8`` (autocast only) are DERIVED, not yet validated on a GPU (docs/plan.md):
    - compiled (inductor's min-cut partitioner, which never recomputes matmuls but recomputes pointwise ops
      when that saves bytes): the norms save as in eager (8D each); the bf16 casts of a norm output are one
      fused kernel shared by its linears (2D per norm, eager 6D + 4D); SDPA as in eager; SwiGLU keeps gate and
      up (4I) and recomputes silu(gate) and the product in backward (eager 8I): 20D + 4Q + 4KV + 4H + 4I.
      At llama-1b, seq 2048, micro-batch 16 this predicts ~62 GiB against 60.2 measured (eager: ~84).
    - float8 (torchao ``Float8Linear`` saves the float8 cast of its input, 1 byte/element, plus a scale): eager,
      each linear casts its input (q/k/v 3D, gate/up 2D, o_proj's 1Q next to SDPA's bf16 out, down 1I in
      place of 2I): 21D + 5Q + 4KV + 4H + 7I. Compiled, the partitioner saves each norm's fp32 input (4D) and
      recomputes norm + cast, plus one float8 input per norm (1D): 10D + 5Q + 4KV + 4H + 5I. This
      over-predicts the one measured point (llama-1b as above, compiled, tensorwise: 46.4 GiB measured,
      ~57 predicted); rowwise scales add 4 bytes per row (per token), counted per linear input.
    """
    d, i = config.hidden_size, config.intermediate_size
    q, kv, h = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.num_heads
    if param_bytes == 4 and float8 is not None:
        scales = 4 * (2 if compile else 7) if float8 == "rowwise" else 0
        return (10 * d + 5 * i if compile else 21 * d + 7 * i) + 5 * q + 4 * kv + 4 * h + scales
    if param_bytes == 4 and compile:
        return 20 * d + 4 * q + 4 * kv + 4 * h + 4 * i
    norms_and_inputs = 26 * d if param_bytes == 4 else 16 * d
    return norms_and_inputs + 4 * q + 4 * kv + 4 * h + 8 * i


def moe_mlp_bytes_per_token(config: LlamaConfig, *, param_bytes: int = 4) -> int:
    """Bytes a sparse MoE MLP (``model/moe.py``, grouped path, bf16 compute) saves per token for backward.

    E experts, K per token, I' expert intermediate, Is shared intermediate. Autocast (``param_bytes`` 4) casts
    the fp32 norm output once per linear (router 2D, shared gate/up 4D, shared gate 2D); with bf16 parameters
    one 2D input is shared. Router: the fp32 softmax (4E), the routing record's softmax, fp32 logits for
    logsumexp and z (8E + 8), top-k ids and the (renormalised) weights (12K). Per routed slot (the permutation
    buffers): the gather index (8), the gathered bf16 input the first grouped GEMM saves (2D), SwiGLU on the
    grouped outputs (8I'), the expert output and its weight for the weighting multiply (2D + 2), the scatter
    index (8). Shared expert: SwiGLU (8Is), its gate's sigmoid (4) and the gated product's input (2D).
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
    dense = activation_bytes_per_token(config, param_bytes=param_bytes, compile=compile, float8=float8)
    if not config.is_moe_layer(layer_idx):
        return dense
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


def estimate_stream_activation_bytes(config: LlamaConfig, *, seq_len: int, chunk_tokens: int,
                                     micro_batch_size: int = 1, param_bytes: int = 4) -> float:
    """Activation bytes at the first streamed block's backward: every block's saved input plus its working set.

    The planner's ``estimate_peak_bytes`` uses this in place of checkpointing's ``kept x L + recompute``.
    """
    saved_inputs = param_bytes * config.hidden_size * micro_batch_size * seq_len * config.num_layers
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


def estimate_peak_bytes(config: LlamaConfig, *, micro_batch_size: int, seq_len: int, optimizer: str = "adamw",
                        num_gpus: int = 1, sharding: Sharding = "none", checkpointing: bool = False,
                        stream_chunk_tokens: int | None = None, compile: bool = False,
                        float8: str | None = None) -> MemoryEstimate:
    """Peak bytes per GPU of forward + backward + optimizer step (module docstring).

    ``stream_chunk_tokens``: streaming backprop (``--parallel.activation_checkpointing stream``): every block
    keeps its input, as under checkpointing, and the block being differentiated holds
    ``stream_backward_working_bytes`` instead of a recomputed block (its bf16 weight copies included, so
    without FSDP2 no other block's copies are held then).
    ``compile`` / ``float8``: the derived per-token terms of ``activation_bytes_per_token`` (await GPU validation).
    """
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
    inputs_only = checkpointing or streaming  # both keep only each block's input
    kept = pbytes * d * tokens * config.num_layers if inputs_only else sum(per_layer)
    activations = kept + (8 if pbytes == 4 else 6) * d * tokens  # + final norm
    # autocast keeps a bf16 copy of every block weight for backward; FSDP2 gathers ~2 blocks (current + prefetch)
    # plus the root (embedding/head) in bf16.
    copies = 2 * (2 * block + v * d) if fsdp else 2 * non_vocab_params(config)

    loss = estimate_loss_bytes(config, tokens=tokens, fsdp=fsdp)
    recompute = max(per_layer) if checkpointing else 0.0  # the (largest) block recomputed in backward
    if streaming:
        recompute = stream_backward_working_bytes(config, seq_len=seq_len, chunk_tokens=stream_chunk_tokens,
                                                  micro_batch_size=micro_batch_size, param_bytes=pbytes)
    backward_copies = 0.0 if streaming and not fsdp else copies
    fsdp_grads = 3 * 2 * block if fsdp else 0  # FSDP2: bf16 block grads + their fp32 reduce-scatter copy
    # in backward the head grad becomes a parameter grad; grad_hidden flows into the blocks next to its input
    moments = {
        "loss forward": (activations, copies, loss.forward_peak, 0.0),
        "first block backward": (activations + recompute, backward_copies + fsdp_grads, loss.saved + pbytes * d * tokens, 0.0),
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


def fit_micro_batch(config: LlamaConfig, *, seq_len: int, optimizer: str, num_gpus: int, gpu_memory_gib: float,
                    headroom: float, max_micro_batch: int) -> MemoryFit:
    """Largest power-of-two micro-batch <= ``max_micro_batch`` that fits with headroom (FSDP on > 1 GPU).

    No checkpointing when that fits at a reasonable micro-batch (``REASONABLE_MICRO_BATCH_TOKENS``, or the
    cap if smaller). Otherwise the mode of full checkpointing and streaming backprop (its memory does not grow
    with a block's T x I activations, only with T x D inputs and O(T) keys/values) that fits the larger
    micro-batch; at equal micro-batches the cheaper in time (``recompute_factor``: full < stream).
    """
    sharding: Sharding = "fsdp" if num_gpus > 1 else "none"
    limit = gpu_memory_gib * GIB * (1 - headroom)

    def largest(mode: str) -> MemoryFit | None:
        best = None
        for mb in (m for m in MICRO_BATCH_GRID if m <= max_micro_batch):
            est = estimate_peak_bytes(config, micro_batch_size=mb, seq_len=seq_len, optimizer=optimizer,
                                      num_gpus=num_gpus, sharding=sharding, checkpointing=mode == "full",
                                      stream_chunk_tokens=STREAM_CHUNK_TOKENS if mode == "stream" else None)
            if est.total_bytes > limit:
                break
            best = MemoryFit(mb, mode == "full", sharding, est, streaming=mode == "stream")
        return best

    plain = largest("none")
    if plain and plain.micro_batch_size * seq_len >= min(max_micro_batch * seq_len, REASONABLE_MICRO_BATCH_TOKENS):
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
    return (f"the model does not fit on {num_gpus} GPU(s) of {gpu_memory_gib:g} GiB even at micro-batch 1 with "
            f"{sharding} sharding and activation checkpointing or streaming (needs {need_gib:.1f} GiB per GPU incl. {headroom:.0%}"
            f" headroom at seq_len {seq_len}); use {more_gpus}>= {math.ceil(need_gib)} GiB per GPU")
