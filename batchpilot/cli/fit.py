"""``batchpilot fit RUNS.csv --out law.json``: fit the Step Law (and, when the runs allow, the critical batch).

The math lives in ``batchpilot.plan.fit``; this module maps flags onto it, prints the constants, writes law.json
atomically and draws the plots (matplotlib is imported inside ``write_plots`` only).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from batchpilot.io import write_json_atomic
from batchpilot.plan.fit import (DEFAULT_COLUMNS, OPTIONAL_COLUMNS, CriticalBatchFit, LawFit, Runs, StepLawFit,
                                 best_on_grid_edge, fit_critical_batch, fit_steplaw, law_to_dict, read_runs)

PANELS_PER_FIGURE = 16


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fit", help="fit lr/batch scaling laws to a runs table -> law.json",
                              description="Fit lr = c N^a D^b and batch_tokens = c' D^b' (Step Law procedure) and, "
                                          "when the runs allow, B_crit(L) = B_* / L^(1/alpha_B).")
    p.add_argument("runs", type=Path, help="runs CSV (one row per finished run)")
    p.add_argument("--out", type=Path, default=Path("law.json"), help="law file to write (default: law.json)")
    for key, names in (DEFAULT_COLUMNS | {"steps": OPTIONAL_COLUMNS["steps"]}).items():
        p.add_argument(f"--col-{key}", default=None, metavar="NAME",
                       help=f"{key} column (default: the first of {', '.join(map(repr, names))} present)")
    p.add_argument("--batch-unit", choices=("tokens", "sequences"), default="tokens")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (for --batch-unit sequences)")
    p.add_argument("--band", type=float, default=0.0025, help="keep runs within this fraction of the group's best")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: plain OLS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-on-params", action="store_true", help="fit ln batch ~ ln N + ln D instead of ln D")
    p.add_argument("--schedule", default="cosine", help="LR schedule the runs used (recorded in law.json)")
    p.add_argument("--plots", type=Path, default=None, help="plot directory (default: beside --out)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--name", default=None, help="law name (default: the runs file name)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    columns = {k: getattr(args, f"col_{k}") for k in ("params", "tokens", "lr", "batch", "loss", "steps")}
    runs = read_runs(args.runs, columns=columns, batch_unit=args.batch_unit, seq_len=args.seq_len)
    fit = fit_steplaw(runs, band=args.band, num_bootstrap=args.bootstrap, seed=args.seed,
                      batch_on_params=args.batch_on_params)
    try:
        critical: CriticalBatchFit | None = fit_critical_batch(runs)
    except ValueError as e:
        critical, skipped = None, str(e)
    law = law_to_dict(runs, fit, name=args.name or args.runs.stem, schedule=args.schedule, critical=critical)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, law)
    print(format_fit(runs, fit))
    lr_edges, batch_edges = best_on_grid_edge(runs)
    if lr_edges or batch_edges:
        print(f"warning: the best run of {lr_edges} group(s) is at the edge of its lr grid and of {batch_edges} at "
              f"the edge of its batch grid: the optimum may lie outside; widen the grid there")
    print(format_critical(critical) if critical else f"critical batch: not fitted ({skipped})")
    print(f"wrote {args.out}")
    if not args.no_plots:
        for path in write_plots(runs, fit, critical, args.plots or args.out.parent, stem=args.out.stem):
            print(f"wrote {path}")
    return 0


def _rows(label: str, law: LawFit) -> list[str]:
    names = [n for n in ("coef", "exp_params", "exp_tokens") if n != "exp_params" or law.point.exp_params != 0.0]
    rows = []
    for n in names:
        lo, hi = law.intervals.get(n, (math.nan, math.nan))
        rows.append(f"{label:<6} {n:<11} {getattr(law.law, n):>11.4g} {getattr(law.point, n):>11.4g}"
                    f"   [{lo:.4g}, {hi:.4g}]")
    return rows


def format_fit(runs: Runs, fit: StepLawFit) -> str:
    head = (f"{runs.source}: {len(runs)} runs, {fit.num_used} with a loss, {fit.num_groups} (N, D) groups, "
            f"{int(fit.kept.sum())} kept within {fit.band:.2%} of their group's best; {fit.num_resamples} bootstrap "
            f"resamples (seed {fit.seed})")
    table = [f"{'law':<6} {'constant':<11} {'boot mean':>11} {'ols':>11}   {fit.level:.0%} interval"]
    lr, bs = fit.lr.law, fit.batch.law
    formula = (f"lr = {lr.coef:.4g} N^{lr.exp_params:.4f} D^{lr.exp_tokens:.4f};  "
               f"batch_tokens = {bs.coef:.4g} N^{bs.exp_params:.4f} D^{bs.exp_tokens:.4f}")
    return "\n".join([head, *table, *_rows("lr", fit.lr), *_rows("batch", fit.batch), formula])


def format_critical(critical: CriticalBatchFit) -> str:
    losses = [p.loss for p in critical.points]
    return (f"critical batch: B_crit(L) = {critical.b_star:.4g} / L^(1/{critical.alpha_b:.4f}) tokens, from "
            f"{len(critical.points)} target losses in [{min(losses):.3f}, {max(losses):.3f}]")


def write_plots(runs: Runs, fit: StepLawFit, critical: CriticalBatchFit | None, out_dir: Path, *,
                stem: str = "law") -> list[Path]:
    """Heatmaps of loss over (lr, batch) per (N, D) group, the fitted lines, and B_crit(L); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    groups = sorted({(n, d) for n, d, loss in zip(runs.params, runs.tokens, runs.loss) if np.isfinite(loss)})
    paths = []
    for start in range(0, len(groups), PANELS_PER_FIGURE):
        chunk = groups[start:start + PANELS_PER_FIGURE]
        cols = math.ceil(math.sqrt(len(chunk)))
        fig, axes = plt.subplots(math.ceil(len(chunk) / cols), cols, figsize=(3.2 * cols, 2.8 * math.ceil(
            len(chunk) / cols)), squeeze=False)
        for ax, (n, d) in zip(axes.flat, chunk):
            _heatmap(ax, runs, fit, n, d)
        for ax in axes.flat[len(chunk):]:
            ax.axis("off")
        fig.tight_layout()
        paths.append(out_dir / f"{stem}_heatmaps_{start // PANELS_PER_FIGURE + 1}.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    paths.append(_plot_lines(plt, runs, fit, out_dir / f"{stem}_lines.png"))
    if critical is not None:
        paths.append(_plot_critical(plt, critical, out_dir / f"{stem}_critical_batch.png"))
    return paths


def _heatmap(ax, runs: Runs, fit: StepLawFit, params: float, tokens: float) -> None:
    mask = (runs.params == params) & (runs.tokens == tokens) & np.isfinite(runs.loss)
    lrs, batches = np.unique(runs.lr[mask]), np.unique(runs.batch_tokens[mask])
    grid = np.full((len(batches), len(lrs)), np.nan)  # (batch, lr)
    for lr, b, loss in zip(runs.lr[mask], runs.batch_tokens[mask], runs.loss[mask]):
        i, j = np.searchsorted(batches, b), np.searchsorted(lrs, lr)
        grid[i, j] = np.fmin(grid[i, j], loss)
    rel = grid / np.nanmin(grid) - 1  # excess over the group's best
    image = ax.imshow(np.clip(rel, 0, 0.05), origin="lower", aspect="auto", cmap="viridis_r")
    kept = fit.kept & mask
    ax.scatter(np.searchsorted(lrs, runs.lr[kept]), np.searchsorted(batches, runs.batch_tokens[kept]), s=8, c="w")
    # the fitted optimum, placed on the index axes by interpolating in log space
    x = np.interp(np.log(fit.lr.law(params, tokens)), np.log(lrs), np.arange(len(lrs)), left=-0.5, right=len(lrs))
    y = np.interp(np.log(fit.batch.law(params, tokens)), np.log(batches), np.arange(len(batches)), left=-0.5,
                  right=len(batches))
    ax.plot([x], [y], marker="*", color="r", markersize=12)
    ax.set_xticks(range(len(lrs)), [f"{v:.1e}" for v in lrs], rotation=90, fontsize=5)
    ax.set_yticks(range(len(batches)), [f"{v:.2g}" for v in batches], fontsize=5)
    ax.set_title(f"N={params:.3g} D={tokens:.3g}", fontsize=7)
    ax.figure.colorbar(image, ax=ax, fraction=0.05).ax.tick_params(labelsize=5)


def _plot_lines(plt, runs: Runs, fit: StepLawFit, path: Path) -> Path:
    fig, (ax_lr, ax_bs) = plt.subplots(1, 2, figsize=(10, 4))
    d = np.geomspace(runs.tokens.min(), runs.tokens.max(), 50)
    for n in np.unique(runs.params):
        kept = fit.kept & (runs.params == n)
        line = ax_lr.plot(d, [fit.lr.law(n, float(x)) for x in d], label=f"N={n:.3g}")[0]
        ax_lr.scatter(runs.tokens[kept], runs.lr[kept], s=10, color=line.get_color())
        ax_bs.scatter(runs.tokens[kept], runs.batch_tokens[kept], s=10, color=line.get_color())
        if fit.batch.law.exp_params != 0.0 or n == runs.params.min():
            ax_bs.plot(d, [fit.batch.law(n, float(x)) for x in d], color=line.get_color() if fit.batch.law.exp_params else "k")
    for ax, label in ((ax_lr, "optimal lr"), (ax_bs, "optimal batch (tokens)")):
        ax.set(xscale="log", yscale="log", xlabel="D (tokens)", ylabel=label)
    ax_lr.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_critical(plt, critical: CriticalBatchFit, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4))
    losses = np.array([p.loss for p in critical.points])
    ax.scatter(losses, [p.b_crit for p in critical.points], c=np.log([p.params for p in critical.points]), s=12)
    grid = np.geomspace(losses.min(), losses.max(), 50)
    ax.plot(grid, critical(grid), "k-", label=f"{critical.b_star:.3g} / L^(1/{critical.alpha_b:.3f})")
    ax.set(xscale="log", yscale="log", xlabel="target loss L", ylabel="B_crit = E_min / S_min (tokens)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
