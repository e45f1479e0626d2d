"""Naive reference generation: one sequence at a time, a contiguous KV cache, greedy. For tests only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ContiguousKV:
    """attn_meta that appends each layer's K/V to a growing (1, K, T, E) tensor."""

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
        if layer_idx in self.k:
            k = torch.cat([self.k[layer_idx], k], dim=2)
            v = torch.cat([self.v[layer_idx], v], dim=2)
        self.k[layer_idx], self.v[layer_idx] = k, v
        T, L = q.shape[2], k.shape[2]
        mask = torch.ones(T, L, dtype=torch.bool).tril(diagonal=L - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


@torch.no_grad()
def greedy_reference(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    cache, out = ContiguousKV(), []
    ids, pos = torch.tensor([prompt]), torch.arange(len(prompt))[None]
    for _ in range(max_tokens):
        token = model(ids, position_ids=pos, attn_meta=cache)[0, -1].argmax().item()
        out.append(token)
        ids, pos = torch.tensor([[token]]), pos[:, -1:] + 1
    return out


@torch.no_grad()
def processed_greedy_reference(model: torch.nn.Module, prompt: list[int], max_tokens: int, *, presence: float = 0.0,
                               frequency: float = 0.0, bias: dict[int, float] | None = None, banned: int | None = None,
                               min_tokens: int = 0) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy over hand-processed logits, one full forward per token (no cache): OpenAI's penalty formula
    (logit - presence * [count > 0] - frequency * count over the output so far), then logit_bias, then
    ``banned`` at -inf while fewer than ``min_tokens`` are out. Returns the tokens and each step's
    log-softmax of the processed logits."""
    out, lps = [], []
    for _ in range(max_tokens):
        logits = model(torch.tensor([prompt + out]))[0, -1].float()
        counts = torch.zeros_like(logits)
        for t in out:
            counts[t] += 1
        logits = logits - presence * (counts > 0).float() - frequency * counts
        for t, b in (bias or {}).items():
            logits[t] += b
        if banned is not None and len(out) < min_tokens:
            logits[banned] = float("-inf")
        lps.append(logits.log_softmax(-1))
        out.append(int(logits.argmax()))
    return out, lps
