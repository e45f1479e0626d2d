"""kill -9 at seeded random points, inside and outside checkpoint writes; ``--resume`` loses nothing.

Inside a write the kill is exact: ``BATCHPILOT_FAULT_CHECKPOINT=PHASE:STEP`` makes the trainer SIGKILL
itself at one of the four phases of a save (see batchpilot/train/checkpoint.py). Outside, the test waits
until a seeded number of steps is logged, sleeps a seeded fraction of a step and sends SIGKILL.
"""

from __future__ import annotations

import signal
import time

from fault_harness import CHECKPOINT_STEPS, PROCESS_TIMEOUT_S, STEPS, kill_and_reap, logged_steps, wait_until

from batchpilot.train.checkpoint import find_resumable_checkpoint, verify_checkpoint


def assert_latest_not_torn(run_dir) -> None:
    """``latest``, when present, names a checkpoint whose manifest verifies; a resumable one exists."""
    pointer = run_dir / "checkpoints" / "latest"
    if pointer.exists():
        assert verify_checkpoint(run_dir / "checkpoints" / pointer.read_text().strip()) is None
    path, _ = find_resumable_checkpoint(run_dir)
    assert path is not None and verify_checkpoint(path) is None


def test_kill_inside_checkpoint_writes_then_resume(harness, tmp_path, rng):
    """One run killed at each of the four phases of a save in turn (seeded order and steps), resumed each time.

    Steps only move forward: a kill before ``latest`` moves makes the resumed run save that step again; a
    kill after it (``after_latest``, always last) needs a later step.
    """
    phases = ["after_shards", "after_manifest", "after_rename"]
    rng.shuffle(phases)
    step = CHECKPOINT_STEPS[1]  # with checkpoint 3 behind it: a kill before 3 exists is another test
    run, resume = tmp_path / "run", False
    for phase in [*phases, "after_latest"]:
        step = rng.choice([s for s in CHECKPOINT_STEPS if s >= step])
        killed = harness.train(run, resume=resume, env={"BATCHPILOT_FAULT_CHECKPOINT": f"{phase}:{step}"})
        assert killed.returncode == -signal.SIGKILL, f"{phase}:{step}: {killed.stderr[-2000:]}"
        assert_latest_not_torn(run)
        resume = True
    resumed = harness.train(run, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    harness.assert_nothing_lost(run)
    assert not list((run / "checkpoints").glob(".tmp-*"))  # each re-run save of a step replaced its leftover


def test_kill_at_random_points_then_resume(harness, tmp_path, rng):
    """Three kills at seeded points after the first checkpoint, each followed by ``--resume``; then finish."""
    run = tmp_path / "run"
    proc = harness.start(run)
    for _ in range(3):
        target = rng.randint(CHECKPOINT_STEPS[0] + 1, STEPS)  # step 4 is logged after checkpoint 3 is complete
        wait_until(lambda: logged_steps(run) >= target, proc)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside the next step (or the save that follows it)
        rc, _, err = kill_and_reap(proc)
        assert rc in (0, -signal.SIGKILL), err[-2000:]  # 0: it finished before the signal
        assert_latest_not_torn(run)
        proc = harness.start(run, resume=True)
    _, err = proc.communicate(timeout=PROCESS_TIMEOUT_S)
    assert proc.returncode == 0, err[-2000:]
    harness.assert_nothing_lost(run)


def test_kill_before_first_checkpoint_then_resume(harness, tmp_path):
    run = tmp_path / "run"
    proc = harness.start(run)
    wait_until(lambda: logged_steps(run) >= 1, proc)
    rc, _, err = kill_and_reap(proc)
    assert rc == -signal.SIGKILL, err[-2000:]
    assert find_resumable_checkpoint(run) == (None, [])
    resumed = harness.train(run, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    harness.assert_nothing_lost(run)
