"""read_documents over each format and a directory; every bad input is a one-line ValueError."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchpilot.data.corpus import default_documents, read_documents


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_formats_and_directory(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("whole file\n\nis one document")
    write_jsonl(tmp_path / "b" / "c.jsonl", [{"body": "j1"}, {"body": "j2", "x": 1}])
    (tmp_path / "b" / "c.jsonl").write_text((tmp_path / "b" / "c.jsonl").read_text() + "\n")  # blank line is fine
    table = pa.table({"body": [f"p{i}" for i in range(5)] + [None]})
    pq.write_table(table, tmp_path / "b" / "d.parquet", row_group_size=2)
    (tmp_path / "notes.md").write_text("ignored in a directory")

    assert list(read_documents(tmp_path / "a.txt")) == ["whole file\n\nis one document"]
    assert list(read_documents(tmp_path / "b" / "c.jsonl", text_field="body")) == ["j1", "j2"]
    assert list(read_documents(tmp_path / "b" / "d.parquet", text_field="body")) == [f"p{i}" for i in range(5)]
    docs = list(read_documents(tmp_path, text_field="body"))  # sorted recursive: a.txt, b/c.jsonl, b/d.parquet
    assert docs == ["whole file\n\nis one document", "j1", "j2"] + [f"p{i}" for i in range(5)]


def bad_jsonl(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    return tmp_path / "x.jsonl", r"x.jsonl:2: invalid JSON$"


def missing_field(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"text": "ok"}, {"content": "no"}])
    return tmp_path / "x.jsonl", r"x.jsonl:2: no field 'text'$"


def missing_column(tmp_path):
    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "x.parquet")
    return tmp_path / "x.parquet", r"x.parquet: no column 'text'"


def missing_path(tmp_path):
    return tmp_path / "nope.txt", "no such file or directory"


def empty_file(tmp_path):
    (tmp_path / "x.txt").write_text("")
    return tmp_path / "x.txt", "file is empty"


def unsupported(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    return tmp_path / "x.csv", "unsupported file type '.csv'"


def empty_dir(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.csv").write_text("a,b")
    return tmp_path / "d", "directory has no .txt, .jsonl, .parquet files"


def empty_path(tmp_path):
    return "", "empty path"


@pytest.mark.parametrize("case", [bad_jsonl, missing_field, missing_column, missing_path, empty_file, unsupported,
                                  empty_dir, empty_path])
def test_bad_input_raises_one_line_value_error(tmp_path, case):
    path, message = case(tmp_path)
    with pytest.raises(ValueError, match=message) as info:
        list(read_documents(path))
    assert "\n" not in str(info.value)


def test_default_corpus_is_the_kjv():
    docs = default_documents()
    assert len(docs) > 4000
    assert docs[0].startswith("In the beginning God created the heaven and the earth.")
