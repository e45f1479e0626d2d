"""Parallelism as a transform of the single-device model, applied in one fixed order.

``parallelize`` applies float8 matmuls (optional, torchao), then activation checkpointing, then
``torch.compile`` (per block), then FSDP2 (``fully_shard`` on every block, then the root) to a model
built by ``model/llama.py``. This file and ``checkpoint.py`` are the only users of
``torch.distributed``; the few collectives the rest of the code needs are exported here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint


@dataclass(kw_only=True, slots=True, frozen=True)
class ParallelDims:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


DEVICES = ("auto", "cpu", "cuda")
AC_MODES = ("none", "full", "selective", "stream")
FLOAT8_RECIPES = ("tensorwise", "rowwise")
OFFLOAD_MODES = ("none", "cpu")
MASTER_DTYPES = ("float32", "bfloat16")


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """How the single-device model is run: device, compile, activation checkpointing, float8, FSDP2 on one GPU."""

    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile each block
    activation_checkpointing: str = "none"  # none | full | selective | stream (streaming backprop, train/stream.py)
    stream_chunk: int = 4096  # rows of the sequence per backward chunk under activation_checkpointing=stream
    # under activation_checkpointing=stream: each block's saved input in pinned host memory, copied back for its
    # backward, so the GPU holds one block input instead of one per layer (train/stream.py)
    stream_offload: bool = False
    # one device: FSDP2 mixed precision (bf16 compute copies over fp32 masters, what every rank runs under torchrun)
    # instead of autocast over fp32 parameters; bf16 residual stream and saved activations (docs/scale.md)
    fsdp_one_device: bool = False
    float8: str | None = None  # tensorwise | rowwise: float8 matmuls in the blocks (torchao; apply_float8)
    # cpu: FSDP2 CPUOffloadPolicy, parameter shards, gradients and optimizer states in host memory (implies FSDP2,
    # on one device a one-rank mesh); the AdamW step runs on the CPU
    offload: str = "none"  # none | cpu
    # dtype of the parameters the optimizer updates, and so of its states: bfloat16 halves their memory (an 8B
    # model's AdamW under offload: 64 GB of host memory instead of 128 GB) at the cost of rounding every update
    master_dtype: str = "float32"  # float32 | bfloat16
    # ranks that share each row, its sequence split over them (ring attention, train/context_parallel.py)
    context_parallel: int = 1

    def __post_init__(self) -> None:
        for name, allowed in (("device", DEVICES), ("activation_checkpointing", AC_MODES),
                              ("offload", OFFLOAD_MODES), ("master_dtype", MASTER_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--parallel.{name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        check_float8_recipe(self.float8)
        if self.stream_chunk < 1:
            raise ValueError(f"--parallel.stream_chunk must be >= 1 token, got {self.stream_chunk}")
        if self.stream_offload and self.activation_checkpointing != "stream":
            raise ValueError("--parallel.stream_offload needs --parallel.activation_checkpointing stream (it moves "
                             "the streamed blocks' saved inputs to host memory)")
        if self.context_parallel < 1:
            raise ValueError(f"--parallel.context_parallel must be >= 1 rank, got {self.context_parallel}")
        if self.context_parallel > 1 and self.activation_checkpointing == "stream":
            raise ValueError("--parallel.context_parallel with --parallel.activation_checkpointing stream is not "
                             "supported: streaming backprop chunks the sequence that the ring already splits")
        if self.offload != "none" and self.float8 is not None:
            raise ValueError("--parallel.float8 with --parallel.offload cpu is not supported: the offloaded step is "
                             "bound by the host link and the CPU optimizer, and torchao's float8 all-gather "
                             "is not wired in; drop one of them")

    @property
    def sharded_on_one_device(self) -> bool:
        """Whether one device runs FSDP2 on a one-rank mesh (``fsdp_one_device``, implied by offload)."""
        return self.fsdp_one_device or self.offload != "none"


def init_distributed(device: str = "auto", *, offload: str = "none") -> ParallelDims:
    """Read torchrun's environment; start the process group (NCCL on GPU, gloo on CPU) when WORLD_SIZE > 1.

    Under CPU offload a GPU group gets a gloo backend for CPU tensors too: gradient clipping reduces the
    norm of CPU gradient shards, and checkpoints gather CPU state."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--parallel.device {device}: no CUDA GPU is visible (use cpu or auto)")
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend_for(use_cuda, offload), device_id=dev if use_cuda else None)
    return ParallelDims(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def backend_for(cuda: bool, offload: str) -> str:
    """NCCL on GPU, gloo on CPU; under CPU offload a GPU group also holds gloo for the CPU tensors."""
    if not cuda:
        return "gloo"
    return "cuda:nccl,cpu:gloo" if offload != "none" else "nccl"


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_float8_recipe(recipe: str | None) -> None:
    if recipe is not None and recipe not in FLOAT8_RECIPES:
        raise ValueError(f"--parallel.float8 {recipe!r}: choose one of {', '.join(FLOAT8_RECIPES)}")


def apply_float8(model: nn.Module, recipe: str | None, device: torch.device) -> None:
    """Swap the blocks' linear layers for torchao's ``Float8Linear`` (float8 matmuls, dynamic scaling).

    ``tensorwise`` scales each tensor by one amax (the fastest on H100/H200, what torchtitan enables with
    ``--float8``); ``rowwise`` scales per row (more accurate, slower). Weights, optimizer states and
    checkpoints keep their dtype and names: only the matmuls' inputs are cast to float8 on the fly, so a
    float8 run resumes without it and exports the same HF weights. The LM head stays in the compute dtype,
    as torchtitan keeps its output layer: its matmul is the fused loss's (``model/loss.py``). Under FSDP2
    the all-gather stays in bf16 (torchao's float8 all-gather is not wired in).
    """
    check_float8_recipe(recipe)
    if recipe is None:
        return
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(f"--float8 needs float8 tensor cores (compute capability 8.9+: H100, H200, L4, ...); "
                           f"{name} has {torch.cuda.get_device_capability(device)}")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as err:
        raise RuntimeError("--float8 needs torchao: pip install 'batchpilot[float8]'") from err

    def in_blocks(module: nn.Module, fqn: str) -> bool:
        # float8 matmuls (torch._scaled_mm) need both dimensions divisible by 16
        return fqn.startswith("layers.") and module.in_features % 16 == 0 and module.out_features % 16 == 0

    convert_to_float8_training(model, module_filter_fn=in_blocks, config=Float8LinearConfig.from_recipe_name(recipe))


def apply_ac(model: nn.Module, mode: str) -> None:
    """Activation checkpointing: ``full`` recomputes every block in backward, ``selective`` every other one.

    The composable ``checkpoint`` keeps parameter names unchanged, so checkpoints and HF export
    do not depend on whether a run used checkpointing.
    """
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"unknown activation checkpointing mode {mode!r}; choose none, full or selective "
                         f"(stream: apply_streaming)")
    every = 1 if mode == "full" else 2
    for i, block in enumerate(model.layers):
        if i % every == 0:
            checkpoint(block)


