"""The HTTP side of ``batchpilot serve``: OpenAI's completions and chat completions API on Starlette.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` answers with server-sent events,
one ``data:`` chunk per engine step that produced text, then ``data: [DONE]``), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text format). Backpressure: when ``max_queue`` requests are in flight a new one gets
429 with ``Retry-After``. A client that disconnects cancels its request (its KV blocks are freed at the next loop
turn). Shutdown finishes running requests for ``shutdown_timeout_s`` and cancels the rest.
Request bodies are read with the same field rules as offline jobs (``generate/jobs.py``), so a line that works in
``batchpilot generate`` works against the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from batchpilot.generate.engine import Engine
from batchpilot.generate.jobs import JobItem, RequestError, parse_body, response_body
from batchpilot.generate.request import SamplingParams, request_seed
from batchpilot.serve.config import ServeConfig
from batchpilot.serve.loop import EngineLoop, Event, Stream
from batchpilot.serve.metrics import ServeMetrics


def _error(status: int, message: str, *, param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


class Server:
    """What the routes share: the engine loop (started in the app's lifespan), metrics, config."""

    def __init__(self, engine: Engine, cfg: ServeConfig) -> None:
        self.engine, self.cfg = engine, cfg
        self.metrics = ServeMetrics(cfg)
        self.loop: EngineLoop | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.loop = EngineLoop(self.engine, admission=self.cfg.admission, tpot_slo_s=self.cfg.tpot_slo_s,
                               event_loop=asyncio.get_running_loop(), on_first_token=self.metrics.ttft.observe,
                               warm_up=self.cfg.warm_up_graphs)  # token gaps: observed at the end (metrics.finish)
        if self.loop.warmup_seconds:
            print(f"captured decode graphs in {self.loop.warmup_seconds:.1f} s", flush=True)
        self.metrics.bind(self.loop)
        self.loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(self.loop.stop, drain_timeout_s=self.cfg.shutdown_timeout_s)

    # --- routes ---

    async def health(self, request: HTTPRequest) -> Response:
        alive = self.loop is not None and self.loop.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "starting"}, status_code=200 if alive else 503)

    async def models(self, request: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.cfg.served_model_name, "object": "model",
                                                         "created": 0, "owned_by": "batchpilot"}]})

    async def metrics_text(self, request: HTTPRequest) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: HTTPRequest) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: HTTPRequest, *, chat: bool) -> Response:
        assert self.loop is not None
        arrival_s = time.perf_counter()  # TTFT and its phases count from here (serve/metrics.py TTFT_PHASES)
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object")
            parsed = self._parse(body, chat=chat)
        except RequestError as e:
            return _error(400, str(e), param=e.param)
        except (ValueError, TypeError) as e:
            return _error(400, str(e))
        if self.loop.in_flight + len(parsed.prompt_ids) * parsed.n > self.cfg.max_queue:
            self.metrics.rejected.inc()
            return _error(429, f"{self.loop.in_flight} requests in flight (max {self.cfg.max_queue}); retry later",
                          headers={"Retry-After": str(self.cfg.retry_after_s)})
        try:
            streams = self._submit(parsed, arrival_s)
        except ValueError as e:
            return _error(400, str(e), param="messages" if chat else "prompt")
        ids = _Ids(chat=chat, model=self.cfg.served_model_name, include_usage=parsed.include_usage)
        if parsed.stream:
            return StreamingResponse(self._sse(streams[0][1], ids, request), media_type="text/event-stream")
        return await self._whole(streams, parsed.item, ids, request)

    def _parse(self, body: dict[str, Any], *, chat: bool) -> _Parsed:
        """The body with the jobs' rules (``jobs.parse_body``: the same fields, limits and prompt forms), plus the
        server-only ``stream`` / ``stream_options``. A stream carries one choice without logprobs; a body that
        asks for more is a 400 naming the field."""
        body = dict(body)
        stream_mode = body.pop("stream", False)
        if not isinstance(stream_mode, bool):
            raise RequestError("stream must be true or false", "stream")
        options = body.pop("stream_options", None) or {}
        if not isinstance(options, dict) or set(options) - {"include_usage"} or \
                not isinstance(options.get("include_usage", False), bool):
            raise RequestError('stream_options must be {"include_usage": true|false}', "stream_options")
        kind = "chat" if chat else "completion"
        tokenizer = self.engine.tokenizer
        if chat and tokenizer is None:
            raise RequestError("chat requests need a tokenizer (start the server with --tokenizer)", "messages")
        prompts, params, echo = parse_body(body, kind, SamplingParams(max_tokens=self.cfg.max_tokens),
                                           self.cfg.chat_template, self.cfg.special_tokens or {})
        if stream_mode:
            for field, bad in (("n", params.n > 1), ("prompt", len(prompts) > 1), ("echo", echo),
                               ("logprobs", params.logprobs is not None)):
                if bad:
                    raise RequestError(f"{field} is not supported with stream: true (send stream: false)", field)
        prompt_ids = []
        for prompt in prompts:
            if isinstance(prompt, list):
                prompt_ids.append(list(prompt))
            elif tokenizer is None:
                raise RequestError("text prompts need a tokenizer (start the server with --tokenizer)", "prompt")
            else:
                prompt_ids.append(tokenizer.encode(prompt) if chat else self.engine.encode(prompt))
        item = JobItem(0, "server", kind=kind, prompts=prompts, params=params, echo=echo)
        return _Parsed(item, prompt_ids, stream_mode, bool(options.get("include_usage", False)))

    def _submit(self, parsed: _Parsed, arrival_s: float) -> list[tuple[int, Stream]]:
        """One engine request per (prompt, sample): (prompt position, stream). Seeds as in jobs and the engine:
        the body's seed, else ``request_seed(engine seed, a fresh id)``; sample j gets ``sample_seed(seed, j)``."""
        assert self.loop is not None and parsed.item.params is not None
        params = parsed.item.params
        if params.seed is None:
            params = replace(params, seed=request_seed(self.engine.config.seed, uuid.uuid4().hex))
        streams: list[tuple[int, Stream]] = []
        try:
            for p, ids in enumerate(parsed.prompt_ids):
                for j in range(params.n):
                    streams.append((p, self.loop.submit(ids, params, sample_index=j, arrival_s=arrival_s,
                                                        deltas=parsed.stream)))
        except ValueError:
            for _, stream in streams:
                self.loop.cancel(stream)
            raise
        return streams

    async def _sse(self, stream: Stream, ids: _Ids, request: HTTPRequest) -> AsyncIterator[str]:
        assert self.loop is not None
        try:
            event = Event("delta")
            while event.kind == "delta":
                for event in await _pending(stream):
                    if event.kind == "error":
                        yield f"data: {json.dumps({'error': {'message': event.text, 'type': 'server_error'}})}\n\n"
                        break
                    if event.kind == "delta":
                        chunk = f"data: {json.dumps(ids.chunk(event.text, None))}\n\n"
                        if stream.sent_s is None:
                            stream.sent_s = time.perf_counter()
                        yield chunk
                        continue
                    c = event.completion
                    assert c is not None
                    yield f"data: {json.dumps(ids.chunk('', c.finish_reason))}\n\n"
                    if ids.include_usage:  # OpenAI's stream_options.include_usage: a last chunk with no choices
                        yield f"data: {json.dumps(ids.usage_chunk(len(c.prompt_ids), len(c.output_ids)))}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not stream.finished:  # the client went away mid-stream
                self.loop.cancel(stream)
            self.metrics.finish(stream)

    async def _whole(self, streams: list[tuple[int, Stream]], item: JobItem, ids: _Ids,
                     request: HTTPRequest) -> Response:
        """Wait for every choice, then answer with the jobs' response body (``jobs.response_body``)."""
        assert self.loop is not None
        waiters = [asyncio.ensure_future(_final(stream)) for _, stream in streams]
        try:
            while not all(w.done() for w in waiters):
                await asyncio.wait(set(waiters), timeout=0.25, return_when=asyncio.ALL_COMPLETED)
                if not all(w.done() for w in waiters) and await request.is_disconnected():
                    for _, stream in streams:
                        self.loop.cancel(stream)
            events = [w.result() for w in waiters]
        finally:
            for _, stream in streams:
                self.metrics.finish(stream)
        if failed := next((e for e in events if e.kind == "error"), None):
            for _, stream in streams:
                self.loop.cancel(stream)
            return _error(500 if failed.text != "cancelled" else 499, failed.text)
        completions = []
        for (p, _), event in zip(streams, events, strict=True):
            assert event.completion is not None
            completions.append(replace(event.completion, index=p))
        body = response_body(item, completions, ids.model, tokenizer=self.engine.tokenizer)
        body["id"], body["created"] = ids.id, ids.created
        return JSONResponse(body)


