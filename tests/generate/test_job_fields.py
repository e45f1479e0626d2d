"""Issue 16, jobs: OpenAI Batch request fields validated strictly, output lines that the openai SDK types accept."""

import json
import math
from dataclasses import dataclass, fields

import pytest

from batchpilot.cli import main
from batchpilot.generate import request as request_module
from batchpilot.generate.jobs import JobItem, parse_line, result_record
from batchpilot.generate.request import SamplingParams
from chat_fixture import CHAT_TEMPLATE

ENGINE_HAS_FIELDS = {"n", "logprobs", "prompt_logprobs"} <= {f.name for f in fields(SamplingParams)}


def _line(body, url="/v1/completions", cid="x", **envelope):
    obj = {"custom_id": cid, "method": "POST", "url": url, "body": body, **envelope}
    return json.dumps(obj).encode()


def _parse(body, url="/v1/completions", **envelope):
    return parse_line(_line(body, url, **envelope), 0, SamplingParams(), CHAT_TEMPLATE, {})


CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, url, param", [
    ({"prompt": "p", "max_tokens": "5"}, None, "max_tokens"),
    ({"prompt": "p", "max_tokens": 5.9}, None, "max_tokens"),
    ({"prompt": "p", "max_tokens": 5.0}, None, "max_tokens"),
    ({"prompt": "p", "max_tokens": True}, None, "max_tokens"),
    ({"prompt": "p", "max_tokens": -1}, None, "max_tokens"),
    ({"prompt": "p", "ignore_eos": "false"}, None, "ignore_eos"),
    ({"prompt": "p", "ignore_eos": 0}, None, "ignore_eos"),
    ({"prompt": "p", "temperature": 3.5}, None, "temperature"),
    ({"prompt": "p", "temperature": math.inf}, None, "temperature"),
    ({"prompt": "p", "top_p": 0}, None, "top_p"),
    ({"prompt": "p", "stop": ["a", "b", "c", "d", "e"]}, None, "stop"),
    ({"prompt": "p", "stop": [1]}, None, "stop"),
    ({"prompt": "p", "stop": ""}, None, "stop"),
    ({"prompt": "p", "n": 0}, None, "n"),
    ({"prompt": "p", "n": 129}, None, "n"),
    ({"prompt": "p", "seed": 2**70}, None, "seed"),
    ({"prompt": "p", "seed": "abc"}, None, "seed"),
    ({"prompt": "p", "logprobs": 6}, None, "logprobs"),
    ({"prompt": "p", "logprobs": True}, None, "logprobs"),
    ({"prompt": "p", "echo": "yes"}, None, "echo"),
    ({"prompt": "p", "presence_penalty": 2.5}, None, "presence_penalty"),
    ({"prompt": "p", "frequency_penalty": -3}, None, "frequency_penalty"),
    ({"prompt": "p", "repetition_penalty": 0}, None, "repetition_penalty"),
    ({"prompt": "p", "logit_bias": {"5": 101}}, None, "logit_bias"),
    ({"prompt": "p", "logit_bias": {"x": 1}}, None, "logit_bias"),
    ({"prompt": "p", "logit_bias": [5]}, None, "logit_bias"),
    ({"prompt": "p", "min_tokens": 9, "max_tokens": 3}, None, "min_tokens"),
    ({"prompt": "p", "max_tokens": 3, "max_completion_tokens": 4}, None, "max_completion_tokens"),
    ({"prompt": "p", "top_k": 1e30}, None, "top_k"),
    ({"prompt": "p", "stream": True}, None, "stream"),
    ({"prompt": "p", "best_of": 2}, None, "best_of"),
    ({"prompt": "p", "suffix": "s"}, None, "suffix"),
    ({"prompt": "p", "top_logprobs": 2}, None, "top_logprobs"),  # chat only
    ({"prompt": []}, None, "prompt"),
    ({"prompt": [1, "a"]}, None, "prompt"),
    ({"prompt": [[1], []]}, None, "prompt"),
    ({"prompt": "p", "model": 3}, None, "model"),
    ({"messages": MSG, "tools": []}, CHAT, "tools"),
    ({"messages": MSG, "stream": False}, CHAT, "stream"),
    ({"messages": MSG, "top_logprobs": 3}, CHAT, "top_logprobs"),  # needs logprobs: true
    ({"messages": MSG, "top_logprobs": 21, "logprobs": True}, CHAT, "top_logprobs"),
    ({"messages": MSG, "logprobs": 1}, CHAT, "logprobs"),
    ({"messages": MSG, "echo": True}, CHAT, "echo"),
    ({"messages": "hi"}, CHAT, "messages"),
    ({"prompt": "p"}, CHAT, "prompt"),
])
def test_strict_types_and_limits_name_the_field(body, url, param):
    item = _parse(body, url or "/v1/completions")
    assert item.error is not None and item.error.param == param, item.error


