"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, resumable on another GPU count, never code.

Layout of a run directory::

    checkpoints/step_00000120/   model + optimizer (DCP shards, one per rank), trainer_state.json,
                                 manifest.json (size and sha256 of every other file, written last)
    checkpoints/latest           text file naming the newest complete checkpoint (``step_<8 digits>``)

Crash consistency: a checkpoint is written into ``.tmp-step_...``; once every rank has finished, rank 0
writes trainer_state.json and then manifest.json (both atomically, with plain file modes), renames the
directory, and only then replaces ``latest`` atomically. A kill at any point leaves the previous checkpoint
as the newest one with a valid manifest.

Integrity: on resume the manifest is verified (every file present, a regular file, with its size and
sha256); a checkpoint that fails, or a ``latest`` that is missing, empty, dangling or names anything but
its own ``step_*`` sibling, is skipped with a one-line message in favour of the newest intact one
(:func:`find_resumable_checkpoint`).

No code from files: DCP's stock reader unpickles ``.metadata`` with ``pickle.load`` and its planner reads
non-tensor entries with ``torch.load(weights_only=False)``; both would run a crafted ``__reduce__``. Here
``.metadata`` goes through an unpickler that admits only DCP's metadata dataclasses and a few torch value
types, and non-tensor entries through ``torch.load(weights_only=True)``; tensors were already read that way.
Every file DCP is asked to read must be a plain name inside the checkpoint directory.

DCP reshards on load, so a run saved on 4 GPUs resumes on 2 (the global batch in tokens is part of the
trainer state, not of the layout).

Test hook (inert unless set): ``BATCHPILOT_FAULT_CHECKPOINT=PHASE:STEP`` makes the process SIGKILL itself
during the save of step STEP at PHASE, one of ``after_shards`` (DCP files written, no manifest),
``after_manifest`` (before the rename), ``after_rename`` (before ``latest`` moves) and ``after_latest``
(before old checkpoints are pruned). The fault-injection suite (tests/faults/) uses it to kill inside
checkpoint writes at exact points; see docs/faults.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from batchpilot.io import write_json_atomic, write_text_atomic
from batchpilot.train.parallel import ParallelDims, barrier

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "batchpilot-checkpoint-v1"
_NAME = re.compile(r"step_\d{8}")
_FAULT_ENV = "BATCHPILOT_FAULT_CHECKPOINT"
_FAULT_PHASES = ("after_shards", "after_manifest", "after_rename", "after_latest")


