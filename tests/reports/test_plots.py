import json

import pytest

pytest.importorskip("matplotlib")

from batchpilot.cli import main  # noqa: E402
from batchpilot.reports.plots import build_report, read_run, series, summarize  # noqa: E402


def write_run(path, *, adaptive: bool = True, torn_tail: bool = False):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model": "tiny", "seq_len": 64, "optimizer": "lamb"}))
    (path / "plan.json").write_text(json.dumps({"global_batch_tokens": 1024, "peak_lr": 3e-3, "law": {"a": 1}}))
    lines, tokens, batch = [], 0, 1024
    for step in range(1, 31):
        batch = min(4096, 1024 * 2 ** (step // 10)) if adaptive else 1024
        tokens += batch
        record = {"step": step, "tokens": tokens, "loss": 5.0 / step**0.3, "lr": 1e-3, "global_batch_tokens": batch,
                  "tokens_per_s": 2000.0, "grad_norm": 1.0 / step, "peak_memory_bytes": 2**30 * (1 + step / 30)}
        if step % 10 == 0:
            record["val_loss"] = record["loss"] + 0.1
        if adaptive and step > 3:
            record |= {"b_simple": 500.0 * step, "critical_batch_tokens": 500.0 * step, "mfu": 0.3}
        lines.append(json.dumps(record))
    text = "\n".join(lines) + "\n" + ('{"step": 31, "tok' if torn_tail else "")
    (path / "metrics.jsonl").write_text(text)
    return path


def test_report_full_run(tmp_path):
    run = read_run(write_run(tmp_path / "run", torn_tail=True))
    page = build_report(run)
    out = tmp_path / "run" / "report"
    assert page == out / "report.html"
    assert {p.name for p in out.glob("*.png")} == {"loss.png", "lr.png", "batch.png", "noise.png", "grad_norm.png",
                                                   "throughput.png", "mfu.png", "memory.png"}
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 8 and "final loss" in text and "peak_lr" in text
    assert not list(out.glob(".*.tmp"))
    summary = summarize(run)
    assert summary["steps"] == 30 and summary["tokens"] == run.records[-1]["tokens"]
    assert summary["val loss"] == pytest.approx(run.records[-1]["val_loss"])
    assert summary["wall time (s)"] == pytest.approx(summary["tokens"] / 2000.0)
    assert summary["peak memory (GiB)"] == pytest.approx(2.0)


def test_report_skips_absent_series(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "tokens": 64 * s, "train/loss": 3.0 - s / 10})
                                                + "\n" for s in range(1, 6)))
    run = read_run(path)
    assert series(run.records, "loss")[0] == [64, 128, 192, 256, 320]
    build_report(run)
    assert [p.name for p in (path / "report").glob("*.png")] == ["loss.png"]
    assert summarize(run)["mean tokens/s"] is None


def test_cli_report(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", adaptive=False)
    assert main(["report", str(run_dir)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert not (run_dir / "report" / "noise.png").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("batchpilot report: error:") and "\n" not in err


def test_bad_metrics_line_is_an_error(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    (path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_run(path)


def test_report_files_have_plain_modes(tmp_path):
    """Under umask 022 the report is readable by others: 0755 directory, 0644 files (atomic writes included)."""
    import os
    import stat
    old = os.umask(0o022)
    try:
        page = build_report(read_run(write_run(tmp_path / "run")))
    finally:
        os.umask(old)
    assert stat.S_IMODE(page.parent.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in page.parent.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
