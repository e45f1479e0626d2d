"""Offline jobs in the OpenAI Batch format: read requests, write results incrementally, resume.

Input: JSONL lines ``{"custom_id", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions",
"body": {...}}`` (``prompt`` text, a list of texts, token ids or a list of token-id lists; or ``messages``,
rendered with the model's chat template in the sandbox of ``data/chat_template.py``), or a plain text file with
one prompt per line (custom_id ``line-N``). Any suffix other than ``.jsonl`` (case-insensitive) is plain text.

The promises (docs/generate.md):
- Every input line ends as exactly one output record, a response or an error record, whatever it holds. Each
  line is validated before the job starts (strict types and OpenAI's documented limits, each violation naming
  the field), and the engine runs inside a per-request guard, so no single request aborts the job.
- Records are appended and flushed one at a time, so a killed job loses at most the line being written (a torn
  last line is cut off on the next run). A re-run answers exactly the lines without a record. Lines are matched
  to records by custom_id and occurrence: the first line of a custom_id owns the id, a later line with the same
  id is a duplicate whose error record carries ``code: duplicate_custom_id`` and never marks the first as done.
- Error records are OpenAI's per-request error shape (``response.status_code`` 400 and
  ``response.body.error{message, type, param, code}``, as OpenAI and vLLM's run_batch write them); they count
  as answered unless the job is re-run with ``retry_errors``.
With several ranks each writes ``OUT.partR``; rank 0 merges everything in input order at the end.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, BinaryIO

from batchpilot.data.chat_template import RenderLimits, render_chat
from batchpilot.generate.request import Completion, Request, SamplingParams, request_seed
from batchpilot.io import cut_torn_tail, write_text_atomic

URLS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
ENVELOPE_KEYS = {"custom_id", "method", "url", "body"}
# codes of error records that a line gets whatever happens at run time (so they are never retried)
DUPLICATE, MISSING_ID = "duplicate_custom_id", "missing_custom_id"
INT64 = 2**63

# OpenAI's documented limits (API reference, "Create completion" / "Create chat completion")
MAX_STOP_STRINGS = 4
MAX_N = 128
MAX_COMPLETION_LOGPROBS = 5  # legacy completions: `logprobs` <= 5
MAX_TOP_LOGPROBS = 20  # chat: `top_logprobs` <= 20
# SamplingParams' defaults for the fields of the shared request interface: a value equal to it needs no support
INTERFACE_DEFAULTS: dict[str, Any] = {"n": 1, "min_tokens": 0, "logprobs": None, "prompt_logprobs": None,
                                      "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                                      "logit_bias": ()}
# fields we accept but do not act on: metadata that changes no output
IGNORED_FIELDS = {"model", "user"}
COMMON_FIELDS = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop",
                 "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens",
                 "ignore_eos"} | IGNORED_FIELDS
FIELDS = {"completion": COMMON_FIELDS | {"prompt", "logprobs", "echo"},
          "chat": COMMON_FIELDS | {"messages", "logprobs", "top_logprobs"}}


@dataclass(kw_only=True, slots=True, frozen=True)
class JobLimits:
    """Per-request limits, so that one hostile line cannot exhaust the memory or the time of the whole job."""

    max_line_bytes: int = 8 * 2**20  # a longer input line is not parsed; its record says so
    max_prompt_bytes: int = 4 * 2**20  # UTF-8 bytes of a text prompt (or of a rendered chat)
    template: RenderLimits = field(default_factory=RenderLimits)

    def __post_init__(self) -> None:
        if self.max_line_bytes < 1 or self.max_prompt_bytes < 1:
            raise ValueError("max_line_bytes and max_prompt_bytes must be >= 1")


class RequestError(ValueError):
    """A bad request: becomes an error record naming ``param``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(slots=True)
class JobItem:
    line: int  # 0-based input line; the merge order
    custom_id: str | None  # None: the line has no usable custom_id (always an error record)
    kind: str = "completion"  # or "chat"
    prompts: list[str | list[int]] = field(default_factory=list)  # one choice set per prompt; chat: rendered text
    params: SamplingParams | None = None
    echo: bool = False
    error: RequestError | None = None

    @property
    def deterministic_error(self) -> bool:
        """An error every run gives again (duplicate or missing id): never retried."""
        return self.error is not None and self.error.code in (DUPLICATE, MISSING_ID)


# --- input ---

