"""Fit hyperparameter scaling laws to a table of finished training runs (``batchpilot fit``).

Two forms, both least squares in log space:

* Step Law (Li et al. 2025, arXiv 2503.04715; the procedure of their ``code/fit_tool.py``). Group runs by
  (N, D); keep every run whose final smoothed loss is within ``band`` (0.25%) of its group's best, not only the
  argmin; then OLS ``ln lr = a + b ln N + c ln D`` and ``ln B = a' + c' ln D`` (B in tokens, ``+ b' ln N`` with
  ``batch_on_params``). Bootstrap the kept runs with replacement; the reported constants are the bootstrap means
  (``coef`` = exp of the mean log intercept, as the authors report theirs) and the intervals are percentiles.
* Critical batch (Kaplan et al. 2020, eqs 5.1-5.5; Su et al. 2024, arXiv 2403.06563). The steps S and tokens
  E = B S that runs at batch B need to reach a target loss L obey (S/S_min - 1)(E/E_min - 1) = 1, which is
  S = S_min + E_min / B: linear in 1/B. Then B_crit(L) = E_min / S_min and ln B_crit = ln B_* - ln L / alpha_B.

Design choice: the input is one row per finished run (its final loss, no loss curves), because that is what any
sweep table holds. The cost: the critical-batch form needs, for one model size N, runs at >= 3 batch sizes, each
at >= 2 step counts, whose final losses bracket the same target losses; S(L) is interpolated in log-log between
runs of one batch size (the best LR at each (N, B, S)), so a run trained to S steps stands for "S steps needed".
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from batchpilot.plan.laws import PowerLaw  # value = coef N^exp_params D^exp_tokens (law.json form)

# Column names tried in order when no explicit name is given; the first row of each is what `batchpilot sweep`
# writes, the rest read the Step Law release (`bs` in sequences, `smooth loss`) and similar tables.
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "params": ("N", "params", "num_params"),
    "tokens": ("D", "tokens"),
    "lr": ("lr", "peak_lr"),
    "batch": ("batch_tokens", "bs", "batch"),
    "loss": ("smooth_loss", "smooth loss", "final_loss", "loss"),
}
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {"steps": ("steps", "ti"), "seq_len": ("seq_len",)}


@dataclass(frozen=True, slots=True)
class Runs:
    """One entry per run. N = non-vocabulary params, D = training tokens, batch in tokens."""

    params: np.ndarray
    tokens: np.ndarray
    lr: np.ndarray
    batch_tokens: np.ndarray
    steps: np.ndarray
    loss: np.ndarray  # final (smoothed) training loss; NaN for runs that diverged or did not finish
    seq_len: int | None
    source: str
    columns: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.loss)


def _pick_column(header: list[str], key: str, explicit: str | None, candidates: tuple[str, ...]) -> str | None:
    if explicit is not None:
        if explicit not in header:
            raise ValueError(f"column {explicit!r} (for {key}) is not in the runs table; it has: {', '.join(header)}")
        return explicit
    return next((name for name in candidates if name in header), None)


def _number(text: str | None, name: str, row: int) -> float:
    try:
        return float(text) if text and text.strip() else math.nan
    except ValueError:
        raise ValueError(f"column {name!r} needs numbers; row {row} has {text!r}") from None


def _parse(rows: list[dict[str, str]], name: str, *, positive: bool) -> np.ndarray:
    values = np.array([_number(r[name], name, i + 2) for i, r in enumerate(rows)])
    bad = ~np.isfinite(values) | (values <= 0) if positive else values <= 0
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"column {name!r} needs positive numbers; row {i + 2} has {rows[i][name]!r}")
    return values


def read_runs(path: str | Path, *, columns: dict[str, str | None] | None = None,
              batch_unit: Literal["tokens", "sequences"] = "tokens", seq_len: int | None = None) -> Runs:
    """Read a runs CSV. ``columns`` maps params/tokens/lr/batch/loss/steps to column names (None = auto)."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path.name} has no runs")
    columns = columns or {}
    names: dict[str, str] = {}
    for key, candidates in (DEFAULT_COLUMNS | OPTIONAL_COLUMNS).items():
        name = _pick_column(header, key, columns.get(key), candidates)
        if name is None and key in DEFAULT_COLUMNS:
            raise ValueError(f"{path.name} has no {key} column (looked for {', '.join(candidates)}; "
                             f"name it with --col-{key})")
        if name is not None:
            names[key] = name
    batch = _parse(rows, names["batch"], positive=True)
    if batch_unit == "sequences":
        if seq_len is None and "seq_len" not in names:
            raise ValueError("--batch-unit sequences needs --seq-len (or a seq_len column)")
        batch = batch * (seq_len or _parse(rows, names["seq_len"], positive=True))
    elif batch_unit != "tokens":
        raise ValueError(f"batch unit must be 'tokens' or 'sequences', not {batch_unit!r}")
    if seq_len is None and "seq_len" in names:
        lengths = set(_parse(rows, names["seq_len"], positive=True))
        seq_len = int(lengths.pop()) if len(lengths) == 1 else None
    tokens = _parse(rows, names["tokens"], positive=True)
    steps = _parse(rows, names["steps"], positive=True) if "steps" in names else np.round(tokens / batch)
    return Runs(params=_parse(rows, names["params"], positive=True), tokens=tokens,
                lr=_parse(rows, names["lr"], positive=True), batch_tokens=batch, steps=steps,
                loss=_parse(rows, names["loss"], positive=False), seq_len=seq_len, source=path.name, columns=names)


