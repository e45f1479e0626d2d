"""Preemption (SIGTERM, Ctrl-C) and two processes on one run directory: the trainer side is H1's work.

Expected (issue 14): SIGTERM and SIGINT write a checkpoint at the next step boundary and exit 0 with a line
that says how to resume; a second ``train --resume`` on a run directory in use fails fast with one line.
Each asserts nothing lost: the resumed run's losses equal the uninterrupted run's, every finished step kept.
"""

from __future__ import annotations

import signal

import pytest
from fault_harness import PROCESS_TIMEOUT_S, STEPS, kill_and_reap, logged_steps, one_line_error, step_losses, wait_until

from batchpilot.train.checkpoint import find_resumable_checkpoint


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_preemption_checkpoints_every_finished_step(harness, tmp_path, rng, sig):
    run = tmp_path / "run"
    proc = harness.start(run)
    wait_until(lambda: logged_steps(run) >= rng.randint(1, STEPS - 2), proc)
    rc, out, err = kill_and_reap(proc, sig)
    assert rc == 0, err[-2000:]
    assert "--checkpoint.resume" in out + err  # tells the user (or the scheduler's log) how to continue
    finished = max(step_losses(run))
    path, _ = find_resumable_checkpoint(run)
    assert path is not None and path.name == f"step_{finished:08d}"  # no finished step lost
    resumed = harness.train(run, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    harness.assert_nothing_lost(run)


def test_second_process_on_a_run_directory_is_refused(harness, tmp_path):
    """The first run is frozen (SIGSTOP) while it holds the lock, so the second meets it whatever the timing."""
    run = tmp_path / "run"
    first = harness.start(run)
    wait_until(lambda: logged_steps(run) >= 1, first)
    first.send_signal(signal.SIGSTOP)
    try:
        assert first.poll() is None, "the first run ended before the second started"
        second = harness.train(run, resume=True)
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=PROCESS_TIMEOUT_S)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode != 0 and one_line_error(second.stderr) and "in use" in second.stderr
    harness.assert_nothing_lost(run)
