"""File I/O every area shares: atomic writes with ordinary modes, JSONL that survives a torn last line, locks.

Standard library only, so that ``reports/`` (which imports nothing else of batchpilot) may use it too.

- Atomic writes go to a temporary file in the same directory, are flushed to disk, get the mode a plain
  ``open(path, "w")`` would have given (0666 minus the umask; ``tempfile`` makes 0600), and are renamed over
  the target, so a reader sees the old file or the new one, never half of one.
- JSONL files are appended one line at a time by processes that may be killed mid-line: a torn LAST line is
  dropped (or cut off before appending again); a bad line anywhere else is an error naming the file and line.
- ``FileLock`` is an exclusive ``flock`` on a lock file: two processes on one run directory or one output file
  fail fast with a one-line message instead of interleaving their writes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plain_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def plain_dir_mode() -> int:
    """The mode ``mkdir`` gives a new directory under the current umask (0755 under umask 022)."""
    return 0o777 & ~_umask()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, plain mode, rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, plain_file_mode())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # write()/fsync() errors (ENOSPC) carry no path: name the file being written
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """JSON (indented, non-JSON values as strings) written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new hidden directory in ``parent`` with the mode a plain ``mkdir`` would give (mkdtemp makes 0700)."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    tmp.chmod(plain_dir_mode())
    return tmp


def cut_torn_tail(path: str | os.PathLike) -> None:
    """Drop a partial last line (a writer killed mid-line) so that appending starts on a line boundary."""
    path = Path(path)
    if not path.is_file():
        return
    with path.open("rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        data = path.read_bytes()
        f.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The objects of a JSONL file; a torn last line is dropped, any other bad line raises ValueError."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    records: list[dict[str, Any]] = []
    numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    for k, (lineno, line) in enumerate(numbered):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if k == len(numbered) - 1:  # the last line of a writer killed mid-line
                break
            raise ValueError(f"{path}:{lineno}: not valid JSON") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: a JSON {type(obj).__name__}, not an object")
        records.append(obj)
    return records


class LockedError(RuntimeError):
    """Another process holds the lock."""


class FileLock:
    """An exclusive, non-blocking ``flock`` on ``path`` (created if needed), released on exit or process death."""

    def __init__(self, path: str | os.PathLike, *, what: str = "") -> None:
        self.path, self.what = Path(path), what or str(path)
        self._fd: int | None = None

    def acquire(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, plain_file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockedError(f"{self.what} is in use by another batchpilot process (lock {self.path})") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