@pytest.mark.parametrize("envelope, param", [({"method": "GET"}, "method"), ({"url": "/v1/embeddings"}, "url"),
                                             ({"extra": 1}, "extra"), ({"custom_id": ""}, "custom_id"),
                                             ({"custom_id": 5}, "custom_id"), ({"body": []}, "body")])
def test_envelope_is_checked(envelope, param):
    obj = {"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {"prompt": "p"}} | envelope
    item = parse_line(json.dumps(obj).encode(), 0, SamplingParams(), None, {})
    assert item.error is not None and item.error.param == param
    no_id = {k: v for k, v in obj.items() if k != "custom_id"}
    assert parse_line(json.dumps(no_id).encode(), 0, SamplingParams(), None, {}).error.code == "missing_custom_id"


def test_valid_fields_map_onto_sampling_params():
    item = _parse({"prompt": ["a", "b"], "max_completion_tokens": 7, "temperature": 2, "top_p": 1, "top_k": 3,
                   "stop": "x", "seed": -5, "ignore_eos": False, "model": "m", "user": "u"})
    assert item.error is None and item.prompts == ["a", "b"]
    assert item.params == SamplingParams(max_tokens=7, temperature=2.0, top_p=1.0, top_k=3, stop=("x",), seed=-5)
    assert _parse({"prompt": [[1, 2], [3]]}).prompts == [[1, 2], [3]]
    # interface fields at their defaults need no engine support; other values do (or an error record)
    assert _parse({"prompt": "p", "n": 1, "presence_penalty": 0, "logit_bias": {}}).error is None
    if not ENGINE_HAS_FIELDS:
        assert _parse({"prompt": "p", "n": 2}).error.param == "n"


# --- output lines against the openai SDK types, strict ---

def _no_extra(model, allowed=()):
    """Every key of the line is a field of the SDK type (the SDK's models allow extras; we do not)."""
    from pydantic import BaseModel

    extra = set(model.model_extra or {}) - set(allowed)
    assert not extra, f"{type(model).__name__} has unknown keys {extra}"
    for name in type(model).model_fields:
        value = getattr(model, name)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, BaseModel):
                _no_extra(v, allowed)


