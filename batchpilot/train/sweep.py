"""Run a grid of proxy trainings (shape x token budget x peak LR x batch) for ``batchpilot fit``; the worker pool
and the run tables that ``sft_sweep.py`` (the SFT sweep with early stopping, docs/sweep.md) shares.

Every run is a normal ``train(TrainConfig(...))`` in ``SWEEP_DIR/runs/<run_id>``; its output is one row of
``SWEEP_DIR/runs.csv`` (``RUN_COLUMNS``). Runs go to a pool of ``workers`` spawned processes (several small
runs share a GPU; workers are spread round-robin over the visible GPUs).

Design choices and their costs:
- Only the parent process writes runs.csv, one row as each run finishes, so no file lock is needed; the cost
  is that a run finished by a worker whose parent was killed before writing is found again from its
  ``result.json`` on the next invocation rather than from the table.
- A run is identified by its id (shape, D, lr, batch). A second invocation skips every id already in
  runs.csv; a half-finished run directory resumes from its last checkpoint, or restarts from scratch when it
  has none. Checkpoints and exported weights are deleted when a run finishes (``keep_checkpoints`` keeps them).
- A run that diverges is a result (its LR is too high): its row has NaN losses, which ``fit`` drops.
- It lives in ``train/`` because it executes the trainer (``plan`` never imports ``train``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import multiprocessing
import os
import shutil
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import MISSING, asdict, dataclass, field, fields
from itertools import product
from pathlib import Path
from typing import Any
from collections.abc import Callable

from batchpilot.data.prepare import PrepareConfig, prepare
from batchpilot.metrics import read_metrics
from batchpilot.model.counting import non_vocab_params  # Step Law's N: attention + MLP, no embeddings
from batchpilot.model.hf import config_to_hf
from batchpilot.model.llama import PRESETS, LlamaConfig, get_preset
from batchpilot.train.checkpoint import latest_checkpoint
from batchpilot.train.config import TrainConfig, field_types, set_dotted
from batchpilot.train.trainer import TrainingDiverged, train

RUN_COLUMNS = ("run_id", "preset", "N", "D", "lr", "batch_tokens", "steps", "final_loss", "smooth_loss", "val_loss",
               "wall_seconds", "seq_len")


@dataclass(kw_only=True, slots=True)
class GridSpec:
    """The grid file (JSON). ``models``: preset names, or ``{"name": ..., <LlamaConfig fields>}`` where the
    fields not given come from the ``tiny`` preset. Token budgets D are per run; ``steps = round(D / batch)``."""

    models: list[str | dict[str, Any]]
    tokens: list[int]
    lrs: list[float]
    batch_tokens: list[int]
    seq_len: int = 256
    schedule: str = "cosine"
    min_lr: float = 1e-5  # Step Law's recipe (arXiv 2503.04715): cosine to a fixed 1e-5
    data: str = "default"  # a prepared directory, or sources that are prepared once into SWEEP_DIR/data
    vocab_size: int = 4096  # of the tokenizer trained when ``data`` is not prepared
    micro_batch_size: int = 32
    eval_batches: int = 4
    seed: int = 0
    device: str = "auto"
    keep_checkpoints: bool = False
    # any further TrainConfig fields by dotted name ({"optim.weight_decay": 0.1, ...})
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("models", "tokens", "lrs", "batch_tokens"):
            if not getattr(self, name):
                raise ValueError(f"the grid needs at least one value in {name!r}")
        self.tokens, self.batch_tokens = [int(t) for t in self.tokens], [int(b) for b in self.batch_tokens]
        if not isinstance(self.train, dict):
            raise ValueError("the grid's 'train' is an object of dotted TrainConfig fields, e.g. "
                             "{\"optim.weight_decay\": 0.1}")
        unknown = sorted(set(self.train) - set(field_types()))
        if unknown:
            raise ValueError(f"unknown TrainConfig fields in the grid's 'train': {unknown} (dotted names such as "
                             f"optim.weight_decay)")
        bad = [b for b in self.batch_tokens if b % self.seq_len]
        if bad:
            raise ValueError(f"batch sizes {bad} (tokens) are not multiples of seq_len {self.seq_len}")
        names = [model_name(m) for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")

    @classmethod
    def from_json(cls, path: str | Path) -> GridSpec:
        return cls(**read_grid_json(path, cls))


def read_grid_json(path: str | Path | None, kind: type, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The grid file's keys for dataclass ``kind``, with ``overrides`` (the command line's) laid over them;
    unknown keys and missing required ones are one-line errors."""
    d: Any = {}
    if path is not None:
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a grid is a JSON object, got {type(d).__name__}")
    d = {**d, **(overrides or {})}
    where = path if path is not None else "the command line"
    unknown = sorted(set(d) - {f.name for f in fields(kind)})
    if unknown:
        raise ValueError(f"{where}: unknown grid keys {unknown}; known: {[f.name for f in fields(kind)]}")
    missing = [f.name for f in fields(kind) if f.default is MISSING and f.default_factory is MISSING
               and f.name not in d]
    if missing:
        raise ValueError(f"{where}: the grid needs {', '.join(missing)}")
    return d


