"""Per-request state (``Request``), sampling options (``SamplingParams``) and the returned ``Completion``.

A request's tokens are ``prompt_ids + output_ids``. When it belongs to a prefix group, the first
``prefix_len`` of them live in the group's shared KV blocks; the rest ("own" tokens) live in the
request's own blocks. ``num_computed`` counts own tokens whose KV is in the cache. Preemption sets it
back to 0 and keeps ``output_ids``, so recomputation rebuilds exactly the same cache.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field

import torch

from batchpilot.generate.detok import IncrementalText


def request_seed(engine_seed: int, key: str) -> int:
    """The seed of a request that names none: a stable 63-bit hash of (engine seed, key).

    The one owner of seed derivation. Key by something that survives a resume (a job's ``custom_id``;
    the engine uses ``str(index)`` for requests without one), never by a position that can shift.
    """
    digest = hashlib.blake2b(f"{engine_seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_seed(seed: int, sample_index: int) -> int:
    """Seed of sample j of a request with ``n`` > 1: sample 0 keeps the request's seed (n = 1 is unchanged)."""
    return seed if sample_index == 0 else request_seed(seed, f"sample-{sample_index}")


@dataclass(kw_only=True, slots=True, frozen=True)
class SamplingParams:
    """One request's sampling options. Ranges follow OpenAI's API reference (completions / chat)."""

    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop strings are ignored before this many tokens
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None  # None: request_seed(engine seed, request key)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n: int = 1  # samples per prompt; they share the prompt's KV through the prefix machinery
    logprobs: int | None = None  # None: none; k >= 0: each output token's logprob plus the top-k alternatives
    prompt_logprobs: int | None = None  # echo: the prompt tokens' logprobs (plus top-k), from prefill
    presence_penalty: float = 0.0  # OpenAI: logit -= presence * (count > 0) + frequency * count,
    frequency_penalty: float = 0.0  # counts over the output tokens so far
    repetition_penalty: float = 1.0  # HF/vLLM over prompt + output tokens: logit / p if logit > 0 else logit * p
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to the logit), sorted by id

    def __post_init__(self) -> None:
        for name in ("max_tokens", "min_tokens", "top_k"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= 20:
                raise ValueError(f"{name} must be in [0, 20], got {k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        ids = [t for t, _ in self.logit_bias]
        if ids != sorted(set(ids)) or any(t < 0 for t in ids):
            raise ValueError("logit_bias must hold distinct non-negative token ids, sorted")
        if any(not -100 <= b <= 100 for _, b in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")

    @property
    def penalised(self) -> bool:
        """Some logit processing before sampling (penalties, bias, min_tokens)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.logit_bias or self.min_tokens)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float  # log-softmax of the (penalised, biased, temperature-1) logits; prompt tokens: of the model's
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the top-k, best first

    def truncated(self, k: int) -> TokenLogprob:
        """The same with only the best k alternatives (a batch computes the largest k any row asked for)."""
        return self if len(self.top) <= k else TokenLogprob(self.token_id, self.logprob, self.top[:k])


@dataclass(frozen=True, slots=True)
class Score:
    logprobs: list[float]  # log p(continuation[i] | context + continuation[:i]) for each scored continuation token
    is_greedy: bool  # every scored continuation token is the argmax at its position


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
    # prompt_logprobs: (V,) log-probs at the prefix's last position, which predict each member's first own token
    last_logprobs: torch.Tensor | None = None

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
    sample_index: int = 0  # 0..n-1 of a request with n > 1
    seed: int = 0  # the sampling seed (resolved by the engine from params.seed or request_seed)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token, when asked
    prompt_logprobs: dict[int, TokenLogprob] = field(default_factory=dict)  # prompt position -> its logprob
    detok: IncrementalText | None = None  # the output's text so far, for stop strings (engine._accept)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def shared(self) -> Group:
        """The prefix group of a request with ``prefix_len`` > 0."""
        assert self.group is not None, "a request with a shared prefix belongs to a group"
        return self.group

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
    index: int  # the request's index in the job
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    num_preemptions: int = 0
    sample_index: int = 0  # 0..n-1 for n > 1
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per output token when asked
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # one per prompt token (first: None)

    @classmethod
    def of(cls, r: Request) -> Completion:
        assert r.finish_reason is not None
        p = r.params
        logprobs = tuple(r.logprobs[:len(r.output_ids)]) if p.logprobs is not None else None
        prompt = None
        if p.prompt_logprobs is not None:
            prompt = (None, *(r.prompt_logprobs.get(i) for i in range(1, len(r.prompt_ids))))
        return cls(r.index, r.prompt_ids, r.output_ids, r.text, r.finish_reason, r.num_preemptions,
                   r.sample_index, logprobs, prompt)
