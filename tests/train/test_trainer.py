"""Trainer equivalences: accumulation == one big batch, resume == uninterrupted, packing isolation, NaN stop."""

import json
import subprocess
import sys

import pytest
import torch

from batchpilot.data.packing import PackedLoader
from batchpilot.model.attention import DocumentMask, document_ids_from_positions
from batchpilot.model.llama import LlamaConfig, build_model
from batchpilot.train.parallel import ParallelDims
from batchpilot.train.config import config_from_legacy
from batchpilot.train.trainer import TrainingDiverged, accumulate_gradients, eval_row_ranges, micro_batch_sizes, train

TINY = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   tie_word_embeddings=True)


def _cfg(tmp_path, data, **kw):
    base = dict(model=_model_dir(tmp_path), data=str(data), seq_len=32,
                global_batch_tokens=256, micro_batch_size=4, max_steps=6, lr=1e-2, min_lr=1e-3, eval_every=3,
                eval_batches=2, save_every=3, progress=False)
    base.update(kw)
    return config_from_legacy(str(tmp_path / "run"), **base)


def _model_dir(tmp_path):
    from batchpilot.model.hf import config_to_hf
    path = tmp_path / "tiny_model"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_hf(TINY)))
    return str(path)


def test_micro_batch_sizes_reach_the_global_batch_exactly():
    assert micro_batch_sizes(16, 4) == [4, 4, 4, 4]
    assert micro_batch_sizes(10, 4) == [4, 4, 2]
    assert sum(micro_batch_sizes(37, 8)) == 37


def test_accumulation_equals_one_big_batch(tiny_data):
    dims = ParallelDims()
    grads = []
    for micro in (8, 3, 1):  # 8 = one micro-batch; 3 -> 3+3+2 (uneven last); 1 -> 8 micro-batches
        torch.manual_seed(0)
        model = build_model(TINY, seed=0)
        loader = PackedLoader(tiny_data, "train", 32, seed=0)
        loss, _ = accumulate_gradients(model, loader, global_batch_tokens=8 * 32, seq_len=32, micro_batch_size=micro,
                                       dims=dims)
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    for loss, g in grads[1:]:
        assert loss == pytest.approx(grads[0][0], abs=1e-5)
        for a, b in zip(g, grads[0][1]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_resume_is_identical_to_uninterrupted(tmp_path, tiny_data):
    full = train(_cfg(tmp_path / "a", tiny_data))
    first = train(_cfg(tmp_path / "b", tiny_data, max_steps=6, save_every=3, stop_at_step=3))
    assert first.steps == 3
    resumed = train(_cfg(tmp_path / "b", tiny_data, resume=True))
    assert resumed.steps == 6
    losses_full = [r["loss"] for r in _metrics(full.run_dir)]
    losses_resumed = [r["loss"] for r in _metrics(resumed.run_dir)]
    assert losses_resumed == losses_full  # bit-identical on CPU


def test_one_device_fsdp_matches_plain_training_and_resumes(tmp_path, tiny_data):
    """``--fsdp-one-device`` (FSDP2 on an in-process one-rank group; fp32 on CPU) gives plain training's losses,
    and a stopped and resumed run continues them (DCP checkpoint). CLI subprocesses: the group is per process."""
    plain = train(_cfg(tmp_path / "a", tiny_data))
    flags = ["--model", _model_dir(tmp_path), "--data", str(tiny_data), "--seq-len", "32", "--global-batch-tokens",
             "256", "--micro-batch-size", "4", "--max-steps", "6", "--lr", "1e-2", "--min-lr", "1e-3",
             "--eval-every", "3", "--eval-batches", "2", "--save-every", "3", "--device", "cpu", "--fsdp-one-device",
             "--no-progress"]

    def cli(out, *extra):
        subprocess.run([sys.executable, "-m", "batchpilot", "train", *flags, "--out", str(out), *extra], check=True,
                       capture_output=True, text=True, timeout=300)

    cli(tmp_path / "full")
    cli(tmp_path / "resumed", "--stop-at-step", "3")
    cli(tmp_path / "resumed", "--resume")
    want = [r["loss"] for r in _metrics(plain.run_dir)]
    for run in ("full", "resumed"):
        got = [r["loss"] for r in _metrics(tmp_path / run)]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), run