@dataclass(frozen=True, slots=True)
class RunSpec:
    run_id: str
    preset: str  # the shape's name
    model: str  # preset name or config.json path, as TrainConfig.model takes it
    params: int  # N, non-vocabulary
    tokens: int  # D, the budget (the run trains round(D / batch) steps)
    lr: float
    batch_tokens: int


@dataclass(frozen=True, slots=True)
class SweepResult:
    csv_path: Path
    finished: int  # runs in runs.csv after this invocation
    ran: int  # runs finished by this invocation
    failed: dict[str, str]  # run_id -> error (no row written: a later invocation retries them)


def model_name(model: str | dict[str, Any]) -> str:
    return model if isinstance(model, str) else str(model["name"])


def model_config(model: str | dict[str, Any]) -> LlamaConfig:
    if isinstance(model, str):
        return get_preset(model)
    shape = {"head_dim": 0} | {k: v for k, v in model.items() if k != "name"}  # 0: re-derive from the shape
    return get_preset("tiny").with_(**shape)


def grid_runs(grid: GridSpec, sweep_dir: Path) -> list[RunSpec]:
    """Every run of the grid; explicit shapes get a config.json under SWEEP_DIR/models/<name>/."""
    runs = []
    for model in grid.models:
        name, config = model_name(model), model_config(model)
        ref = name
        if not (isinstance(model, str) and model in PRESETS):
            path = sweep_dir / "models" / name / "config.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(config_to_hf(config), indent=2))
            ref = str(path)
        for tokens, lr, batch in product(grid.tokens, grid.lrs, grid.batch_tokens):
            run_id = f"{name}_D{tokens}_lr{lr:.3e}_B{batch}"
            runs.append(RunSpec(run_id=run_id, preset=name, model=ref, params=non_vocab_params(config),
                                tokens=tokens, lr=float(lr), batch_tokens=batch))
    return runs


def finished_ids(csv_path: Path, *, last_column: str = "seq_len") -> set[str]:
    return {row["run_id"] for row in read_rows(csv_path, last_column=last_column)}


def read_rows(csv_path: Path, *, last_column: str) -> list[dict[str, str]]:
    """The complete rows of a table (its ``last_column`` is never empty; a torn last line has it empty)."""
    if not csv_path.is_file():
        return []
    with csv_path.open(newline="") as f:
        return [row for row in csv.DictReader(f) if row.get(last_column)]


def append_row(csv_path: Path, row: dict[str, Any], columns: tuple[str, ...] = RUN_COLUMNS) -> None:
    """Append one run (header first if new); a torn last line from a killed sweep is dropped first."""
    new = not csv_path.is_file() or csv_path.stat().st_size == 0
    if not new:
        text = csv_path.read_bytes()
        if not text.endswith(b"\n"):
            csv_path.write_bytes(text[: text.rfind(b"\n") + 1])
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def prepare_data(grid: GridSpec, sweep_dir: Path) -> Path:
    """The prepared dataset all runs share (prepared once, reused by later invocations)."""
    if (Path(grid.data) / "meta.json").is_file():
        return Path(grid.data)
    vocab = min([grid.vocab_size] + [model_config(m).vocab_size for m in grid.models])
    return prepare(PrepareConfig(sources=[grid.data], out_dir=str(sweep_dir / "data"), vocab_size=vocab,
                                 seed=grid.seed))


def micro_batch_size(rows_per_step: int, cap: int) -> int:
    """The largest micro-batch <= cap that divides the step's rows, so every micro-step is full (the
    trainer's batch controller wants batches in multiples of micro_batch_size x seq_len)."""
    return max(m for m in range(1, min(rows_per_step, cap) + 1) if rows_per_step % m == 0)


