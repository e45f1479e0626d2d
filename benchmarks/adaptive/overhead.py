"""Cost of measuring the gradient noise scale: the trainer's own step with and without the measurement.

Runs `train_step` side by side on the same model and device, in pairs that see the same rows (step
cost depends on how many documents a row packs), in ABBA order so that drift hits both modes, and reports
the median step time of each and the overhead ratio (issue target: at most 3% of step time). The
measurement is two full gradient norms per step (after the first micro-batch and after the last); under
FSDP2 it also turns on the reduce-scatter of the first micro-batch.

    python benchmarks/adaptive/overhead.py --preset llama-125m --seq-len 2048 --micro-batch-size 8 --accum 4
    python benchmarks/adaptive/overhead.py --smoke            # CPU, tiny preset
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: provenance
from provenance import provenance  # noqa: E402

from batchpilot.data.prepare import PrepareConfig, prepare
from batchpilot.data.packing import PackedLoader
from batchpilot.model.llama import build_model, get_preset
from batchpilot.train import parallel
from batchpilot.train.optim import OptimConfig, build_optimizer
from batchpilot.train.adaptive import grad_sq_norm_tensor
from batchpilot.train.trainer import accumulate_gradients, train_step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama-125m")
    p.add_argument("--data", default=None, help="prepared dataset (default: prepare the embedded corpus)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--accum", type=int, default=4, help="micro-batches per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if args.smoke:
        args.preset, args.seq_len, args.micro_batch_size, args.accum, args.steps = "tiny", 256, 8, 4, 6
    dims = parallel.init_distributed("auto")
    config = get_preset(args.preset)
    data = args.data or str(prepare(PrepareConfig(sources=["default"], out_dir=tempfile.mkdtemp() + "/d",
                                                  vocab_size=min(config.vocab_size, 8192))))
    model = parallel.parallelize(build_model(config, device=dims.device, seed=0), dims, compile=args.compile,
                                 param_dtype=torch.bfloat16 if dims.device.type == "cuda" else None)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4))
    loader = PackedLoader(data, "train", args.seq_len, seed=0)
    tokens = args.seq_len * args.micro_batch_size * args.accum * dims.world_size
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * (args.steps + 2)):
        measure = i % 4 in (1, 2)  # ABBA order, so slow drifts cancel between the two modes
        if i % 2 == 0:
            position = loader.state_dict()  # both modes of a pair see the same rows (step cost depends on them)
        else:
            loader.load_state_dict(position)
        t0 = time.perf_counter()
        train_step(model, optimizer, loader, global_batch_tokens=tokens, seq_len=args.seq_len,
                   micro_batch_size=args.micro_batch_size, dims=dims, grad_clip=1.0, measure_noise=measure)
        if dims.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 4:  # the first two steps of each mode warm up allocator, kernels and compile
            times[measure].append(time.perf_counter() - t0)
    base, measured = statistics.median(times[False]), statistics.median(times[True])
    norms = norm_seconds(model, loader, tokens, args, dims)
    summary = {"step_seconds_without": base, "step_seconds_with": measured, "overhead": measured / base - 1,
               "norm_seconds": norms, "direct_overhead": norms / base, "target_max_overhead": 0.03}
    result = {"benchmark": "adaptive_noise_overhead", **provenance(), "preset": args.preset, "seq_len": args.seq_len,
              "micro_batch_size": args.micro_batch_size, "accum": args.accum, "summary": summary, "times": times}
    if dims.rank == 0:
        out = Path(args.out) / f"adaptive_overhead_{result['gpu'].replace(' ', '_')}_{datetime.date.today()}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(json.dumps(summary, indent=2))


def norm_seconds(model, loader, tokens: int, args, dims) -> float:
    """The measurement's own cost, timed directly: two full gradient norms (the step timings above are noisy
    on shared machines; this is the part of the difference the measurement itself causes)."""
    accumulate_gradients(model, loader, global_batch_tokens=tokens, seq_len=args.seq_len,
                         micro_batch_size=args.micro_batch_size, dims=dims)
    samples = []
    for _ in range(20):
        t0 = time.perf_counter()
        torch.stack([grad_sq_norm_tensor(model.parameters()), grad_sq_norm_tensor(model.parameters())]).tolist()
        samples.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return statistics.median(samples)


if __name__ == "__main__":
    main()