def iter_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(0-based line, bytes without the newline) of a file; None for a line over ``max_line_bytes``, which is
    skipped in chunks and never held in memory whole."""
    with path.open("rb") as f:
        for line in range(2**62):
            data = f.readline(max_line_bytes + 1)
            if not data:
                return
            if len(data) > max_line_bytes and not data.endswith(b"\n"):
                while (rest := f.readline(2**20)) and not rest.endswith(b"\n"):
                    pass
                yield line, None
                continue
            yield line, data.rstrip(b"\r\n")


def read_job(path: str | os.PathLike, defaults: SamplingParams, *, chat_template: str | None = None,
             special_tokens: dict[str, str] | None = None, limits: JobLimits | None = None) -> list[JobItem]:
    path, limits = Path(path), limits or JobLimits()
    jsonl = path.suffix.lower() == ".jsonl"
    items: list[JobItem] = []
    for line, data in iter_lines(path, limits.max_line_bytes):
        if data is not None and not data.strip():
            continue
        if not jsonl:
            item = JobItem(line, f"line-{line + 1}", params=defaults)
            try:
                item.prompts = [_text(data, limits, "prompt")] if data is not None else []
                if data is None:
                    raise RequestError(f"line longer than {limits.max_line_bytes} bytes", "prompt")
            except RequestError as e:
                item.error = e
            items.append(item)
            continue
        items.append(parse_line(data, line, defaults, chat_template, special_tokens or {}, limits))
    seen: set[str] = set()
    for it in items:
        if it.custom_id is not None and it.custom_id in seen:
            it.error = RequestError(f"duplicate custom_id {it.custom_id!r}: an earlier line has it",
                                    "custom_id", DUPLICATE)
        elif it.custom_id is not None:
            seen.add(it.custom_id)
    return items


def _text(data: bytes, limits: JobLimits, param: str) -> str:
    if len(data) > limits.max_prompt_bytes:
        raise RequestError(f"{param} is {len(data)} bytes, over the limit of {limits.max_prompt_bytes}", param)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"{param} is not valid UTF-8", param) from None


def parse_line(data: bytes | None, line: int, defaults: SamplingParams, chat_template: str | None,
               special_tokens: dict[str, str], limits: JobLimits | None = None) -> JobItem:
    """One input line as a JobItem; any fault becomes ``item.error`` (never an exception)."""
    limits = limits or JobLimits()
    item = JobItem(line, None)
    try:
        if data is None:
            raise RequestError(f"line longer than {limits.max_line_bytes} bytes", None, MISSING_ID)
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            raise RequestError("not a valid JSON line", None, MISSING_ID) from None
        if not isinstance(obj, dict):
            raise RequestError(f"a JSON {type(obj).__name__}, not an object", None, MISSING_ID)
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid or not _utf8(cid):
            raise RequestError("custom_id is required: a non-empty string", "custom_id", MISSING_ID)
        item.custom_id = cid
        if extra := sorted(set(obj) - ENVELOPE_KEYS):
            raise RequestError(f"unsupported field {extra[0]!r} in the request line", extra[0])
        if obj.get("method") != "POST":
            raise RequestError("method must be 'POST'", "method")
        url = obj.get("url")
        if url not in URLS:
            raise RequestError(f"url must be one of {sorted(URLS)}", "url")
        item.kind = URLS[url]
        body = obj.get("body")
        if not isinstance(body, dict):
            raise RequestError("body must be an object", "body")
        item.prompts, item.params, item.echo = parse_body(body, item.kind, defaults, chat_template, special_tokens,
                                                          limits)
    except RequestError as e:
        item.error = e
    return item


def parse_body(body: dict[str, Any], kind: str, defaults: SamplingParams, chat_template: str | None,
               special_tokens: dict[str, str], limits: JobLimits | None = None
               ) -> tuple[list[str | list[int]], SamplingParams, bool]:
    """(prompts, SamplingParams, echo) of a completions (``kind`` "completion") or chat ("chat") body: the one
    owner of the per-field validation and the prompt rules, shared by offline jobs and the server. A fault is a
    RequestError naming the field; a chat prompt is the rendered text (tokenize it without special tokens)."""
    limits = limits or JobLimits()
    params, echo = body_params(body, defaults, kind)
    if kind != "chat":
        return _prompts(body.get("prompt"), limits), params, echo
    if chat_template is None:
        raise RequestError("chat request but the model has no chat template", "messages")
    try:
        text = render_chat(body.get("messages"), chat_template, special_tokens, limits=limits.template)
    except RequestError:
        raise
    except ValueError as e:  # the chat template's one-line errors
        raise RequestError(str(e), "messages") from None
    return [_text(text.encode("utf-8", "surrogatepass"), limits, "messages")], params, echo


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a lone surrogate
        return False


def _prompts(prompt: Any, limits: JobLimits) -> list[str | list[int]]:
    """OpenAI's four prompt forms: a string, a list of strings, token ids, a list of token-id lists."""
    if isinstance(prompt, str):
        return [_prompt_text(prompt, limits)]
    if _is_token_list(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [_prompt_text(p, limits) for p in prompt]
    if isinstance(prompt, list) and prompt and all(_is_token_list(p) for p in prompt):
        return list(prompt)
    raise RequestError("prompt must be a string, a list of strings, a list of token ids or a list of "
                       "token-id lists (non-empty)", "prompt")


def _prompt_text(text: str, limits: JobLimits) -> str:
    if not _utf8(text):
        raise RequestError("prompt holds a lone surrogate (not valid Unicode text)", "prompt")
    return _text(text.encode("utf-8"), limits, "prompt")


def _is_token_list(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(type(t) is int for t in x)


# --- strict body validation ---

def _int(body: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if type(v) is not int:  # no "5", 5.0, 5.9 or true
        raise RequestError(f"{key} must be an integer, got {type(v).__name__}", key)
    if not lo <= v <= hi:
        raise RequestError(f"{key} must be in [{lo}, {hi}], got {v}", key)
    return v


def _num(body: dict[str, Any], key: str, lo: float, hi: float, *, open_lo: bool = False) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if type(v) not in (int, float) or not math.isfinite(v):
        raise RequestError(f"{key} must be a finite number, got {type(v).__name__}", key)
    if not (lo < v if open_lo else lo <= v) or not v <= hi:
        raise RequestError(f"{key} must be in {'(' if open_lo else '['}{lo}, {hi}], got {v}", key)
    return float(v)


def _bool(body: dict[str, Any], key: str) -> bool | None:
    v = body.get(key)
    if v is not None and type(v) is not bool:  # no "false", no 0
        raise RequestError(f"{key} must be true or false, got {type(v).__name__}", key)
    return v


def _stop(body: dict[str, Any]) -> tuple[str, ...] | None:
    v = body.get("stop")
    if v is None:
        return None
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s and _utf8(s) for s in stops):
        raise RequestError("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    return tuple(stops)


def _logit_bias(body: dict[str, Any]) -> tuple[tuple[int, float], ...] | None:
    v = body.get("logit_bias")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise RequestError("logit_bias must be an object {token id: bias}", "logit_bias")
    out = []
    for k, b in v.items():
        if not (isinstance(k, str) and k.isascii() and k.isdigit()) or int(k) >= INT64:
            raise RequestError(f"logit_bias keys must be token ids, got {k[:40]!r}", "logit_bias")
        if type(b) not in (int, float) or not -100 <= b <= 100:
            raise RequestError("logit_bias values must be numbers in [-100, 100]", "logit_bias")
        out.append((int(k), float(b)))
    return tuple(sorted(out))


def body_params(body: dict[str, Any], defaults: SamplingParams, kind: str = "completion") -> tuple[SamplingParams, bool]:
    """(SamplingParams, echo) of a request body, strictly typed; a RequestError names the first bad field."""
    if extra := sorted(set(body) - FIELDS[kind]):
        raise RequestError(f"unsupported field {extra[0]!r} for {'chat ' if kind == 'chat' else ''}completions",
                           extra[0])
    for key in IGNORED_FIELDS:
        if key in body and not isinstance(body[key], str):
            raise RequestError(f"{key} must be a string", key)
    max_tokens, max_completion = _int(body, "max_tokens", 0, INT64 - 1), _int(body, "max_completion_tokens", 0,
                                                                             INT64 - 1)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise RequestError("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
    kw: dict[str, Any] = {
        "max_tokens": max_completion if max_completion is not None else max_tokens,
        "min_tokens": _int(body, "min_tokens", 0, INT64 - 1),
        "temperature": _num(body, "temperature", 0, 2),
        "top_p": _num(body, "top_p", 0, 1, open_lo=True),
        "top_k": _int(body, "top_k", 0, INT64 - 1),
        "n": _int(body, "n", 1, MAX_N),
        "seed": _int(body, "seed", -INT64, INT64 - 1),
        "stop": _stop(body),
        "presence_penalty": _num(body, "presence_penalty", -2, 2),
        "frequency_penalty": _num(body, "frequency_penalty", -2, 2),
        "repetition_penalty": _num(body, "repetition_penalty", 0, 2**31, open_lo=True),
        "logit_bias": _logit_bias(body),
        "ignore_eos": _bool(body, "ignore_eos"),
    }
    if kw["min_tokens"] is not None and kw["min_tokens"] > (kw["max_tokens"] or defaults.max_tokens):
        raise RequestError("min_tokens must be <= max_tokens", "min_tokens")
    echo = False
    if kind == "completion":
        kw["logprobs"] = _int(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
        echo = bool(_bool(body, "echo"))
        if echo:
            kw["prompt_logprobs"] = kw["logprobs"] if kw["logprobs"] is not None else None
    else:
        top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top is not None and not _bool(body, "logprobs"):
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        kw["logprobs"] = (top or 0) if _bool(body, "logprobs") else None
    return make_params(defaults, {k: v for k, v in kw.items() if v is not None}), echo


def make_params(defaults: SamplingParams, overrides: dict[str, Any]) -> SamplingParams:
    """``defaults`` with ``overrides``; a field this engine's SamplingParams lacks, or a value it refuses, is a
    RequestError naming the field (never dropped silently)."""
    known = {f.name for f in fields(SamplingParams)}
    for key, value in overrides.items():
        if key not in known and value != INTERFACE_DEFAULTS.get(key):
            raise RequestError(f"{key} is not supported by this engine", key)
    kw = {f.name: getattr(defaults, f.name) for f in fields(SamplingParams)}
    kw.update({k: v for k, v in overrides.items() if k in known})
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        raise RequestError(str(e), next((k for k in overrides if k in str(e)), None)) from None


# --- output ---

@dataclass(slots=True)
class Answered:
    """What an output file already answers: custom_id -> {"first": has a record of the owning line,
    "first_error": that record is an error, "dups": number of duplicate/missing-id error records}."""

    by_id: dict[str | None, dict[str, Any]] = field(default_factory=dict)

    def add(self, record: dict[str, Any]) -> None:
        entry = self.by_id.setdefault(record.get("custom_id"), {"first": False, "first_error": False, "dups": 0})
        code = _error_code(record)
        if code in (DUPLICATE, MISSING_ID):
            entry["dups"] += 1
        else:
            entry["first"], entry["first_error"] = True, code is not None

    def todo(self, items: list[JobItem], *, retry_errors: bool = False) -> list[JobItem]:
        """The items without a record (and, with ``retry_errors``, those whose record is an error)."""
        used: dict[str | None, int] = {}
        out = []
        for it in items:
            entry = self.by_id.get(it.custom_id, {"first": False, "first_error": False, "dups": 0})
            if it.custom_id is None or it.deterministic_error:
                used[it.custom_id] = used.get(it.custom_id, 0) + 1
                if used[it.custom_id] > entry["dups"]:
                    out.append(it)
            elif not entry["first"] or (retry_errors and entry["first_error"]):
                out.append(it)
        return out


def _error_code(record: dict[str, Any]) -> str | None | bool:
    """The error code of an error record ("" when it has none), None for a response."""
    response = record.get("response")
    if isinstance(response, dict) and response.get("status_code") == 200:
        return None
    body = response.get("body") if isinstance(response, dict) else None
    err = body.get("error") if isinstance(body, dict) else record.get("error")
    return (err.get("code") or "") if isinstance(err, dict) else ""


def is_result_record(obj: Any) -> bool:
    return isinstance(obj, dict) and {"id", "custom_id", "response", "error"} <= set(obj)


def read_results(path: Path) -> list[dict[str, Any]]:
    """The records of a results file; a torn last line is cut off. Anything that is not a results file (another
    file given as --output by mistake) is refused, never truncated."""
    if not path.is_file():
        return []
    records: list[dict[str, Any]] = []
    with path.open("rb") as f:
        lines = f.read().split(b"\n")
    torn = lines[-1] != b""
    for k, data in enumerate(lines[:-1] if not torn else lines):
        if not data.strip():
            continue
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if not is_result_record(obj):
            if torn and k == len(lines) - 1 and all(is_result_record(r) for r in records):
                break  # the last line of a job killed mid-write
            raise ValueError(f"{path}:{k + 1}: not a batchpilot results file (refusing to append to it)")
        records.append(obj)
    if torn:
        cut_torn_tail(path)
    return records


def check_output(out: Path, inp: Path) -> None:
    """--output must not be --input (same path or same file) and must be new or a results file."""
    if out.resolve() == inp.resolve() or (out.exists() and os.path.samefile(out, inp)):
        raise ValueError(f"--output {out} is the input file")
    if out.exists() and not out.is_file():
        raise ValueError(f"--output {out} is not a regular file")


def answered(out: Path, items: list[JobItem], world_size: int = 1) -> Answered:
    """What ``out`` (and the part files of an interrupted multi-rank run) answer; refuses a results file of
    another job (custom_ids this job does not have)."""
    ids = {it.custom_id for it in items}
    a = Answered()
    for f in [out] + ([part_path(out, r) for r in range(world_size)] if world_size > 1 else []):
        for rec in read_results(f):
            if rec.get("custom_id") not in ids:
                raise ValueError(f"{f}: holds custom_id {str(rec.get('custom_id'))[:40]!r}, which is not in "
                                 "this job: results of another job?")
            a.add(rec)
    return a


def drop_errors(out: Path, items: list[JobItem]) -> int:
    """--retry-errors: rewrite ``out`` (atomically) without the error records that will be redone."""
    records = read_results(out)
    keep = [r for r in records if _error_code(r) is None or _error_code(r) in (DUPLICATE, MISSING_ID)]
    if len(keep) != len(records):
        write_text_atomic(out, "".join(_dumps(r) for r in keep))
    return len(records) - len(keep)


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _token_str(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


def completion_logprobs(tokenizer: Any, lps: list[Any], text_start: int = 0) -> dict[str, Any]:
    """OpenAI's legacy completions ``logprobs`` object from a list of TokenLogprob (None: no logprob)."""
    tokens, token_lps, tops, offsets, pos = [], [], [], [], text_start
    for lp, token_id in lps:
        s = _token_str(tokenizer, token_id)
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
        token_lps.append(None if lp is None else lp.logprob)
        tops.append(None if lp is None else {_token_str(tokenizer, t): v for t, v in lp.top})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer: Any, lps: tuple[Any, ...]) -> dict[str, Any]:
    """OpenAI's chat ``logprobs`` object: ``content[]`` of {token, logprob, bytes, top_logprobs[]}."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        s = _token_str(tokenizer, token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8", "replace"))}

    return {"content": [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps], "refusal": None}


def response_body(item: JobItem, completions: list[Completion], model: str, *, tokenizer: Any = None,
                  token_ids: bool = False) -> dict[str, Any]:
    """An OpenAI ``Completion`` / ``ChatCompletion`` body for ``completions`` (every sample of every prompt of
    ``item``, any order; ``c.index`` is the prompt's position in ``item.prompts``, ``c.sample_index`` the sample):
    choice ``index`` = prompt position * n + sample, as OpenAI numbers them. Shared by jobs and the server;
    ``token_ids`` adds the generated ids (jobs without a tokenizer)."""
    n = item.params.n if item.params is not None else 1
    choices = [_choice(item, c, n, tokenizer, token_ids) for c in completions]
    choices.sort(key=lambda ch: ch["index"])
    prompt_lengths = {c.index: len(c.prompt_ids) for c in completions}  # the prompt counts once, not per sample
    n_in, n_out = sum(prompt_lengths.values()), sum(len(c.output_ids) for c in completions)
    chat = item.kind == "chat"
    body: dict[str, Any] = {"id": _new_id("chatcmpl-" if chat else "cmpl-"), "object": "chat.completion" if chat else
            "text_completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}
    if chat:
        body["system_fingerprint"] = None
    return body


def _choice(item: JobItem, c: Completion, n: int, tokenizer: Any, token_ids: bool) -> dict[str, Any]:
    p = c.index
    choice: dict[str, Any] = {"index": p * n + c.sample_index, "finish_reason": c.finish_reason, "logprobs": None}
    if item.kind == "chat":
        choice["message"] = {"role": "assistant", "content": c.text, "refusal": None}
        if c.logprobs is not None:
            choice["logprobs"] = chat_logprobs(tokenizer, c.logprobs)
    else:
        prompt_text = ""
        if item.echo:
            prompt = item.prompts[p]
            prompt_text = prompt if isinstance(prompt, str) else (tokenizer.decode(c.prompt_ids) if tokenizer else "")
        choice["text"] = prompt_text + c.text
        if c.logprobs is not None:
            pairs: list[tuple[Any, int]] = [(lp, lp.token_id) for lp in c.logprobs]
            if item.echo and c.prompt_logprobs is not None:
                pairs = list(zip(c.prompt_logprobs, c.prompt_ids)) + pairs
            choice["logprobs"] = completion_logprobs(tokenizer, pairs)
    if token_ids:
        choice["token_ids"] = c.output_ids
    return choice


def result_record(item: JobItem, completions: list[Completion], model: str, *, tokenizer: Any = None,
                  token_ids: bool = False) -> dict[str, Any]:
    """An OpenAI Batch output line: the envelope around ``response_body``."""
    body = response_body(item, completions, model, tokenizer=tokenizer, token_ids=token_ids)
    return {"id": _new_id("batch_req_"), "custom_id": item.custom_id,
            "response": {"status_code": 200, "request_id": _new_id("req_"), "body": body}, "error": None}


def error_record(item: JobItem, *, status_code: int = 400) -> dict[str, Any]:
    """OpenAI's per-request error: ``response.status_code`` 4xx/5xx and ``body.error{message, type, param, code}``."""
    e = item.error or RequestError("unknown error")
    message = f"line {item.line + 1}: {e}"
    kind = "invalid_request_error" if status_code < 500 else "server_error"
    return {"id": _new_id("batch_req_"), "custom_id": item.custom_id,
            "response": {"status_code": status_code, "request_id": _new_id("req_"),
                         "body": {"error": {"message": message, "type": kind, "param": e.param, "code": e.code}}},
            "error": None}


def _dumps(record: dict[str, Any]) -> str:
    text = json.dumps(record, ensure_ascii=False) + "\n"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # generated text with a lone surrogate: JSON escapes are still valid JSON
        text = json.dumps(record) + "\n"
    return text


class JobWriteError(OSError):
    """Writing the results failed (disk full, ...): the job stops; what was written stays valid."""


class JobWriter:
    """Appends one JSON line per record and flushes it, so a crash loses at most the line being written.

    A failed write (ENOSPC) cuts the partial line off again, so the file stays a valid results file."""

    def __init__(self, path: Path, opener: Any = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        cut_torn_tail(path)
        self.file: BinaryIO = (opener or open)(path, "ab")
        self.written = 0

    def write(self, record: dict[str, Any]) -> None:
        try:
            self.file.write(_dumps(record).encode("utf-8"))
            self.file.flush()
        except OSError as e:
            self._restore()
            reason = "no space left on device (ENOSPC)" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise JobWriteError(e.errno, f"{self.path}: {reason}; the {self.written} records written are valid, "
                                f"re-run the same command to finish the job") from None
        self.written += 1

    def _restore(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        try:
            cut_torn_tail(self.path)
        except OSError:
            pass

    def close(self) -> None:
        self.file.close()


def part_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.part{rank}")


def sort_results(out: Path, items: list[JobItem], extra: Sequence[Path] = ()) -> None:
    """Rewrite ``out`` (plus ``extra`` part files) atomically with every record in input-line order."""
    first: dict[str | None, int] = {it.custom_id: it.line for it in items
                                     if not it.deterministic_error and it.custom_id is not None}
    later: dict[str | None, list[int]] = {}
    for it in items:
        if it.custom_id is None or it.deterministic_error:
            later.setdefault(it.custom_id, []).append(it.line)
    keyed = []
    for f in [out, *extra]:
        for rec in read_results(f):
            cid, code = rec.get("custom_id"), _error_code(rec)
            if code in (DUPLICATE, MISSING_ID) and later.get(cid):
                line = later[cid].pop(0)
            else:
                line = first.get(cid, len(items) + 2**40)
            keyed.append((line, rec))
    keyed.sort(key=lambda x: x[0])
    write_text_atomic(out, "".join(_dumps(r) for _, r in keyed))
    for f in extra:
        f.unlink(missing_ok=True)


def merge_parts(out: Path, world_size: int, items: list[JobItem]) -> None:
    """Rank 0: every record of ``out`` and the part files, in input order, written atomically."""
    sort_results(out, items, [part_path(out, r) for r in range(world_size)])


def run_job(engine: Any, items: list[JobItem], out: Path, *, model: str, todo: list[JobItem] | None = None,
            rank: int = 0, world_size: int = 1, progress: bool | None = None, opener: Any = None,
            encoded: dict[int, list[list[int]]] | None = None) -> dict[str, Any]:
    """Run ``todo`` (default: the items without a record in ``out``); write each result as it finishes.
    ``encoded``: ``encode_job(engine, todo)`` done already (the CLI tokenizes while the weights load).

    ``progress``: a bar counting input lines (done, errors, skipped); None = on when stdout is a terminal. The
    summary splits the time: ``tokenize_seconds`` (the batched tokenization) and ``engine_seconds`` (the engine's
    steps, graph capture and compilation inside them included); the rest is planning and writing."""
    todo = answered(out, items, world_size).todo(items) if todo is None else todo
    writer = JobWriter(out if world_size == 1 else part_path(out, rank), opener)
    stats: dict[str, Any] = {"requests": 0, "errors": 0, "output_tokens": 0, "lengths": []}
    start = time.perf_counter()
    engine_s0 = _engine_seconds(engine)
    skipped = len(items) - len(todo)
    show = (sys.stdout.isatty() if progress is None else progress) and rank == 0
    try:
        requests, owner = _requests(engine, todo, writer, write_errors=rank == 0, stats=stats, encoded=encoded)
        tokenized = time.perf_counter()
        with _progress(show, len(items), skipped) as update:
            update(stats, 0.0)
            for item, completions in _guarded_run(engine, requests, owner, rank, world_size):
                if isinstance(completions, RequestError):
                    item.error = completions
                    writer.write(error_record(item, status_code=500))
                    stats["errors"] += 1
                else:
                    writer.write(result_record(item, completions, model, tokenizer=engine.tokenizer,
                                               token_ids=engine.tokenizer is None))
                    stats["requests"] += 1
                    stats["output_tokens"] += sum(len(c.output_ids) for c in completions)
                    stats["lengths"] += [(len(c.prompt_ids), len(c.output_ids)) for c in completions]
                update(stats, stats["output_tokens"] / max(1e-9, time.perf_counter() - start))
    finally:
        writer.close()
    seconds = time.perf_counter() - start
    return {**stats, "skipped": skipped, "seconds": seconds, "tokenize_seconds": tokenized - start,
            "engine_seconds": _engine_seconds(engine) - engine_s0,
            "output_tokens_per_s": stats["output_tokens"] / max(seconds, 1e-9)}


def _engine_seconds(engine: Any) -> float:
    """The engine's step time so far (0 for an engine-like object without ``EngineStats``)."""
    stats = getattr(engine, "stats", None)
    return float(stats.seconds) if stats is not None else 0.0


def _guarded_run(engine: Any, requests: list[Request], owner: dict[int, tuple[JobItem, int]], rank: int,
                 world_size: int) -> Iterator[tuple[JobItem, list[Completion] | RequestError]]:
    """(item, its completions) as each item's last sample finishes. If the engine raises, what finished is kept
    and every unfinished request is re-run alone, so only the request that makes the engine fail gets an error
    record (status 500) and the job goes on."""
    pending: dict[int, list[Completion]] = {}  # item line -> completions so far
    need: dict[int, int] = {}
    for r in requests:
        item, _ = owner[r.index]
        need[item.line] = need.get(item.line, 0) + r.params.n
    finished: set[int] = set()

    def collect(r_index: int, c: Completion) -> tuple[JobItem, list[Completion]] | None:
        item, p = owner[r_index]
        got = pending.setdefault(item.line, [])
        got.append(_with_index(c, p))
        if len(got) == need[item.line]:
            finished.add(item.line)
            return item, pending.pop(item.line)
        return None

    try:
        for c in engine.run(requests, rank=rank, world_size=world_size):
            if (done := collect(c.index, c)) is not None:
                yield done
        return
    except JobWriteError:
        raise
    except Exception:  # noqa: BLE001 - one request must not abort the job; each is retried alone below
        if world_size > 1:  # which requests are this rank's is the engine's plan; do not guess it
            raise
    failed: set[int] = set()
    for r in requests:
        item, _ = owner[r.index]
        if item.line in finished or item.line in failed:
            continue
        fresh = Request(r.index, r.prompt_ids, r.params)
        try:
            results = list(engine.run([fresh], rank=0, world_size=1))
        except JobWriteError:
            raise
        except Exception as e:  # noqa: BLE001
            failed.add(item.line)
            pending.pop(item.line, None)
            yield item, RequestError(f"the engine failed on this request: {type(e).__name__}: {str(e)[:200]}")
            continue
        pending.setdefault(item.line, [])
        pending[item.line] = [x for x in pending[item.line] if x.index != owner[r.index][1]]
        for c in results:
            if (done := collect(c.index, c)) is not None:
                yield done


def _with_index(c: Completion, prompt_pos: int) -> Completion:
    """The completion with ``index`` = the prompt's position within its item (for the choice index)."""
    return replace(c, index=prompt_pos)


def _requests(engine: Any, todo: list[JobItem], writer: JobWriter, write_errors: bool, stats: dict[str, Any],
              encoded: dict[int, list[list[int]]] | None = None) -> tuple[list[Request], dict[int, tuple[JobItem, int]]]:
    """Tokenize (the whole job in one batched call) and check every item; bad ones get an error record (on one
    rank only)."""
    requests: list[Request] = []
    owner: dict[int, tuple[JobItem, int]] = {}
    vocab = engine.model.config.vocab_size
    encoded = encode_job(engine, todo) if encoded is None else encoded
    for it in todo:
        if it.error is None:
            param = "messages" if it.kind == "chat" else "prompt"
            try:
                mine: list[Request] = []
                for p, ids in enumerate(encoded[it.line]):
                    if not ids:
                        raise RequestError("empty prompt", param)
                    if (min(ids) < 0 or max(ids) >= vocab) and (bad := [t for t in ids if not 0 <= t < vocab]):
                        raise RequestError(f"token id {bad[0]} is outside the model's vocabulary [0, {vocab})", param)
                    r = Request(len(requests) + len(mine), ids, item_seed(it, p, engine.config.seed))
                    engine.check(r)
                    mine.append(r)
                for p, r in enumerate(mine):
                    owner[r.index] = (it, p)
                requests += mine
                continue
            except RequestError as e:
                it.error = e
            except (ValueError, TypeError, AttributeError, OverflowError) as e:
                it.error = RequestError(str(e)[:500], param)
        if write_errors:
            writer.write(error_record(it))
            stats["errors"] += 1
    return requests, owner


def encode_job(engine: Any, items: list[JobItem]) -> dict[int, list[list[int]]]:
    """line -> the token ids of each prompt of every item without an error, text tokenized in two batched calls
    (the tokenizers library encodes a batch on all cores): completions with the prompt's special tokens (BOS
    policy, ``Tokenizer.encode_prompt``), rendered chats without (the template wrote them). An item whose text
    cannot be encoded gets ``item.error``."""
    out: dict[int, list[list[int]]] = {}
    texts: dict[bool, list[tuple[JobItem, int, str]]] = {True: [], False: []}  # special tokens? -> (item, p, text)
    for it in items:
        if it.error is not None:
            continue
        out[it.line] = [list(p) if not isinstance(p, str) else [] for p in it.prompts]
        for p, prompt in enumerate(it.prompts):
            if isinstance(prompt, str):
                texts[it.kind != "chat"].append((it, p, prompt))
    for special, group in texts.items():
        if not group:
            continue
        if engine.tokenizer is None:
            for it, _, _ in group:
                it.error = RequestError("text prompts need a tokenizer (pass token ids, or --tokenizer)",
                                        "messages" if it.kind == "chat" else "prompt")
            continue
        for (it, p, _), ids in zip(group, _encode_batch(engine.tokenizer, [t for _, _, t in group], special),
                                   strict=True):
            out[it.line][p] = ids
    return out


def _encode_batch(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    """``Tokenizer.encode_prompt`` (special=True) or ``encode`` of every text, in one parallel batched call."""
    inner = getattr(tokenizer, "inner", None)
    if inner is None:  # a tokenizer without the tokenizers library underneath: one call per text
        return [tokenizer.encode_prompt(t) if special else tokenizer.encode(t) for t in texts]
    return [e.ids for e in inner.encode_batch(texts, add_special_tokens=special)]


def item_seed(item: JobItem, prompt_pos: int, job_seed: int) -> SamplingParams:
    """The item's params with its seed resolved: the body's seed, else ``request_seed(job seed, custom_id)``
    (the one owner of seed derivation; a custom_id survives resumes and ranks, a request index does not), with
    ``#p`` appended for the later prompts of a list prompt. The n samples of a prompt then differ by
    ``sample_seed`` in the engine."""
    assert item.params is not None
    if item.params.seed is not None:
        return item.params
    key = str(item.custom_id) if prompt_pos == 0 else f"{item.custom_id}#{prompt_pos}"
    return replace(item.params, seed=request_seed(job_seed, key))


class _progress:
    """A rich progress bar over the job's input lines (done, errors, skipped; output tokens/s), or nothing."""

    def __init__(self, enabled: bool, total_lines: int, skipped: int) -> None:
        self.enabled, self.total, self.skipped = enabled, total_lines, skipped

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda stats, tps: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("lines"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn())
        self.bar.__enter__()
        task = self.bar.add_task("generate", total=self.total, info="")

        def update(stats: dict[str, Any], tps: float) -> None:
            done = stats["requests"] + stats["errors"]
            self.bar.update(task, completed=done + self.skipped,
                            info=f"done {stats['requests']}, errors {stats['errors']}, skipped {self.skipped}, "
                                 f"{tps:,.0f} tok/s")
        return update

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)
