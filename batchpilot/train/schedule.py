"""Learning-rate schedules as pure functions of TOKENS seen.

Design choice: the clock is tokens, not steps. When the adaptive batch controller changes the global
batch, a step no longer means a fixed amount of data, but warmup, decay start and the end of training
keep their meaning when they are counted in tokens. The cost: the trainer must pass tokens, and a
change of batch does not by itself change the LR (the batch-LR coupling is `plan.laws.rescale_lr`).

Two types: ``ScheduleConfig`` is what a user sets (the shape, the floor, warmup and the horizon of the run);
``Schedule`` is that shape resolved for one run (peak LR from the optimizer, total tokens, batch in sequences),
and ``lr_at`` evaluates it. The formulas of the Power and DeepSeek schedules are owned by ``plan/laws.py``.

Convention: `lr_at(n)` is the LR for an update made after n tokens. Warmup starts at 0, so pass the
tokens the step will have consumed when it completes (tokens_seen + global_batch_tokens), as nanoGPT
uses `it + 1`; otherwise the first update has LR 0.

Schedules:
- ``cosine``: linear warmup, then cosine from peak to a FIXED floor ``min_lr`` at ``total_tokens``
  (Step Law, arXiv 2503.04715, trained with cosine to 1e-5), flat after.
- ``wsd``: warmup-stable-decay. The decay over the last ``decay_fraction`` of tokens has the
  ``1-sqrt`` shape by default (Hägele et al. 2024, arXiv 2405.18392, found it beats linear
  cooldown); ``decay_shape="linear"`` gives the MiniCPM/Megatron-style linear tail.
- ``power``: Power Scheduler (Shen et al. 2024, arXiv 2408.13359, eq. 6; ``plan.laws.power_scheduler_lr``),
  f(n) = min(peak, beta * a * n^b), n tokens, beta the batch in SEQUENCES; warmup to f(n_warmup);
  exponential anneal over the last ``power_decay_fraction`` (IBM dolomite-engine's formula).
- ``multistep``: DeepSeek LLM's schedule (arXiv 2401.02954, section 2.3; ``plan.laws.DEEPSEEK_STEPS``):
  warmup, peak until 80% of tokens, 31.6% of peak until 90%, then 10% of peak.
- ``constant``: warmup, then peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from batchpilot.plan import laws

SCHEDULES = laws.SCHEDULES
DECAY_SHAPES = ("1-sqrt", "linear")


@dataclass(kw_only=True, slots=True)
class ScheduleConfig:
    """The LR schedule and the run's horizon (one of ``max_steps`` / ``max_tokens``)."""

    name: str = "cosine"  # one of plan.laws.SCHEDULES
    min_lr: float = 3e-4  # absolute floor reached at the end (not a fraction of peak)
    warmup_tokens: int | None = None  # None: 5% of the horizon
    max_steps: int | None = None
    max_tokens: int | None = None  # one of max_steps / max_tokens sets the horizon
    stop_at_step: int | None = None  # stop early (checkpointed) while the schedule still spans the horizon
    decay_fraction: float = 0.2  # wsd: share of the tokens spent decaying
    decay_shape: str = "1-sqrt"  # wsd tail: 1-sqrt | linear
    power_a: float = laws.POWER_A  # Power Scheduler a and b (arXiv 2408.13359: a=4, b=-0.51 in the released configs)
    power_b: float = laws.POWER_B
    power_decay_fraction: float = 0.1  # power: share of the tokens spent in the exponential anneal

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"--schedule.name {self.name!r}: choose one of {', '.join(SCHEDULES)}")
        if self.min_lr < 0:
            raise ValueError(f"--schedule.min_lr must be >= 0, got {self.min_lr}")
        if self.max_steps is not None and self.max_tokens is not None:
            raise ValueError("give only one of --schedule.max_steps or --schedule.max_tokens")
        for name in ("max_steps", "max_tokens", "stop_at_step"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--schedule.{name} must be positive, got {getattr(self, name)}")
        if self.warmup_tokens is not None and self.warmup_tokens < 0:
            raise ValueError(f"--schedule.warmup_tokens must be >= 0, got {self.warmup_tokens}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"--schedule.decay_shape {self.decay_shape!r}: choose one of {', '.join(DECAY_SHAPES)}")
        for field in ("decay_fraction", "power_decay_fraction"):
            if not 0 <= getattr(self, field) <= 1:
                raise ValueError(f"--schedule.{field} must be in [0, 1], got {getattr(self, field)}")
        if self.power_a <= 0 or self.power_b >= 0:
            raise ValueError(f"the power schedule needs power_a > 0 and power_b < 0, got {self.power_a}, {self.power_b}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Schedule:
    """A ``ScheduleConfig`` resolved for one run: what ``lr_at`` needs."""

    config: ScheduleConfig
    peak_lr: float
    total_tokens: int
    warmup_tokens: int = 0
    batch_sequences: int | None = None  # the power schedule's beta: global batch in sequences

    def __post_init__(self) -> None:
        if self.peak_lr <= 0 or not 0 <= self.config.min_lr <= self.peak_lr:
            raise ValueError(f"need peak lr > 0 and 0 <= min_lr <= lr, got lr={self.peak_lr}, "
                             f"min_lr={self.config.min_lr}")
        if self.total_tokens <= 0 or not 0 <= self.warmup_tokens <= self.total_tokens:
            raise ValueError(f"need 0 <= warmup_tokens <= total tokens > 0, got {self.warmup_tokens}, "
                             f"{self.total_tokens}")
        if self.config.name in ("wsd", "power") and self.warmup_tokens > _decay_start(self):
            raise ValueError(f"warmup_tokens {self.warmup_tokens} overlaps the decay starting at {_decay_start(self)}")
        if self.config.name == "power" and (self.batch_sequences is None or self.batch_sequences <= 0):
            raise ValueError("the power schedule needs the batch in sequences (beta) > 0")


def lr_at(tokens_seen: int, sched: Schedule) -> float:
    """The learning rate after ``tokens_seen`` tokens (pure; see the module docstring for the convention)."""
    n, cfg = max(tokens_seen, 0), sched.config
    if cfg.name == "power":
        return _power_lr(n, sched)
    if n < sched.warmup_tokens:
        return sched.peak_lr * n / sched.warmup_tokens
    if cfg.name == "cosine":
        progress = min((n - sched.warmup_tokens) / max(sched.total_tokens - sched.warmup_tokens, 1), 1.0)
        return cfg.min_lr + 0.5 * (sched.peak_lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    if cfg.name == "wsd":
        start = _decay_start(sched)
        if n < start:
            return sched.peak_lr
        progress = min((n - start) / max(sched.total_tokens - start, 1), 1.0)
        keep = 1.0 - math.sqrt(progress) if cfg.decay_shape == "1-sqrt" else 1.0 - progress
        return cfg.min_lr + (sched.peak_lr - cfg.min_lr) * keep
    if cfg.name == "multistep":
        return sched.peak_lr * laws.deepseek_multistep_factor(n / sched.total_tokens)
    return sched.peak_lr  # constant


def power_curve(tokens: float, sched: Schedule) -> float:
    """f(n) = min(peak, beta * a * n^b): the Power Scheduler's stable phase (``plan.laws.power_scheduler_lr``)."""
    assert sched.batch_sequences is not None
    return laws.power_scheduler_lr(tokens, batch_sequences=sched.batch_sequences, a=sched.config.power_a,
                                   b=sched.config.power_b, max_lr=sched.peak_lr)


def exp_decay_multiplier(x: float, t: float, d: float) -> float:
    """Exponential anneal from 1 at x=0 to d at x=t (IBM dolomite-engine scheduler):
    m(x) = (1-d) e/(e-1) exp(-x/t) + (d e - 1)/(e-1)."""
    e = math.e
    return (1.0 - d) * e / (e - 1.0) * math.exp(-x / t) + (d * e - 1.0) / (e - 1.0)


def _power_lr(n: int, sched: Schedule) -> float:
    if n < sched.warmup_tokens:
        # eta(n) = (n / n_warmup) * f(n_warmup): linear ramp to the curve's value at the end of warmup
        return n / sched.warmup_tokens * power_curve(sched.warmup_tokens, sched)
    start = _decay_start(sched)
    if n < start or start >= sched.total_tokens:
        return power_curve(n, sched)
    start_lr = power_curve(start, sched)
    x = min(n - start, sched.total_tokens - start)
    return start_lr * exp_decay_multiplier(x, sched.total_tokens - start, min(sched.config.min_lr / start_lr, 1.0))


def _decay_start(sched: Schedule) -> int:
    cfg = sched.config
    fraction = cfg.power_decay_fraction if cfg.name == "power" else cfg.decay_fraction
    return round(sched.total_tokens * (1.0 - fraction))
