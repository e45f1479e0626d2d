"""Logs for people on rank 0 (`print0`), one metrics sink for machines (`MetricsWriter`).

`MetricsWriter` appends one JSON object per logged step to ``metrics.jsonl`` (flushed each time,
so a killed run keeps its history) and mirrors scalars to TensorBoard when asked. On ranks other
than 0 it is a no-op object, so the training loop never branches on logging.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from batchpilot.io import read_jsonl


def print0(*args: Any, rank: int = 0, **kwargs: Any) -> None:
    if rank == 0:
        print(*args, **kwargs, flush=True)


class MetricsWriter:
    def __init__(self, run_dir: str | os.PathLike | None, *, tensorboard: bool = False) -> None:
        self._file = None
        self._tb = None
        if run_dir is None:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional dependency
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        try:
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        except OSError as e:  # ENOSPC on write carries no path: name the file
            raise type(e)(e.errno, e.strerror, str(self.path)) from e
        if self._tb is not None:
            for key, value in clean.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, clean["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl; a torn last line (a run killed mid-write) is dropped."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")