# ---------------------------------------------------------------------------------------------------------------
# Step Law form


@dataclass(frozen=True, slots=True)
class LawFit:
    law: PowerLaw  # bootstrap mean (the point estimate when there is no bootstrap)
    point: PowerLaw  # OLS on all kept runs
    intervals: dict[str, tuple[float, float]]  # coefficient name -> (lo, hi) percentile interval


@dataclass(frozen=True, slots=True)
class StepLawFit:
    lr: LawFit
    batch: LawFit
    kept: np.ndarray  # bool per run: within the band of its (N, D) group's best
    num_groups: int
    num_used: int  # runs with a finite loss
    num_resamples: int  # bootstrap resamples with a full-rank design (rank-deficient ones are dropped)
    band: float
    seed: int
    level: float


def near_best(runs: Runs, band: float) -> np.ndarray:
    """Mask of the runs whose loss is within ``band`` (relative) of the best loss of their (N, D) group."""
    _, group = np.unique(np.stack([runs.params, runs.tokens], axis=1), axis=0, return_inverse=True)
    loss = np.where(np.isfinite(runs.loss), runs.loss, np.inf)
    best = np.full(group.max() + 1, np.inf)
    np.minimum.at(best, group, loss)
    return np.isfinite(loss) & (loss <= best[group] * (1 + band))


def best_on_grid_edge(runs: Runs) -> tuple[int, int]:
    """How many (N, D) groups have their best run at the smallest or largest lr (first) or batch (second) of
    the group, among groups with >= 3 values of it: the optimum may lie outside the grid there."""
    edges = [0, 0]
    for n, d in set(zip(runs.params, runs.tokens)):
        mask = (runs.params == n) & (runs.tokens == d) & np.isfinite(runs.loss)
        if not mask.any():
            continue
        best = np.flatnonzero(mask)[np.argmin(runs.loss[mask])]
        for k, values in enumerate((runs.lr, runs.batch_tokens)):
            grid = np.unique(values[mask])
            edges[k] += len(grid) >= 3 and values[best] in (grid[0], grid[-1])
    return edges[0], edges[1]


def _design(runs: Runs, mask: np.ndarray, *, with_params: bool) -> np.ndarray:
    columns = [np.ones(mask.sum()), np.log(runs.params[mask]), np.log(runs.tokens[mask])]
    return np.stack(columns if with_params else [columns[0], columns[2]], axis=1)


def _check_design(x: np.ndarray, runs: Runs, mask: np.ndarray, law: str) -> None:
    if np.linalg.matrix_rank(x) == x.shape[1]:
        return
    num_n, num_d = len(np.unique(runs.params[mask])), len(np.unique(runs.tokens[mask]))
    groups = len(np.unique(np.stack([runs.params[mask], runs.tokens[mask]], axis=1), axis=0))
    need = ("(N, D) groups with >= 2 distinct N and >= 2 distinct D, not all on one line in (ln N, ln D), "
            "so >= 3 groups" if x.shape[1] == 3 else "runs at >= 2 distinct D")
    raise ValueError(f"too few runs to fit the {law} law: it needs {need}; the usable runs have "
                     f"{groups} group(s), {num_n} distinct N, {num_d} distinct D")


def _to_law(coefs: np.ndarray, with_params: bool) -> PowerLaw:
    return PowerLaw(coef=float(np.exp(coefs[0])), exp_params=float(coefs[1]) if with_params else 0.0,
                    exp_tokens=float(coefs[-1]))


