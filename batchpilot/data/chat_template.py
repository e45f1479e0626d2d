"""Chat templates: read a model directory's template and render messages with it in a jinja2 sandbox.

Templates come from model files, so they run in jinja2's ``ImmutableSandboxedEnvironment`` (no attribute
access to Python internals, no mutation). Generation (``generate/jobs.py``) and chat fine-tuning data both
render through here, so a fine-tuned model is prompted exactly as it was trained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def render_chat(messages: Any, template: str, special_tokens: dict[str, str]) -> str:
    """The chat template rendered in jinja2's immutable sandbox (templates come from model files)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("body.messages must be a list of {role, content} objects")

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special_tokens)
    except TemplateError as e:
        raise ValueError(f"chat template: {e}") from None


def chat_template_of(model_dir: str | os.PathLike | None) -> tuple[str | None, dict[str, str]]:
    """(chat_template, {bos_token, eos_token}) from a model directory's tokenizer_config.json."""
    file = Path(model_dir) / "tokenizer_config.json" if model_dir else None
    if file is None or not file.is_file():
        return None, {}
    cfg = json.loads(file.read_text())
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    tokens = {k: (v.get("content") if isinstance(v, dict) else v) for k in ("bos_token", "eos_token")
              if (v := cfg.get(k)) is not None}
    return template, tokens
