"""The SFT sweep over (lr, batch) with early stopping by the early signals of Pareja et al., "Unveiling the Secret
Recipe: A Guide for Supervised Fine-Tuning Small LLMs" (arXiv 2412.13337), docs/sweep.md.

Each configuration trains in two phases of one run (stopped at the early cut, resumed after it), so survivors pay
nothing extra for the early phase; its tables are early.csv and final.csv, the resume rules of ``sweep.py`` apply
per phase, and the cut is recomputed from early.csv on every invocation. The worker pool and the run tables are
``sweep.py``'s.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Any
from collections.abc import Mapping, Sequence

from batchpilot.data.prepare import PrepareConfig, prepare
from batchpilot.io import write_json_atomic, write_text_atomic
from batchpilot.metrics import read_metrics
from batchpilot.train.checkpoint import latest_checkpoint
from batchpilot.train.config import TrainConfig, field_types, set_dotted
from batchpilot.train.sweep import (Task, train_logged, append_row, finished_ids, read_grid_json, read_rows,
                                    run_pool)


#
# "Unveiling the Secret Recipe: A Guide For Supervised Fine-Tuning Small LLMs" (Pareja et al., arXiv
# 2412.13337), abstract finding (ii): early-stage training dynamics, LOWER gradient norms and HIGHER loss values,
# are strong indicators of better final models, which allows sub-optimal runs to be terminated early. Every
# configuration trains its first ``early_fraction`` of steps, the early signals rank them, the best survive
# (the cut-off is OUR rule, in the manner of successive halving) and train to the end; the report measures how
# well the early ranking predicted the final validation loss (Spearman's rho over the runs that finished).

SFT_SIGNALS = ("grad_norm", "loss", "rank_sum")
EARLY_COLUMNS = ("run_id", "lr", "batch_examples", "batch_tokens", "rows_per_step", "steps", "early_steps",
                 "early_grad_norm", "early_loss", "early_val_loss", "early_seconds")
FINAL_COLUMNS = ("run_id", "final_steps", "final_val_loss", "final_loss", "final_seconds")
RESULT_COLUMNS = (*EARLY_COLUMNS, "rank", "kept", *FINAL_COLUMNS[1:])


@dataclass(kw_only=True, slots=True)
class SftGridSpec:
    """The SFT grid (JSON, or ``--sweep.<field>`` flags over it): every (lr, batch) pair is a configuration.
    Give the batch in examples (``batch_examples``, rounded to whole micro-batches of packed rows) or in tokens
    (``batch_tokens``), not both. Every configuration trains ``epochs`` passes over the packed train split."""

    model: str  # HF model directory: weights, tokenizer.json and a chat template
    data: str  # chat JSONL (prepared once into SWEEP_DIR/data with the model's tokenizer) or a prepared chat dataset
    lrs: list[float]
    batch_examples: list[int] = field(default_factory=list)
    batch_tokens: list[int] = field(default_factory=list)
    epochs: float = 1.0
    seq_len: int = 2048
    early_fraction: float = 0.1  # share of each configuration's steps in the early window (equal data seen)
    keep_fraction: float = 0.5  # share of the configurations that survive the early cut (rounded up, >= 1)
    keep_top: int = 0  # > 0: keep exactly this many instead of keep_fraction
    signal: str = "grad_norm"  # grad_norm | loss | rank_sum: what ranks the configurations (early_scores)
    validate_all: bool = False  # train every configuration to the end anyway, to measure the prediction
    micro_batch_size: int = 8  # rows per micro-step, the same for every configuration (so is the val set)
    eval_batches: int = 4  # validation micro-batches at the early cut and at the end
    val_fraction: float = 0.05  # of the conversations, when ``data`` is prepared here
    loss_on: str = "assistant"
    seed: int = 0
    device: str = "auto"
    keep_checkpoints: bool = False
    train: dict[str, Any] = field(default_factory=dict)  # further TrainConfig fields by dotted name

    def __post_init__(self) -> None:
        for name in ("lrs", "batch_examples", "batch_tokens"):
            if not isinstance(getattr(self, name), list):
                raise ValueError(f"--sweep.{name} is a list of numbers, got {getattr(self, name)!r}")
        self.lrs = [float(x) for x in self.lrs]
        self.batch_examples, self.batch_tokens = [int(b) for b in self.batch_examples], \
            [int(b) for b in self.batch_tokens]
        if not self.lrs or not all(math.isfinite(lr) and lr > 0 for lr in self.lrs):
            raise ValueError(f"--sweep.lrs needs at least one positive learning rate, got {self.lrs}")
        if bool(self.batch_examples) == bool(self.batch_tokens):
            raise ValueError("give the batches as --sweep.batch_examples or --sweep.batch_tokens (one of them)")
        if any(b < 1 for b in self.batch_examples + self.batch_tokens):
            raise ValueError("--sweep.batch_examples / --sweep.batch_tokens must be positive")
        if self.micro_batch_size < 1 or self.eval_batches < 1 or self.seq_len < 1:
            raise ValueError("--sweep.micro_batch_size, --sweep.eval_batches and --sweep.seq_len must be positive")
        bad = [b for b in self.batch_tokens if b % (self.seq_len * self.micro_batch_size)]
        if bad:
            raise ValueError(f"--sweep.batch_tokens {bad} are not multiples of seq_len x micro_batch_size "
                             f"({self.seq_len} x {self.micro_batch_size})")
        if self.epochs <= 0:
            raise ValueError(f"--sweep.epochs must be positive, got {self.epochs}")
        if not 0.0 < self.early_fraction < 1.0:
            raise ValueError(f"--sweep.early_fraction must be in (0, 1), got {self.early_fraction}")
        if not 0.0 < self.keep_fraction <= 1.0 or self.keep_top < 0:
            raise ValueError(f"--sweep.keep_fraction must be in (0, 1] and --sweep.keep_top >= 0, got "
                             f"{self.keep_fraction} and {self.keep_top}")
        if self.signal not in SFT_SIGNALS:
            raise ValueError(f"--sweep.signal must be one of {', '.join(SFT_SIGNALS)}, got {self.signal!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--sweep.val_fraction must be in (0, 1), got {self.val_fraction}")
        if not isinstance(self.train, dict) or sorted(set(self.train) - set(field_types())):
            raise ValueError("the grid's 'train' is an object of dotted TrainConfig fields, e.g. "
                             "{\"optim.weight_decay\": 0.1}")

    @classmethod
    def from_json(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> SftGridSpec:
        return cls(**read_grid_json(path, cls, overrides))


@dataclass(frozen=True, slots=True)
class SftRunSpec:
    run_id: str
    lr: float
    batch_examples: float  # mean examples per optimizer step (rows x examples per packed row)
    batch_tokens: int
    rows_per_step: int
    steps: int  # the whole run
    early_steps: int  # the early window: ceil(early_fraction x steps), at least 1, below steps


@dataclass(frozen=True, slots=True)
class EarlySignals:
    """Means over a run's early window (its first ``early_steps`` optimizer steps) of metrics.jsonl."""

    grad_norm: float
    loss: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.grad_norm) and math.isfinite(self.loss)