def _summarize(x: np.ndarray, y: np.ndarray, samples: list[np.ndarray], level: float) -> LawFit:
    with_params = x.shape[1] == 3
    point = _to_law(np.linalg.lstsq(x, y, rcond=None)[0], with_params)
    if not samples:
        return LawFit(law=point, point=point, intervals={})
    coefs = np.array(samples)  # (num_resamples, num_coefficients)
    lo, hi = np.percentile(coefs, [50 * (1 - level), 50 * (1 + level)], axis=0)
    names = ["coef", "exp_params", "exp_tokens"] if with_params else ["coef", "exp_tokens"]
    intervals = {n: (float(a), float(b)) for n, a, b in zip(names, lo, hi, strict=True)}
    intervals["coef"] = (math.exp(intervals["coef"][0]), math.exp(intervals["coef"][1]))
    return LawFit(law=_to_law(coefs.mean(axis=0), with_params), point=point, intervals=intervals)


def fit_steplaw(runs: Runs, *, band: float = 0.0025, num_bootstrap: int = 1000, seed: int = 0,
                batch_on_params: bool = False, level: float = 0.95) -> StepLawFit:
    """Fit lr(N, D) and batch_tokens(D) (or (N, D)) with the Step Law procedure; see the module docstring."""
    if band < 0 or num_bootstrap < 0:
        raise ValueError(f"band and bootstrap must be >= 0, got {band} and {num_bootstrap}")
    kept = near_best(runs, band)
    x_lr, x_bs = _design(runs, kept, with_params=True), _design(runs, kept, with_params=batch_on_params)
    _check_design(x_lr, runs, kept, "lr")
    _check_design(x_bs, runs, kept, "batch")
    y_lr, y_bs = np.log(runs.lr[kept]), np.log(runs.batch_tokens[kept])
    rng = np.random.default_rng(seed)
    lr_samples, bs_samples = [], []
    for _ in range(num_bootstrap):
        i = rng.integers(0, len(y_lr), len(y_lr))  # the same resample for both laws
        lr_fit, bs_fit = np.linalg.lstsq(x_lr[i], y_lr[i], rcond=None), np.linalg.lstsq(x_bs[i], y_bs[i], rcond=None)
        if lr_fit[2] == x_lr.shape[1] and bs_fit[2] == x_bs.shape[1]:
            lr_samples.append(lr_fit[0])
            bs_samples.append(bs_fit[0])
    groups = np.unique(np.stack([runs.params, runs.tokens], axis=1)[np.isfinite(runs.loss)], axis=0)
    return StepLawFit(lr=_summarize(x_lr, y_lr, lr_samples, level), batch=_summarize(x_bs, y_bs, bs_samples, level),
                      kept=kept, num_groups=len(groups), num_used=int(np.isfinite(runs.loss).sum()),
                      num_resamples=len(lr_samples), band=band, seed=seed, level=level)


# ---------------------------------------------------------------------------------------------------------------
# Critical-batch form


@dataclass(frozen=True, slots=True)
class TradeOff:
    """One target loss of one model size: S = s_min + e_min / B fitted over >= 3 batch sizes."""

    loss: float
    params: float
    s_min: float
    e_min: float
    num_batches: int

    @property
    def b_crit(self) -> float:
        return self.e_min / self.s_min


@dataclass(frozen=True, slots=True)
class CriticalBatchFit:
    """B_crit(L) = b_star / L^(1 / alpha_b), B in tokens, L in nats."""

    b_star: float
    alpha_b: float
    points: tuple[TradeOff, ...]

    def __call__(self, loss: float | np.ndarray) -> float | np.ndarray:
        return self.b_star / np.power(loss, 1 / self.alpha_b)


def fit_trade_off(steps: np.ndarray, batch_tokens: np.ndarray) -> tuple[float, float]:
    """(S_min, E_min) from the steps S each batch size B needs: least squares on S = S_min + E_min / B.

    Residuals are taken relative to S (weights 1/S), so that small and large batches count alike.
    """
    x = np.stack([np.ones_like(steps), 1 / batch_tokens], axis=1) / steps[:, None]
    s_min, e_min = np.linalg.lstsq(x, np.ones_like(steps), rcond=None)[0]
    return float(s_min), float(e_min)


def steps_to_reach(steps: np.ndarray, loss: np.ndarray, target: float) -> float | None:
    """Steps needed to reach ``target`` on one batch size's runs, interpolated in log-log; None if not bracketed.

    Only the runs that improve on every run with fewer steps are used, so noise cannot make S(L) non-monotone.
    """
    order = np.argsort(steps)
    s, lo = steps[order], loss[order]
    record = lo < np.minimum.accumulate(np.r_[np.inf, lo[:-1]])
    s, lo = s[record], lo[record]
    if len(s) < 2 or not lo[-1] <= target <= lo[0]:
        return None
    return float(np.exp(np.interp(math.log(target), np.log(lo[::-1]), np.log(s[::-1]))))


