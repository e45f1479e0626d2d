"""Learning-rate schedules as pure functions of TOKENS seen.

Design choice: the clock is tokens, not steps. When the adaptive batch controller changes the global
batch, a step no longer means a fixed amount of data, but warmup, decay start and the end of training
keep their meaning when they are counted in tokens. The cost: the trainer must pass tokens, and a
change of batch does not by itself change the LR (the batch-LR coupling is `adaptive.lr_scale`).

Convention: `lr_at(n)` is the LR for an update made after n tokens. Warmup starts at 0, so pass the
tokens the step will have consumed when it completes (tokens_seen + global_batch_tokens), as nanoGPT
uses `it + 1`; otherwise the first update has LR 0.

Schedules:
- ``cosine``: linear warmup, then cosine from peak to a FIXED floor ``min_lr`` at ``total_tokens``
  (Step Law trained with cosine to 1e-5, laws.md section 1), flat after.
- ``wsd``: warmup-stable-decay. The decay over the last ``decay_fraction`` of tokens has the
  ``1-sqrt`` shape by default (Hägele et al. 2024, arXiv 2405.18392, found it beats linear
  cooldown); ``decay_shape="linear"`` gives the MiniCPM/Megatron-style linear tail.
- ``power``: Power Scheduler (Shen et al. 2024, arXiv 2408.13359; laws.md section 2),
  f(n) = min(peak, beta * a * n^b), n tokens, beta the batch in SEQUENCES; warmup to f(n_warmup);
  exponential anneal over the last ``power_decay_fraction`` (IBM dolomite-engine's formula).
- ``multistep``: DeepSeek LLM's schedule (arXiv 2401.02954, section 2.3; laws.md 4a): warmup, peak
  until 80% of tokens, 31.6% of peak until 90%, then 10% of peak.
- ``constant``: warmup, then peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("cosine", "wsd", "power", "multistep", "constant")
DECAY_SHAPES = ("1-sqrt", "linear")


@dataclass(kw_only=True, slots=True)
class ScheduleConfig:
    name: str = "cosine"  # cosine | wsd | power | constant
    peak_lr: float
    min_lr: float = 0.0  # absolute floor reached at total_tokens (not a fraction of peak)
    warmup_tokens: int = 0
    total_tokens: int
    decay_fraction: float = 0.2  # wsd: share of total_tokens spent decaying
    decay_shape: str = "1-sqrt"  # wsd tail: 1-sqrt | linear
    power_a: float = 4.0  # Power Scheduler a and b (laws.md section 2: a=4, b=-0.51 in the released configs)
    power_b: float = -0.51
    power_batch_sequences: int | None = None  # beta: global batch in sequences (required for power)
    power_decay_fraction: float = 0.1  # power: share of total_tokens spent in the exponential anneal

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; choose one of {', '.join(SCHEDULES)}")
        if self.peak_lr <= 0 or not 0 <= self.min_lr <= self.peak_lr:
            raise ValueError(f"need peak_lr > 0 and 0 <= min_lr <= peak_lr, got {self.peak_lr}, {self.min_lr}")
        if self.total_tokens <= 0 or not 0 <= self.warmup_tokens <= self.total_tokens:
            raise ValueError(f"need 0 <= warmup_tokens <= total_tokens > 0, got {self.warmup_tokens}, "
                             f"{self.total_tokens}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"unknown decay_shape {self.decay_shape!r}; choose one of {', '.join(DECAY_SHAPES)}")
        for field in ("decay_fraction", "power_decay_fraction"):
            if not 0 <= getattr(self, field) <= 1:
                raise ValueError(f"{field} must be in [0, 1], got {getattr(self, field)}")
        if self.name in ("wsd", "power") and self.warmup_tokens > _decay_start(self):
            raise ValueError(f"warmup_tokens {self.warmup_tokens} overlaps the decay starting at {_decay_start(self)}")
        if self.name == "power":
            if self.power_batch_sequences is None or self.power_batch_sequences <= 0:
                raise ValueError("the power schedule needs power_batch_sequences > 0 (beta, batch in sequences)")
            if self.power_a <= 0 or self.power_b >= 0:
                raise ValueError(f"power schedule needs a > 0 and b < 0, got a={self.power_a}, b={self.power_b}")


def lr_at(tokens_seen: int, cfg: ScheduleConfig) -> float:
    """The learning rate after ``tokens_seen`` tokens (pure; see the module docstring for the convention)."""
    n = max(tokens_seen, 0)
    if cfg.name == "power":
        return _power_lr(n, cfg)
    if n < cfg.warmup_tokens:
        return cfg.peak_lr * n / cfg.warmup_tokens
    if cfg.name == "cosine":
        progress = min((n - cfg.warmup_tokens) / max(cfg.total_tokens - cfg.warmup_tokens, 1), 1.0)
        return cfg.min_lr + 0.5 * (cfg.peak_lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    if cfg.name == "wsd":
        start = _decay_start(cfg)
        if n < start:
            return cfg.peak_lr
        progress = min((n - start) / max(cfg.total_tokens - start, 1), 1.0)
        keep = 1.0 - math.sqrt(progress) if cfg.decay_shape == "1-sqrt" else 1.0 - progress
        return cfg.min_lr + (cfg.peak_lr - cfg.min_lr) * keep
    if cfg.name == "multistep":
        return cfg.peak_lr * _multistep_factor(n / cfg.total_tokens)
    return cfg.peak_lr  # constant


def _multistep_factor(progress: float) -> float:
    """DeepSeek LLM: x1 until 80% of training tokens, x0.316 until 90%, x0.1 after (laws.md 4a)."""
    return 1.0 if progress < 0.8 else 0.316 if progress < 0.9 else 0.1


def power_curve(tokens: float, cfg: ScheduleConfig) -> float:
    """f(n) = min(peak, beta * a * n^b): the Power Scheduler's stable phase (laws.md section 2)."""
    assert cfg.power_batch_sequences is not None
    if tokens <= 0:
        return cfg.peak_lr  # n^b -> infinity as n -> 0 (b < 0), so the cap binds
    return min(cfg.peak_lr, cfg.power_batch_sequences * cfg.power_a * tokens**cfg.power_b)


def exp_decay_multiplier(x: float, t: float, d: float) -> float:
    """Exponential anneal from 1 at x=0 to d at x=t (IBM dolomite-engine scheduler):
    m(x) = (1-d) e/(e-1) exp(-x/t) + (d e - 1)/(e-1)."""
    e = math.e
    return (1.0 - d) * e / (e - 1.0) * math.exp(-x / t) + (d * e - 1.0) / (e - 1.0)


def _power_lr(n: int, cfg: ScheduleConfig) -> float:
    if n < cfg.warmup_tokens:
        # eta(n) = (n / n_warmup) * f(n_warmup): linear ramp to the curve's value at the end of warmup
        return n / cfg.warmup_tokens * power_curve(cfg.warmup_tokens, cfg)
    start = _decay_start(cfg)
    if n < start or start >= cfg.total_tokens:
        return power_curve(n, cfg)
    start_lr = power_curve(start, cfg)
    x = min(n - start, cfg.total_tokens - start)
    return start_lr * exp_decay_multiplier(x, cfg.total_tokens - start, min(cfg.min_lr / start_lr, 1.0))


def _decay_start(cfg: ScheduleConfig) -> int:
    fraction = cfg.power_decay_fraction if cfg.name == "power" else cfg.decay_fraction
    return round(cfg.total_tokens * (1.0 - fraction))