def _ckpt_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_dirs(root: Path) -> list[Path]:
    """The run's own checkpoint directories (``step_<8 digits>``, real directories), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


# ---------------------------------------------------------------- integrity (manifest of checksums)

def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_manifest(ckpt_dir: Path) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(ckpt_dir.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_json_atomic(ckpt_dir / MANIFEST, {"format": MANIFEST_FORMAT, "files": files})


def verify_checkpoint(ckpt_dir: str | os.PathLike) -> str | None:
    """None when ``ckpt_dir`` is intact, else a short reason (missing manifest, a file missing/changed...)."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_symlink() or not ckpt_dir.is_dir():
        return "not a checkpoint directory"
    manifest_path = ckpt_dir / MANIFEST
    if manifest_path.is_symlink() or not manifest_path.is_file():
        return "no manifest.json (an interrupted or pre-manifest save)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError
        entries = [(str(name), int(e["bytes"]), str(e["sha256"])) for name, e in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return "manifest.json is unreadable"
    for required in (".metadata", "trainer_state.json"):
        if required not in files:
            return f"manifest.json does not list {required}"
    for name, size, digest in entries:
        path = ckpt_dir / name
        if "/" in name or name in ("", ".", "..", MANIFEST):
            return f"manifest.json names a file outside the checkpoint ({name!r})"
        if path.is_symlink() or not path.is_file():
            return f"{name} is missing or not a regular file"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
        if _sha256(path) != digest:
            return f"{name} fails its sha256 checksum"
    return None


# ---------------------------------------------------------------- finding the checkpoint to resume

def _pointer_target(root: Path) -> tuple[Path | None, str | None]:
    """The checkpoint ``latest`` names, or None and why not (None, None: there is no ``latest``)."""
    pointer = root / "latest"
    if not pointer.exists() and not pointer.is_symlink():
        return None, None
    if pointer.is_symlink() or not pointer.is_file():
        return None, "checkpoints/latest is not a regular file"
    name = pointer.read_text(errors="replace").strip()
    if not name:
        return None, "checkpoints/latest is empty"
    if not _NAME.fullmatch(name):  # never a path: no '..', no absolute names, only our own step_* siblings
        return None, f"checkpoints/latest names {name[:80]!r}, not a step_<8 digits> checkpoint of this run"
    target = root / name
    if target.is_symlink():
        return None, f"checkpoints/{name} is a symlink"
    if not target.is_dir():
        return None, f"checkpoints/latest names {name}, which does not exist"
    return target, None


def find_resumable_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint of ``run_dir`` and one line per checkpoint (or pointer) skipped.

    ``latest`` is preferred; when it is missing, damaged or names a damaged checkpoint, the newest
    ``step_*`` directory that passes :func:`verify_checkpoint` is used. ``(None, [])``: the run has no
    checkpoint at all. Raises ValueError (one line) when checkpoints exist but none is intact.
    """
    root = _ckpt_root(run_dir)
    messages: list[str] = []
    target, problem = _pointer_target(root)
    if problem:
        messages.append(f"ignoring {problem}")
    candidates = _step_dirs(root)
    if target is not None:
        candidates = [p for p in candidates if p != target] + [target]  # latest first, then newest to oldest
    tried: list[str] = []
    for ckpt in reversed(candidates):
        reason = verify_checkpoint(ckpt)
        if reason is None:
            if tried or problem:
                messages.append(f"resuming from {ckpt.name}, the newest intact checkpoint")
            return ckpt, messages
        tried.append(ckpt.name)
        messages.append(f"skipping checkpoint {ckpt.name}: {reason}")
    if tried:
        raise ValueError(f"no intact checkpoint in {root} ({'; '.join(messages)[:400]})")
    return None, messages


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume: :func:`find_resumable_checkpoint`, its messages printed to stderr."""
    path, messages = find_resumable_checkpoint(run_dir)
    for line in messages:
        print(f"batchpilot: {line}", file=sys.stderr)
    return path


def clean_leftovers(run_dir: str | os.PathLike) -> list[str]:
    """Remove what interrupted saves leave behind; returns the names removed.

    ``.tmp-step_*`` directories (a save killed before its rename), ``.latest.tmp`` and the ``.latest.*.tmp``
    files of atomic writes. Call it on rank 0 only, while holding the run directory's lock, before training:
    in a live save these are another process's work in progress.
    """
    root = _ckpt_root(run_dir)
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".tmp-step_") or p.name == ".latest.tmp" or (
                p.name.startswith(".latest.") and p.name.endswith(".tmp")):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


# ---------------------------------------------------------------- saving

def _fault_point(phase: str, step: int) -> None:
    """The test hook of the module docstring: SIGKILL at ``phase`` of the save of ``step``, when asked to."""
    spec = os.environ.get(_FAULT_ENV)
    if spec and spec == f"{phase}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], dims: ParallelDims, *, keep: int = 2) -> Path:
    """Write checkpoint ``step`` (every rank calls it), point ``latest`` at it, keep the newest ``keep``."""
    if keep < 1:
        raise ValueError(f"checkpoints to keep (keep) must be at least 1, got {keep}")
    root = _ckpt_root(run_dir)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if dims.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(dims)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        with warnings.catch_warnings():  # DCP warns when it runs in a single process, which is intended here
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    except CheckpointException as e:  # a BaseException wrapping each rank's error: re-raise the first one
        if dims.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial save only takes space (disk full)
        raise _rank_failure(e) from None
    barrier(dims)
    if dims.rank == 0:
        _fault_point("after_shards", step)
        try:
            write_json_atomic(tmp / "trainer_state.json", trainer_state)
            _write_manifest(tmp)  # last: a directory with a valid manifest is a complete checkpoint
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fault_point("after_manifest", step)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        _fault_point("after_rename", step)
        write_text_atomic(root / "latest", name)
        _fault_point("after_latest", step)
        _prune(root, keep, newest=final)
    barrier(dims)
    return final


