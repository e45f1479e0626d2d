"""Batched sampling on the device: greedy, temperature, top-k, top-p, per-request seeds, no host sync.

Randomness is a counter-based hash of (seed, step, token id) (splitmix64's finaliser on int64
tensors) turned into Gumbel noise: sampling is ``argmax(logits / T + Gumbel)``. The same request
therefore draws the same token at the same step whatever batch it runs in, after a preemption, and
with prefix sharing on or off; no ``torch.Generator`` state is carried. Cost: an (R, V) int64
hash per step, computed only when some row samples (all-greedy batches take a plain argmax).
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_K_SEED, _K_STEP, _K_TOKEN = _signed(0x9E3779B97F4A7C15), _signed(0xD1B54A32D192ED03), _signed(0x8CB92BA72F3D8DD7)
_M1, _M2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(R, V) float32 in (0, 1), a pure function of (seed, step, token id)."""
    tokens = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    x = seeds[:, None] * _K_SEED + steps[:, None] * _K_STEP + tokens[None] * _K_TOKEN  # (R, V), wraps mod 2^64
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    x = x ^ _shr(x, 31)
    return (_shr(x, 40).float() + 0.5) / float(1 << 24)


def sample(logits: torch.Tensor, *, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, steps: torch.Tensor, any_random: bool, any_filter: bool) -> torch.Tensor:
    """Next token per row of ``logits`` (R, V). Rows with temperature 0 are greedy.

    ``any_random``/``any_filter`` are known on the host from the requests' parameters; they only
    skip work, never change the result.
    """
    greedy = logits.argmax(dim=-1)
    if not any_random:
        return greedy
    scaled = logits.float() / temperature.clamp_min(1e-6)[:, None]
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, steps, logits.shape[-1])))
    if any_filter:
        vals, idx = scaled.sort(dim=-1, descending=True)  # (R, V)
        ranks = torch.arange(vals.shape[-1], device=vals.device)[None]
        keep = (ranks < top_k[:, None]) | (top_k[:, None] <= 0)
        probs = vals.softmax(dim=-1)
        keep &= (probs.cumsum(dim=-1) - probs) < top_p[:, None]  # smallest set with mass >= top_p
        keep[:, 0] = True
        choice = torch.where(keep, vals + gumbel.gather(1, idx), float("-inf")).argmax(dim=-1)
        drawn = idx.gather(1, choice[:, None])[:, 0]
    else:
        drawn = (scaled + gumbel).argmax(dim=-1)
    return torch.where(temperature > 0, drawn, greedy)


def penalise(logits: torch.Tensor, *, output_counts: torch.Tensor | None, seen: torch.Tensor | None,
             presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor,
             bias: torch.Tensor | None, banned: torch.Tensor | None) -> torch.Tensor:
    """Processed (R, V) fp32 logits: repetition, then presence/frequency, then logit_bias, then bans.

    - repetition (CTRL, Keskar et al. 2019, arXiv 1909.05858, section 4.1; HF's
      ``RepetitionPenaltyLogitsProcessor``): over tokens ``seen`` in prompt + output,
      logit / p where logit > 0, logit * p otherwise;
    - OpenAI's presence/frequency penalties over the output tokens so far:
      logit - presence * (count > 0) - frequency * count;
    - ``bias`` (R, V) added (OpenAI's logit_bias); ``banned`` (R, V) set to -inf (EOS before min_tokens).
    A ``None`` tensor skips its stage; the (R,) parameter tensors are neutral (1, 0, 0) for rows without it.
    """
    x = logits.float()
    if seen is not None:
        p = repetition[:, None]
        x = torch.where(seen, torch.where(x > 0, x / p, x * p), x)
    if output_counts is not None:
        x = x - presence[:, None] * (output_counts > 0) - frequency[:, None] * output_counts
    if bias is not None:
        x = x + bias
    if banned is not None:
        x = x.masked_fill(banned, float("-inf"))
    return x


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """log-softmax of (R, V) logits at temperature 1: (R,) logprob of ``tokens``, (R, k) top-k values and ids."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(1, tokens[:, None])[:, 0]
    top = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], tokens[:, None][:, :0])
    return chosen, top[0], top[1]
