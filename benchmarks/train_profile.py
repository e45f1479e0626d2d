"""Where one training step's GPU time goes: the trainer's step on a compiled model, under the torch profiler.

Prints the median step time over 6 timed steps (after 3 warmup), the GPU's busy time (the union of kernel
intervals) and idle time inside the step's span, kernel time by category, and the top kernels.

    python benchmarks/train_profile.py                        # llama-1b, 16 x 2048, bf16 matmuls
    python benchmarks/train_profile.py --float8 tensorwise    # the same with float8 matmuls in the blocks

Needs a CUDA GPU. Raw tables of earlier runs: ``benchmarks/results/train_profile_*.txt``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402
from provenance import provenance  # noqa: E402

from batchpilot.model.llama import get_preset  # noqa: E402
from batchpilot.train import parallel  # noqa: E402


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds in, milliseconds out)."""
    total, start, end = 0.0, None, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += 0 if end is None else end - start
            start, end = s, e
        else:
            end = max(end, e)
    return (total + (0 if end is None else end - start)) / 1e3


def category(kernel: str) -> str:
    name = kernel.lower()
    if any(k in name for k in ("flash", "fmha", "sdpa", "cudnn")):
        return "attention (cuDNN)"
    if "groupproblemshape" in name:  # torch._grouped_mm's CUTLASS kernel (MoE experts)
        return "grouped matmul (CUTLASS)"
    if any(k in name for k in ("nvjet", "gemm", "cutlass", "scaled_mm")) and not name.startswith("triton"):
        return "matmul (cuBLAS)"
    if "multi_tensor_apply" in name:
        return "foreach (AdamW, clipping)"
    return "triton (compiled)" if name.startswith("triton") else "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-1b")
    p.add_argument("--rows", type=int, default=16, help="rows per step (one micro-batch)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--float8", default=None, choices=parallel.FLOAT8_RECIPES)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_profile.py needs a CUDA GPU")
    print(json.dumps(provenance()))
    config = get_preset(args.preset)
    dims = parallel.ParallelDims(device=torch.device("cuda", 0))
    runner = tt.BatchpilotRunner(config, dims, ac="none", compile=True, float8=args.float8)
    loader = tt.RandomRows(config.vocab_size, args.seq)

    def step() -> None:
        runner.step(loader, rows=args.rows, seq=args.seq, mb=args.rows)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    median = sorted(times)[len(times) // 2]
    print(f"float8={args.float8} step median {median * 1e3:.1f} ms, {args.rows * args.seq / median:,.0f} tokens/s; "
          f"steps {[round(t * 1e3, 1) for t in times]} ms")
    prof, summary = profile_step(step)
    print(f"GPU span {summary['span_ms']:.1f} ms, busy {summary['busy_ms']:.1f} ms, idle inside the span "
          f"{summary['span_ms'] - summary['busy_ms']:.1f} ms")
    print(summary["by_category_ms"])
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=80))


def profile_step(step, top: int = 25) -> tuple[profile, dict]:
    """One call of ``step`` under the CUDA profiler: the GPU's span and busy time (ms), kernel time by
    category, and the ``top`` kernels by total time as [name, calls, ms]."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    intervals = [(e.time_range.start, e.time_range.end) for e in kernels]
    by_category: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for e in kernels:
        ms = (e.time_range.end - e.time_range.start) / 1e3
        by_category[category(e.name)] = by_category.get(category(e.name), 0.0) + ms
        entry = by_name.setdefault(e.name[:160], [0, 0.0])
        entry[0], entry[1] = entry[0] + 1, entry[1] + ms
    return prof, {
        "span_ms": (max(e for _, e in intervals) - min(s for s, _ in intervals)) / 1e3,
        "busy_ms": busy_ms(intervals),
        "by_category_ms": {k: round(v, 2) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top_kernels": [[n, c, round(ms, 2)] for n, (c, ms) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]],
    }


if __name__ == "__main__":
    main()
