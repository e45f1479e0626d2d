"""Damaged and crafted checkpoints: bit flips are detected and the previous checkpoint is resumed; a crafted
run directory (pickle payloads, ``latest`` pointing out of the run) is refused and runs nothing.

The payloads would create a marker file when unpickled (what ``os.system`` would do in a real attack);
every test asserts the marker does not exist. Each run directory is a copy of the finished reference run.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
from fault_harness import CHECKPOINT_STEPS, one_line_error

from batchpilot.train.checkpoint import MANIFEST, verify_checkpoint

LAST, PREVIOUS = (f"step_{s:08d}" for s in CHECKPOINT_STEPS[:-3:-1])


class Payload:
    """Unpickling it opens ``marker`` for writing: stands for any code a crafted pickle would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def flip_bit(path: Path, rng) -> None:
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def reseal(ckpt: Path) -> None:
    """Rewrite the manifest so the checksums match: an attacker who crafts files can craft it too."""
    import hashlib

    files = {p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in ckpt.iterdir() if p.is_file() and p.name != MANIFEST}
    manifest = json.loads((ckpt / MANIFEST).read_text())
    (ckpt / MANIFEST).write_text(json.dumps({**manifest, "files": files}))


@pytest.mark.parametrize("target", ["shard", "trainer_state"])
def test_bit_flip_falls_back_to_previous_checkpoint(harness, tmp_path, rng, target):
    run = harness.copy_reference(tmp_path / "run")
    ckpt = run / "checkpoints" / LAST
    victim = {"shard": next(ckpt.glob("*.distcp")), "metadata": ckpt / ".metadata",
              "trainer_state": ckpt / "trainer_state.json"}[target]
    flip_bit(victim, rng)
    assert verify_checkpoint(ckpt) is not None
    resumed = harness.train(run, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"skipping checkpoint {LAST}" in resumed.stderr and PREVIOUS in resumed.stderr
    harness.assert_nothing_lost(run)  # the steps after the previous checkpoint re-ran to the same losses


def test_crafted_metadata_pickle_is_refused_and_runs_nothing(harness, tmp_path):
    run = harness.copy_reference(tmp_path / "run")
    marker = tmp_path / "pwned"
    ckpt = run / "checkpoints" / LAST
    (ckpt / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    reseal(ckpt)
    resumed = harness.train(run, resume=True)
    assert not marker.exists()
    assert resumed.returncode != 0 and one_line_error(resumed.stderr) and "not allowed" in resumed.stderr


@pytest.mark.parametrize("pointer", ["dotdot", "symlink"])
def test_latest_pointing_out_of_the_run_is_refused(harness, tmp_path, pointer):
    """``latest`` names a crafted checkpoint outside the run: ignored; the run's own newest one is resumed."""
    run = harness.copy_reference(tmp_path / "run")
    marker = tmp_path / "pwned"
    crafted = tmp_path / "x" / "step_00000099"
    shutil.copytree(run / "checkpoints" / LAST, crafted)
    (crafted / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    reseal(crafted)
    if pointer == "symlink":
        (run / "checkpoints" / crafted.name).symlink_to(crafted)
    name = {"dotdot": "../../x/step_00000099", "absolute": str(crafted), "symlink": crafted.name}[pointer]
    (run / "checkpoints" / "latest").write_text(name)
    resumed = harness.train(run, resume=True)
    assert not marker.exists()
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "ignoring checkpoints/" in resumed.stderr or "skipping" in resumed.stderr
    assert f"resumed from step {CHECKPOINT_STEPS[-1]}" in resumed.stdout + resumed.stderr
    harness.assert_nothing_lost(run)
