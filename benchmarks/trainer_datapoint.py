"""End-to-end data point: `batchpilot train` (the real CLI, data pipeline and loop) on one GPU.

Runs the trainer for a few steps on the embedded corpus and records tokens/s, MFU and peak memory
from its own metrics.jsonl, next to an HF baseline measured earlier on the same model and seq (``HF_ANCHOR``).

    python benchmarks/trainer_datapoint.py --preset llama-1b --seq-len 2048 --micro-batch-size 16 --steps 12
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import provenance

# A baseline measured once before (not by this script): HF LlamaForCausalLM (SDPA, eager) on the 1.24B model, seq 2048, one H200.
HF_ANCHOR = {"model": "llama-1b", "seq_len": 2048, "micro_batch_size": 16, "tokens_per_s": 51691, "mfu": 0.430,
             "peak_gib": 115.3, "source": "HF baseline, earlier measurement (not re-measured in this invocation)"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama-1b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--compile", action="store_true", help="also run with --compile")
    p.add_argument("--data", default="default", help="'default' or a prepared dataset directory")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    rows = []
    for compile_ in ([False, True] if args.compile else [False]):
        rows.append(run_trainer(args, compile_))
    result = {"benchmark": "trainer_datapoint", **provenance(), "rows": rows, "hf_anchor": HF_ANCHOR}
    out = Path(args.out) / f"trainer_datapoint_{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(rows, indent=2))


def run_trainer(args: argparse.Namespace, compile_: bool) -> dict:
    run_dir = Path(tempfile.mkdtemp()) / "run"
    tokens_per_step = args.micro_batch_size * args.seq_len * 2  # two micro-batches: accumulation is exercised
    cmd = [sys.executable, "-m", "batchpilot", "train", "--preset", args.preset, "--data", args.data,
           "--seq-len", str(args.seq_len), "--micro-batch-size", str(args.micro_batch_size),
           "--global-batch-tokens", str(tokens_per_step), "--max-steps", str(args.steps), "--lr", "3e-4",
           "--min-lr", "3e-5", "--eval-every", "1000", "--save-every", "100000", "--out", str(run_dir)]
    if compile_:
        cmd.append("--compile")
    subprocess.run(cmd, check=True)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = metrics[len(metrics) // 2:]  # second half: past compile and allocator warm-up
    return {"preset": args.preset, "seq_len": args.seq_len, "micro_batch_size": args.micro_batch_size,
            "global_batch_tokens": tokens_per_step, "compile": compile_,
            "tokens_per_s": sum(m["tokens_per_s"] for m in timed) / len(timed),
            "mfu": sum(m.get("mfu", 0.0) for m in timed) / len(timed),
            "peak_memory_gib": max(m.get("peak_memory_bytes", 0) for m in metrics) / 2**30,
            "loss_first": metrics[0]["loss"], "loss_last": metrics[-1]["loss"]}


if __name__ == "__main__":
    main()