def _rank_failure(e: CheckpointException) -> Exception:
    """The first rank's own exception (an OSError such as ENOSPC stays one), else a one-line RuntimeError."""
    for exc, _trace in e.failures.values():
        if isinstance(exc, Exception):
            return exc
    return RuntimeError(f"checkpoint write failed on ranks {sorted(e.failures)}")


def _prune(root: Path, keep: int, *, newest: Path) -> None:
    """Delete all but the newest ``keep`` checkpoints (the one just written is always kept)."""
    steps = [p for p in _step_dirs(root) if p != newest] + [newest]
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- loading without unpickling code

# What DCP's ``.metadata`` pickle may reference (torch 2.6 - 2.13): its metadata dataclasses, the
# torch value types inside them, and the checkpoint path. Anything else (os.system, builtins.eval,
# any other callable a crafted __reduce__ names) is refused before it is called.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
     ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata references {module}.{name}, which is not allowed")


def read_metadata_safely(data: bytes) -> Metadata:
    """DCP metadata from its pickle bytes, admitting only DCP's own classes (see ``_METADATA_GLOBALS``)."""
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError, IndexError,
            KeyError) as e:
        raise ValueError(f"checkpoint metadata refused: {str(e)[:200] or type(e).__name__}") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"checkpoint metadata is a {type(metadata).__name__}, not DCP Metadata")
    return metadata


def _metadata_path(ckpt_dir: Path, rank: int | None = None) -> Path:
    """DCP's metadata file: ``.metadata``, or ``__<rank>.metadata`` for rank-local metadata."""
    return ckpt_dir / (".metadata" if rank is None else f"__{int(rank)}.metadata")


class _SafeReader(FileSystemReader):
    """DCP's file reader with ``.metadata`` read by the restricted unpickler and reads confined to the dir."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        metadata = read_metadata_safely(_metadata_path(Path(self.path), rank).read_bytes())
        for info in (metadata.storage_data or {}).values():
            rel = getattr(info, "relative_path", None)
            if not isinstance(rel, str) or "/" in rel or "\\" in rel or rel in ("", ".", "..") \
                    or not (Path(self.path) / rel).is_file() or (Path(self.path) / rel).is_symlink():
                raise ValueError(f"checkpoint metadata names a data file outside the checkpoint ({rel!r})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor entries (optimizer hyperparameters) load with weights_only."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"checkpoint entry {read_item.dest_index.fqn} refused: it is not plain data "
                             "(torch.load weights_only)") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                    verify: bool = True) -> dict[str, Any]:
    """Load model and optimizer in place (resharding as needed); return the trainer state.

    ``verify`` checks the manifest first (skip it only for a path :func:`find_resumable_checkpoint` just
    verified). Nothing in the checkpoint is unpickled beyond DCP's metadata classes and plain values.
    """
    path = Path(path)
    if verify and (reason := verify_checkpoint(path)) is not None:
        raise ValueError(f"checkpoint {path} is damaged: {reason}")
    if path.is_symlink() or not _metadata_path(path).is_file():
        raise ValueError(f"checkpoint {path} has no DCP metadata")
    read_metadata_safely(_metadata_path(path).read_bytes())  # refuse a crafted file before DCP sees it
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=_SafeReader(str(path)), planner=_SafeLoadPlanner())
    except CheckpointException as e:  # DCP wraps each rank's failure; report the first one
        first = _rank_failure(e)
        raise ValueError(f"checkpoint {path} does not load into this model/optimizer ({_first_line(first)})") from None
    except (RuntimeError, ValueError, KeyError, AssertionError, OSError) as e:
        raise ValueError(f"checkpoint {path} does not load into this model/optimizer ({_first_line(e)})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    if not isinstance(trainer_state, dict):
        raise ValueError(f"checkpoint {path}: trainer_state.json is not a JSON object")
    return trainer_state


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state on CPU; under FSDP2 every rank must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
