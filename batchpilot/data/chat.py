"""Chat fine-tuning data: conversations rendered with the model's chat template, loss on assistant tokens only.

Design: a conversation is a list of ``{role, content}`` messages (the OpenAI shape), read from chat JSONL
(``{"messages": [...]}``) or from instruction/response pairs (``{"prompt": ..., "response": ...}``, field
names configurable). It is rendered through ``chat_template.render_chat``, the one renderer, which always
appends the generation prompt. Which characters belong to an assistant turn is found by rendering message
prefixes, which works with any template: for assistant message ``k``, ``render(messages[:k])`` ends with the
generation prompt (the assistant header), so the turn starts right after it inside ``render(messages[:k+1])``;
it covers the message's content and the special token that closes it (``<|im_end|>``, ``<|eot_id|>``, ...),
so the model learns to stop. Templates that rewrite earlier turns (a later render is not an extension of an
earlier one) are refused with a clear error rather than masked wrongly.

The text is encoded segment by segment (prompt parts, assistant parts), as generation sees it: the prompt is
encoded alone and the answer's tokens follow. The cost is ``assistant turns + 1`` renders per conversation
(quadratic in turns; a renderer option returning the assistant character spans would make it one).

A token's flags (one ``uint8`` per token, stored beside the token shards): bit 0 ``LOSS`` = the token is a
training target, bit 1 ``START`` = the token opens a conversation (positions restart at 0 there).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batchpilot.data.chat_template import render_chat
from batchpilot.data.tokenizer import Tokenizer

LOSS, START = np.uint8(1), np.uint8(2)
LOSS_ON = ("assistant", "all")

Message = dict[str, str]


@dataclass(kw_only=True, slots=True)
class ChatConfig:
    messages_field: str = "messages"  # chat JSONL: a list of {role, content}
    prompt_field: str = "prompt"  # instruction/response pairs, used when a record has no messages_field
    response_field: str = "response"
    loss_on: str = "assistant"  # "assistant": loss on assistant turns only; "all": on every token

    def __post_init__(self) -> None:
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {self.loss_on!r}")
        if not (self.messages_field and self.prompt_field and self.response_field):
            raise ValueError("--messages-field, --prompt-field and --response-field must be non-empty")


def conversation_of(record: Any, cfg: ChatConfig) -> list[Message]:
    """The messages of one JSONL record: its ``messages_field``, or a user/assistant pair from the prompt fields."""
    if not isinstance(record, dict):
        raise ValueError("a chat record must be a JSON object")
    if cfg.messages_field in record:
        messages = record[cfg.messages_field]
    elif cfg.prompt_field in record and cfg.response_field in record:
        messages = [{"role": "user", "content": record[cfg.prompt_field]},
                    {"role": "assistant", "content": record[cfg.response_field]}]
    else:
        raise ValueError(f"a chat record needs {cfg.messages_field!r} or both {cfg.prompt_field!r} and "
                         f"{cfg.response_field!r} (see --messages-field/--prompt-field/--response-field)")
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError(f"{cfg.messages_field!r} must be a list of {{role: str, content: str}} objects")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("a conversation has no assistant message (nothing to learn from)")
    return messages


def read_conversations(path: str | Path, cfg: ChatConfig) -> Iterator[list[Message]]:
    """Conversations from a ``.jsonl`` file or a directory of them (walked in sorted order)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    files = sorted(p for p in path.rglob("*.jsonl")) if path.is_dir() else [path]
    if not files or any(f.suffix != ".jsonl" for f in files):
        raise ValueError(f"{path}: chat data must be .jsonl files")
    for file in files:
        with open(file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{file}:{line_no}: invalid JSON ({e.msg})") from None
                try:
                    yield conversation_of(record, cfg)
                except ValueError as e:
                    raise ValueError(f"{file}:{line_no}: {e}") from None


def render_segments(messages: list[Message], template: str, special_tokens: dict[str, str],
                    closing_tokens: list[str]) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, is_assistant)`` pieces, ending after the last assistant turn.

    ``closing_tokens`` are the special-token strings that may close a turn; the first one right after an
    assistant message's content belongs to the turn.
    """
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ValueError("a conversation has no assistant message (nothing to learn from)")
    # render(messages[:k]) for each assistant turn k, then the whole conversation up to the last one: the
    # turn k is read in the next render, which extends it (one render per turn, plus one).
    renders = [render_chat(messages[:k], template, special_tokens) for k in (*turns, turns[-1] + 1)]
    segments: list[tuple[str, bool]] = []
    done, rendered_so_far = 0, ""  # the conversation's text emitted so far
    for k, before, rendered in zip(turns, renders, renders[1:]):
        if not rendered.startswith(before) or not rendered.startswith(rendered_so_far):
            raise ValueError(f"chat template does not render message {k} as an extension of the messages before it "
                             "(a template that rewrites earlier turns cannot be masked by prefixes)")
        start = len(before)
        content = messages[k]["content"].strip() or messages[k]["content"]  # templates may trim the content
        content_at = rendered.find(content, start)
        if content_at < 0:
            raise ValueError(f"chat template does not render assistant message {k}'s content verbatim")
        end = content_at + len(content)
        after_space = len(rendered) - len(rendered[end:].lstrip(" \n"))
        end = next((after_space + len(t) for t in closing_tokens if rendered.startswith(t, after_space)), end)
        segments += [(rendered[done:start], False), (rendered[start:end], True)]
        done, rendered_so_far = end, rendered[:end]
    return [(text, is_assistant) for text, is_assistant in segments if text]


def encode_conversation(messages: list[Message], tokenizer: Tokenizer, template: str,
                        special_tokens: dict[str, str], loss_on: str = "assistant") -> tuple[np.ndarray, np.ndarray]:
    """(token ids int64 (L,), flags uint8 (L,)) of one conversation; see the module docstring for the flags."""
    segments = render_segments(messages, template, special_tokens, closing_tokens(tokenizer))
    pieces = tokenizer.encode_batch([text for text, _ in segments])
    ids = np.fromiter((i for piece in pieces for i in piece), dtype=np.int64)
    flags = np.concatenate([np.full(len(piece), LOSS if (is_assistant or loss_on == "all") else 0, np.uint8)
                            for piece, (_, is_assistant) in zip(pieces, segments)])
    if len(ids) == 0:
        raise ValueError("a conversation rendered to no tokens")
    flags[0] = START  # the first token is never a target: nothing precedes it in its conversation
    return ids, flags


def closing_tokens(tokenizer: Tokenizer) -> list[str]:
    """The tokenizer's special-token strings, longest first (the candidates that close a turn)."""
    added = tokenizer.inner.get_added_tokens_decoder().values()
    return sorted((t.content for t in added if t.special), key=len, reverse=True)
