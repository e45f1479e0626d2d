"""Check ``plan/memory.py`` against ``torch.cuda.max_memory_allocated`` on the trainer's own step (issue 17).

Every probe is one configuration the tests do not use (``tests/plan/test_memory.py`` holds llama-1b at seq 2048
micro-batch 16 and seq 8192 micro-batch 4): llama-125m, qwen2-0.5b and llama-1b shapes, seq 2048-8192,
activation checkpointing none / selective / full, eager, compiled and float8 (tensorwise, compiled) blocks, one
probe with bf16 parameters (FSDP2 on one GPU), and two moe-1b probes (the trainer's MoE objective on: routing
record, global-batch balance loss). A probe runs in its own process (an OOM or a compile cache cannot
leak into the next) and builds the model as the trainer does (``train/parallel.parallelize``: float8, AC,
compile) with the trainer's optimizer (``train/optim.build_optimizer``), then runs ``trainer.train_step`` on
random rows: step 1 compiles and creates the AdamW states, the peak statistics are reset, step 2 is measured.
Each block shape is compiled once per probe. The prediction is ``estimate_peak_bytes(...).allocated_bytes``
(what ``max_memory_allocated`` counts); error = predicted / measured - 1.

    python benchmarks/memory_validation.py                 # one H200: <= 380 s (--budget-s), 13 probes (~25-35 s each)
    python benchmarks/memory_validation.py --dry           # CPU, tiny preset: the code path, no measurement

Each probe is capped (``--probe-timeout-s``) and skipped once the budget is spent; the JSON
(``benchmarks/results/mem_validation_<date>.json`` or ``--out DIR``) is rewritten after every probe with the
GPU, torch, commit, date, command and the summary ``memory_prediction_max_error`` (max |error| by kind: eager,
compiled, float8, and all).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclasses.dataclass(frozen=True)
class Probe:
    preset: str
    seq_len: int
    micro_batch_size: int
    activation_checkpointing: str = "none"  # none | selective | full
    compile: bool = False
    float8: str | None = None
    grad_accum_steps: int = 1
    bf16_params: bool = False  # FSDP2 on one GPU (the multi-GPU path's precision)

    @property
    def kind(self) -> str:
        return "float8" if self.float8 else "compiled" if self.compile else "eager"


# Interleaved by kind, cheapest first, so that a spent budget still leaves every kind measured.
GPU_PROBES = [  # sized so the activations are 30-80% of the peak (15-55 GiB predicted on an H200's 141)
    Probe("llama-125m", 4096, 12),
    Probe("llama-125m", 8192, 8, compile=True),
    Probe("qwen2-0.5b", 2048, 24, compile=True, float8="tensorwise"),
    Probe("qwen2-0.5b", 2048, 12, "selective"),
    Probe("qwen2-0.5b", 4096, 16, "full", compile=True),
    Probe("llama-1b", 4096, 16, "full", compile=True, float8="tensorwise"),
    Probe("llama-1b", 8192, 6, "full", grad_accum_steps=2),
    Probe("llama-1b", 2048, 12, "selective", compile=True),
    Probe("llama-125m", 2048, 32, "selective", compile=True, float8="tensorwise"),
    Probe("llama-1b", 4096, 6, compile=True, grad_accum_steps=2),
    Probe("qwen2-0.5b", 4096, 8, compile=True, bf16_params=True),
    # MoE (the routed experts' permutation buffers, router and routing record; docs/moe.md): last, as they are new
    Probe("moe-1b", 2048, 8, compile=True),
    Probe("moe-1b", 4096, 4, "full"),
]
DRY_PROBES = [Probe("tiny", 64, 2), Probe("tiny", 128, 2, "selective", compile=True, grad_accum_steps=2),
              Probe("tiny", 64, 4, "full", compile=True, float8="tensorwise"), Probe("tiny-moe", 64, 2)]


def predict(probe: Probe) -> dict:
    from batchpilot.model.llama import get_preset
    from batchpilot.plan.memory import estimate_peak_bytes

    est = estimate_peak_bytes(get_preset(probe.preset), micro_batch_size=probe.micro_batch_size,
                              seq_len=probe.seq_len, checkpointing=probe.activation_checkpointing,
                              compile=probe.compile, float8=probe.float8, grad_accum_steps=probe.grad_accum_steps,
                              sharding="fsdp" if probe.bf16_params else "none")
    parts = ("params", "grads", "optimizer", "activations", "compute_copies", "loss")
    return {"predicted_bytes": int(est.allocated_bytes), "peak_moment": est.peak_moment,
            "predicted_breakdown": {k: int(getattr(est, k)) for k in parts}}


def measure(probe: Probe) -> dict:
    """The child: two trainer steps of ``probe``; the second one's peak (None on CPU, where compile and float8
    are not applied: a CPU compile takes minutes and float8 matmuls need a GPU)."""
    import torch

    from train_throughput import RandomRows

    from batchpilot.model.llama import build_model, get_preset
    from batchpilot.train import parallel, trainer
    from batchpilot.train.config import MoeConfig
    from batchpilot.train.optim import OptimConfig, build_optimizer

    cuda = torch.cuda.is_available()
    dims = parallel.init_distributed("cuda" if cuda else "cpu")
    config = get_preset(probe.preset)
    model = build_model(config, device=dims.device, seed=0)
    model = parallel.parallelize(model, dims, activation_checkpointing=probe.activation_checkpointing,
                                 compile=probe.compile and cuda, float8=probe.float8 if cuda else None,
                                 param_dtype=torch.bfloat16 if probe.bf16_params else None,
                                 fsdp_one_device=probe.bf16_params)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4))
    loader = RandomRows(config.vocab_size, probe.seq_len)
    moe = trainer.moe_objective(MoeConfig(), config, dims)  # MoE models train with their balance loss, as in train
    rows = probe.micro_batch_size * probe.grad_accum_steps
    times = []
    for step in range(2):
        t0 = time.perf_counter()
        trainer.train_step(model, optimizer, loader, global_batch_tokens=rows * probe.seq_len, seq_len=probe.seq_len,
                           micro_batch_size=probe.micro_batch_size, dims=dims, grad_clip=1.0, moe=moe)
        if cuda:
            torch.cuda.synchronize()
            if step == 0:
                torch.cuda.reset_peak_memory_stats()
        times.append(round(time.perf_counter() - t0, 2))
    return {"measured_bytes": torch.cuda.max_memory_allocated() if cuda else None, "step_seconds": times}


def run_probe(probe: Probe, timeout_s: float) -> dict:
    """``probe`` in a child process, killed after ``timeout_s``; the row with prediction, measurement, error."""
    row: dict = {"config": dataclasses.asdict(probe), "kind": probe.kind, **predict(probe)}
    start = time.perf_counter()
    cmd = [sys.executable, __file__, "--child", json.dumps(dataclasses.asdict(probe))]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
            row["error"] = f"exit {out.returncode}: {tail[0][:300]}"
        else:
            row.update(json.loads(lines[-1]))
    except subprocess.TimeoutExpired:
        row["error"] = f"timed out after {timeout_s:.0f} s"
    row["seconds"] = round(time.perf_counter() - start, 1)
    measured = row.get("measured_bytes")
    row["prediction_error"] = round(row["predicted_bytes"] / measured - 1, 4) if measured else None
    return row


def summarize(rows: list[dict]) -> dict:
    errors: dict[str, list[float]] = {"eager": [], "compiled": [], "float8": []}
    for r in rows:
        if r.get("prediction_error") is not None:
            errors[r["kind"]].append(abs(r["prediction_error"]))
    everything = [e for v in errors.values() for e in v]
    max_error = {k: (round(max(v), 4) if v else None) for k, v in errors.items()}
    max_error["all"] = round(max(everything), 4) if everything else None
    return {"memory_prediction_max_error": max_error,
            "probes_measured": {k: len(v) for k, v in errors.items()},
            "within_5_percent": {k: (all(e <= 0.05 for e in v) if v else None) for k, v in errors.items()},
            "probes_failed_or_skipped": sum(1 for r in rows if r.get("measured_bytes") is None)}


def describe(probe: Probe, row: dict) -> str:
    measured, error = row.get("measured_bytes"), row.get("prediction_error")
    return (f"{probe.kind:8s} {probe.preset:11s} seq {probe.seq_len:5d} mb {probe.micro_batch_size:2d} "
            f"x{probe.grad_accum_steps} ac {probe.activation_checkpointing:9s} predicted "
            f"{row['predicted_bytes'] / 2**30:6.2f} GiB measured "
            + ("-" if measured is None else f"{measured / 2**30:6.2f}") + " GiB error "
            + ("-" if error is None else f"{error:+.3f}")
            + (f"  {row['error']}" if row.get("error") else "") + f" ({row.get('seconds', 0)} s)")


def write_atomic(path: Path, result: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny preset: the code path, no measurement")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--budget-s", type=float, default=375.0, help="wall time for all probes")
    parser.add_argument("--probe-timeout-s", type=float, default=75.0, help="wall time cap of one probe")
    parser.add_argument("--kinds", default="eager,compiled,float8", help="comma-separated subset of the kinds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Probe(**json.loads(args.child)))), flush=True)
        return args.out

    import torch

    from provenance import provenance

    if not args.dry and not torch.cuda.is_available():
        parser.error("no CUDA GPU; use --dry to check the code path on CPU")
    kinds = set(args.kinds.split(","))
    probes = [p for p in (DRY_PROBES if args.dry else GPU_PROBES) if p.kind in kinds]
    args.out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    path = args.out / f"mem_validation_{now:%Y%m%d_%H%M%S}{'_dry' if args.dry else ''}.json"
    result = {"benchmark": "memory_validation", **provenance(), "budget_s": args.budget_s,
              "probe_timeout_s": args.probe_timeout_s, "rows": [], "summary": {}}
    deadline = time.monotonic() + args.budget_s
    for probe in probes:
        left = deadline - time.monotonic()
        if left < 10:
            row = {"config": dataclasses.asdict(probe), "kind": probe.kind, **predict(probe),
                   "error": "skipped: budget spent", "prediction_error": None}
        else:
            row = run_probe(probe, min(args.probe_timeout_s, left))
        result["rows"].append(row)
        result["summary"] = summarize(result["rows"])
        write_atomic(path, result)
        print(describe(probe, row), flush=True)
    print(json.dumps(result["summary"]["memory_prediction_max_error"]))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
