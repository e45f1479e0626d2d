"""Float8 against bf16 training on real text: the same run twice, one flag apart (``--float8``).

Both runs are ``batchpilot train`` on the same prepared data, model shape (``--preset`` with the data's
vocabulary), seed, batch, schedule and compiled blocks; the only difference is ``--float8 RECIPE``. A
speed benchmark cannot show that float8 still trains: this records both loss curves, the validation
losses and tokens/s, and the differences.

    python benchmarks/float8_parity.py --data data/adaptive                 # one GPU, both runs in turn
    python benchmarks/float8_parity.py --data data/adaptive --gpus 0,1      # both at once on two GPUs

``--data`` is a prepared directory (``batchpilot prepare``). Results:
``benchmarks/results/float8_parity_<recipe>_lr<lr>_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance import provenance  # noqa: E402

from batchpilot.metrics import read_metrics  # noqa: E402
from batchpilot.model.hf import config_to_hf  # noqa: E402
from batchpilot.model.llama import get_preset  # noqa: E402
from batchpilot.train.parallel import FLOAT8_RECIPES  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="prepared data directory (meta.json, train/val shards)")
    p.add_argument("--preset", default="llama-1b", help="model shape; the vocabulary is the data's")
    p.add_argument("--recipe", default="tensorwise", choices=FLOAT8_RECIPES)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--global-batch-tokens", type=int, default=65536)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--min-lr", type=float, default=6e-5)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="compile the blocks")
    p.add_argument("--gpus", default=None, help="two GPU indices (e.g. 0,1): run both at once")
    p.add_argument("--work-dir", default=None, help="where the two run directories go (default: a temp dir)")
    p.add_argument("--out", default=None, help="directory for the JSON (default benchmarks/results)")
    args = p.parse_args()
    if not (Path(args.data) / "meta.json").is_file():
        p.error(f"--data {args.data}: not a prepared directory (no meta.json); run `batchpilot prepare` first")
    return args


def train_command(args: argparse.Namespace, model_config: Path, out: Path, float8: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "batchpilot", "train", "--model", str(model_config), "--data", args.data,
           "--seq-len", str(args.seq_len), "--global-batch-tokens", str(args.global_batch_tokens),
           "--micro-batch-size", str(args.micro_batch_size), "--max-steps", str(args.max_steps),
           "--lr", str(args.lr), "--min-lr", str(args.min_lr), "--eval-every", str(args.eval_every),
           "--eval-batches", str(args.eval_batches), "--save-every", str(args.max_steps),
           "--compile" if args.compile else "--no-compile", "--seed", "0", "--no-progress", "--out", str(out)]
    return cmd + (["--float8", float8] if float8 else [])


def run_both(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    config = get_preset(args.preset)
    vocab_size = json.loads((Path(args.data) / "meta.json").read_text())["vocab_size"]
    model_config = work / "config.json"
    model_config.write_text(json.dumps(config_to_hf(config.with_(vocab_size=vocab_size))))
    runs = {"bf16": None, "float8": args.recipe}
    gpus = args.gpus.split(",") if args.gpus else None
    procs = {}
    for i, (name, float8) in enumerate(runs.items()):
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpus[i]} if gpus else {}))
        log = open(work / f"{name}.log", "w")
        procs[name] = subprocess.Popen(train_command(args, model_config, work / name, float8), env=env, cwd=REPO,
                                       stdout=log, stderr=subprocess.STDOUT)
        if not gpus:
            procs[name].wait()
    for name, proc in procs.items():
        if proc.wait() != 0:
            tail = (work / f"{name}.log").read_text()[-2000:]
            raise SystemExit(f"the {name} run failed (exit {proc.returncode}):\n{tail}")
    return {name: work / name for name in runs}


def curve(run_dir: Path) -> dict:
    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    second_half = [r["tokens_per_s"] for r in steps[len(steps) // 2:]]
    return dict(loss=[round(r["loss"], 5) for r in steps],
                val_loss={r["step"]: round(r["val_loss"], 5) for r in records if "val_loss" in r},
                tokens_per_s_median_second_half=round(statistics.median(second_half), 1),
                peak_memory_gib=max((r.get("peak_memory_bytes", 0) for r in steps), default=0) / 2**30)


def compare(bf16: dict, float8: dict) -> dict:
    def mean_last(losses: list[float], n: int = 20) -> float:
        return statistics.fmean(losses[-n:])

    windows = range(0, min(len(bf16["loss"]), len(float8["loss"])) - 9, 10)  # 10-step means along the run
    gaps = [statistics.fmean(float8["loss"][i:i + 10]) - statistics.fmean(bf16["loss"][i:i + 10]) for i in windows]
    last_val = max(set(bf16["val_loss"]) & set(float8["val_loss"]))
    return dict(
        final_val_loss_bf16=bf16["val_loss"][last_val], final_val_loss_float8=float8["val_loss"][last_val],
        final_val_loss_rel_diff=round(float8["val_loss"][last_val] / bf16["val_loss"][last_val] - 1, 5),
        train_loss_last20_bf16=round(mean_last(bf16["loss"]), 5),
        train_loss_last20_float8=round(mean_last(float8["loss"]), 5),
        largest_10step_mean_gap=round(max(gaps, key=abs), 5) if gaps else None,
        tokens_per_s_ratio=round(float8["tokens_per_s_median_second_half"] / bf16["tokens_per_s_median_second_half"], 3))


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        dirs = run_both(args, Path(tmp))
        curves = {name: curve(run_dir) for name, run_dir in dirs.items()}
        setup = json.loads((dirs["float8"] / "config.json").read_text())
    result = dict(benchmark="float8_parity", preset=args.preset, recipe=args.recipe, **provenance(),
                  train_config_float8_run=setup, runs=curves, summary=compare(curves["bf16"], curves["float8"]))
    print(json.dumps(result["summary"], indent=1))
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"float8_parity_{args.recipe}_lr{args.lr:g}_{dt.date.today().isoformat()}.json"
    tmp_path = path.with_suffix(".tmp")
    tmp_path.write_text(json.dumps(result, indent=1))
    tmp_path.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
