"""Chat templates: read a model directory's template and render messages with it in a jinja2 sandbox.

Templates come from model files, so they run in jinja2's ``ImmutableSandboxedEnvironment`` (no attribute
access to Python internals, no mutation), under a time and output-size limit (a template with nested loops must
not hang a job). They render with transformers' semantics (``apply_chat_template``): ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, ``tojson`` as transformers defines it (``ensure_ascii=False``,
optional ``indent``/``separators``/``sort_keys``), and the globals ``raise_exception`` and ``strftime_now``.
Generation (``generate/jobs.py``) and chat fine-tuning data both render through here, so a fine-tuned model is
prompted exactly as it was trained. Templates are read from ``chat_template.jinja`` (what transformers 5 writes)
or from ``tokenizer_config.json``.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

TEMPLATE_FILE = "chat_template.jinja"


@dataclass(kw_only=True, slots=True, frozen=True)
class RenderLimits:
    """Per render: wall-clock seconds and characters of output."""

    max_seconds: float = 2.0
    max_chars: int = 4 * 2**20

    def __post_init__(self) -> None:
        if not self.max_seconds > 0 or self.max_chars < 1:
            raise ValueError("RenderLimits needs max_seconds > 0 and max_chars >= 1")


class _Timeout(Exception):
    pass


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' ``tojson`` (not jinja2's, which HTML-escapes and sorts keys)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=64)
def compiled_template(template: str) -> Any:
    """The template compiled once per template string (a server renders the same few templates per request,
    and chat data preparation renders one per assistant turn); jinja2 templates render safely from many
    threads. A template that does not compile raises each time (exceptions are not cached)."""
    return _environment().from_string(template)


def render_chat(messages: Any, template: str, special_tokens: dict[str, str], *,
                limits: RenderLimits | None = None, add_generation_prompt: bool = True) -> str:
    """The chat template rendered in jinja2's immutable sandbox, within ``limits``; ValueError on any fault."""
    from jinja2 import TemplateError

    limits = limits or RenderLimits()
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m
                                                                for m in messages):
        raise ValueError("body.messages must be a non-empty list of {role, content} objects")
    try:
        tmpl = compiled_template(template)
        with _deadline(limits.max_seconds):
            parts, size = [], 0
            for chunk in tmpl.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                       **special_tokens):
                size += len(chunk)
                if size > limits.max_chars:
                    raise ValueError(f"chat template output exceeds {limits.max_chars} characters")
                parts.append(chunk)
        return "".join(parts)
    except _Timeout:
        raise ValueError(f"chat template took longer than {limits.max_seconds:g} s to render") from None
    except TemplateError as e:
        raise ValueError(f"chat template: {str(e)[:300]}") from None
    except (TypeError, AttributeError, KeyError, IndexError, ZeroDivisionError, OverflowError, RecursionError,
            UnicodeError) as e:  # a template that fails on these messages
        raise ValueError(f"chat template: {type(e).__name__}: {str(e)[:300]}") from None


class _deadline:
    """Raise ``_Timeout`` in this thread after ``seconds``: SIGALRM in the main thread (interrupts any Python
    loop at no cost), a line tracer elsewhere (signals only reach the main thread)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.main = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")

    def __enter__(self) -> None:
        self.end = time.monotonic() + self.seconds
        if self.main:
            self.previous = signal.signal(signal.SIGALRM, self._alarm)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        else:
            self.trace = sys.gettrace()
            sys.settrace(self._tracer)

    def __exit__(self, *exc: object) -> None:
        if self.main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        else:
            sys.settrace(self.trace)

    def _alarm(self, signum: int, frame: Any) -> None:
        raise _Timeout

    def _tracer(self, frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > self.end:
            raise _Timeout
        return self._tracer


def chat_template_of(model_dir: str | os.PathLike | None) -> tuple[str | None, dict[str, str]]:
    """(chat_template, {bos_token, eos_token, ...}) of a model directory: ``chat_template.jinja`` first (what
    transformers 5 writes), else ``tokenizer_config.json``'s ``chat_template`` (a string or a named list)."""
    if not model_dir:
        return None, {}
    cfg = read_tokenizer_config(Path(model_dir))
    template = read_chat_template(Path(model_dir), cfg)
    tokens = {k: (v.get("content") if isinstance(v, dict) else v)
              for k in ("bos_token", "eos_token", "pad_token", "unk_token") if (v := cfg.get(k)) is not None}
    return template, {k: v for k, v in tokens.items() if isinstance(v, str)}


def read_tokenizer_config(model_dir: Path) -> dict[str, Any]:
    file = model_dir / "tokenizer_config.json"
    if not file.is_file():
        return {}
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{file}: not valid JSON") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{file}: not a JSON object")
    return cfg


def read_chat_template(model_dir: Path, tokenizer_config: dict[str, Any] | None = None) -> str | None:
    file = model_dir / TEMPLATE_FILE
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = (tokenizer_config if tokenizer_config is not None else read_tokenizer_config(model_dir)).get(
        "chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{model_dir}: chat_template must be a string or a list of named templates")
    return template
