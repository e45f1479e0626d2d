"""Log-likelihoods of continuations through ``Engine.score`` (prefill only, shared prefixes prefilled once).

``reference_score`` is what the engine's ``score`` is checked against: one fp32-logit forward per
(context + continuation), ``log_softmax`` at the positions that predict the continuation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from batchpilot.generate.engine import Engine


@dataclass(frozen=True, slots=True)
class Score:
    logprobs: list[float]  # log p(continuation[i] | context + continuation[:i])
    is_greedy: bool  # every continuation token is the argmax at its position


def score(engine: Engine, contexts: Sequence[list[int]], continuations: Sequence[list[int]]) -> list[Score]:
    """Per-token logprobs of each continuation after its context (an empty context: the first continuation
    token is not scored, as for lm-eval's rolling windows), from ``Engine.score``."""
    return [Score(list(s.logprobs), bool(s.is_greedy)) for s in engine.score(contexts, continuations)]


@torch.no_grad()
def reference_score(model: torch.nn.Module, context: list[int], continuation: list[int]) -> Score:
    ids = context + continuation
    if not continuation or len(ids) < 2:
        raise ValueError("need a non-empty continuation and >= 2 tokens in all")
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids[:-1]], device=device))[0].float()  # (T-1, V): position t predicts ids[t+1]
    first = max(len(context), 1) - 1  # the position predicting the first scored continuation token
    logp = torch.log_softmax(logits[first:], dim=-1)  # (n, V)
    targets = torch.tensor(ids[first + 1:], device=device)
    picked = logp.gather(1, targets[:, None])[:, 0]
    return Score(picked.tolist(), bool((logp.argmax(-1) == targets).all()))
