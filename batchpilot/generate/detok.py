"""Incremental detokenization for stop strings: O(new tokens) per step instead of decoding the whole output.

Decoding a request's whole output after every token to look for its stop strings costs O(L) per token, O(L^2)
per request: on a 1,000-row batch it was most of the host time of a step. ``IncrementalText`` follows vLLM's
incremental detokenizer (``detokenize_incrementally``, after HF's ``TextStreamer``): it decodes the window
``ids[prefix:]`` and keeps what it adds after ``ids[prefix:read]``, holding text back while it ends in a partial
UTF-8 character (U+FFFD), so that new tokens are read in the context of the tokens before them (BPE leading
spaces, SentencePiece's "▁", multi-byte characters split over byte tokens). Unlike vLLM it also moves on past
tokens that decode to nothing (a random-weight model's ids outside the tokenizer's vocabulary), so the window
stays short. A stop string is searched only where new text can complete one: the new text and the
``max(len(stop)) - 1`` characters before it.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"
MAX_HELD_TOKENS = 16  # a window still ending in a partial character after this many tokens is taken as it is


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class IncrementalText:
    """The text of a growing token list and the first stop string in it, a couple of short decodes per call."""

    __slots__ = ("stops", "keep", "text", "prefix", "read")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.keep = max(map(len, stops), default=1) - 1  # characters before new text that a stop can start in
        self.text = ""  # the text of ids[:read]
        self.prefix = self.read = 0

    def state(self) -> tuple[int, int, int]:
        return len(self.text), self.prefix, self.read

    def restore(self, state: tuple[int, int, int]) -> None:
        n, self.prefix, self.read = state
        self.text = self.text[:n]

    def add(self, tokenizer: Decoder, ids: list[int]) -> int:
        """Read ``ids[read:]`` (the caller appended them); the index in ``text`` of the first stop string that the
        new text completes, or -1."""
        if self.read >= len(ids):
            return -1
        old = len(self.text)
        prefix_text = tokenizer.decode(ids[self.prefix:self.read])
        full = tokenizer.decode(ids[self.prefix:])
        if full.endswith(REPLACEMENT) and len(ids) - self.read < MAX_HELD_TOKENS:
            return -1  # a character split over tokens: read it once its last byte is here
        self.text += full[len(prefix_text):]
        self.prefix, self.read = self.read, len(ids)
        start = max(0, old - self.keep)
        return min((i for s in self.stops if (i := self.text.find(s, start)) >= 0), default=-1)