def validate_line(rec):
    """A Batch output line as OpenAI documents it, its body an openai ``Completion`` / ``ChatCompletion`` or an
    error object; strict pydantic validation (no coercion)."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion
    from pydantic import BaseModel, ConfigDict

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

    class Error(Strict):
        message: str
        type: str
        param: str | None
        code: str | None

    class ErrorBody(Strict):
        error: Error

    class Response(Strict):
        status_code: int
        request_id: str
        body: dict

    class Line(Strict):
        id: str
        custom_id: str | None
        response: Response
        error: None

    line = Line.model_validate(rec)
    body = line.response.body
    if line.response.status_code != 200:
        ErrorBody.model_validate(body)
        return None
    cls = ChatCompletion if body["object"] == "chat.completion" else Completion
    if cls is Completion:
        body = _sdk_echo_logprobs(body)
    parsed = cls.model_validate(body, strict=True)
    _no_extra(parsed)
    assert ("chatcmpl-" if cls is ChatCompletion else "cmpl-") in body["id"][:9]
    assert body["id"] != line.response.request_id
    assert all("logprobs" in c for c in body["choices"])
    return parsed


def _sdk_echo_logprobs(body):
    """With ``echo``, the first prompt token has no logprob: the API (and vLLM) send ``null`` there, which the
    SDK's ``Completion`` type (``List[float]``) does not admit; the SDK never validates responses, so it does not
    notice. Checked here: only that first entry is null; it is then filled in for the strict validation."""
    body = json.loads(json.dumps(body))
    for c in body["choices"]:
        lp = c["logprobs"]
        if lp is not None and lp["token_logprobs"] and lp["token_logprobs"][0] is None:
            assert lp["top_logprobs"][0] is None and None not in lp["token_logprobs"][1:]
            lp["token_logprobs"][0], lp["top_logprobs"][0] = 0.0, {}
    return body


def _job(model_dir, tmp_path, lines, *extra):
    job, out = tmp_path / "job.jsonl", tmp_path / "out.jsonl"
    job.write_text("\n".join(lines) + "\n")
    assert main(["generate", "--model", str(model_dir), "--input", str(job), "--output", str(out), "--no-progress",
                 "--dtype", "float32", *extra]) == 0
    return [json.loads(x) for x in out.read_text().splitlines()]


def test_output_lines_validate_against_openai_sdk(model_dir, tmp_path):
    pytest.importorskip("openai")
    lines = [_line({"prompt": "And God said", "max_tokens": 3, "stop": ["zz"], "seed": 1, "temperature": 0.5,
                    "top_p": 0.9, "top_k": 5, "ignore_eos": True, "model": "x", "n": 1}, cid="a"),
             _line({"prompt": ["light", "earth"], "max_completion_tokens": 2}, cid="b"),
             _line({"prompt": [[5, 6], [7]], "max_tokens": 2}, cid="c"),
             _line({"messages": MSG, "max_completion_tokens": 2, "stop": "q", "logprobs": False}, CHAT, cid="d"),
             _line({"prompt": "p", "max_tokens": "5"}, cid="e"), _line({"prompt": "p"}, cid="a"),
             b'{"custom_id": "f", "method": "GET", "url": "/v1/completions", "body": {}}', b"{torn"]
    recs = _job(model_dir, tmp_path, [x.decode() for x in lines], "--served-model-name", "tiny", "--ordered")
    assert [r["custom_id"] for r in recs] == ["a", "b", "c", "d", "e", "a", "f", None]  # --ordered
    parsed = [validate_line(r) for r in recs]
    assert [p is None for p in parsed] == [False] * 4 + [True] * 4
    assert all(p.model == "tiny" for p in parsed if p is not None)
    assert [c.index for c in parsed[1].choices] == [0, 1] and parsed[1].usage.completion_tokens == 4
    errors = [r["response"]["body"]["error"] for r in recs[4:]]
    assert [e["param"] for e in errors] == ["max_tokens", "custom_id", "method", None]
    assert all(r["response"]["status_code"] == 400 for r in recs[4:])


def test_model_name_defaults_to_the_directory_name(model_dir, tmp_path):
    recs = _job(model_dir, tmp_path, [_line({"prompt": "light", "max_tokens": 1}).decode()])
    assert recs[0]["response"]["body"]["model"] == model_dir.name


# --- logprob shapes from a Completion that carries them (the engine side lands with H2's branch) ---

@dataclass(frozen=True, slots=True)
class _TokenLogprob:  # the shared interface's TokenLogprob
    token_id: int
    logprob: float
    top: tuple = ()


@dataclass(frozen=True, slots=True)
class _Completion:  # the shared interface's Completion
    index: int
    prompt_ids: list
    output_ids: list
    text: str
    finish_reason: str
    num_preemptions: int = 0
    sample_index: int = 0
    logprobs: tuple | None = None
    prompt_logprobs: tuple | None = None


TokenLogprob = getattr(request_module, "TokenLogprob", _TokenLogprob)


class _Tok:
    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def _samples(n):
    lp = (TokenLogprob(7, -0.5, ((7, -0.5), (8, -1.25))), TokenLogprob(9, -2.0, ((3, -0.1), (9, -2.0))))
    plp = (None, TokenLogprob(2, -3.0, ((2, -3.0),)))
    return [_Completion(0, [1, 2], [7, 9], "<7><9>", "length", sample_index=k, logprobs=lp, prompt_logprobs=plp)
            for k in range(n)]


def test_completion_logprobs_shape_with_echo():
    pytest.importorskip("openai")
    item = JobItem(0, "x", prompts=["<1><2>"], params=SamplingParams(), echo=True)
    rec = result_record(item, _samples(1), "m", tokenizer=_Tok())
    validate_line(rec)
    choice = rec["response"]["body"]["choices"][0]
    assert choice["text"] == "<1><2><7><9>"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["<1>", "<2>", "<7>", "<9>"] and lp["token_logprobs"] == [None, -3.0, -0.5, -2.0]
    assert lp["text_offset"] == [0, 3, 6, 9] and lp["top_logprobs"][0] is None
    assert lp["top_logprobs"][3] == {"<3>": -0.1, "<9>": -2.0}
    assert rec["response"]["body"]["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


def test_chat_logprobs_shape_and_n_choices():
    pytest.importorskip("openai")
    item = JobItem(0, "x", kind="chat", prompts=["..."], params=SamplingParams())
    if ENGINE_HAS_FIELDS:
        from dataclasses import replace

        item.params = replace(item.params, n=2)
    n = 2 if ENGINE_HAS_FIELDS else 1
    parsed = validate_line(result_record(item, _samples(n)[::-1], "m", tokenizer=_Tok()))
    assert [c.index for c in parsed.choices] == list(range(n))
    content = parsed.choices[0].logprobs.content
    assert [c.token for c in content] == ["<7>", "<9>"] and content[1].logprob == -2.0
    assert content[0].bytes == list(b"<7>") and [t.token for t in content[1].top_logprobs] == ["<3>", "<9>"]
    # usage counts the prompt once, every sample's output
    assert parsed.usage.prompt_tokens == 2 and parsed.usage.completion_tokens == 2 * n


def test_every_field_job_validates_against_openai_sdk(model_dir, tmp_path):
    pytest.importorskip("openai")
    lines = [_line({"prompt": ["And God said", "light"], "max_tokens": 3, "n": 2, "logprobs": 2, "echo": True,
                    "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1,
                    "logit_bias": {"5": -100}, "min_tokens": 1, "stop": ["zz", "q"], "seed": 3,
                    "temperature": 0.8, "top_p": 0.9, "top_k": 20}, cid="a"),
             _line({"messages": MSG, "max_completion_tokens": 3, "n": 3, "logprobs": True, "top_logprobs": 2,
                    "stop": "zz", "logit_bias": {"6": 3}}, CHAT, cid="b")]
    recs = _job(model_dir, tmp_path, [x.decode() for x in lines])
    by = {r["custom_id"]: validate_line(r) for r in recs}
    assert len(by["a"].choices) == 4 and len(by["b"].choices) == 3
    assert [c.index for c in by["a"].choices] == [0, 1, 2, 3]
    # the raw line (the SDK type cannot hold echo's leading null; validate_line checked it and filled it in)
    raw = {r["custom_id"]: r["response"]["body"] for r in recs}
    for c in raw["a"]["choices"]:
        lp = c["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(len(t) <= 2 for t in lp["top_logprobs"][1:])
        assert c["text"].startswith("And God said" if c["index"] < 2 else "light")
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"])
    for c in by["b"].choices:
        assert len(c.logprobs.content) >= 1 and all(len(t.top_logprobs) == 2 for t in c.logprobs.content)


def test_job_seeds_come_from_request_seed_and_samples_share_the_prompt_index(model_dir, tmp_path):
    """One owner of seed derivation: a line without a seed samples as ``request_seed(--seed, custom_id)`` does in
    the engine; its n samples are choices p*n + sample_index, and a resumed or reordered job gives the same."""
    from batchpilot import load_model
    from batchpilot.data.tokenizer import Tokenizer
    from batchpilot.generate.engine import Engine, EngineConfig
    from batchpilot.generate.request import request_seed

    body = {"prompt": "And God said", "max_tokens": 4, "temperature": 1.0, "n": 2}
    lines = [_line(body, cid="s1").decode(), _line({"prompt": "light", "max_tokens": 2}, cid="s0").decode()]
    recs = _job(model_dir, tmp_path, lines, "--seed", "7")
    texts = [c["text"] for c in next(r for r in recs if r["custom_id"] == "s1")["response"]["body"]["choices"]]
    engine = Engine(load_model(model_dir), Tokenizer.from_path(model_dir), EngineConfig(num_blocks=64))
    params = SamplingParams(max_tokens=4, temperature=1.0, n=2, seed=request_seed(7, "s1"))
    assert texts == [c.text for c in engine.generate(["And God said"], params)]
    (tmp_path / "out.jsonl").unlink()
    again = _job(model_dir, tmp_path, lines[::-1], "--seed", "7")
    assert texts == [c["text"] for c in next(r for r in again if r["custom_id"] == "s1")["response"]["body"]["choices"]]
