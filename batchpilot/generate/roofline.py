"""Physical bounds for a generation job: bytes and FLOPs, no overheads (the roofline model, Williams et al. 2009).

    decode step bytes  = W + kappa * (KV tokens read)          (prefix read once per group with cascade)
    request FLOPs      = 2 * P_mm * (I + O) + 2 * layers * d_q * (I + O)^2
    request bytes      = O * W / B + kappa * (I * O + O^2 / 2)
    T_job             >= max(sum FLOPs / F, sum bytes / BW)

W weight bytes, P_mm matmul parameters, kappa KV bytes per token, B decode batch (the decode
accounting of "Efficiently Scaling Transformer Inference", Pope et al. 2022, arXiv 2211.05102,
section 2). P_mm and kappa are counted by ``batchpilot.model.counting``. Datasheet ceilings (bf16
dense); a share of 1.0 is the unreachable physical limit.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from batchpilot.generate.stats import EngineStats
from batchpilot.model import counting
from batchpilot.model.llama import Llama

# name fragment -> (HBM bytes/s, dense bf16 FLOP/s), datasheet values
GPU_SPECS = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12), "A100": (2.0e12, 312e12)}


@dataclass(frozen=True, slots=True)
class ModelCost:
    weight_bytes: int
    matmul_params: int  # P_mm: parameters in matmuls per token (embedding lookup excluded, LM head included)
    kv_bytes_per_token: int  # kappa
    num_layers: int
    q_width: int  # d_q = num_heads * head_dim


def model_cost(model: Llama) -> ModelCost:
    c = model.config
    params = list({id(p): p for p in model.parameters()}.values())  # tied weights once
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    kv = counting.kv_bytes_per_token(c, dtype_bytes=params[0].element_size())  # the cache has the weights' dtype
    return ModelCost(weight_bytes, counting.matmul_params(c), kv, c.num_layers, c.num_heads * c.head_dim)


def gpu_spec(device: torch.device) -> tuple[float, float] | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_SPECS.items() if k in name), None)


def decode_step_bytes(cost: ModelCost, kv_tokens_read: int) -> float:
    return cost.weight_bytes + cost.kv_bytes_per_token * kv_tokens_read


def job_bound_s(cost: ModelCost, lengths: list[tuple[int, int]], spec: tuple[float, float], *, batch: int) -> float:
    """Lower bound on job time from (prompt, output) lengths, without prefix reuse."""
    bandwidth, flops = spec
    total_flops = sum(2 * cost.matmul_params * (i + o) + 2 * cost.num_layers * cost.q_width * (i + o) ** 2
                      for i, o in lengths)
    total_bytes = sum(o * cost.weight_bytes / max(1, batch) + cost.kv_bytes_per_token * (i * o + o * o / 2)
                      for i, o in lengths)
    return max(total_flops / flops, total_bytes / bandwidth)


def measure_copy_bandwidth(device: torch.device, num_bytes: int = 2 * 2**30, repeats: int = 10) -> float:
    """HBM bandwidth in bytes/s from a device-to-device copy (bytes read + written over the time)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * num_bytes * repeats / (start.elapsed_time(end) / 1e3)


def roofline_share(model: Llama, stats: EngineStats, lengths: list[tuple[int, int]],
                   seconds: float, *, bandwidth: float | None = None) -> dict[str, float] | None:
    """A job's time against its bytes/FLOPs bound, and its decode-only steps against their bytes bound.

    ``stats`` is the engine's ``EngineStats``; None off GPU (no known ceilings). ``bandwidth``
    (bytes/s, e.g. from ``measure_copy_bandwidth``) replaces the datasheet's HBM figure.
    """
    spec = gpu_spec(next(model.parameters()).device)
    if spec is None or seconds <= 0:
        return None
    spec = (bandwidth or spec[0], spec[1])
    batch = stats.decode_batch_sum / max(1, stats.decode_steps)
    bound = job_bound_s(model_cost(model), lengths, spec, batch=max(1, round(batch)))
    out = {"job_bound_s": bound, "job_share": bound / seconds, "mean_decode_batch": batch}
    if stats.decode_seconds > 0:
        out["decode_share"] = stats.decode_bytes / spec[0] / stats.decode_seconds
    return out
