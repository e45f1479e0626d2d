"""Fixtures of the fault-injection suite: one tiny dataset, one uninterrupted reference run (fault_harness.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from batchpilot.data.prepare import PrepareConfig, prepare
from fault_harness import STEPS, TINY_LLAMA, WORDS, Harness, step_losses


@pytest.fixture(scope="session")
def harness(tmp_path_factory) -> Harness:
    root = tmp_path_factory.mktemp("faults")
    rng = random.Random(0)
    (root / "text").mkdir()
    for i in range(60):
        (root / "text" / f"doc_{i:03d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 250))))
    data = prepare(PrepareConfig(sources=[str(root / "text")], out_dir=str(root / "data"), vocab_size=300,
                                 val_fraction=0.1))
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(TINY_LLAMA))
    h = Harness(root=root, data=Path(data), model=root / "model" / "config.json", reference=root / "reference")
    done = h.train(h.reference)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(step_losses(h.reference)) == list(range(1, STEPS + 1))
    return h


@pytest.fixture
def rng(request) -> random.Random:
    """A generator seeded by the test's name: random fault points that are the same on every run."""
    return random.Random(request.node.nodeid)