def train_config(spec: RunSpec, grid: GridSpec, data_dir: Path, run_dir: Path, *, resume: bool) -> TrainConfig:
    steps = max(1, round(spec.tokens / spec.batch_tokens))
    micro = micro_batch_size(spec.batch_tokens // grid.seq_len, grid.micro_batch_size)
    tree: dict[str, Any] = {
        "out_dir": str(run_dir), "model": {"name": spec.model, "seed": grid.seed},
        "data": {"path": str(data_dir), "seq_len": grid.seq_len, "seed": grid.seed},
        "batch": {"global_batch_tokens": spec.batch_tokens, "micro_batch_size": micro},
        "optim": {"lr": spec.lr}, "schedule": {"max_steps": steps, "min_lr": min(grid.min_lr, spec.lr),
                                               "name": grid.schedule},
        "logging": {"eval_every": steps, "eval_batches": grid.eval_batches, "log_every": 1, "progress": False},
        "checkpoint": {"save_every": max(1, steps // 4), "resume": resume}, "parallel": {"device": grid.device}}
    for dotted, value in grid.train.items():
        set_dotted(tree, dotted, value)
    return TrainConfig.from_dict(tree, source="grid")


def run_one(spec: RunSpec, grid: GridSpec, data_dir: Path, sweep_dir: Path) -> dict[str, Any]:
    """Train one run (resuming a half-finished directory) and return its runs.csv row. Runs in a worker."""
    run_dir = sweep_dir / "runs" / spec.run_id
    cfg = train_config(spec, grid, data_dir, run_dir, resume=latest_checkpoint(run_dir) is not None)
    result_file = run_dir / "result.json"
    if result_file.is_file():
        done = json.loads(result_file.read_text())
        if done["steps"] >= cfg.schedule.max_steps:  # finished, but the sweep was killed before its row was written
            return _row(spec, grid, done, read_metrics(run_dir))
    if run_dir.exists() and not cfg.checkpoint.resume:
        shutil.rmtree(run_dir)  # nothing to resume from: restart cleanly
    result = train_logged(cfg, sweep_dir / "logs" / f"{spec.run_id}.log") or {
        "steps": cfg.schedule.max_steps, "final_loss": math.nan, "val_loss": None, "wall_seconds": math.nan}
    if not grid.keep_checkpoints:
        for sub in ("checkpoints", "model"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    return _row(spec, grid, result, read_metrics(run_dir))


def train_logged(cfg: TrainConfig, log: Path) -> dict[str, Any] | None:
    """``train(cfg)`` with its output appended to ``log``: its result, or None when the run diverged (a diverged
    run is a result of the sweep, its LR too high, not an error)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            return asdict(train(cfg))
        except TrainingDiverged:
            return None


def _row(spec: RunSpec, grid: GridSpec, result: dict[str, Any], metrics: list[dict[str, Any]]) -> dict[str, Any]:
    last_loss = float(metrics[-1]["loss"]) if metrics and math.isfinite(result["final_loss"]) else math.nan
    val = result.get("val_loss")
    return {"run_id": spec.run_id, "preset": spec.preset, "N": spec.params, "D": spec.tokens, "lr": spec.lr,
            "batch_tokens": spec.batch_tokens, "steps": result["steps"], "final_loss": last_loss,
            "smooth_loss": result["final_loss"], "val_loss": math.nan if val is None else val,
            "wall_seconds": result["wall_seconds"], "seq_len": grid.seq_len}


def _init_worker(counter: Any, num_gpus: int, threads: int) -> None:
    """Pin this worker to one GPU (round-robin) before CUDA starts; split the CPU threads between workers."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    if num_gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(num_gpus)))).split(",")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[index % num_gpus]
    import torch
    import torch._dynamo

    torch.set_num_threads(threads)
    # A worker trains many shapes in turn, and compiled flex_attention gets a new graph for each (shape, grad
    # mode): past dynamo's default of 8 it silently falls back to eager flex_attention (slow, T^2 memory).
    torch._dynamo.config.recompile_limit = 256


def sweep(grid: GridSpec, sweep_dir: str | Path, *, workers: int = 1, progress: bool = True) -> SweepResult:
    """Run every grid run not yet in SWEEP_DIR/runs.csv, ``workers`` at a time; append a row per finished run."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    csv_path = sweep_dir / "runs.csv"
    runs = grid_runs(grid, sweep_dir)
    done = finished_ids(csv_path)
    todo = [r for r in runs if r.run_id not in done]
    data_dir = prepare_data(grid, sweep_dir) if todo else Path(grid.data)
    failed = run_pool([(r.run_id, run_one, (r, grid, data_dir, sweep_dir)) for r in todo],
                      lambda _, row: append_row(csv_path, row), workers=workers, device=grid.device,
                      progress=progress, label="sweep", total=len(runs))
    return SweepResult(csv_path=csv_path, finished=len(finished_ids(csv_path)), ran=len(todo) - len(failed),
                       failed=failed)


Task = tuple[str, Callable[..., dict[str, Any]], tuple[Any, ...]]  # (run id, function, its arguments)


def run_pool(tasks: list[Task], on_result: Callable[[str, dict[str, Any]], None], *, workers: int, device: str,
             progress: bool, label: str, total: int, in_process: bool = False) -> dict[str, str]:
    """Run ``tasks`` in ``workers`` spawned processes (or here, ``in_process``), calling ``on_result`` in this
    process as each finishes; returns run id -> error for the tasks that raised (a later invocation retries)."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    failed: dict[str, str] = {}
    bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), disable=not progress)

    def finish(run_id: str, get: Callable[[], dict[str, Any]]) -> None:
        try:
            on_result(run_id, get())
        except Exception as e:  # noqa: BLE001 -- one broken run must not stop the grid; it is retried later
            failed[run_id] = f"{type(e).__name__}: {e}"
        bar.update(task, advance=1, description=run_id)

    with bar:
        task = bar.add_task("", total=total, completed=total - len(tasks))
        if in_process:
            for run_id, fn, args in tasks:
                finish(run_id, lambda: fn(*args))
            return failed
        num_gpus = torch.cuda.device_count() if device != "cpu" else 0
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(context.Value("i", 0), num_gpus, threads)) as pool:
            futures: dict[Future, str] = {pool.submit(fn, *args): run_id for run_id, fn, args in tasks}
            for future in as_completed(futures):
                finish(futures[future], future.result)
    return failed