@dataclass(frozen=True, slots=True)
class EarlyStopDecision:
    ranking: list[str]  # best first
    kept: list[str]  # the first ``keep`` of the ranking with finite signals
    stopped: list[str]
    rule: str  # in words, for the report


@dataclass(frozen=True, slots=True)
class SftSweepResult:
    results_path: Path  # SWEEP_DIR/results.csv
    summary: dict[str, Any]  # SWEEP_DIR/summary.json
    ran: int  # training phases run by this invocation
    failed: dict[str, str]


def early_signals(records: Sequence[Mapping[str, Any]], early_steps: int) -> EarlySignals:
    """Mean ``grad_norm`` and ``loss`` of the records of steps 1..early_steps (the trainer logs every step)."""
    window = [r for r in records if 1 <= int(r["step"]) <= early_steps]
    if len(window) < early_steps:
        raise ValueError(f"metrics.jsonl has {len(window)} of the {early_steps} early steps (log_every must be 1)")
    mean = lambda key: sum(float(r[key]) for r in window) / early_steps  # noqa: E731
    return EarlySignals(grad_norm=mean("grad_norm"), loss=mean("loss"))


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties sharing their mean rank (as ``scipy.stats.rankdata``)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the average ranks (Spearman 1904; scipy.stats.spearmanr).
    NaN for fewer than two pairs or when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman_rho needs pairs, got {len(x)} and {len(y)} values")
    if len(x) < 2:
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def early_scores(signals: Mapping[str, EarlySignals], signal: str) -> dict[str, tuple[float, ...]]:
    """Per run a sort key, smaller = more promising: ``grad_norm`` (lower early gradient norm, ties: higher
    early loss), ``loss`` (higher early loss, ties: lower gradient norm), ``rank_sum`` (the sum of the two
    average ranks, ties: gradient norm). Non-finite signals (a diverging run) sort last."""
    names = list(signals)
    finite = [n for n in names if signals[n].finite]
    norm_rank = dict(zip(finite, average_ranks([signals[n].grad_norm for n in finite])))
    loss_rank = dict(zip(finite, average_ranks([-signals[n].loss for n in finite])))
    out: dict[str, tuple[float, ...]] = {}
    for n in names:
        s = signals[n]
        if not s.finite:
            out[n] = (math.inf, math.inf, math.inf)
        elif signal == "grad_norm":
            out[n] = (0.0, s.grad_norm, -s.loss)
        elif signal == "loss":
            out[n] = (0.0, -s.loss, s.grad_norm)
        elif signal == "rank_sum":
            out[n] = (0.0, norm_rank[n] + loss_rank[n], s.grad_norm)
        else:
            raise ValueError(f"--sweep.signal must be one of {', '.join(SFT_SIGNALS)}, got {signal!r}")
    return out


