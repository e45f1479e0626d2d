"""Disk full without tmpfs: a ``sitecustomize`` hook makes every write under the run directory fail with
ENOSPC once a seeded point is reached; the run stops, its last good checkpoint stays intact and a
``--resume`` (with space again) loses nothing.

The hook is installed only in the trainer subprocess (its directory leads PYTHONPATH) and wraps
``open``/``io.open`` (what pathlib, json, DCP's file writer and metrics.jsonl use) and ``os.open`` (what
``tempfile.mkstemp`` in the atomic writes uses). The disk "fills" once ``BATCHPILOT_TEST_ENOSPC_WHEN``
exists, after ``BATCHPILOT_TEST_ENOSPC_ALLOW`` more writes.
"""

from __future__ import annotations

import pytest
from fault_harness import CHECKPOINT_STEPS, one_line_error

from batchpilot.train.checkpoint import find_resumable_checkpoint, verify_checkpoint

SITECUSTOMIZE = '''
import builtins, errno, io, os

_WHEN, _UNDER = os.environ["BATCHPILOT_TEST_ENOSPC_WHEN"], os.environ["BATCHPILOT_TEST_ENOSPC_UNDER"]
_allow = [int(os.environ["BATCHPILOT_TEST_ENOSPC_ALLOW"])]
_open, _io_open, _os_open = builtins.open, io.open, os.open
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _full(path):
    if not isinstance(path, (str, bytes, os.PathLike)) or not os.fsdecode(path).startswith(_UNDER):
        return False
    if not os.path.exists(_WHEN):
        return False
    _allow[0] -= 1
    return _allow[0] < 0


def _raise(path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(path))


def open_(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and _full(file):
        _raise(file)
    return _io_open(file, mode, *args, **kwargs)


def os_open(path, flags, *args, **kwargs):
    if flags & _WRITE_FLAGS and _full(path):
        _raise(path)
    return _os_open(path, flags, *args, **kwargs)


builtins.open = io.open = open_
os.open = os_open
'''


@pytest.mark.parametrize("case", range(2))
def test_disk_full_keeps_last_good_checkpoint(harness, tmp_path, rng, case):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    run = tmp_path / "run"
    full_after = rng.choice(CHECKPOINT_STEPS[:-1])
    env = {"BATCHPILOT_TEST_ENOSPC_WHEN": str(run / "checkpoints" / f"step_{full_after:08d}"),
           "BATCHPILOT_TEST_ENOSPC_UNDER": str(run), "BATCHPILOT_TEST_ENOSPC_ALLOW": str(rng.randint(0, 12))}
    failed = harness.train(run, env=env, pythonpath=(hook,))
    assert failed.returncode not in (0, -9), failed.stderr[-2000:]
    assert "no space left on device" in failed.stderr.lower(), failed.stderr[-2000:]
    path, _ = find_resumable_checkpoint(run)
    assert path is not None and verify_checkpoint(path) is None and path.name >= f"step_{full_after:08d}"
    resumed = harness.train(run, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    harness.assert_nothing_lost(run)
    assert one_line_error(failed.stderr), failed.stderr[-2000:]  # one line naming the path, no traceback
    assert str(run) in failed.stderr