def _metrics(run_dir):
    with open(f"{run_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_run_dir_is_never_overwritten(tmp_path, tiny_data):
    train(_cfg(tmp_path, tiny_data, max_steps=1))
    with pytest.raises(FileExistsError, match="--resume"):
        train(_cfg(tmp_path, tiny_data, max_steps=1))


def test_resume_with_another_shape_is_refused(tmp_path, tiny_data):
    train(_cfg(tmp_path, tiny_data, max_steps=3))
    with pytest.raises(ValueError, match="cannot resume"):
        train(_cfg(tmp_path, tiny_data, max_steps=3, seq_len=64, resume=True))


def test_nan_stops_with_last_good_checkpoint(tmp_path, tiny_data):
    cfg = _cfg(tmp_path, tiny_data, max_steps=6, save_every=2, lr=1e30, min_lr=0.0, grad_clip=0.0)
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        train(cfg)


def test_packed_documents_do_not_see_each_other():
    torch.manual_seed(0)
    model = build_model(TINY, seed=0).eval()
    ids = torch.randint(0, 320, (1, 24))
    positions = torch.cat([torch.arange(10), torch.arange(14)])[None]  # two documents: 10 + 14 tokens
    changed = ids.clone()
    changed[0, :10] = torch.randint(0, 320, (10,))  # replace the first document entirely
    meta = DocumentMask(document_ids=document_ids_from_positions(positions))
    with torch.no_grad():
        a = model(ids, position_ids=positions, attn_meta=meta)
        b = model(changed, position_ids=positions, attn_meta=DocumentMask(document_ids=meta.document_ids))
        alone = model(ids[:, 10:])  # the second document on its own
    torch.testing.assert_close(a[:, 10:], b[:, 10:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[:, 10:], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, :10], b[:, :10])


def test_adaptive_batch_grows_logs_noise_and_survives_resume(tmp_path, tiny_data):
    adaptive = dict(batch_policy="adaptive", global_batch_tokens=512, micro_batch_size=4, max_steps=10,
                    adaptive_min_interval_steps=2, adaptive_warmup_steps=3, adaptive_target_multiplier=30,
                    max_global_batch_tokens=2048, save_every=4)
    full = train(_cfg(tmp_path / "a", tiny_data, **adaptive))
    records = _metrics(full.run_dir)
    assert all("b_simple" in r for r in records[1:])  # measured every step (EMA needs one update first)
    batches = [r["global_batch_tokens"] for r in records]
    assert batches == sorted(batches) and batches[-1] > 512  # grows, never shrinks
    changed = [r for r in records if "batch_change" in r]
    assert changed and all(r["lr_scale"] >= 1.0 for r in records)
    train(_cfg(tmp_path / "b", tiny_data, stop_at_step=4, **adaptive))
    resumed = train(_cfg(tmp_path / "b", tiny_data, resume=True, **adaptive))
    assert [r["loss"] for r in _metrics(resumed.run_dir)] == [r["loss"] for r in records]
    assert resumed.tokens == full.tokens


def test_every_run_records_its_layout_in_plan_json(tmp_path, tiny_data):
    result = train(_cfg(tmp_path, tiny_data, max_steps=1))
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["global_batch_tokens"] == 256 and plan["micro_batch_size"] == 4 and plan["grad_accum_steps"] == 2
    assert plan["total_steps"] == 1 and result.steps == 1


def test_validation_rows_do_not_depend_on_the_number_of_ranks():
    """Ranks split each validation batch evenly, and together they cover the same rows as one process."""
    for micro, batches, num_rows in [(4, 3, 100), (4, 4, 100), (16, 4, 30), (3, 5, 7)]:
        one = eval_row_ranges(num_rows, eval_batches=batches, micro_batch_size=micro, world_size=1)
        rows_one = [r for lo, hi in one for r in range(lo, hi)]
        for world in (2, 4):
            many = eval_row_ranges(num_rows, eval_batches=batches, micro_batch_size=micro, world_size=world)
            assert all((hi - lo) % world == 0 for lo, hi in many)
            rows_many = [r for lo, hi in many for r in range(lo, hi)]
            assert rows_many == list(range(len(rows_many)))
            # the same rows whenever the total is already a multiple of the ranks
            if len(rows_one) % world == 0:
                assert rows_many == rows_one


# ---- issue 14: a failed start leaves the run directory as it was; keep N; leftovers; exports carry EOS ----

def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else None


def test_a_failed_start_leaves_the_run_directory_as_it_was(tmp_path, tiny_text_dir, monkeypatch, capsys):
    from batchpilot.cli import main
    from batchpilot.train import run as run_module

    out = tmp_path / "run"
    flags = ["train", "--model.name", _model_dir(tmp_path), "--data.seq_len", "32", "--batch.global_batch_tokens",
             "128", "--batch.micro_batch_size", "4", "--logging.eval_every", "100", "--logging.eval_batches", "1",
             "--no-logging.progress", "--out", str(out)]
    assert main([*flags, "--data.path", str(tmp_path / "no_such_data"), "--schedule.max_steps", "2"]) == 2
    assert main([*flags, "--data.path", str(tiny_text_dir), "--schedule.max_steps", "0"]) == 2
    assert not out.exists()

    def model_fails(*args, **kwargs):  # a failure after the raw text was prepared (staged) and checked
        raise ValueError("the model does not fit")
    monkeypatch.setattr(run_module, "build_run_model", model_fails)
    assert main([*flags, "--data.path", str(tiny_text_dir), "--schedule.max_steps", "2"]) == 2
    assert not out.exists()  # the staged data went with the directory this start created
    out.mkdir()  # an existing (empty) directory: only what this start added is removed, the lock file too
    assert main([*flags, "--data.path", str(tiny_text_dir), "--schedule.max_steps", "2", "--checkpoint.resume"]) == 2
    assert _listing(out) == []
    (out / ".data.staging").mkdir()  # what a start killed while preparing leaves
    capsys.readouterr()
    assert main([*flags, "--data.path", str(tiny_text_dir), "--schedule.max_steps", "2"]) == 2
    assert "the model does not fit" in capsys.readouterr().err  # not refused as "not empty": a leftover, cleaned
    assert _listing(out) == []
    monkeypatch.undo()

    # the corrected command works without --resume; the staged data is the run's own RUN/data
    assert main([*flags, "--data.path", str(tiny_text_dir), "--schedule.max_steps", "3",
                 "--checkpoint.save_every", "1", "--checkpoint.keep", "1"]) == 0
    assert (out / "data" / "meta.json").is_file() and not (out / ".data.staging").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000003"]  # keep 1
    generation = json.loads((out / "model" / "generation_config.json").read_text())
    tok = PackedLoader(out / "data", "train", 32).tokenizer
    assert generation["eos_token_id"] == tok.eos_id  # exports carry EOS (and the tokenizer's limits)
    tok_config = json.loads((out / "model" / "tokenizer_config.json").read_text())
    assert tok_config["model_max_length"] == json.loads((out / "model" / "config.json").read_text())[
        "max_position_embeddings"]


def test_resume_cleans_leftovers_and_falls_back_past_a_damaged_latest(tmp_path, tiny_data, capsys):
    train(_cfg(tmp_path, tiny_data, max_steps=6, save_every=3, stop_at_step=4, keep_checkpoints=3))
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / ".tmp-step_00000005").mkdir()  # a save killed before its rename
    (ckpts / "step_00000004" / "trainer_state.json").write_text("{}")  # damaged: fails its checksum
    capsys.readouterr()
    resumed = train(_cfg(tmp_path, tiny_data, max_steps=6, save_every=3, resume=True, keep_checkpoints=3))
    err = capsys.readouterr().err
    assert "skipping checkpoint step_00000004" in err and "resuming from step_00000003" in err
    assert not (ckpts / ".tmp-step_00000005").exists()
    assert resumed.steps == 6
    full = train(_cfg(tmp_path / "full", tiny_data, max_steps=6, save_every=3))
    want = {r["step"]: r["loss"] for r in _metrics(full.run_dir)}
    assert {r["step"]: r["loss"] for r in _metrics(resumed.run_dir)} == want  # step 4 re-run, logged once
    assert [r["step"] for r in _metrics(resumed.run_dir)] == sorted(want)


def test_library_train_leaves_signal_handlers_alone(tmp_path, tiny_data, monkeypatch):
    import signal

    import batchpilot.train.run as run_module

    before, seen = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)), []

    def loader(*args, **kwargs):  # built inside the run: what handlers are installed while it trains
        seen.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))
        return PackedLoader(*args, **kwargs)
    monkeypatch.setattr(run_module, "PackedLoader", loader)
    train(_cfg(tmp_path, tiny_data, max_steps=1))
    assert seen and all(s == before for s in seen)  # a sweep's or a test's own timeout still stops it


def test_first_signal_requests_a_stop_and_a_second_acts_as_before():
    import signal

    from batchpilot.cli.train import owns_the_process
    from batchpilot.train.trainer import _stop_on_signals

    assert not owns_the_process()  # under pytest: in-process main([...]) keeps the caller's handlers
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with _stop_on_signals(True) as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.signal_name == "SIGINT"  # the loop checkpoints at the next step boundary
            signal.raise_signal(signal.SIGINT)  # Ctrl-C twice: Python's own handler, KeyboardInterrupt
    assert signal.getsignal(signal.SIGINT) is previous