def early_stop_decision(signals: Mapping[str, EarlySignals], *, signal: str, keep_fraction: float,
                        keep_top: int = 0) -> EarlyStopDecision:
    """Rank by ``signal`` (paper (ii)); keep the best ``keep_top`` or ceil(keep_fraction x n) (at least one),
    never a run with non-finite signals; ties in the key keep the grid's order."""
    scores = early_scores(signals, signal)
    ranking = sorted(signals, key=lambda n: scores[n])
    keep = keep_top if keep_top else max(1, math.ceil(keep_fraction * len(ranking)))
    kept = [n for n in ranking[:keep] if signals[n].finite]
    better = {"grad_norm": "lower early gradient norm", "loss": "higher early loss",
              "rank_sum": "lower sum of the two ranks"}[signal]
    count = f"the best {keep_top}" if keep_top else f"the best ceil({keep_fraction:g} x {len(ranking)}) = {keep}"
    rule = f"ranked by {signal} ({better} first), kept {count}: {len(kept)} of {len(ranking)} continue"
    return EarlyStopDecision(ranking=ranking, kept=kept, stopped=[n for n in ranking if n not in kept], rule=rule)


def prepare_sft_data(grid: SftGridSpec, sweep_dir: Path) -> Path:
    """The chat dataset all configurations share: ``grid.data`` when prepared, else prepared once into
    SWEEP_DIR/data with the model directory's tokenizer and chat template."""
    if (Path(grid.data) / "meta.json").is_file():
        return Path(grid.data)
    if (sweep_dir / "data" / "meta.json").is_file():
        return sweep_dir / "data"
    return prepare(PrepareConfig(sources=[grid.data], out_dir=str(sweep_dir / "data"), tokenizer=grid.model,
                                 format="chat", loss_on=grid.loss_on, val_fraction=grid.val_fraction,
                                 seed=grid.seed))


