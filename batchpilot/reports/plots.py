"""``batchpilot report``: a run directory's files -> PNG plots and one self-contained HTML page.

A leaf (style rule 14): it reads ``config.json``, ``plan.json`` and ``metrics.jsonl`` only, imports nothing
from the rest of batchpilot, and is the one module that imports matplotlib (the ``plots`` extra). Plots are
against tokens seen, the clock that stays meaningful when the adaptive controller changes the batch. Series a
run did not log are skipped, so the same code serves a fixed-batch CPU run and an adaptive FSDP2 run. The
HTML embeds the PNGs as base64, so ``report.html`` can be mailed or attached on its own.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchpilot.io import read_jsonl, write_bytes_atomic

# (file stem, title, y label, log y, [(metric key, legend label), ...]); keys as the trainer logs them
PLOTS: list[tuple[str, str, str, bool, list[tuple[str, str]]]] = [
    ("loss", "Loss", "loss (nats)", False, [("loss", "train"), ("val_loss", "validation")]),
    ("lr", "Learning rate", "lr", False, [("lr", "lr")]),
    ("batch", "Global batch vs critical batch", "tokens", True,
     [("global_batch_tokens", "global batch"), ("critical_batch_tokens", "critical batch (estimate)")]),
    ("noise", "Gradient noise scale", "tokens", True,
     [("b_simple", "B_simple = tr(Sigma)/|G|^2"), ("grad_noise_scale", "gradient noise scale")]),
    ("grad_norm", "Gradient norm", "||g||", True, [("grad_norm", "grad norm")]),
    ("throughput", "Throughput", "tokens/s", False, [("tokens_per_s", "tokens/s")]),
    ("mfu", "Model FLOPs utilisation", "MFU", False, [("mfu", "MFU")]),
    ("memory", "Peak memory", "GiB", False, [("peak_memory_bytes", "peak allocated")]),
]
GIB = 2**30


@dataclass(frozen=True, slots=True)
class Run:
    path: Path
    config: dict[str, Any]
    plan: dict[str, Any]
    records: list[dict[str, Any]]


def read_run(run_dir: str | os.PathLike) -> Run:
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"{path} is not a run directory")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{path} has no metrics.jsonl (is it a run directory?)")
    return Run(path, _read_json(path / "config.json"), _read_json(path / "plan.json"), _read_metrics(metrics))


def _read_json(path: Path) -> dict[str, Any]:
    """A run's config.json / plan.json ({} when absent); anything but a JSON object is a one-line error."""
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path}: not valid JSON") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: a JSON {type(obj).__name__}, not an object")
    return obj


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line; keys like ``train/loss`` are read as ``loss``; a torn LAST line (a run still
    writing) is dropped, a bad line elsewhere is an error."""
    records = [{key.rsplit("/", 1)[-1]: value for key, value in record.items()} for record in read_jsonl(path)]
    if not records:
        raise ValueError(f"{path} holds no metrics")
    return records


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(tokens, values) of the records that carry a finite number under ``key``."""
    pairs = [(r.get("tokens", r.get("step", i)), r[key]) for i, r in enumerate(records)
             if isinstance(r.get(key), int | float) and r[key] == r[key]]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def summarize(run: Run) -> dict[str, Any]:
    last = run.records[-1]
    val = series(run.records, "val_loss")[1]
    tps = series(run.records, "tokens_per_s")[1]
    memory = series(run.records, "peak_memory_bytes")[1]
    return {"final loss": last.get("loss"), "val loss": val[-1] if val else None, "tokens": last.get("tokens"),
            "steps": last.get("step"), "wall time (s)": _wall_seconds(run.records),
            "mean tokens/s": sum(tps) / len(tps) if tps else None,
            "peak memory (GiB)": max(memory) / GIB if memory else None}


def _wall_seconds(records: list[dict[str, Any]]) -> float | None:
    """Logged wall time if the trainer wrote one; else the sum of interval tokens / tokens_per_s."""
    for key in ("wall_seconds", "elapsed_s"):
        if key in records[-1]:
            return float(records[-1][key])
    total, previous = 0.0, 0
    for r in records:
        if not r.get("tokens_per_s") or "tokens" not in r:
            return None
        total += (r["tokens"] - previous) / r["tokens_per_s"]
        previous = r["tokens"]
    return total


def plot_run(run: Run, out_dir: Path) -> list[tuple[str, Path]]:
    """Write one PNG per plot that has data; returns (title, path) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for stem, title, ylabel, log_y, keys in PLOTS:
        lines = [(label, *series(run.records, key)) for key, label in keys]
        lines = [line for line in lines if line[1]]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for label, x, y in lines:
            y = [v / GIB for v in y] if stem == "memory" else y
            style = "steps-post" if stem in ("batch", "lr") and label == "global batch" else "default"
            ax.plot(x, y, marker="o" if len(x) < 20 else None, label=label, drawstyle=style)
        ax.set(title=title, xlabel="tokens seen", ylabel=ylabel)
        if log_y and all(v > 0 for _, _, y in lines for v in y):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        path = out_dir / f"{stem}.png"
        write_bytes_atomic(path, buffer.getvalue())
        written.append((title, path))
    return written


def build_report(run: Run) -> Path:
    """Write ``RUN_DIR/report/*.png`` and ``report.html``; returns the HTML path."""
    out_dir = run.path / "report"
    out_dir.mkdir(exist_ok=True)
    plots = plot_run(run, out_dir)
    page = out_dir / "report.html"
    write_bytes_atomic(page, render_html(run, summarize(run), plots).encode())
    return page


def render_html(run: Run, summary: dict[str, Any], plots: list[tuple[str, Path]]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in summary.items())
    plan_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in run.plan.items()
                        if not isinstance(v, dict | list))
    images = "".join(f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,'
                     f'{base64.b64encode(p.read_bytes()).decode()}"></figure>' for t, p in plots)
    config = html.escape(json.dumps(run.config, indent=2, default=str))
    plan = f"<h2>Plan</h2><table>{plan_rows}</table>" if plan_rows else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>batchpilot report: "
            f"{html.escape(run.path.name)}</title><style>body{{font-family:sans-serif;max-width:70em;margin:auto}}"
            f"th{{text-align:left;padding-right:1em}}figure{{display:inline-block;margin:0.5em}}</style></head>"
            f"<body><h1>Run {html.escape(run.path.name)}</h1><h2>Summary</h2><table>{rows}</table>{plan}"
            f"<h2>Plots</h2>{images}<details><summary>config.json</summary><pre>{config}</pre></details>"
            f"</body></html>\n")


def _fmt(value: Any) -> str:
    if value is None:
        return "&mdash;"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return html.escape(str(value))
