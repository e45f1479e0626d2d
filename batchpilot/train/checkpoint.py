"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, resumable on another GPU count.

Layout of a run directory::

    checkpoints/step_00000120/   model + optimizer (DCP shards, one per rank), trainer_state.json
    checkpoints/latest           text file naming the newest complete checkpoint

A checkpoint is written into ``.tmp-step_...`` and renamed only once every rank has finished, and
``latest`` is replaced atomically after that, so a crash mid-save leaves the previous checkpoint
as the one resumed from. DCP reshards on load, so a run saved on 4 GPUs resumes on 2 (the global
batch in tokens is part of the trainer state, not of the layout). Loading never unpickles
arbitrary objects: tensors come from DCP files, the rest from JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from batchpilot.train.parallel import ParallelDims, barrier


def _ckpt_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    pointer = _ckpt_root(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = _ckpt_root(run_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], dims: ParallelDims, *, keep: int = 2) -> Path:
    root = _ckpt_root(run_dir)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if dims.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(dims)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # DCP warns when it runs in a single process, which is intended here
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    barrier(dims)
    if dims.rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = root / ".latest.tmp"
        pointer_tmp.write_text(name)
        os.replace(pointer_tmp, root / "latest")
        _prune(root, keep)
    barrier(dims)
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load model and optimizer in place (resharding as needed); return the trainer state."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(path))
    except (RuntimeError, ValueError, KeyError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {path} does not match this model/optimizer ({first_line[:200]})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((path / "trainer_state.json").read_text())


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state on CPU; under FSDP2 every rank must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
