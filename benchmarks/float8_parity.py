"""Float8 against bf16 training on real text: the same run twice, one flag apart (``--float8``).

Both runs are ``batchpilot train`` on the same prepared data, model shape (``--preset`` with the data's
vocabulary), seed, batch, schedule and compiled blocks; the only difference is ``--float8 RECIPE``. A
speed benchmark cannot show that float8 still trains: this records both loss curves, the validation
losses and tokens/s, and the differences.

    python benchmarks/float8_parity.py --data data/adaptive                 # one GPU, both runs in turn
    python benchmarks/float8_parity.py --data data/adaptive --gpus 0,1      # both at once on two GPUs
    python benchmarks/float8_parity.py --data data/adaptive --control       # bf16 seed 0 vs bf16 seed 1

``--control`` replaces the float8 run by a bf16 run with another seed (initialisation and data order): the
same differences between two equally good runs are the noise floor to read the float8 differences against.

``--data`` is a prepared directory (``batchpilot prepare``). Results:
``benchmarks/results/float8_parity_<recipe>_lr<lr>_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks" / "adaptive"))  # run_experiment: launch_all

from provenance import provenance  # noqa: E402
from run_experiment import launch_all  # noqa: E402

from batchpilot.io import write_json_atomic  # noqa: E402
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
    p.add_argument("--warmup-tokens", type=int, default=None, help="default: the trainer's (5%% of the run)")
    p.add_argument("--control", action="store_true", help="second run: bf16 with seed 1 instead of float8")
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


def train_command(args: argparse.Namespace, model_config: Path, float8: str | None, seed: int) -> list[str]:
    cmd = [sys.executable, "-m", "batchpilot", "train", "--model", str(model_config), "--data", args.data,
           "--seq-len", str(args.seq_len), "--global-batch-tokens", str(args.global_batch_tokens),
           "--micro-batch-size", str(args.micro_batch_size), "--max-steps", str(args.max_steps),
           "--lr", str(args.lr), "--min-lr", str(args.min_lr), "--eval-every", str(args.eval_every),
           "--eval-batches", str(args.eval_batches), "--save-every", str(args.max_steps),
           "--compile" if args.compile else "--no-compile", "--seed", str(seed), "--no-progress"]
    if args.warmup_tokens is not None:
        cmd += ["--warmup-tokens", str(args.warmup_tokens)]
    return cmd + (["--float8", float8] if float8 else [])


def run_both(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    config = get_preset(args.preset)
    vocab_size = json.loads((Path(args.data) / "meta.json").read_text())["vocab_size"]
    model_config = work / "config.json"
    model_config.write_text(json.dumps(config_to_hf(config.with_(vocab_size=vocab_size))))
    runs = {"bf16": (None, 0), "bf16_seed1": (None, 1)} if args.control else {"bf16": (None, 0),
                                                                                 "float8": (args.recipe, 0)}
    gpus = args.gpus.split(",") if args.gpus else []
    launch_all({name: train_command(args, model_config, float8, seed) for name, (float8, seed) in runs.items()},
               parallel=len(gpus) or 1, gpus=gpus)  # each run goes to work/<name>
    return {name: work / name for name in runs}


def curve(run_dir: Path) -> dict:
    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    second_half = [r["tokens_per_s"] for r in steps[len(steps) // 2:]]
    return dict(loss=[round(r["loss"], 5) for r in steps],
                val_loss={r["step"]: round(r["val_loss"], 5) for r in records if "val_loss" in r},
                tokens_per_s_median_second_half=round(statistics.median(second_half), 1),
                peak_memory_gib=max((r.get("peak_memory_bytes", 0) for r in steps), default=0) / 2**30)


def compare(bf16: dict, other: dict, name: str) -> dict:
    """The second run (``name``) against the bf16 run: final validation loss, the last 20 training losses,
    the largest gap between 10-step means along the run, and the speed ratio."""
    def mean_last(losses: list[float], n: int = 20) -> float:
        return round(statistics.fmean(losses[-n:]), 5)

    windows = range(0, min(len(bf16["loss"]), len(other["loss"])) - 9, 10)
    gaps = [statistics.fmean(other["loss"][i:i + 10]) - statistics.fmean(bf16["loss"][i:i + 10]) for i in windows]
    last_val = max(set(bf16["val_loss"]) & set(other["val_loss"]))
    speed = other["tokens_per_s_median_second_half"] / bf16["tokens_per_s_median_second_half"]
    return {"compared": f"{name} vs bf16", "final_val_loss_bf16": bf16["val_loss"][last_val],
            f"final_val_loss_{name}": other["val_loss"][last_val],
            "final_val_loss_rel_diff": round(other["val_loss"][last_val] / bf16["val_loss"][last_val] - 1, 5),
            "train_loss_last20_bf16": mean_last(bf16["loss"]), f"train_loss_last20_{name}": mean_last(other["loss"]),
            "largest_10step_mean_gap": round(max(gaps, key=abs), 5) if gaps else None,
            "tokens_per_s_ratio": round(speed, 3)}


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        dirs = run_both(args, Path(tmp))
        curves = {name: curve(run_dir) for name, run_dir in dirs.items()}
        (bf16, _), (name, other) = curves.items()
        setup = json.loads((dirs[name] / "config.json").read_text())
    result = dict(benchmark="float8_parity", preset=args.preset, recipe=None if args.control else args.recipe,
                  **provenance(), train_config_second_run=setup, runs=curves,
                  summary=compare(curves["bf16"], other, name))
    print(json.dumps(result["summary"], indent=1))
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    label = "control" if args.control else args.recipe
    warmup = f"_warmup{args.warmup_tokens}" if args.warmup_tokens is not None else ""
    path = out / f"float8_parity_{label}_lr{args.lr:g}{warmup}_{dt.date.today().isoformat()}.json"
    write_json_atomic(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