def sft_grid_runs(grid: SftGridSpec, data_dir: Path) -> list[SftRunSpec]:
    """Every (lr, batch) configuration. Batches in examples become whole micro-batches of packed rows at the
    train split's mean examples per row (conversation packing); steps = epochs x rows / rows per step."""
    from batchpilot.data.packing import PackedLoader
    from batchpilot.data.prepare import load_meta

    rows = PackedLoader(data_dir, "train", grid.seq_len, seed=grid.seed, pack="conversation").num_rows
    examples_per_row = load_meta(data_dir)["documents"]["train"] / max(1, rows)
    micro = grid.micro_batch_size
    batches = [(b, max(1, round(b / examples_per_row / micro)) * micro) for b in grid.batch_examples] or \
        [(0, b // grid.seq_len) for b in grid.batch_tokens]
    runs = []
    for lr, (examples, rows_per_step) in product(grid.lrs, batches):
        steps = max(2, round(grid.epochs * rows / rows_per_step))
        early = min(steps - 1, max(1, math.ceil(grid.early_fraction * steps)))
        name = f"B{examples}ex" if examples else f"B{rows_per_step * grid.seq_len}"
        runs.append(SftRunSpec(run_id=f"sft_lr{lr:.3e}_{name}", lr=lr,
                               batch_examples=round(rows_per_step * examples_per_row, 2),
                               batch_tokens=rows_per_step * grid.seq_len, rows_per_step=rows_per_step, steps=steps,
                               early_steps=early))
    if len({r.run_id for r in runs}) != len(runs):
        raise ValueError("the grid repeats a (lr, batch) configuration")
    return runs


def sft_train_config(spec: SftRunSpec, grid: SftGridSpec, data_dir: Path, run_dir: Path, *, final: bool,
                     resume: bool) -> TrainConfig:
    """One configuration under ``--recipe sft`` (constant LR, chat data; plan/sft.py); the early phase is the
    same run stopped (checkpointed) at ``early_steps``, so the final phase resumes it on the same schedule."""
    tree: dict[str, Any] = {
        "out_dir": str(run_dir), "recipe": {"name": "sft"}, "model": {"name": grid.model, "seed": grid.seed},
        "data": {"path": str(data_dir), "seq_len": grid.seq_len, "seed": grid.seed, "pack": "conversation"},
        "batch": {"global_batch_tokens": spec.batch_tokens, "micro_batch_size": grid.micro_batch_size},
        "optim": {"lr": spec.lr},
        "schedule": {"max_steps": spec.steps, "stop_at_step": None if final else spec.early_steps},
        "logging": {"eval_every": 0, "eval_batches": grid.eval_batches, "log_every": 1, "progress": False},
        "checkpoint": {"save_every": max(1, spec.steps // 4), "resume": resume}, "parallel": {"device": grid.device}}
    for dotted, value in grid.train.items():
        set_dotted(tree, dotted, value)
    return TrainConfig.from_dict(tree, source="grid")


def run_sft_phase(spec: SftRunSpec, grid: SftGridSpec, data_dir: Path, sweep_dir: Path, *,
                  final: bool) -> dict[str, Any]:
    """Train one configuration to its early cut or to the end (resuming its directory) and return its row of
    early.csv or final.csv. A phase whose result.json already reaches the step is not trained again."""
    run_dir = sweep_dir / "runs" / spec.run_id
    until = spec.steps if final else spec.early_steps
    result_file = run_dir / "result.json"
    done = json.loads(result_file.read_text()) if result_file.is_file() else None
    if done is None or done["steps"] < until:
        resume = latest_checkpoint(run_dir) is not None
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)  # nothing to resume from: restart cleanly
        cfg = sft_train_config(spec, grid, data_dir, run_dir, final=final, resume=resume)
        done = train_logged(cfg, sweep_dir / "logs" / f"{spec.run_id}.log") or {
            "steps": until, "final_loss": math.nan, "val_loss": math.nan, "wall_seconds": math.nan}
    records = read_metrics(run_dir)
    val = done.get("val_loss")
    if val is None:  # killed between the last checkpoint and result.json: the resume ran no step; the loss was logged
        val = next((r["val_loss"] for r in records if int(r["step"]) == until and "val_loss" in r), math.nan)
    val = float(val)
    if final:
        if not grid.keep_checkpoints:
            for sub in ("checkpoints", "model"):
                shutil.rmtree(run_dir / sub, ignore_errors=True)
        return {"run_id": spec.run_id, "final_steps": done["steps"], "final_val_loss": val,
                "final_loss": done["final_loss"], "final_seconds": done["wall_seconds"]}
    try:
        signals = early_signals(records, spec.early_steps)
    except ValueError:  # diverged inside the window: its metrics stop early
        signals = EarlySignals(grad_norm=math.nan, loss=math.nan)
    return {"run_id": spec.run_id, "lr": spec.lr, "batch_examples": spec.batch_examples,
            "batch_tokens": spec.batch_tokens, "rows_per_step": spec.rows_per_step, "steps": spec.steps,
            "early_steps": spec.early_steps, "early_grad_norm": signals.grad_norm, "early_loss": signals.loss,
            "early_val_loss": val, "early_seconds": done["wall_seconds"]}


def sft_sweep(grid: SftGridSpec, sweep_dir: str | Path, *, workers: int = 1, progress: bool = True) -> SftSweepResult:
    """The early phase of every configuration not in SWEEP_DIR/early.csv, the cut (once all have early
    signals), the survivors (or all, ``validate_all``) to the end into final.csv; then results.csv and
    summary.json. Every phase resumes: a rerun after a kill trains only what is missing."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    check_same_sweep(grid, sweep_dir)
    data_dir = prepare_sft_data(grid, sweep_dir)
    runs = {r.run_id: r for r in sft_grid_runs(grid, data_dir)}
    early_csv, final_csv = sweep_dir / "early.csv", sweep_dir / "final.csv"
    ran = [0]

    def phase(ids: list[str], csv_path: Path, columns: tuple[str, ...], *, final: bool) -> dict[str, str]:
        done = finished_ids(csv_path, last_column=columns[-1])
        todo = [runs[i] for i in ids if i not in done]
        tasks: list[Task] = [(r.run_id, _sft_phase_task, (r, grid, data_dir, sweep_dir, final)) for r in todo]
        failed = run_pool(tasks, lambda _, row: append_row(csv_path, row, columns), workers=workers,
                          device=grid.device, progress=progress, label="final" if final else "early",
                          total=len(ids), in_process=workers == 1)
        ran[0] += len(tasks) - len(failed)
        return failed

    failed = phase(list(runs), early_csv, EARLY_COLUMNS, final=False)
    early = {r["run_id"]: r for r in read_rows(early_csv, last_column=EARLY_COLUMNS[-1]) if r["run_id"] in runs}
    summary: dict[str, Any] = {"configurations": len(runs), "early_done": len(early)}
    if not failed and len(early) == len(runs):
        signals = {i: EarlySignals(grad_norm=float(r["early_grad_norm"]), loss=float(r["early_loss"]))
                   for i, r in early.items()}
        decision = early_stop_decision({i: signals[i] for i in runs}, signal=grid.signal,
                                       keep_fraction=grid.keep_fraction, keep_top=grid.keep_top)
        to_finish = [i for i in decision.ranking if signals[i].finite] if grid.validate_all else decision.kept
        if not grid.keep_checkpoints:
            for i in set(runs) - set(to_finish):
                for sub in ("checkpoints", "model"):
                    shutil.rmtree(sweep_dir / "runs" / i / sub, ignore_errors=True)
        failed = phase(to_finish, final_csv, FINAL_COLUMNS, final=True)
        final = {r["run_id"]: r for r in read_rows(final_csv, last_column=FINAL_COLUMNS[-1]) if r["run_id"] in runs}
        summary = sft_summary(grid, runs, early, final, decision)
        write_results(sweep_dir / "results.csv", runs, early, final, decision)
        write_json_atomic(sweep_dir / "summary.json", summary)
    return SftSweepResult(results_path=sweep_dir / "results.csv", summary=summary,
                          ran=ran[0], failed=failed)


# What a rerun in the same SWEEP_DIR may change: the grid's values (new configurations are added), the cut and
# its report, the execution. Anything else changes what the finished rows mean, so it needs a new directory.
SFT_RERUN_FREE = ("lrs", "batch_examples", "batch_tokens", "keep_fraction", "keep_top", "signal", "validate_all",
                  "device", "keep_checkpoints")


def check_same_sweep(grid: SftGridSpec, sweep_dir: Path) -> None:
    """Record the grid in SWEEP_DIR/grid.json; refuse a rerun that changes a field outside ``SFT_RERUN_FREE``."""
    path, now = sweep_dir / "grid.json", asdict(grid)
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in now if k not in SFT_RERUN_FREE and saved.get(k) != now[k])
        if changed:
            raise ValueError(f"{sweep_dir} was swept with other {', '.join(f'{k} ({saved.get(k)!r} -> {now[k]!r})' for k in changed)}; "
                             f"use a new --out (only {', '.join(SFT_RERUN_FREE)} may change)")
    write_json_atomic(path, now)


def _sft_phase_task(spec: SftRunSpec, grid: SftGridSpec, data_dir: Path, sweep_dir: Path,
                    final: bool) -> dict[str, Any]:
    return run_sft_phase(spec, grid, data_dir, sweep_dir, final=final)


def sft_summary(grid: SftGridSpec, runs: Mapping[str, SftRunSpec], early: Mapping[str, Mapping[str, str]],
                final: Mapping[str, Mapping[str, str]], decision: EarlyStopDecision) -> dict[str, Any]:
    """How well the early ranking predicted the final validation loss, over the configurations run to the end
    (all of them under ``validate_all``; else only the survivors, a range-restricted and optimistic sample)."""
    finals = {i: float(r["final_val_loss"]) for i, r in final.items() if math.isfinite(float(r["final_val_loss"]))}
    done = [i for i in decision.ranking if i in finals]
    position = {i: k + 1 for k, i in enumerate(decision.ranking)}
    y = [finals[i] for i in done]
    rho = {"ranking": spearman_rho([position[i] for i in done], y),
           "grad_norm": spearman_rho([float(early[i]["early_grad_norm"]) for i in done], y),
           "loss": spearman_rho([-float(early[i]["early_loss"]) for i in done], y)}
    best = min(done, key=lambda i: finals[i]) if done else None
    kept_done = [i for i in decision.kept if i in finals]
    best_kept = min(kept_done, key=lambda i: finals[i]) if kept_done else None
    tokens_full = sum(r.steps * r.batch_tokens for r in runs.values())
    tokens_run = sum((int(final[i]["final_steps"]) if i in final else r.early_steps) * r.batch_tokens
                     for i, r in runs.items())
    return {"paper": "Pareja et al., arXiv 2412.13337, finding (ii)", "configurations": len(runs),
            "signal": grid.signal, "early_fraction": grid.early_fraction, "rule": decision.rule,
            "validate_all": grid.validate_all, "ranking": decision.ranking, "kept": decision.kept,
            "stopped": decision.stopped, "finished": done,
            "spearman": {**{k: None if math.isnan(v) else round(v, 6) for k, v in rho.items()}, "n": len(done)},
            "best_final": best, "best_final_val_loss": finals.get(best) if best else None,
            "best_kept": best_kept, "best_final_was_kept": best in decision.kept if best else None,
            "regret_val_loss": finals[best_kept] - finals[best] if best and best_kept else None,
            "tokens_trained": tokens_run, "tokens_full_grid": tokens_full,
            "compute_saved": round(1 - tokens_run / tokens_full, 6) if tokens_full else 0.0}


def write_results(path: Path, runs: Mapping[str, SftRunSpec], early: Mapping[str, Mapping[str, str]],
                  final: Mapping[str, Mapping[str, str]], decision: EarlyStopDecision) -> None:
    """results.csv: one row per configuration in ranking order, early signals, the cut, the final result."""
    lines = [",".join(RESULT_COLUMNS)]
    for rank, i in enumerate(decision.ranking, start=1):
        row = {**early[i], "rank": rank, "kept": i in decision.kept,
               **{k: final[i][k] if i in final else "" for k in FINAL_COLUMNS[1:]}}
        lines.append(",".join(str(row[c]) for c in RESULT_COLUMNS))
    write_text_atomic(path, "\n".join(lines) + "\n")
