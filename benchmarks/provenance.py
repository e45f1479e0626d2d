"""What every benchmark result records about where it ran: GPU, torch, commit, date, exact command.

The GPU machines receive a copy of the working tree whose ``.git`` may be older than the tree (seen: the
session-start snapshot), so ``BATCHPILOT_COMMIT``, when set, wins over git: set it in the command to
``$(git rev-parse HEAD)`` expanded here, after committing.
"""

from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance() -> dict:
    commit = os.environ.get("BATCHPILOT_COMMIT") or _git("rev-parse", "HEAD")
    dirty = None if "BATCHPILOT_COMMIT" in os.environ or not commit else bool(_git("status", "--porcelain"))
    return {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "gpu_count": torch.cuda.device_count(), "torch": torch.__version__,
            "commit": commit or "unknown", "dirty": dirty,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": shlex.join([Path(sys.executable).name, *sys.argv])}