async def _pending(stream: Stream) -> list[Event]:
    """The stream's next events (waits for one), consecutive deltas merged: a handler that fell behind the engine
    catches up with one chunk per wake instead of one per step, so the HTTP side's work per second stays bounded
    under load (vLLM's ``stream_interval`` trades the same way)."""
    events = [await stream.events.get()]
    while not stream.events.empty():
        events.append(stream.events.get_nowait())
    merged: list[Event] = []
    for e in events:
        if merged and e.kind == "delta" == merged[-1].kind:
            merged[-1] = Event("delta", merged[-1].text + e.text)
        else:
            merged.append(e)
    return merged


async def _final(stream: Stream) -> Event:
    while True:
        event = await stream.events.get()
        if event.kind != "delta":
            return event


@dataclass(frozen=True, slots=True)
class _Parsed:
    item: JobItem  # kind, prompts (text or ids), params, echo: what jobs.response_body needs
    prompt_ids: list[list[int]]  # per prompt
    stream: bool
    include_usage: bool

    @property
    def n(self) -> int:
        return self.item.params.n if self.item.params is not None else 1


@dataclass(slots=True)
class _Ids:
    """Ids and shapes of one response, as OpenAI writes them (``cmpl-`` / ``chatcmpl-``)."""

    chat: bool
    model: str
    include_usage: bool = False
    id: str = ""
    created: int = 0
    role_sent: bool = False

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {} if self.role_sent else {"role": "assistant"}
            self.role_sent = True
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [choice]}
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": _usage(prompt_tokens,
                                                                                              completion_tokens)}

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": finish_reason, "logprobs": None}
            kind = "chat.completion"
        else:
            choice, kind = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}, \
                "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice],
                "usage": _usage(prompt_tokens, completion_tokens)}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def build_app(engine: Engine, cfg: ServeConfig) -> Starlette:
    server = Server(engine, cfg)
    routes = [Route("/health", server.health), Route("/v1/models", server.models),
              Route("/metrics", server.metrics_text),
              Route("/v1/completions", server.completions, methods=["POST"]),
              Route("/v1/chat/completions", server.chat_completions, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=server.lifespan)
    app.state.server = server
    return app
