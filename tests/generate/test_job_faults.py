"""Issue 14 for generate: every input line ends as exactly one record, whatever it holds and whatever happens."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchpilot.cli import main
from batchpilot.data.tokenizer import Tokenizer
from batchpilot.generate.engine import Engine, EngineConfig
from batchpilot.generate.jobs import JobLimits, answered, read_job, run_job
from batchpilot.generate.request import SamplingParams
from chat_fixture import CHAT_TEMPLATE

REPO = Path(__file__).resolve().parents[2]


def _line(cid, body, url="/v1/completions", **envelope):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body, **envelope})


def _records(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _status(rec):
    return rec["response"]["status_code"]


def _assert_every_line_once(items, out):
    """Every job item has exactly one record: the first line of each custom_id one of its own, every duplicate
    or id-less line one error record."""
    recs = _records(out)
    a = answered(out, items)
    assert a.todo(items) == []
    want = Counter(it.custom_id for it in items)
    assert Counter(r["custom_id"] for r in recs) == want
    for cid, entry in a.by_id.items():
        extra = want[cid] - (1 if cid is not None else 0)
        assert entry["dups"] == extra and entry["first"] == (cid is not None)


@pytest.fixture(scope="module")
def engine(model_dir):
    import batchpilot

    return Engine(batchpilot.load_model(model_dir), Tokenizer.from_path(model_dir),
                  EngineConfig(cpu_kv_tokens=4096))


# --- a seeded hostile-lines generator over the body fields ---

HOSTILE = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([1e30, 1e400, -1e400,
                    float("nan"), 0.5, 5.9, -0.0]), st.text(max_size=6), st.sampled_from(["5", "false", "\ud800"]),
                    st.lists(st.integers(-5, 400), max_size=4), st.lists(st.text(max_size=3), max_size=6),
                    st.dictionaries(st.text(max_size=3), st.integers(-200, 200), max_size=2))
FIELDS = ["prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
          "ignore_eos", "logprobs", "echo", "logit_bias", "min_tokens", "presence_penalty", "stream", "best_of",
          "messages"]
GOOD = st.fixed_dictionaries({"prompt": st.sampled_from(["And God said", "the earth", [5, 6, 7], "light"]),
                              "max_tokens": st.integers(0, 4)})


@st.composite
def hostile_line(draw):
    kind = draw(st.sampled_from(["good", "field", "field", "envelope", "raw"]))
    cid = draw(st.sampled_from(["a", "b", "c", "d", None, 7, "\ud800"]))
    body = draw(GOOD)
    if kind == "field":
        body[draw(st.sampled_from(FIELDS))] = draw(HOSTILE)
    if kind == "raw":
        return draw(st.sampled_from(["{not json", "[1, 2]", '"str"', "null", '{"custom_id": "a"}', "{" * 5000]))
    url = "/v1/completions"
    if kind == "envelope":
        url = draw(st.sampled_from(["/v1/chat/completions", "/v1/embeddings", None]))
        if url == "/v1/chat/completions":
            body = {"messages": draw(st.one_of(HOSTILE, st.just([{"role": "user", "content": "hi"}]))),
                    "max_tokens": 2}
    method = draw(st.sampled_from(["POST", "POST", "GET"]))
    return json.dumps({"custom_id": cid, "method": method, "url": url, "body": body})


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(lines=st.lists(hostile_line(), min_size=1, max_size=6))
def test_hostile_lines_each_answered_exactly_once(engine, model_dir, tmp_path_factory, lines):
    tmp = tmp_path_factory.mktemp("fuzz")
    job, out = tmp / "job.jsonl", tmp / "out.jsonl"
    job.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    items = read_job(job, SamplingParams(max_tokens=4), chat_template=CHAT_TEMPLATE, special_tokens={})
    run_job(engine, items, out, model="m", progress=False)
    _assert_every_line_once(items, out)
    for rec in _records(out):
        assert _status(rec) in (200, 400, 500) and rec["error"] is None
    run_job(engine, items, out, model="m", progress=False)  # a re-run adds nothing
    _assert_every_line_once(items, out)


def test_issue_hostile_cases_are_error_records_naming_the_field(engine, tmp_path):
    cases = {"seed": "abc", "top_k": 1e30, "max_tokens": 1e400, "stop": [1]}
    lines = [_line(k, {"prompt": "light", k: v}) for k, v in cases.items()]
    lines += [_line("seed70", {"prompt": "light", "seed": 2**70}), _line("oov", {"prompt": [1, 2, 10**6]}),
              _line("neg", {"prompt": [-1]}), '{"custom_id": "sur", "method": "POST", "url": "/v1/completions", '
              '"body": {"prompt": "x\\ud800y"}}', _line("ok", {"prompt": "light", "max_tokens": 2})]
    job, out = tmp_path / "job.JSONL", tmp_path / "out.jsonl"  # upper-case suffix: still JSONL
    job.write_text("\n".join(lines) + "\n")
    items = read_job(job, SamplingParams(max_tokens=2))
    run_job(engine, items, out, model="m", progress=False)
    recs = {r["custom_id"]: r for r in _records(out)}
    assert set(recs) == {*cases, "seed70", "oov", "neg", "sur", "ok"}
    for k in [*cases, "seed70"]:
        assert recs[k if k != "seed70" else "seed70"]["response"]["body"]["error"]["param"] == (
            k if k != "seed70" else "seed")
    for k in ("oov", "neg", "sur"):
        assert recs[k]["response"]["body"]["error"]["param"] == "prompt"
    assert _status(recs["ok"]) == 200


def test_tokenizer_token_beyond_model_vocab_is_an_error_record(engine, tmp_path):
    vocab = engine.model.config.vocab_size
    token = next(t for t, i in engine.tokenizer.inner.get_vocab().items() if i >= 3)

    class Shifted:  # a tokenizer whose ids exceed the model's vocabulary
        eos_id, bos_id = engine.tokenizer.eos_id, None

        def encode_prompt(self, text):
            return [vocab + 5] if token in text else [3]

        encode = encode_prompt

        def decode(self, ids):
            return "x"

    e = Engine(engine.model, Shifted(), EngineConfig(cpu_kv_tokens=2048))
    job, out = tmp_path / "job.jsonl", tmp_path / "out.jsonl"
    job.write_text(_line("bad", {"prompt": token, "max_tokens": 1}) + "\n" + _line("ok", {"prompt": "z",
                                                                                       "max_tokens": 1}) + "\n")
    run_job(e, read_job(job, SamplingParams()), out, model="m", progress=False)
    recs = {r["custom_id"]: r for r in _records(out)}
    assert "vocabulary" in recs["bad"]["response"]["body"]["error"]["message"] and _status(recs["ok"]) == 200


def test_engine_failing_on_one_request_does_not_abort_the_job(engine, tmp_path):
    class Flaky:  # raises whenever the poisoned prompt is in the batch, as a buggy kernel might
        def __init__(self, inner):
            self.inner, self.tokenizer, self.config, self.model = inner, inner.tokenizer, inner.config, inner.model
            self.encode, self.check = inner.encode, inner.check

        def run(self, requests, **kw):
            if any(r.prompt_ids == [7, 7, 7] for r in requests):
                yield from self.inner.run([r for r in requests if r.prompt_ids != [7, 7, 7]][:1], **kw)
                raise RuntimeError("kernel fault")
            yield from self.inner.run(requests, **kw)

    job, out = tmp_path / "job.jsonl", tmp_path / "out.jsonl"
    job.write_text("".join(_line(c, {"prompt": p, "max_tokens": 2}) + "\n" for c, p in
                           [("a", [5, 6]), ("poison", [7, 7, 7]), ("b", [8, 9]), ("c", "light")]))
    items = read_job(job, SamplingParams())
    run_job(Flaky(engine), items, out, model="m", progress=False)
    _assert_every_line_once(items, out)
    recs = {r["custom_id"]: r for r in _records(out)}
    assert _status(recs["poison"]) == 500 and "kernel fault" in recs["poison"]["response"]["body"]["error"]["message"]
    assert all(_status(recs[c]) == 200 for c in "abc")


def test_duplicates_keyed_by_line_and_retry_errors(model_dir, tmp_path):
    job, out = tmp_path / "job.jsonl", tmp_path / "out.jsonl"
    job.write_text("\n".join([_line("a", {"prompt": "light", "max_tokens": 2}), _line("a", {"prompt": "earth"}),
                              _line("b", {"prompt": "x", "max_tokens": 5000}), _line("a", {"prompt": "z"})]) + "\n")
    argv = ["generate", "--model", str(model_dir), "--input", str(job), "--output", str(out), "--no-progress"]
    assert main(argv) == 0
    first = _records(out)
    assert [r["custom_id"] for r in first].count("a") == 3
    # the duplicates' error records are written first (before the run): a kill right then loses the answer of
    # line 1, and the re-run must still answer it (the duplicate's record must not mark "a" as done)
    out.write_text("".join(json.dumps(r) + "\n" for r in first if _status(r) != 200))
    assert main(argv) == 0
    recs = _records(out)
    assert Counter(r["custom_id"] for r in recs) == Counter({"a": 3, "b": 1})
    assert sum(_status(r) == 200 for r in recs) == 1
    # error records count as answered, unless --retry-errors
    before = out.read_text()
    assert main(argv) == 0 and out.read_text() == before
    assert main(argv + ["--retry-errors", "--max-tokens", "1"]) == 0
    recs = _records(out)
    assert Counter(r["custom_id"] for r in recs) == Counter({"a": 3, "b": 1})


def test_output_guard(model_dir, tmp_path, capsys):
    job = tmp_path / "job.jsonl"
    job.write_text(_line("a", {"prompt": "light", "max_tokens": 1}) + "\n")
    base = ["generate", "--model", str(model_dir), "--input", str(job), "--no-progress"]
    assert main(base + ["--output", str(job)]) == 2
    assert "is the input" in capsys.readouterr().err
    link = tmp_path / "link.jsonl"
    os.link(job, link)
    assert main(base + ["--output", str(link)]) == 2
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"my": "data"}\n{"more": 1}')
    assert main(base + ["--output", str(notes)]) == 2
    assert "not a batchpilot results file" in capsys.readouterr().err
    assert notes.read_text() == '{"my": "data"}\n{"more": 1}'  # untouched
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "x", "custom_id": "zz", "response": {"status_code": 200}, "error": None}) + "\n")
    assert main(base + ["--output", str(other)]) == 2
    assert "another job" in capsys.readouterr().err
    assert job.read_text().count("\n") == 1


def test_disk_full_while_writing_keeps_what_was_written(engine, tmp_path):
    job, out = tmp_path / "job.jsonl", tmp_path / "out.jsonl"
    job.write_text("".join(_line(f"r{i}", {"prompt": [5 + i, 6], "max_tokens": 2}) + "\n" for i in range(5)))
    items = read_job(job, SamplingParams())

    class FullDisk:  # the file system fills up after the second record, mid-line
        def __init__(self, path, mode):
            self.f, self.writes = open(path, mode), 0

        def write(self, data):
            self.writes += 1
            if self.writes == 3:
                self.f.write(data[:10])
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def flush(self):
            self.f.flush()

        def close(self):
            self.f.close()

    with pytest.raises(OSError, match=r"out.jsonl: no space left on device \(ENOSPC\); the 2 records"):
        run_job(engine, items, out, model="m", progress=False, opener=FullDisk)
    assert len(_records(out)) == 2  # valid JSONL, the torn third line cut off
    run_job(engine, items, out, model="m", progress=False)
    _assert_every_line_once(items, out)


def test_limits_prompt_bytes_and_template_time(engine, tmp_path):
    from batchpilot.data.chat_template import RenderLimits

    hang = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    big = "x" * 3000
    job, out = tmp_path / "job.jsonl", tmp_path / "out.jsonl"
    job.write_text("\n".join([_line("big", {"prompt": big}), '{"custom_id": "huge", "body": "' + "y" * 20000 + '"}',
                              _line("chat", {"messages": [{"role": "user", "content": "hi"}]},
                                    "/v1/chat/completions"), _line("ok", {"prompt": "light", "max_tokens": 1})])
                 + "\n")
    limits = JobLimits(max_prompt_bytes=1000, max_line_bytes=10000, template=RenderLimits(max_seconds=0.3))
    start = time.perf_counter()
    items = read_job(job, SamplingParams(), chat_template=hang, limits=limits)
    assert time.perf_counter() - start < 5
    run_job(engine, items, out, model="m", progress=False)
    _assert_every_line_once(items, out)
    recs = {r["custom_id"]: r for r in _records(out)}
    msg = {k: (r["response"]["body"].get("error") or {}).get("message", "") for k, r in recs.items()}
    assert "over the limit" in msg["big"] and "longer than 10000 bytes" in msg[None]
    assert "took longer than" in msg["chat"] and _status(recs["ok"]) == 200


def _generate_cmd(model_dir, job, out, *extra):
    return [sys.executable, "-m", "batchpilot", "generate", "--model", str(model_dir), "--input", str(job),
            "--output", str(out), "--no-progress", "--max-tokens", "24", "--ignore-eos", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_kill_9_mid_job_then_rerun_answers_every_line_once(model_dir, tmp_path):
    job, out = tmp_path / "job.jsonl", tmp_path / "out.jsonl"
    lines = [_line(f"r{i}", {"prompt": [5 + i % 50, 6, 7], "max_tokens": 1 + i % 24}) for i in range(60)]
    lines += [_line("r3", {"prompt": "dup"}), "{bad"]
    job.write_text("\n".join(lines) + "\n")
    # one request per step batch, so the job takes long enough to be killed midway
    proc = subprocess.Popen(_generate_cmd(model_dir, job, out, "--max-num-seqs", "1"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 8):
        time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = out.read_text().count("\n")
    assert partial < len(lines), "the job finished before the kill"
    done = subprocess.run(_generate_cmd(model_dir, job, out), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    items = read_job(job, SamplingParams())
    _assert_every_line_once(items, out)


def test_two_concurrent_jobs_on_one_output_second_fails_fast(model_dir, tmp_path, capsys):
    job, out = tmp_path / "job.jsonl", tmp_path / "out.jsonl"
    job.write_text("\n".join(_line(f"r{i}", {"prompt": [5 + i, 6], "max_tokens": 24}) for i in range(40)) + "\n")
    first = subprocess.Popen(_generate_cmd(model_dir, job, out, "--max-num-seqs", "1"), env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lock = out.with_name(f".{out.name}.lock")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (lock.exists() and lock.read_text().strip()):
        time.sleep(0.05)
    assert first.poll() is None, "the first job ended before the second started: nothing was concurrent"
    # the second job in this process: it must fail on the lock before it loads anything
    assert main(_generate_cmd(model_dir, job, out)[3:]) == 2
    assert "in use by another batchpilot process" in capsys.readouterr().err
    first.send_signal(signal.SIGKILL)  # (waiting for it to finish costs minutes on a CI machine)
    first.wait()
    assert main(_generate_cmd(model_dir, job, out)[3:]) == 0  # the lock died with the process
    _assert_every_line_once(read_job(job, SamplingParams()), out)
