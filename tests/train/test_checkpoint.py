"""DCP checkpoints resume on another number of ranks (2 -> 1 and 1 -> 2) and continue the same losses.

Both runs keep the global batch (8 rows of 32 tokens); only its split over ranks changes. The loader's
position counts global rows, so the data order does not depend on the number of ranks either.
"""

from __future__ import annotations

import json
import pickle
import shutil
import stat
from pathlib import Path

import pytest
import torch
from test_parallel import losses, make_dataset, run_ranks, tiny_run

from batchpilot.io import plain_file_mode
from batchpilot.model.llama import build_model
from batchpilot.train.checkpoint import (clean_leftovers, find_resumable_checkpoint, latest_checkpoint,
                                         load_checkpoint, read_metadata_safely, save_checkpoint, verify_checkpoint)
from batchpilot.train.optim import OptimConfig, build_optimizer
from batchpilot.train.parallel import ParallelDims
from batchpilot.train.trainer import TrainConfig, train

STEPS, SAVE_EVERY = 4, 2


def rewind_copy(run_dir: Path, dest: Path, step: int) -> Path:
    """A copy of a finished run whose ``latest`` points at an earlier checkpoint, and metrics cut to that step."""
    shutil.copytree(run_dir, dest)
    (dest / "checkpoints" / "latest").write_text(f"step_{step:08d}")
    metrics = (dest / "metrics.jsonl").read_text().splitlines()[:step]
    (dest / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics))
    return dest


def _two_rank_worker(full: dict, resumed: dict) -> None:
    train(TrainConfig(**full))
    train(TrainConfig(**resumed))


def as_dict(cfg: TrainConfig) -> dict:
    return {f: getattr(cfg, f) for f in cfg.__slots__}


def test_resume_on_other_world_size_continues_losses(tmp_path):
    data = make_dataset(tmp_path)
    run = dict(max_steps=STEPS, save_every=SAVE_EVERY)
    one = train(tiny_run(tmp_path / "one", data, **run))  # 1 rank, 4 steps
    one_to_two = rewind_copy(Path(one.run_dir), tmp_path / "one_to_two", SAVE_EVERY)
    run_ranks(_two_rank_worker, as_dict(tiny_run(tmp_path / "two", data, **run)),
              as_dict(tiny_run(one_to_two, data, resume=True, **run)))
    two_to_one = rewind_copy(tmp_path / "two", tmp_path / "two_to_one", SAVE_EVERY)
    train(tiny_run(two_to_one, data, resume=True, **run))

    ref = losses(one.run_dir)
    assert len(ref) == STEPS
    assert losses(tmp_path / "two") == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert losses(one_to_two) == pytest.approx(ref, rel=1e-5, abs=1e-6)  # saved at 1 rank, resumed at 2
    assert losses(two_to_one) == pytest.approx(ref, rel=1e-5, abs=1e-6)  # saved at 2 ranks, resumed at 1


def test_checkpoint_round_trip_and_atomic_pointer(tiny_config, tmp_path):
    dims = ParallelDims()
    model = build_model(tiny_config, seed=0)
    opt = build_optimizer(model, OptimConfig())
    model(torch.randint(0, 512, (2, 8)), targets=torch.randint(0, 512, (2, 8))).backward()
    opt.step()
    path = save_checkpoint(tmp_path, 7, model, opt, {"step": 7}, dims)
    assert latest_checkpoint(tmp_path) == path and not list((tmp_path / "checkpoints").glob(".tmp-*"))
    other = build_model(tiny_config, seed=1)
    other_opt = build_optimizer(other, OptimConfig())
    assert load_checkpoint(path, other, other_opt) == {"step": 7}
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    exp_avg = [opt.state[p]["exp_avg"] for p in model.parameters()]
    assert all(torch.equal(a, other_opt.state[p]["exp_avg"]) for a, p in zip(exp_avg, other.parameters()))


# ---------------------------------------------------------------- integrity, confinement, no code from files

def _saved(tiny_config, run_dir: Path, steps=(3, 6), keep: int = 2):
    """A model trained one step and checkpointed at each of ``steps``; returns (model, optimizer, paths)."""
    model = build_model(tiny_config, seed=0)
    opt = build_optimizer(model, OptimConfig())
    paths = []
    for step in steps:
        model(torch.randint(0, 512, (2, 8)), targets=torch.randint(0, 512, (2, 8))).backward()
        opt.step()
        opt.zero_grad()
        paths.append(save_checkpoint(run_dir, step, model, opt, {"step": step}, ParallelDims(), keep=keep))
    return model, opt, paths


