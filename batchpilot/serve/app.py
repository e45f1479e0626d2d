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
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from batchpilot.data.chat_template import render_chat
from batchpilot.generate.engine import Engine
from batchpilot.generate.jobs import body_params
from batchpilot.generate.request import SamplingParams
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
                               on_token_gap=self.metrics.tpot.observe)
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
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise ValueError("the request body must be a JSON object")
            prompt_ids, params, stream_mode = self._parse(body, chat=chat)
        except (ValueError, TypeError) as e:
            return _error(400, str(e))
        if self.loop.in_flight >= self.cfg.max_queue:
            self.metrics.rejected.inc()
            return _error(429, f"{self.loop.in_flight} requests in flight (max {self.cfg.max_queue}); retry later",
                          headers={"Retry-After": str(self.cfg.retry_after_s)})
        try:
            stream = self.loop.submit(prompt_ids, params)
        except ValueError as e:
            return _error(400, str(e))
        ids = _Ids(chat=chat, model=self.cfg.served_model_name, include_usage=body["_include_usage"])
        if stream_mode:
            return StreamingResponse(self._sse(stream, ids, request), media_type="text/event-stream")
        return await self._whole(stream, ids, request)

    def _parse(self, body: dict[str, Any], *, chat: bool) -> tuple[list[int], SamplingParams, bool]:
        stream_mode = body.get("stream", False)
        if not isinstance(stream_mode, bool):
            raise ValueError("stream must be true or false")
        options = body.pop("stream_options", None) or {}
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise ValueError("stream_options must be {\"include_usage\": true|false}")
        body["_include_usage"] = bool(options.get("include_usage", False))
        params = body_params(body, SamplingParams(max_tokens=self.cfg.max_tokens))
        tokenizer = self.engine.tokenizer
        if chat:
            if self.cfg.chat_template is None or tokenizer is None:
                raise ValueError("this model has no chat template; use /v1/completions")
            text = render_chat(body.get("messages"), self.cfg.chat_template, self.cfg.special_tokens or {})
            return tokenizer.encode(text), params, stream_mode
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            return list(prompt), params, stream_mode
        if not isinstance(prompt, str):
            raise ValueError("prompt must be a string or a list of token ids")
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer (start the server with --tokenizer)")
        return self.engine.encode(prompt), params, stream_mode

    async def _sse(self, stream: Stream, ids: _Ids, request: HTTPRequest) -> AsyncIterator[str]:
        assert self.loop is not None
        try:
            while True:
                event = await stream.events.get()
                if event.kind == "error":
                    yield f"data: {json.dumps({'error': {'message': event.text, 'type': 'server_error'}})}\n\n"
                    break
                if event.kind == "delta":
                    yield f"data: {json.dumps(ids.chunk(event.text, None))}\n\n"
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

    async def _whole(self, stream: Stream, ids: _Ids, request: HTTPRequest) -> Response:
        assert self.loop is not None
        waiter = asyncio.ensure_future(_final(stream))
        try:
            while not waiter.done():
                await asyncio.wait({waiter}, timeout=0.25)
                if not waiter.done() and await request.is_disconnected():
                    self.loop.cancel(stream)
            event = waiter.result()
        finally:
            self.metrics.finish(stream)
        if event.kind == "error":
            return _error(500 if event.text != "cancelled" else 499, event.text)
        assert event.completion is not None
        return JSONResponse(ids.whole(event.completion.text, event.completion.finish_reason,
                                      len(event.completion.prompt_ids), len(event.completion.output_ids)))


async def _final(stream: Stream) -> Event:
    while True:
        event = await stream.events.get()
        if event.kind != "delta":
            return event


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
