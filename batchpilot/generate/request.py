"""Per-request state (``Request``), sampling options (``SamplingParams``) and the returned ``Completion``.

A request's tokens are ``prompt_ids + output_ids``. When it belongs to a prefix group, the first
``prefix_len`` of them live in the group's shared KV blocks; the rest ("own" tokens) live in the
request's own blocks. ``num_computed`` counts own tokens whose KV is in the cache. Preemption sets it
back to 0 and keeps ``output_ids``, so recomputation rebuilds exactly the same cache.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(kw_only=True, slots=True, frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None  # None: derived from the engine seed and the request index
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Group:
    """Requests sharing ``prefix_ids``; the prefix KV is computed once and freed when the group is done.

    ``prefix`` is a pseudo-request (no output) that prefills the shared tokens into ``prefix.blocks``.
    """

    prefix: Request
    members: list[Request]
    num_unfinished: int = 0

    @property
    def ready(self) -> bool:
        return self.prefix.num_computed == len(self.prefix.prompt_ids)


@dataclass(eq=False, slots=True)
class Request:
    index: int  # position in the job's input; results come back in this order
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    output_ids: list[int] = field(default_factory=list)
    group: Group | None = None
    prefix_len: int = 0  # leading tokens held by the group's shared blocks
    is_prefix: bool = False  # the pseudo-request that fills a group's shared blocks
    num_computed: int = 0  # own tokens whose KV is cached
    blocks: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    text: str = ""
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_own_tokens(self) -> int:
        return self.num_tokens - self.prefix_len

    @property
    def num_uncomputed(self) -> int:
        return self.num_own_tokens - self.num_computed

    @property
    def in_decode(self) -> bool:
        """Prompt fully computed: each step adds one token."""
        n_out = len(self.output_ids)
        return n_out > 0 and len(self.prompt_ids) + n_out - self.prefix_len - self.num_computed == 1

    def token_at(self, own_index: int) -> int:
        i = self.prefix_len + own_index
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]


@dataclass(frozen=True, slots=True)
class Completion:
    index: int
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    num_preemptions: int = 0

    @classmethod
    def of(cls, r: Request) -> Completion:
        assert r.finish_reason is not None
        return cls(r.index, r.prompt_ids, r.output_ids, r.text, r.finish_reason, r.num_preemptions)