def _fresh(tiny_config):
    model = build_model(tiny_config, seed=1)
    return model, build_optimizer(model, OptimConfig())


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: what a crafted checkpoint would do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_manifest_lists_every_file_with_plain_modes(tiny_config, tmp_path):
    _, _, (_, path) = _saved(tiny_config, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {"manifest.json"}
    assert verify_checkpoint(path) is None
    mode = plain_file_mode()
    for name in ("latest",):
        assert stat.S_IMODE((tmp_path / "checkpoints" / name).stat().st_mode) == mode
    for name in ("trainer_state.json", "manifest.json"):
        assert stat.S_IMODE((path / name).stat().st_mode) == mode


def test_bit_flip_falls_back_to_previous_checkpoint(tiny_config, tmp_path, capsys):
    model, opt, (first, second) = _saved(tiny_config, tmp_path)
    shard = next(second.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    assert "sha256" in verify_checkpoint(second)
    path, messages = find_resumable_checkpoint(tmp_path)
    assert path == first and any("step_00000006" in m and "sha256" in m for m in messages)
    assert latest_checkpoint(tmp_path) == first and "step_00000006" in capsys.readouterr().err
    with pytest.raises(ValueError, match="damaged"):
        load_checkpoint(second, *_fresh(tiny_config))
    assert load_checkpoint(first, *_fresh(tiny_config)) == {"step": 3}


@pytest.mark.parametrize("damage", ["no_manifest", "empty_latest", "dangling_latest", "latest_dir", "bad_manifest"])
def test_damaged_newest_or_pointer_falls_back(tiny_config, tmp_path, damage):
    _, _, (first, second) = _saved(tiny_config, tmp_path)
    pointer = tmp_path / "checkpoints" / "latest"
    expected = first
    if damage == "no_manifest":
        (second / "manifest.json").unlink()
    elif damage == "bad_manifest":
        (second / "manifest.json").write_text("[1, 2")
    elif damage == "empty_latest":
        pointer.write_text("")
        expected = second  # the pointer is ignored; the newest intact checkpoint is still step 6
    elif damage == "dangling_latest":
        pointer.write_text("step_00000099")
        expected = second
    else:
        pointer.unlink()
        pointer.mkdir()
        expected = second
    path, messages = find_resumable_checkpoint(tmp_path)
    assert path == expected and messages and all("\n" not in m for m in messages)


def test_no_intact_checkpoint_is_one_line_error(tiny_config, tmp_path):
    _, _, paths = _saved(tiny_config, tmp_path)
    for p in paths:
        (p / "trainer_state.json").write_text('{"step": 99}')
    with pytest.raises(ValueError, match="no intact checkpoint") as info:
        find_resumable_checkpoint(tmp_path)
    assert "\n" not in str(info.value)
    assert find_resumable_checkpoint(tmp_path / "elsewhere") == (None, [])


@pytest.mark.parametrize("target", ["../../x", "ABS", "/etc", "step_00000003/../step_00000006", "SYMLINK"])
def test_latest_is_confined_to_the_runs_own_checkpoints(tiny_config, tmp_path, target):
    run = tmp_path / "run"
    _, _, (first, second) = _saved(tiny_config, run)
    outside = tmp_path / "outside"
    shutil.copytree(second, outside / "step_00000009")  # an intact checkpoint outside the run
    pointer = run / "checkpoints" / "latest"
    if target == "ABS":
        target = str(outside / "step_00000009")
    if target == "SYMLINK":  # a step_* name that is a symlink out of the run directory
        (run / "checkpoints" / "step_00000009").symlink_to(outside / "step_00000009")
        target = "step_00000009"
    pointer.write_text(target)
    path, messages = find_resumable_checkpoint(run)
    assert path == second and messages


def test_crafted_metadata_pickle_is_refused_without_running(tiny_config, tmp_path):
    _, _, (_, path) = _saved(tiny_config, tmp_path)
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="not allowed"):
        load_checkpoint(path, *_fresh(tiny_config), verify=False)
    assert not marker.exists()
    with pytest.raises(ValueError, match="not allowed"):
        read_metadata_safely(pickle.dumps({"x": _Payload(marker)}))
    assert not marker.exists()


def test_crafted_non_tensor_entry_is_refused_without_running(tiny_config, tmp_path):
    """The optimizer's hyperparameters are DCP byte entries: a payload there must not run either."""
    model, opt, (_, path) = _saved(tiny_config, tmp_path)
    marker = tmp_path / "pwned"
    original = opt.param_groups[0]["eps"]
    opt.param_groups[0]["eps"] = _Payload(marker)
    try:
        crafted = save_checkpoint(tmp_path / "crafted", 1, model, opt, {"step": 1}, ParallelDims())
    finally:
        opt.param_groups[0]["eps"] = original
    with pytest.raises(ValueError, match="refused|does not load"):
        load_checkpoint(crafted, *_fresh(tiny_config))
    assert not marker.exists()


def test_metadata_naming_a_file_outside_is_refused(tiny_config, tmp_path):
    _, _, (_, path) = _saved(tiny_config, tmp_path)
    metadata = read_metadata_safely((path / ".metadata").read_bytes())
    for info in metadata.storage_data.values():
        info.relative_path = "../../outside.distcp"
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ValueError, match="outside the checkpoint"):
        load_checkpoint(path, *_fresh(tiny_config), verify=False)


def test_keep_n_and_clean_leftovers(tiny_config, tmp_path):
    _saved(tiny_config, tmp_path, steps=(1, 2, 3, 4), keep=3)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000003", "step_00000004"]
    (root / ".tmp-step_00000005").mkdir()
    (root / ".tmp-step_00000005" / "__0_0.distcp").write_bytes(b"torn")
    (root / ".latest.tmp").write_text("step_00000005")
    (root / ".latest.abc123.tmp").write_text("step_00000005")
    assert sorted(clean_leftovers(tmp_path)) == [".latest.abc123.tmp", ".latest.tmp", ".tmp-step_00000005"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003", "step_00000004"]
    with pytest.raises(ValueError, match="keep"):
        _saved(tiny_config, tmp_path / "bad", steps=(1,), keep=0)
