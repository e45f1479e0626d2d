"""End to end: `python -m batchpilot prepare default` on the real KJV, then a loader reads it."""

import subprocess
import sys

from batchpilot.data.packing import PackedLoader
from batchpilot.data.prepare import load_meta


def test_prepare_default_corpus(tmp_path):
    out = tmp_path / "kjv"
    cmd = [sys.executable, "-m", "batchpilot", "prepare", "default", "--out", str(out), "--vocab-size", "512"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "chars/token" in result.stdout
    meta = load_meta(out)
    assert meta["vocab_size"] == 512 and meta["tokens"]["train"] > 1_000_000 and meta["documents"]["val"] > 0
    batch = PackedLoader(out, "val", 128).take(2)
    assert batch.input_ids.shape == (2, 128)

    again = subprocess.run(cmd[:-1] + ["1024"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "different config" in again.stderr
