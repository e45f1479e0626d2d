"""The SFT sweep with early stopping (issue 21): the early-stop rule on synthetic signals, Spearman's rho against
scipy and a hand-computed value, the early window read from metrics.jsonl, and a tiny end-to-end sweep on chat
data that stops the configured share, resumes after an interrupted run and measures the prediction."""

from __future__ import annotations

import csv
import json
import math
import random
import warnings
from pathlib import Path

import pytest
from sft_fixtures import WORDS, tiny_chat_model

from batchpilot.cli import main
from batchpilot.data.packing import PackedLoader
from batchpilot.train import sweep as sweep_module  # train_logged calls its train
from batchpilot.train.trainer import train
from batchpilot.train.sft_sweep import (RESULT_COLUMNS, EarlySignals, SftGridSpec, average_ranks, check_same_sweep, early_signals,
                                    early_stop_decision, prepare_sft_data, run_sft_phase, sft_grid_runs, sft_sweep,
                                    sft_train_config, spearman_rho)



def conversations(num: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    say = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [{"messages": [{"role": "user", "content": say(2, 6) + "?"},
                          {"role": "assistant", "content": say(1, 4) + "."}]} for _ in range(num)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny HF model directory: random Llama weights, a BPE with ChatML special tokens and a chat template."""
    return tiny_chat_model(tmp_path_factory.mktemp("hf_model"), conversations(60, seed=1), num_layers=1,
                           num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def chat_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in conversations(100, seed=2)))
    return path


def grid_dict(model_dir: Path, data: Path, **changes) -> dict:
    grid = {"model": str(model_dir), "data": str(data), "lrs": [1e-3, 1e-2], "batch_examples": [4, 8],
            "seq_len": 64, "micro_batch_size": 2, "eval_batches": 2, "epochs": 1.0, "early_fraction": 0.25,
            "keep_fraction": 0.5, "val_fraction": 0.1, "device": "cpu"}
    return grid | changes


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# --- the rule, on synthetic signals (the oracle is written out by hand) ----------------------------------------


SIGNALS = {"a": EarlySignals(grad_norm=3.0, loss=2.0), "b": EarlySignals(grad_norm=1.0, loss=1.5),
           "c": EarlySignals(grad_norm=2.0, loss=2.5), "d": EarlySignals(grad_norm=1.0, loss=2.2),
           "e": EarlySignals(grad_norm=math.nan, loss=9.0)}


@pytest.mark.parametrize("signal, ranking", [
    ("grad_norm", ["d", "b", "c", "a", "e"]),  # lower norm first; b/d tie on norm: d's higher loss wins
    ("loss", ["c", "d", "a", "b", "e"]),  # higher early loss first
    # norm ranks d 1.5 b 1.5 c 3 a 4; -loss ranks c 1 d 2 a 3 b 4: sums d 3.5, c 4, b 5.5, a 7
    ("rank_sum", ["d", "c", "b", "a", "e"]),
])
def test_ranking_by_each_signal_and_the_non_finite_run_last(signal: str, ranking: list[str]) -> None:
    decision = early_stop_decision(SIGNALS, signal=signal, keep_fraction=0.5)
    assert decision.ranking == ranking
    assert decision.kept == ranking[:3]  # ceil(0.5 x 5) = 3
    assert decision.stopped == ranking[3:]


def test_keep_top_and_the_diverged_run_is_never_kept() -> None:
    assert early_stop_decision(SIGNALS, signal="grad_norm", keep_fraction=0.5, keep_top=1).kept == ["d"]
    everything = early_stop_decision(SIGNALS, signal="grad_norm", keep_fraction=1.0)
    assert everything.kept == ["d", "b", "c", "a"] and everything.stopped == ["e"]
    one = early_stop_decision({"x": SIGNALS["a"], "y": SIGNALS["c"]}, signal="grad_norm", keep_fraction=0.01)
    assert one.kept == ["y"]  # at least one survives


def test_spearman_against_scipy_and_by_hand() -> None:
    from scipy.stats import rankdata, spearmanr

    rng = random.Random(0)
    for n in (2, 3, 5, 9, 20):
        x = [rng.choice([0.1, 0.2, 0.3, 0.4]) for _ in range(n)]  # ties on purpose
        y = [rng.random() for _ in range(n)]
        assert average_ranks(x) == pytest.approx(list(rankdata(x)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a constant draw: scipy warns and returns NaN, as we do
            expected = spearmanr(x, y).statistic
        assert spearman_rho(x, y) == pytest.approx(expected, abs=1e-12) or (math.isnan(expected)
                                                                           and math.isnan(spearman_rho(x, y)))
    # by hand, no ties: d = (0, 2, -1, -1), 1 - 6 * 6 / (4 * 15) = 0.4
    assert spearman_rho([1, 2, 3, 4], [1, 4, 2, 3]) == pytest.approx(0.4)
    assert spearman_rho([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(spearman_rho([1.0], [2.0])) and math.isnan(spearman_rho([1, 1, 1], [1, 2, 3]))


def test_early_signals_are_means_over_the_window() -> None:
    records = [{"step": s, "loss": 10.0 - s, "grad_norm": float(s)} for s in range(1, 9)]
    assert early_signals(records, 4) == EarlySignals(grad_norm=2.5, loss=7.5)
    with pytest.raises(ValueError, match="3 of the 4 early steps"):
        early_signals(records[:3], 4)


@pytest.mark.parametrize("changes, message", [
    ({"batch_tokens": [256]}, "one of them"),
    ({"batch_examples": [], "batch_tokens": [100]}, "not multiples of seq_len x micro_batch_size"),
    ({"early_fraction": 1.0}, "early_fraction must be in"),
    ({"keep_fraction": 0.0}, "keep_fraction must be in"),
    ({"signal": "vibes"}, "signal must be one of"),
    ({"lrs": []}, "at least one positive"),
    ({"lrs": [float("nan")]}, "at least one positive"),
    ({"lrs": 1e-5}, "is a list of numbers"),
    ({"train": {"nope": 1}}, "dotted TrainConfig fields"),
])
def test_bad_sft_grid(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SftGridSpec(**grid_dict(tmp_path, tmp_path, **changes))


def test_grid_file_and_flags_meet(tmp_path: Path, capsys) -> None:
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"model": "m", "data": "d", "lrs": [1e-5], "batch_examples": [8], "bogus": 1}))
    assert main(["sweep", "--recipe", "sft", str(path), "--out", str(tmp_path / "s")]) == 2
    assert "unknown grid keys ['bogus']" in capsys.readouterr().err
    assert main(["sweep", "--recipe", "sft", "--sweep.model", "m", "--out", str(tmp_path / "s")]) == 2
    assert "the grid needs data, lrs" in capsys.readouterr().err
    assert main(["sweep", str(path), "--sweep.keep_top", "2", "--out", str(tmp_path / "s")]) == 2
    assert "add --recipe sft" in capsys.readouterr().err


def test_batches_in_examples_become_whole_micro_batches(tmp_path: Path, model_dir: Path, chat_jsonl: Path) -> None:
    grid = SftGridSpec(**grid_dict(model_dir, chat_jsonl))
    runs = sft_grid_runs(grid, prepare_sft_data(grid, tmp_path))
    assert len(runs) == 4 and all(r.rows_per_step % 2 == 0 and r.batch_tokens == r.rows_per_step * 64 for r in runs)
    data_dir = tmp_path / "data"
    rows = PackedLoader(data_dir, "train", 64, pack="conversation").num_rows
    per_row = json.loads((data_dir / "meta.json").read_text())["documents"]["train"] / rows
    for run, asked in zip(runs, (4, 8, 4, 8)):
        assert abs(run.batch_examples - asked) <= per_row * 2 / 2 + 0.01  # within half a micro-batch of 2 rows
        assert run.steps == round(rows / run.rows_per_step)  # one epoch of packed rows
    assert all(r.early_steps == math.ceil(0.25 * r.steps) for r in runs)


# --- end to end ---------------------------------------------------------------------------------------------


def test_sweep_stops_the_bottom_half_and_resumes_an_interrupted_run(tmp_path: Path, model_dir: Path,
                                                                    chat_jsonl: Path, monkeypatch) -> None:
    grid, out = SftGridSpec(**grid_dict(model_dir, chat_jsonl)), tmp_path / "sweep"
    real_train, calls = sweep_module.train, []

    def killed_on_the_second_final_phase(cfg):
        calls.append((Path(cfg.out_dir).name, cfg.schedule.stop_at_step))
        if sum(stop is None for _, stop in calls) == 2:  # the sweep is killed in its second survivor
            cfg.schedule.stop_at_step = cfg.schedule.max_steps - 1  # ... after a checkpointed step
            real_train(cfg)
            raise KeyboardInterrupt
        return real_train(cfg)

    monkeypatch.setattr(sweep_module, "train", killed_on_the_second_final_phase)
    with pytest.raises(KeyboardInterrupt):
        sft_sweep(grid, out, progress=False)
    assert len(read_csv(out / "early.csv")) == 4 and len(read_csv(out / "final.csv")) == 1
    assert not (out / "results.csv").exists()

    calls.clear()
    monkeypatch.setattr(sweep_module, "train", lambda cfg: calls.append(Path(cfg.out_dir).name) or real_train(cfg))
    result = sft_sweep(grid, out, progress=False)
    first_survivor = read_csv(out / "final.csv")[0]["run_id"]
    assert len(calls) == 1 and calls[0] != first_survivor  # only the killed survivor trains again ...
    assert "resumed from step" in (out / "logs" / f"{calls[0]}.log").read_text()  # ... from its checkpoint
    assert result.ran == 1 and not result.failed

    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["kept"]) == 2 and len(summary["stopped"]) == 2 and summary["finished"] == summary["kept"]
    rows = read_csv(out / "results.csv")
    assert [r["run_id"] for r in rows] == summary["ranking"] and list(rows[0]) == list(RESULT_COLUMNS)
    for row in rows:
        ran = json.loads((out / "runs" / row["run_id"] / "result.json").read_text())["steps"]
        if row["kept"] == "True":
            assert int(row["final_steps"]) == int(row["steps"]) == ran and float(row["final_val_loss"]) > 0
        else:
            assert row["final_steps"] == "" and ran == int(row["early_steps"])
            assert not list((out / "runs" / row["run_id"]).glob("checkpoints/*")) and \
                not (out / "runs" / row["run_id"] / "model").exists()  # pruned at the cut
    full = sum(int(r["steps"]) * int(r["batch_tokens"]) for r in rows)
    assert summary["tokens_full_grid"] == full and 0 < summary["compute_saved"] < 1
    assert summary["spearman"]["n"] == 2 and summary["spearman"]["ranking"] in (-1.0, 1.0)

    calls.clear()
    assert sft_sweep(grid, out, progress=False).ran == 0 and not calls  # all done: nothing trains


def test_validate_all_from_the_command_line_measures_the_prediction(tmp_path: Path, model_dir: Path,
                                                                    chat_jsonl: Path, capsys) -> None:
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid_dict(model_dir, chat_jsonl, lrs=[1e-2])))
    out = tmp_path / "sweep"
    assert main(["sweep", "--recipe", "sft", str(path), "--out", str(out), "--sweep.validate_all",
                 "--sweep.lrs", "1e-3,3e-3,1e-2", "--sweep.batch_examples", "8", "--sweep.keep_top", "1",
                 "--sweep.signal", "loss"]) == 0
    printed = capsys.readouterr().out
    assert "Spearman rho, early ranking vs final val loss over 3 runs to the end" in printed
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["run_id"]: r for r in read_csv(out / "results.csv")}
    assert len(rows) == 3 and all(r["final_steps"] == r["steps"] for r in rows.values())  # all to the end
    assert len(summary["kept"]) == 1 and summary["finished"] == summary["ranking"]
    final = [float(rows[i]["final_val_loss"]) for i in summary["ranking"]]
    assert summary["spearman"]["ranking"] == pytest.approx(spearman_rho([1, 2, 3], final), abs=1e-6)
    assert summary["spearman"]["loss"] == pytest.approx(
        spearman_rho([-float(rows[i]["early_loss"]) for i in summary["ranking"]], final), abs=1e-6)
    assert summary["best_final_was_kept"] == (summary["best_final"] == summary["kept"][0])
    assert summary["compute_saved"] == 0.0
    assert main(["report", str(out)]) == 0  # `batchpilot report SWEEP_DIR` prints the same table again
    assert "Spearman rho, early ranking vs final val loss over 3 runs to the end" in capsys.readouterr().out


def test_a_run_killed_before_its_result_keeps_its_logged_val_loss(tmp_path: Path, model_dir: Path,
                                                                  chat_jsonl: Path) -> None:
    """Killed after the last checkpoint, before result.json: the resume trains no step, and the final
    validation loss comes from metrics.jsonl (the record of the last step holds it)."""
    grid = SftGridSpec(**grid_dict(model_dir, chat_jsonl, epochs=0.3))
    data_dir = prepare_sft_data(grid, tmp_path)
    spec = sft_grid_runs(grid, data_dir)[0]
    run_dir = tmp_path / "runs" / spec.run_id
    train(sft_train_config(spec, grid, data_dir, run_dir, final=True, resume=False))
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    (run_dir / "result.json").unlink()
    row = run_sft_phase(spec, grid, data_dir, tmp_path, final=True)
    assert row["final_steps"] == spec.steps == logged["step"] and row["final_val_loss"] == logged["val_loss"]


def test_a_diverged_early_phase_is_a_row_of_nans(tmp_path: Path, model_dir: Path, chat_jsonl: Path,
                                                 monkeypatch) -> None:
    from batchpilot.train.trainer import TrainingDiverged

    grid = SftGridSpec(**grid_dict(model_dir, chat_jsonl))
    data_dir = prepare_sft_data(grid, tmp_path)
    spec = sft_grid_runs(grid, data_dir)[0]

    def diverge(cfg):
        raise TrainingDiverged("gradient norm became nan at step 2, not applied")

    monkeypatch.setattr(sweep_module, "train", diverge)
    row = run_sft_phase(spec, grid, data_dir, tmp_path, final=False)
    assert math.isnan(row["early_grad_norm"]) and math.isnan(row["early_loss"]) and math.isnan(row["early_val_loss"])
    signals = {"ok": EarlySignals(grad_norm=9.0, loss=1.0),
               spec.run_id: EarlySignals(grad_norm=row["early_grad_norm"], loss=row["early_loss"])}
    assert early_stop_decision(signals, signal="grad_norm", keep_fraction=1.0).kept == ["ok"]


def test_a_rerun_may_change_the_grid_and_the_cut_not_the_runs(tmp_path: Path) -> None:
    grid = SftGridSpec(**grid_dict(tmp_path, tmp_path))
    check_same_sweep(grid, tmp_path)
    check_same_sweep(SftGridSpec(**grid_dict(tmp_path, tmp_path, lrs=[1e-4], keep_top=1, validate_all=True)),
                     tmp_path)
    with pytest.raises(ValueError, match=r"other early_fraction \(0.25 -> 0.5\), epochs \(1.0 -> 2.0\); use a new"):
        check_same_sweep(SftGridSpec(**grid_dict(tmp_path, tmp_path, early_fraction=0.5, epochs=2.0)), tmp_path)
