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
dtype) and an fp32 V x D weight grad, and while it runs, chunk temporaries of about 10 fp32-logit-sized
buffers' worth of bytes per chunk element (14 from the second chunk on: the previous chunk's logits and
softmax are freed only when reassigned). Chunks hold 2^28 logits = 1 GiB in fp32 (``max(256, 2^28 // V)``
tokens), not 2^28 bytes.

Peak = max over three moments: inside the last loss chunk, the start of backward (loss grads
materialised), the end of backward (all grads + the embedding's dense grad). Assumption to check with
``benchmarks/memory_validation.py``: the caching allocator reuses freed blocks perfectly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from batchpilot.model.llama import LlamaConfig
from batchpilot.plan.laws import non_vocab_params, total_params

Sharding = Literal["none", "fsdp"]
Precision = Literal["fp32", "bf16_fp32_master"]
GIB = 1 << 30

# Optimizer state tensors per parameter (fp32 each): AdamW/LAMB keep m and v; LARS and SGD one momentum.
OPTIMIZER_STATES = {"adamw": 2, "lamb": 2, "lars": 1, "sgd": 1}
# CUDA context + cuBLAS/cuDNN workspaces, outside max_memory_allocated (~0.5-0.8 GiB on H100-class GPUs);
# NCCL adds communicator buffers when several GPUs train. Assumed values; calibrate with the benchmark.
CUDA_CONTEXT_BYTES = 3 * GIB // 4
NCCL_BYTES = GIB // 2
LOSS_CHUNK_LOGITS = 1 << 28  # model/loss.py: chunk_tokens = max(256, 2^28 // V)


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


def activation_bytes_per_token(config: LlamaConfig, *, param_bytes: int = 4) -> int:
    """Bytes one block saves for backward per token (module docstring); ``param_bytes`` 4 = autocast, 2 = bf16."""
    d, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    norms_and_inputs = 26 * d if param_bytes == 4 else 16 * d
    return norms_and_inputs + 4 * q + 4 * kv + 4 * config.num_heads + 8 * i


def kv_bytes_per_token(config: LlamaConfig, *, dtype_bytes: int = 2) -> int:
    """KV-cache bytes per generated or prompt token: k and v, every layer, K heads of E."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype_bytes


def _block_params(config: LlamaConfig) -> float:
    return non_vocab_params(config) / config.num_layers


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
                        num_gpus: int = 1, sharding: Sharding = "none", checkpointing: bool = False) -> MemoryEstimate:
    """Peak bytes per GPU of forward + backward + optimizer step (module docstring)."""
    fsdp = sharding == "fsdp"
    n = num_gpus if fsdp else 1
    pbytes = 2 if fsdp else 4  # residual stream / compute dtype of params
    d, v, tokens = config.hidden_size, config.vocab_size, micro_batch_size * seq_len
    state = estimate_model_state_bytes(total_params(config), optimizer=optimizer, num_shards=n)
    block = _block_params(config)

    per_layer = activation_bytes_per_token(config, param_bytes=pbytes) * tokens
    saved_layers = pbytes * d * tokens * config.num_layers + per_layer if checkpointing else per_layer * config.num_layers
    activations = saved_layers + (8 if pbytes == 4 else 6) * d * tokens
    # autocast keeps a bf16 copy of every block weight for backward; FSDP2 gathers ~2 blocks (current + prefetch)
    # plus the root (embedding/head) in bf16.
    copies = 2 * (2 * block + v * d) if fsdp else 2 * non_vocab_params(config)

    chunk = min(tokens, max(256, LOSS_CHUNK_LOGITS // v))
    chunk_temps = (14 if tokens > chunk else 10) * chunk * v + 6 * v * d
    loss_saved = pbytes * d * tokens + 4 * v * d
    in_loss = loss_saved + chunk_temps
    backward_start = 2 * loss_saved  # grad_hidden and the head grad materialise next to the saved ones
    backward_extra = 3 * 2 * block if fsdp else 0  # FSDP2: bf16 block grads + their fp32 reduce copy
    end_of_backward = 4 * v * d + (2 * v * d if fsdp else 0)  # dense embedding grad (+ its bf16 form)

    moments = {
        "loss forward": (activations, copies, in_loss, 0.0),
        "backward start": (activations, copies + backward_extra, backward_start, 0.0),
        "backward end": (0.0, copies if fsdp else 0.0, end_of_backward, state.grads),
    }
    name = max(moments, key=lambda k: sum(moments[k]))
    acts, cps, loss, grads = moments[name]
    overhead = CUDA_CONTEXT_BYTES + (NCCL_BYTES if num_gpus > 1 else 0)
    return MemoryEstimate(params=state.params, grads=grads, optimizer=state.optimizer, activations=acts,
                          compute_copies=cps, loss=loss, overhead_bytes=overhead, peak_moment=name)
