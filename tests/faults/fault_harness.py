"""The fault-injection suite's harness: the tiny model and data, the train launcher, helpers (fixtures: conftest.py).

Every test runs ``batchpilot train`` as a subprocess (``sys.executable -m batchpilot``, this checkout's code)
on a 2-layer, 32-wide Llama from an HF config.json: 12 steps of 256 tokens, a checkpoint every 3 steps,
about 5 seconds of training plus interpreter start-up per process on 2 CPU cores. CPU training is
bit-identical, so "nothing lost" is asserted exactly: the loss of every step 1..12, taking the last record
of a step that a resume re-ran, equals the reference run's. See docs/faults.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import batchpilot
from batchpilot.io import read_jsonl

STEPS, SAVE_EVERY = 12, 3
CHECKPOINT_STEPS = tuple(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
REPO = Path(batchpilot.__file__).resolve().parents[1]
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0}
WORDS = "in the beginning god created heaven and earth was without form void darkness upon face of deep".split()
PROCESS_TIMEOUT_S = 120


def step_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of metrics.jsonl; a step that a resume re-ran keeps its last record."""
    return {int(r["step"]): r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


def logged_steps(run_dir: Path) -> int:
    """How many step records metrics.jsonl holds now (0 while it does not exist)."""
    path = run_dir / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.is_file() else 0


@dataclass(frozen=True)
class Harness:
    root: Path
    data: Path
    model: Path
    reference: Path

    def argv(self, run_dir: Path, *, resume: bool = False, extra: tuple[str, ...] = ()) -> list[str]:
        argv = [sys.executable, "-m", "batchpilot", "train", "--preset", str(self.model), "--data", str(self.data),
                "--max-steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--seq-len", "32",
                "--global-batch-tokens", "256", "--micro-batch-size", "4", "--device", "cpu", "--out", str(run_dir),
                *extra]
        return argv + (["--resume"] if resume else [])

    def env(self, extra_env: dict[str, str] | None = None, *, pythonpath: tuple[Path, ...] = ()) -> dict[str, str]:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(str(p) for p in (*pythonpath, REPO))}
        env.pop("BATCHPILOT_FAULT_CHECKPOINT", None)
        return {**env, **(extra_env or {})}

    def train(self, run_dir: Path, *, resume: bool = False, env: dict[str, str] | None = None,
              pythonpath: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(run_dir, resume=resume), env=self.env(env, pythonpath=pythonpath),
                              capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S, check=False)

    def start(self, run_dir: Path, *, resume: bool = False) -> subprocess.Popen:
        return subprocess.Popen(self.argv(run_dir, resume=resume), env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def copy_reference(self, dest: Path) -> Path:
        shutil.copytree(self.reference, dest)
        return dest

    def reference_losses(self) -> dict[int, float]:
        return step_losses(self.reference)

    def assert_nothing_lost(self, run_dir: Path) -> None:
        """Every step 1..STEPS logged, each loss exactly the uninterrupted run's (CPU is bit-identical)."""
        assert step_losses(run_dir) == self.reference_losses()


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, *, timeout_s: float = PROCESS_TIMEOUT_S) -> bool:
    """Poll ``condition`` until it holds (True) or ``proc`` exits first (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(0.01)
    raise TimeoutError("the trainer neither reached the point nor exited")


def kill_and_reap(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> tuple[int, str, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=PROCESS_TIMEOUT_S)
    return proc.returncode, out, err


def one_line_error(stderr: str) -> bool:
    """A failed command said what went wrong on one ``batchpilot CMD: error:`` line, without a traceback."""
    return "Traceback" not in stderr and any(line.startswith("batchpilot train: error:")
                                             for line in stderr.splitlines())