def _best_curves(runs: Runs, params: float) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """batch -> (steps, best loss over the other hyperparameters at those steps) for one model size."""
    best: dict[tuple[float, float], float] = {}
    for i in np.flatnonzero((runs.params == params) & np.isfinite(runs.loss)):
        key = (float(runs.batch_tokens[i]), float(runs.steps[i]))
        best[key] = min(best.get(key, math.inf), float(runs.loss[i]))
    curves: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    for batch in sorted({b for b, _ in best}):
        steps = np.array(sorted(s for b, s in best if b == batch))
        curves[batch] = steps, np.array([best[batch, s] for s in steps])
    return {b: c for b, c in curves.items() if len(c[0]) >= 2}


def trade_offs(runs: Runs, *, num_targets: int = 12) -> list[TradeOff]:
    """Per model size, (S_min, E_min) at ``num_targets`` log-spaced target losses reached by >= 3 batch sizes."""
    points = []
    for params in np.unique(runs.params):
        curves = _best_curves(runs, float(params))
        if len(curves) < 3:
            continue
        losses = np.concatenate([loss for _, loss in curves.values()])
        for target in np.geomspace(losses.min(), losses.max(), num_targets + 2)[1:-1]:
            reached = [(b, steps_to_reach(s, loss, float(target))) for b, (s, loss) in curves.items()]
            batch, steps = np.array([[b, s] for b, s in reached if s is not None]).reshape(-1, 2).T
            if len(batch) < 3:
                continue
            s_min, e_min = fit_trade_off(steps, batch)
            if s_min > 0 and e_min > 0:
                points.append(TradeOff(float(target), float(params), s_min, e_min, len(batch)))
    return points


def fit_critical_batch(runs: Runs, *, num_targets: int = 12) -> CriticalBatchFit:
    """Fit B_crit(L) = B_* / L^(1/alpha_B) from final losses; see the module docstring for what it needs."""
    points = trade_offs(runs, num_targets=num_targets)
    if len({p.loss for p in points}) < 2:
        raise ValueError(f"too few runs for the critical batch: it needs, for one N, runs at >= 3 batch sizes with "
                         f">= 2 step counts each reaching the same target losses; found {len(points)} usable targets")
    log_loss = np.log([p.loss for p in points])
    slope, intercept = np.polyfit(log_loss, np.log([p.b_crit for p in points]), 1)
    if slope >= 0:
        raise ValueError(f"the critical batch does not fall with the loss (slope {slope:.3g} of ln B_crit on ln L)")
    return CriticalBatchFit(b_star=float(np.exp(intercept)), alpha_b=float(-1 / slope), points=tuple(points))


# ---------------------------------------------------------------------------------------------------------------
# law.json (format in docs/CONTRACTS.md)


def law_to_dict(runs: Runs, fit: StepLawFit, *, name: str, schedule: str = "cosine",
                critical: CriticalBatchFit | None = None) -> dict:
    def interval(law: LawFit) -> dict[str, list[float]]:
        return {k: list(v) for k, v in law.intervals.items()}

    law = {
        "name": name, "form": "steplaw", "lr": asdict(fit.lr.law), "batch": asdict(fit.batch.law),
        "fitted_range": {"params": [float(runs.params.min()), float(runs.params.max())],
                         "tokens": [float(runs.tokens.min()), float(runs.tokens.max())]},
        "schedule": schedule, "seq_len": runs.seq_len, "source": runs.source,
        "intervals": {"level": fit.level, "lr": interval(fit.lr), "batch": interval(fit.batch)},
        "ols": {"lr": asdict(fit.lr.point), "batch": asdict(fit.batch.point)},
        "runs": len(runs), "runs_used": fit.num_used, "runs_kept": int(fit.kept.sum()), "groups": fit.num_groups,
        "band": fit.band, "bootstrap": fit.num_resamples, "seed": fit.seed,
    }
    if critical is not None:
        law["critical_batch"] = {"b_star": critical.b_star, "alpha_b": critical.alpha_b,
                                 "points": [{"loss": p.loss, "params": p.params, "s_min": p.s_min,
                                             "e_min": p.e_min, "b_crit": p.b_crit} for p in critical.points]}
    return law