def apply_streaming(model: nn.Module, chunk_tokens: int, offload_inputs: bool = False) -> None:
    """Streaming backprop (StreamBP, Luo et al., arXiv 2506.03077) in place of checkpointing: each block keeps
    its input (in pinned host memory with ``offload_inputs``) and differentiates the sequence ``chunk_tokens``
    rows at a time (``train/stream.py``)."""
    from batchpilot.train.stream import apply_streaming as stream_blocks

    stream_blocks(model, chunk_tokens, offload_inputs=offload_inputs)


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place: identical blocks share one graph, so compile time stays flat in depth.

    Streamed blocks stay eager: their backward is a Python loop over chunks inside an autograd Function."""
    from batchpilot.train.stream import StreamingBlock

    for block in model.layers:
        if not isinstance(block, StreamingBlock):
            block.compile(fullgraph=False)


def apply_fsdp(model: nn.Module, dims: ParallelDims, *, param_dtype: torch.dtype | None,
               offload: str = "none") -> None:
    """FSDP2: shard every block, then the root (embeddings, final norm, LM head); fp32 gradient reduction.

    On one device (a one-rank group, started here if needed) nothing is sharded or communicated, but the
    mixed-precision policy still gives bf16 compute over fp32 master weights (the "all-gather" is a cast).
    ``offload="cpu"``: FSDP2's ``CPUOffloadPolicy`` on every ``fully_shard``: parameter shards and their
    gradients live in (pinned) host memory, each block's parameters are copied to the GPU for its forward and
    backward, and the optimizer steps on the CPU shards (ZeRO-Offload, Ren et al., arXiv 2101.06840, sec. 4).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if offload not in OFFLOAD_MODES:
        raise ValueError(f"--parallel.offload {offload!r}: choose one of {', '.join(OFFLOAD_MODES)}")
    cuda = dims.device.type == "cuda"
    if not dist.is_initialized():  # one device: an in-process group, no rendezvous
        index = dims.device.index if dims.device.index is not None else (torch.cuda.current_device() if cuda else 0)
        dist.init_process_group(backend_for(cuda, offload), store=dist.HashStore(), rank=0, world_size=1,
                                device_id=torch.device("cuda", index) if cuda else None)
    mesh = init_device_mesh(dims.device.type, (dims.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # pinned host memory makes the copies asynchronous DMA; pinning needs a CUDA runtime
    policy = CPUOffloadPolicy(pin_memory=cuda) if offload == "cpu" else OffloadPolicy()
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again right away in backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=policy,
                    reshard_after_forward=i < len(model.layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=policy)


def parallelize(model: nn.Module, dims: ParallelDims, *, activation_checkpointing: str = "none",
                compile: bool = False, param_dtype: torch.dtype | None = None,
                fsdp_one_device: bool = False, float8: str | None = None, stream_chunk: int = 4096,
                offload: str = "none", stream_offload: bool = False) -> nn.Module:
    """The one place where parallelism is applied, in a fixed order: float8, AC or streaming, compile, FSDP2.

    FSDP2 runs with several ranks, and on one device when ``fsdp_one_device`` is set (with a
    ``param_dtype``): bf16 parameters in compute keep the residual stream and the saved activations in
    bf16, where autocast over fp32 parameters keeps them fp32 (twice the bytes per saved block input).
    ``offload="cpu"`` implies FSDP2 (on one device a one-rank mesh) with the parameters in host memory.
    """
    if offload != "none" and float8 is not None:
        raise ValueError("--parallel.float8 with --parallel.offload cpu is not supported; drop one of them")
    apply_float8(model, float8, dims.device)
    if activation_checkpointing == "stream":
        apply_streaming(model, stream_chunk, stream_offload)
    else:
        apply_ac(model, activation_checkpointing)
    if compile:
        apply_compile(model)
    if dims.is_distributed or (fsdp_one_device and param_dtype is not None) or offload != "none":
        apply_fsdp(model, dims, param_dtype=param_dtype, offload=offload)
    return model


def mean_across_ranks(value: float, dims: ParallelDims) -> float:
    if not dims.is_distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=dims.device)
    dist.all_reduce(t)
    return t.item() / dims.world_size


def sum_across_ranks_fn(dims: ParallelDims) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A callable that sums a tensor over all ranks in place and returns it (None on one process): the
    data-parallel all-reduce of the MoE expert counts for the global-batch balance loss (model/moe.py)."""
    if not dims.is_distributed:
        return None

    def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    return sum_over_ranks


def mean_list_across_ranks(values: list[float], dims: ParallelDims) -> list[float]:
    """Element-wise mean over ranks (one collective for the whole list)."""
    if not dims.is_distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=dims.device)
    dist.all_reduce(t)
    return (t / dims.world_size).tolist()


def any_across_ranks(flag: bool, dims: ParallelDims) -> bool:
    """True on every rank if it is true on any rank (used so that all ranks back off together)."""
    if not dims.is_distributed:
        return flag
    t = torch.tensor([int(flag)], device=dims.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_across_ranks(values: list[float], dims: ParallelDims) -> list[float]:
    """Element-wise maximum over ranks (one collective for the whole list)."""
    if not dims.is_distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=dims.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def barrier(dims: ParallelDims) -> None:
    if dims.is_distributed:
        dist.barrier()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Under FSDP2, reduce-scatter gradients only on the last micro-batch of a step."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)


def reshard_after_error(model: nn.Module) -> None:
    """Free gathered FSDP2 parameters, partial gradients and per-iteration state after a forward/backward raised.

    ``reshard`` is public; the rest touches FSDP2 internals that the end-of-backward callback would
    have cleared, and the unsharded gradients it accumulates while gradient sync is off (micro-batches
    before the last): best effort, each attribute checked, as names move between releases.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        module.reshard()
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch < 2.12: one group per module
            groups = [g for g in [getattr(state, "_fsdp_param_group", None)] if g is not None]
        for group in groups:
            group._training_state = type(group._training_state).IDLE
            for param in getattr(group, "fsdp_params", []):  # gradients kept unsharded while sync was off
                param.unsharded_accumulated_grad = None
                if getattr(param, "_unsharded_param", None) is not None:
                    param._unsharded_param.grad = None
        if hasattr(state, "_training_state"):
            state._training_state = type(state._training_state).IDLE
        getattr(state, "_modules_to_run_forward", set()).clear()
        ctx = getattr(state, "_state_ctx", None)
        if ctx is not None:
            ctx.iter_forward_root = None
            ctx.post_backward_final_callback_queued = False
        comm = getattr(state, "_comm_ctx", None)
        if comm is not None:
            comm.post_forward_order.clear()
            getattr(comm, "reduce_scatter_states", []).clear()
            if hasattr(comm, "reduce_scatter_state"):
                comm.reduce_scatter_state = None


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` (0 disables clipping) and return the total norm, full across shards, as a 0-d
    tensor on the device: reading it is a host sync, which the trainer does once per step, with the loss."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm
