"""Offline jobs in the OpenAI Batch format: read requests, write results incrementally, resume.

Input: JSONL lines ``{"custom_id", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions",
"body": {...}}`` (``prompt`` text or token ids; or ``messages``, rendered with the model's chat
template in a sandboxed jinja2 environment), or a plain text file with one prompt per line
(custom_id ``line-N``). A bad line becomes an error record; the job goes on.
Output: one JSON line per request in completion order, appended and flushed as each finishes, so an
interrupted job loses nothing; running the same job again skips custom_ids already in the output.
With several ranks each writes ``OUT.partR``; rank 0 merges everything in input order at the end.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from batchpilot.data.chat_template import render_chat
from batchpilot.io import write_text_atomic
from batchpilot.generate.request import Completion, Request, SamplingParams

URLS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}


@dataclass(slots=True)
class JobItem:
    line: int  # 0-based input line; the merge order
    custom_id: str
    kind: str = "completion"  # or "chat"
    prompt: str | list[int] | None = None  # chat prompts are already rendered text
    params: SamplingParams | None = None
    error: str | None = None


def read_job(path: str | os.PathLike, defaults: SamplingParams, *, chat_template: str | None = None,
             special_tokens: dict[str, str] | None = None) -> list[JobItem]:
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [JobItem(i, f"line-{i + 1}", prompt=t, params=defaults) for i, t in enumerate(lines) if t.strip()]
    items = [parse_line(t, i, defaults, chat_template, special_tokens or {}) for i, t in enumerate(lines) if t.strip()]
    seen: set[str] = set()
    for it in items:
        if it.custom_id in seen and it.error is None:
            it.error = f"duplicate custom_id {it.custom_id!r}"
        seen.add(it.custom_id)
    return items


def parse_line(text: str, line: int, defaults: SamplingParams, chat_template: str | None,
               special_tokens: dict[str, str]) -> JobItem:
    item = JobItem(line, f"line-{line + 1}")
    try:
        obj = json.loads(text)
        item.custom_id = str(obj.get("custom_id") or item.custom_id)
        item.kind = URLS.get(obj.get("url", "/v1/completions"), "")
        body = obj.get("body")
        if not item.kind or not isinstance(body, dict):
            raise ValueError(f"need url in {sorted(URLS)} and a body object")
        item.params = body_params(body, defaults)
        if item.kind == "chat":
            if chat_template is None:
                raise ValueError("chat request but the model has no chat_template")
            item.prompt = render_chat(body.get("messages"), chat_template, special_tokens)
        else:
            item.prompt = body.get("prompt")
            if not (isinstance(item.prompt, str) or _is_token_list(item.prompt)):
                raise ValueError("body.prompt must be a string or a list of token ids")
    except (ValueError, TypeError, AttributeError) as e:  # json.JSONDecodeError is a ValueError
        item.error = f"line {line + 1}: {e}"
    return item


def body_params(body: dict[str, Any], defaults: SamplingParams) -> SamplingParams:
    stop = body.get("stop", defaults.stop)
    return SamplingParams(
        max_tokens=int(body.get("max_tokens", body.get("max_completion_tokens", defaults.max_tokens))),
        temperature=float(body.get("temperature", defaults.temperature)),
        top_k=int(body.get("top_k", defaults.top_k)),
        top_p=float(body.get("top_p", defaults.top_p)),
        seed=body.get("seed", defaults.seed),
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        ignore_eos=bool(body.get("ignore_eos", defaults.ignore_eos)),
    )


def _is_token_list(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


# --- output ---

def done_ids(path: Path) -> set[str]:
    """custom_ids already answered in ``path``; a torn last line (crash mid-write) is cut off first."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        path.write_bytes(data)
    return {json.loads(line)["custom_id"] for line in data.decode().splitlines() if line.strip()}


def result_record(item: JobItem, c: Completion, model: str, *, token_ids: bool = False) -> dict[str, Any]:
    """An OpenAI Batch output line; ``token_ids`` adds the generated ids (jobs without a tokenizer)."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": c.finish_reason}
    if item.kind == "chat":
        choice["message"] = {"role": "assistant", "content": c.text}
    else:
        choice["text"] = c.text
    if token_ids:
        choice["token_ids"] = c.output_ids
    n_in, n_out = len(c.prompt_ids), len(c.output_ids)
    body = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion" if item.kind == "chat" else
            "text_completion", "created": int(time.time()), "model": model, "choices": [choice],
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": item.custom_id,
            "response": {"status_code": 200, "request_id": body["id"], "body": body}, "error": None}


def error_record(item: JobItem) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": item.custom_id, "response": None,
            "error": {"code": "invalid_request", "message": item.error}}


class JobWriter:
    """Appends one JSON line per record and flushes it, so a crash loses at most the line being written."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def part_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.part{rank}")


def merge_parts(out: Path, world_size: int, order: dict[str, int]) -> None:
    """Rank 0: every record of ``out`` and the part files, in input order, written atomically."""
    records = []
    for f in [out] + [part_path(out, r) for r in range(world_size)]:
        if f.is_file():
            records += [json.loads(x) for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]
    records.sort(key=lambda rec: order.get(rec["custom_id"], len(order)))
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    for r in range(world_size):
        part_path(out, r).unlink(missing_ok=True)


def answered_ids(out: Path, world_size: int = 1) -> set[str]:
    """custom_ids answered in ``out`` or in part files left by an interrupted multi-rank run.

    With several ranks, every rank must read this before any rank writes (the CLI puts a barrier after).
    """
    return done_ids(out).union(*(done_ids(part_path(out, r)) for r in range(world_size)))


def run_job(engine: Any, items: list[JobItem], out: Path, *, model: str, done: set[str] | None = None,
            rank: int = 0, world_size: int = 1, progress: bool = True) -> dict[str, Any]:
    """Run the items not in ``done`` (default: answered in ``out``); write each result as it finishes."""
    done = answered_ids(out, world_size) if done is None else done
    todo = [it for it in items if it.custom_id not in done]
    writer = JobWriter(out if world_size == 1 else part_path(out, rank))
    requests, by_index = _requests(engine, todo, writer, write_errors=rank == 0)
    start, n_out, n_done, lengths = time.perf_counter(), 0, 0, []
    try:
        with _progress(progress and rank == 0, len(requests)) as update:
            for c in engine.run(requests, rank=rank, world_size=world_size):
                writer.write(result_record(by_index[c.index], c, model, token_ids=engine.tokenizer is None))
                n_out, n_done = n_out + len(c.output_ids), n_done + 1
                lengths.append((len(c.prompt_ids), len(c.output_ids)))
                update(n_done, n_out / max(1e-9, time.perf_counter() - start))
    finally:
        writer.close()
    seconds = time.perf_counter() - start
    return {"requests": n_done, "skipped": len(items) - len(todo), "errors": len(todo) - len(requests),
            "output_tokens": n_out, "seconds": seconds, "output_tokens_per_s": n_out / max(seconds, 1e-9),
            "lengths": lengths}


def _requests(engine: Any, todo: list[JobItem], writer: JobWriter,
              write_errors: bool) -> tuple[list[Request], dict[int, JobItem]]:
    """Tokenize and check every item; bad ones get an error record (on one rank only)."""
    requests, by_index = [], {}
    for it in todo:
        if it.error is None:
            try:
                ids = engine.tokenizer.encode(it.prompt) if it.kind == "chat" else engine.encode(it.prompt)
                params = it.params
                if params.seed is None:  # stable across resumes: from the job seed and the custom_id
                    params = replace(params, seed=zlib.crc32(f"{engine.config.seed}:{it.custom_id}".encode()))
                r = Request(len(requests), ids, params)
                engine.check(r)
                by_index[r.index] = it
                requests.append(r)
                continue
            except (ValueError, AttributeError) as e:
                it.error = f"line {it.line + 1}: {e}"
        if write_errors:
            writer.write(error_record(it))
    return requests, by_index


class _progress:
    """A rich progress bar (requests done, output tokens/s), or nothing when disabled."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda done, tps: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[tps]}"),
                            TimeElapsedColumn())
        self.bar.__enter__()
        task = self.bar.add_task("generate", total=self.total, tps="")
        return lambda done, tps: self.bar.update(task, completed=done, tps=f"{tps:,.0f} tok/s")

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)

