"""End to end: `python -m batchpilot prepare default` on the real KJV, then a loader reads it."""

import json
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


def test_prepare_chat_cli(tmp_path, chat_model_dir):
    records = [{"instruction": f"question {i}?", "output": f"answer number {i}."} for i in range(12)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "chat"
    cmd = [sys.executable, "-m", "batchpilot", "prepare", str(tmp_path / "pairs.jsonl"), "--out", str(out),
           "--format", "chat", "--tokenizer", str(chat_model_dir), "--prompt-field", "instruction",
           "--response-field", "output", "--val-fraction", "0.2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "loss on assistant tokens" in result.stdout
    meta = load_meta(out)
    assert meta["format"] == "chat" and sum(meta["documents"].values()) == 12
    batch = PackedLoader(out, "train", 32, pack="conversation").take(2)
    assert (batch.targets != -100).any() and (batch.targets == -100).any()

    no_tokenizer = subprocess.run(cmd[:cmd.index("--tokenizer")] + ["--out", str(tmp_path / "x")],
                                  capture_output=True, text=True, timeout=120)
    assert no_tokenizer.returncode == 2 and "--tokenizer MODEL_DIR" in no_tokenizer.stderr
