"""Tests for ``batchpilot sweep``: a 2x2 grid of very tiny runs, skipping finished runs, resuming a killed one."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from batchpilot.cli import main
from batchpilot.train.sweep import (RUN_COLUMNS, GridSpec, append_row, finished_ids, grid_runs, micro_batch_size,
                                    prepare_data, run_one, train_config)

MICRO = {"name": "micro", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
         "num_heads": 2, "num_kv_heads": 1}


def write_grid(tmp_path: Path, **changes) -> Path:
    rng = random.Random(0)
    words = "the of and to in a that is was he for it with as his on be at by this had not are but from".split()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=100))}) + "\n" for _ in range(200)))
    grid = {"models": [MICRO], "tokens": [4096], "lrs": [1e-3, 3e-3], "batch_tokens": [512, 1024], "seq_len": 64,
            "data": str(corpus), "vocab_size": 300, "micro_batch_size": 8, "eval_batches": 1, "device": "cpu"}
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid | changes))
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_runs_grid_skips_finished_and_feeds_fit(tmp_path: Path, capsys) -> None:
    grid, out = write_grid(tmp_path), tmp_path / "sweep"
    assert main(["sweep", str(grid), "--out", str(out), "--workers", "2"]) == 0
    rows = read_rows(out / "runs.csv")
    assert len(rows) == 4 and list(rows[0]) == list(RUN_COLUMNS)
    assert {(r["lr"], r["batch_tokens"], r["steps"]) for r in rows} == {
        ("0.001", "512", "8"), ("0.001", "1024", "4"), ("0.003", "512", "8"), ("0.003", "1024", "4")}
    assert all(r["N"] == str(3 * 32 * 64 + 32 * 32 * 2 + 2 * 32 * 16) and r["D"] == "4096" for r in rows)
    assert all(float(r["smooth_loss"]) > 0 and float(r["val_loss"]) > 0 for r in rows)
    assert not list(out.glob("runs/*/checkpoints"))  # pruned once finished

    capsys.readouterr()
    assert main(["sweep", str(grid), "--out", str(out), "--workers", "2"]) == 0
    assert "0 runs trained now, 4 in" in capsys.readouterr().out
    assert read_rows(out / "runs.csv") == rows

    assert main(["fit", str(out / "runs.csv"), "--out", str(out / "law.json"), "--bootstrap", "20"]) == 2
    assert "too few runs to fit the lr law" in capsys.readouterr().err


def test_half_finished_runs_resume_or_restart(tmp_path: Path) -> None:
    from batchpilot.train.trainer import train

    sweep_dir = tmp_path / "sweep"
    grid = GridSpec.from_json(write_grid(tmp_path, lrs=[3e-3], batch_tokens=[512]))
    data_dir = prepare_data(grid, sweep_dir)
    spec = grid_runs(grid, sweep_dir)[0]
    run_dir = sweep_dir / "runs" / spec.run_id
    killed = train_config(spec, grid, data_dir, run_dir, resume=False)
    killed.schedule.stop_at_step, killed.checkpoint.save_every = 3, 1  # a sweep killed after step 3 (checkpointed)
    train(killed)
    row = run_one(spec, grid, data_dir, sweep_dir)
    assert row["steps"] == 8 and row["run_id"] == spec.run_id
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 8
    assert "resumed from step 3" in (sweep_dir / "logs" / f"{spec.run_id}.log").read_text()

    (run_dir / "result.json").unlink()  # no checkpoint left and no result: restarted from scratch
    assert run_one(spec, grid, data_dir, sweep_dir)["smooth_loss"] == pytest.approx(row["smooth_loss"])


def test_micro_batch_size_divides_the_step() -> None:
    assert [micro_batch_size(rows, 16) for rows in (8, 10, 16, 40, 64, 7)] == [8, 10, 16, 10, 16, 7]


def test_append_row_drops_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "runs.csv"
    row = {c: "1" for c in RUN_COLUMNS}
    append_row(path, row | {"run_id": "a"})
    with path.open("a") as f:
        f.write("b,x,1,2")  # a sweep killed mid-write
    assert finished_ids(path) == {"a"}
    append_row(path, row | {"run_id": "c"})
    assert [r["run_id"] for r in read_rows(path)] == ["a", "c"]


@pytest.mark.parametrize("changes, message", [
    ({"bogus": 1}, "unknown grid keys"),
    ({"batch_tokens": [100]}, "not multiples of seq_len"),
    ({"lrs": []}, "at least one value in 'lrs'"),
    ({"train": {"nope": 1}}, "unknown TrainConfig fields"),
    ({"models": ["tiny", "tiny"]}, "model names must be unique"),
])
def test_bad_grid(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GridSpec.from_json(write_grid(tmp_path, **changes))
