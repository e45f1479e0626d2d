import json

from batchpilot.cli import main
from batchpilot.data.chat_template import render_chat
from batchpilot.generate.jobs import JobItem, merge_parts, parse_line, part_path, read_job
from batchpilot.generate.request import SamplingParams
from chat_fixture import CHAT_TEMPLATE


def _job(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def _records(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _line(cid, body, url="/v1/completions"):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def test_job_end_to_end_bad_line_chat_and_resume(model_dir, tmp_path):
    job = _job(tmp_path / "job.jsonl", [
        _line("a", {"prompt": "And God said", "max_tokens": 5}),
        "{not json",
        _line("c", {"messages": [{"role": "user", "content": "light"}], "max_tokens": 4}, "/v1/chat/completions"),
        _line("d", {"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0.7, "seed": 3}),
        _line("e", {"prompt": "x", "max_tokens": 5000}),
        _line("f", {"prompt": "the earth", "max_tokens": 6, "temperature": 1.0}),
    ])
    out = tmp_path / "out.jsonl"
    # fp32 also on a GPU machine: a resumed job batches the redone requests differently, and in bf16 different
    # batch shapes round differently, so greedy picks can flip where logits nearly tie
    argv = ["generate", "--model", str(model_dir), "--input", str(job), "--output", str(out), "--no-progress",
            "--ignore-eos", "--dtype", "float32"]
    assert main(argv) == 0
    recs = {r["custom_id"]: r for r in _records(out)}
    assert set(recs) == {"a", None, "c", "d", "e", "f"}
    err = recs[None]["response"]["body"]["error"]
    assert recs[None]["response"]["status_code"] == 400 and err["code"] == "missing_custom_id"
    assert "exceeds" in recs["e"]["response"]["body"]["error"]["message"]
    body = recs["a"]["response"]["body"]
    assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5
    assert recs["c"]["response"]["body"]["choices"][0]["message"]["role"] == "assistant"
    assert recs["d"]["response"]["body"]["usage"]["prompt_tokens"] == 3
    # resume: nothing new; lost records (and a torn last line) are redone, with the same (seeded) text
    assert main(argv) == 0 and len(_records(out)) == 6
    kept = [r for r in out.read_text().splitlines() if json.loads(r)["custom_id"] not in ("a", "f")]
    out.write_text("\n".join(kept) + "\n" + '{"custom_id": "tor')
    assert main(argv) == 0
    again = {r["custom_id"]: r for r in _records(out)}
    assert len(again) == 6 and list(again)[-2:] in (["a", "f"], ["f", "a"])
    for cid in ("a", "f"):
        text = again[cid]["response"]["body"]["choices"][0]["text"]
        assert text == recs[cid]["response"]["body"]["choices"][0]["text"]


def test_text_file_input(model_dir, tmp_path):
    job = _job(tmp_path / "prompts.txt", ["And God said", "", "the earth"])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(model_dir), "--input", str(job), "--output", str(out),
                 "--max-tokens", "3", "--no-progress"]) == 0
    assert sorted(r["custom_id"] for r in _records(out)) == ["line-1", "line-3"]


def test_chat_template_rendering_is_sandboxed():
    text = render_chat([{"role": "user", "content": "hi"}], CHAT_TEMPLATE, {"bos_token": "<s>"})
    assert text == "<s><|user|>hi\n<|assistant|>"
    evil = "{{ messages.__class__.__mro__ }}"
    item = parse_line(_line("x", {"messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions").encode(),
                      0, SamplingParams(), evil, {})
    assert item.error is not None and "chat template" in str(item.error) and item.error.param == "messages"


def test_params_and_duplicates(tmp_path):
    job = _job(tmp_path / "j.jsonl", [_line("a", {"prompt": "p", "stop": "x", "top_p": 0.5}),
                                      _line("a", {"prompt": "q"}), _line("b", {"prompt": "q", "top_p": 2})])
    a, dup, bad = read_job(job, SamplingParams(max_tokens=9))
    assert a.params == SamplingParams(max_tokens=9, stop=("x",), top_p=0.5)
    assert "duplicate" in str(dup.error) and dup.error.code == "duplicate_custom_id"
    assert bad.error.param == "top_p"


def test_merge_parts_in_input_order(tmp_path):
    out = tmp_path / "o.jsonl"
    items = [JobItem(i, c) for i, c in enumerate("abcd")]

    def rec(cid):
        return json.dumps({"id": "x", "custom_id": cid, "response": {"status_code": 200}, "error": None}) + "\n"

    out.write_text(rec("b"))
    part_path(out, 0).write_text(rec("c") + rec("a"))
    part_path(out, 1).write_text(rec("d"))
    merge_parts(out, 2, items)
    assert [r["custom_id"] for r in _records(out)] == ["a", "b", "c", "d"]
    assert not part_path(out, 0).exists()
