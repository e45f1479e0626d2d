"""Adaptive global batch: gradient-noise measurements in, batch decisions out. Pure; the trainer applies them.

Design choice: the controller only DECIDES (``BatchController.decide``) at step boundaries; the trainer owns
the data loader and the accumulation count. Everything here is plain floats and ints, so it is unit-tested
without a model and its state is a JSON dict saved with the checkpoint.

Measurement: the two-batch estimator of McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", arXiv 1812.06162, appendix A),
the cheap route AdaptDL took under DDP. The trainer supplies the squared norm of a SMALL-batch gradient (e.g.
the first micro-step's gradient, times grad_accum_steps^2 to undo the 1/accum loss scaling) and of the BIG
(accumulated, global) gradient, both as FULL norms across FSDP2 shards (``grad_sq_norm``). Under FSDP2 the
micro-step gradient is already averaged over ranks, so B_small = micro-batch tokens x world size.
Numerator and denominator are averaged separately (EMA, bias-corrected) because the ratio of noisy estimates
is biased; gpt-neox's ``gradient_noise_scale.py`` does the same with beta 0.99.

Critical batch: B_crit ~ B_noise ~ B_simple = tr(Sigma) / |G|^2 (McCandlish, section 2.2); we report B_simple
as the estimate. The batch follows a lower confidence bound of it (``confidence_z``), not the point estimate:
below the noise scale the |G|^2 estimate is noisy and near zero, and the ratio then overshoots. Growth follows
AdaptDL/AdAdaGrad: the batch only grows, at most ``max_growth``x per change, no more often than
``min_interval_steps``, and only when the gain clears ``min_relative_change`` (AdaptDL needed a 5 % threshold
to stop batch flapping, petuum/adaptdl#27).

LR coupling at each change (Granziol et al. 2020, arXiv 2006.09092): sqrt(B/B0) for Adam-family (adamw,
lamb), B/B0 for SGD and LARS, by ``plan.laws.rescale_lr`` (the planner's rule too); returned as ``lr_scale``
relative to the initial batch.

Targets: ``gns`` follows B_simple; ``norm_test`` follows the batch the norm test of AdAdaGrad asks for (Lau et
al. 2024, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods", arXiv 2402.11215, with
Byrd et al. 2012's test): b >= tr(Sigma) / (eta^2 |G|^2) = B_simple / eta^2, from the same two-batch estimates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from batchpilot.plan import laws
from batchpilot.train.optim import full_sq_norms

POLICIES = ("fixed", "ramp", "adaptive")
COUPLINGS = ("sqrt", "linear", "none")
TARGETS = ("gns", "norm_test")


# ---- measurement ------------------------------------------------------------------------------------------------

def grad_sq_norm(params: Iterable[Tensor]) -> float:
    """Squared L2 norm of all gradients together, full across FSDP2 shards (one all-reduce per mesh)."""
    return float(grad_sq_norm_tensor(params))


def grad_sq_norm_tensor(params: Iterable[Tensor]) -> Tensor:
    """``grad_sq_norm`` as a 0-d float32 tensor on the device: no host sync, so the trainer can read it later."""
    grads = [p.grad for p in params if p.grad is not None]
    return full_sq_norms(grads).sum() if grads else torch.zeros(())


def two_batch_estimates(small_sq_norm: float, small_tokens: float, big_sq_norm: float,
                        big_tokens: float) -> tuple[float, float]:
    """Unbiased (|G|^2, tr(Sigma)) from E|G_B|^2 = |G|^2 + tr(Sigma)/B at two batch sizes (McCandlish app. A)."""
    assert big_tokens > small_tokens > 0, "need B_big > B_small > 0"
    g_sq = (big_tokens * big_sq_norm - small_tokens * small_sq_norm) / (big_tokens - small_tokens)
    trace = (small_sq_norm - big_sq_norm) / (1.0 / small_tokens - 1.0 / big_tokens)
    return g_sq, trace


@dataclass(frozen=True, slots=True)
class Measurement:
    """What the trainer measured in one step (norms are squared and full across shards)."""

    small_sq_norm: float
    small_batch_tokens: int
    big_sq_norm: float
    big_batch_tokens: int


@dataclass(kw_only=True, slots=True)
class NoiseScaleEstimator:
    """EMA of |G|^2 and tr(Sigma) separately, with Adam-style bias correction.

    It also keeps the EMA of (|G|^2 estimate)^2, so the controller knows how sure the signal estimate is. Far
    below the noise scale, |G|^2 is a small difference of two large noisy norms: the run that started at 4k
    tokens (benchmarks/results/adaptive_2026-11-28_start4k.json) had a negative |G|^2 EMA for ~270 steps and
    then a barely positive one, which made B_simple read 630k tokens and drove the batch 4k -> 64k in four
    changes. ``b_simple_lower`` divides by an upper confidence bound of |G|^2 instead.
    """

    beta: float = 0.99  # gpt-neox gradient_noise_scale.py
    ema_g_sq: float = 0.0
    ema_trace: float = 0.0
    ema_g_sq_sq: float = 0.0  # second moment of the per-step |G|^2 estimate
    count: int = 0

    def update(self, m: Measurement) -> None:
        g_sq, trace = two_batch_estimates(m.small_sq_norm, m.small_batch_tokens, m.big_sq_norm, m.big_batch_tokens)
        self.ema_g_sq = self.beta * self.ema_g_sq + (1 - self.beta) * g_sq
        self.ema_trace = self.beta * self.ema_trace + (1 - self.beta) * trace
        self.ema_g_sq_sq = self.beta * self.ema_g_sq_sq + (1 - self.beta) * g_sq * g_sq
        self.count += 1

    def _corrected(self, ema: float) -> float:
        return ema / (1 - self.beta**self.count) if self.count else math.nan

    @property
    def g_sq(self) -> float:
        return self._corrected(self.ema_g_sq)

    @property
    def trace(self) -> float:
        return self._corrected(self.ema_trace)

    @property
    def effective_count(self) -> float:
        """Kish effective sample size of the bias-corrected EMA weights: (sum w)^2 / sum w^2 (n for few samples,
        (1 + beta) / (1 - beta) in the long run)."""
        if not self.count:
            return 0.0
        b, n = self.beta, self.count
        return (1 - b**n) ** 2 / (1 - b) ** 2 * (1 - b * b) / (1 - b ** (2 * n))

    @property
    def g_sq_stderr(self) -> float:
        """Standard error of the |G|^2 EMA from the spread of the per-step estimates (treated as independent)."""
        if self.count < 2:
            return math.inf
        variance = max(self._corrected(self.ema_g_sq_sq) - self.g_sq**2, 0.0)
        return math.sqrt(variance / self.effective_count)

    @property
    def b_simple(self) -> float | None:
        """tr(Sigma) / |G|^2 in tokens; None until the signal estimate is positive."""
        if not self.count or self.g_sq <= 0:
            return None
        return max(self.trace, 0.0) / self.g_sq

    def b_simple_lower(self, z: float) -> float | None:
        """Conservative B_simple: tr(Sigma) / (|G|^2 + z x its standard error); None while that is undefined."""
        bound = self.g_sq + z * self.g_sq_stderr if z else self.g_sq
        if not self.count or not math.isfinite(bound) or bound <= 0:
            return None
        return max(self.trace, 0.0) / bound


# ---- policy -----------------------------------------------------------------------------------------------------

def lr_scale(batch_tokens: int, initial_batch_tokens: int, coupling: str) -> float:
    """The LR multiplier relative to the initial batch: ``plan.laws.rescale_lr`` of 1.0 (``none``: 1.0)."""
    if coupling == "none":
        return 1.0
    return laws.rescale_lr(1.0, from_batch=initial_batch_tokens, to_batch=batch_tokens,
                           rule="sqrt" if coupling == "sqrt" else "linear")


def default_coupling(optimizer_name: str) -> str:
    """The optimizer's own rule (``plan.laws.lr_scaling_rule``): sqrt for Adam-family, linear for SGD/LARS."""
    return laws.lr_scaling_rule(optimizer_name)


@dataclass(kw_only=True, slots=True)
class BatchConfig:
    """The batch of a run and its policy; the trainer gives the controller the quantum (rows x ranks)."""

    global_batch_tokens: int = 8192  # tokens per optimizer step (the initial one under ramp / adaptive)
    micro_batch_size: int = 16  # rows per rank per micro-step; accumulation reaches the global batch
    auto_micro_batch: bool = False  # fit the micro-batch to GPU memory, back off on OOM (train/autofit.py)
    policy: str = "fixed"  # fixed | ramp | adaptive
    ramp: str = ""  # ramp policy: "TOKENS:BATCH,..." thresholds (Megatron's rampup), e.g. "1e6:16384,4e6:32768"
    max_batch_tokens: int | None = None  # adaptive cap (None: no cap)
    lr_coupling: str | None = None  # sqrt | linear | none; None: the optimizer's rule (plan.laws.lr_scaling_rule)
    measure_noise: bool | None = None  # gradient noise scale every step; None: on for the adaptive policy
    target: str = "gns"  # adaptive target: gns (B_simple) | norm_test (B_simple / norm_test_eta^2, AdAdaGrad)
    target_multiplier: float = 1.0  # aim at multiplier x target
    # growth is irreversible, so it follows a lower confidence bound of B_simple (0: the plain point estimate).
    # z = 3, not 2, because the bound is looked at every step: on simulated gradients 16x below the noise scale
    # (tests/train/test_adaptive.py) the worst bound over 600 steps x 20 seeds overshot B_simple 35-50x at z = 2
    # and at most 1.7x at z = 3, while the point estimate reached 1e6x
    confidence_z: float = 3.0
    norm_test_eta: float = 0.1  # AdAdaGrad default
    ema_beta: float = 0.99
    min_measurements: int = 20  # let the EMA settle before the first change
    min_interval_steps: int = 50
    max_growth: float = 2.0  # at most 2x per change
    min_relative_change: float = 0.05  # AdaptDL's 5 % threshold

    def __post_init__(self) -> None:
        for name, value, allowed in (("policy", self.policy, POLICIES), ("target", self.target, TARGETS),
                                     ("lr_coupling", self.lr_coupling, (*COUPLINGS, None))):
            if value not in allowed:
                raise ValueError(f"--batch.{name} {value!r}: choose one of "
                                 f"{', '.join(a for a in allowed if a is not None)}")
        if self.global_batch_tokens <= 0 or self.micro_batch_size <= 0:
            raise ValueError("--batch.global_batch_tokens and --batch.micro_batch_size must be positive")
        points = self.ramp_points()
        if any(t < 0 or b <= 0 for t, b in points):
            raise ValueError(f"--batch.ramp {self.ramp!r}: thresholds must be >= 0 and batches > 0")
        if self.policy == "ramp" and not points:
            raise ValueError("the ramp policy needs --batch.ramp TOKENS:BATCH,...")
        if self.max_batch_tokens is not None and self.max_batch_tokens < self.global_batch_tokens:
            raise ValueError("--batch.max_batch_tokens must be >= --batch.global_batch_tokens")
        if self.max_growth <= 1 or self.min_interval_steps < 1 or not 0 < self.ema_beta < 1 or self.confidence_z < 0:
            raise ValueError("need batch.max_growth > 1, batch.min_interval_steps >= 1, 0 < batch.ema_beta < 1 and "
                             "batch.confidence_z >= 0")
        if self.norm_test_eta <= 0 or self.target_multiplier <= 0 or self.min_measurements < 0:
            raise ValueError("need batch.norm_test_eta > 0, batch.target_multiplier > 0, batch.min_measurements >= 0")

    def ramp_points(self) -> list[tuple[int, int]]:
        """``ramp`` as sorted (tokens threshold, global batch tokens) pairs."""
        points = []
        for item in self.ramp.split(","):
            if item.strip():
                tokens, sep, batch = item.partition(":")
                try:
                    points.append((int(float(tokens)), int(float(batch))))
                except ValueError:
                    raise ValueError(f"--batch.ramp {self.ramp!r}: write TOKENS:BATCH,... e.g. "
                                     f"1e6:16384,4e6:32768") from None
                if not sep:
                    raise ValueError(f"--batch.ramp {self.ramp!r}: write TOKENS:BATCH,...")
        return sorted(points)

    def wants_noise(self) -> bool:
        return self.measure_noise if self.measure_noise is not None else self.policy == "adaptive"


@dataclass(frozen=True, slots=True)
class Decision:
    global_batch_tokens: int  # for the NEXT step
    lr_scale: float  # multiply the schedule's LR by this
    reason: str  # human-readable; log it when ``changed``
    changed: bool = False
    metrics: dict[str, float] = field(default_factory=dict)  # b_simple, critical_batch_tokens, ... to log


class BatchController:
    """Decides the global batch for the next step; call ``decide`` once per step, after the optimizer step."""

    def __init__(self, cfg: BatchConfig, *, quantum_tokens: int, lr_coupling: str) -> None:
        """``quantum_tokens``: every batch is a multiple of it (micro-batch rows x seq_len x ranks);
        ``lr_coupling``: the resolved rule (``cfg.lr_coupling`` or the optimizer's)."""
        if quantum_tokens <= 0 or lr_coupling not in COUPLINGS:
            raise ValueError(f"need quantum_tokens > 0 and lr_coupling in {COUPLINGS}")
        self.ramp = cfg.ramp_points()
        for b in [cfg.global_batch_tokens, *(b for _, b in self.ramp)]:
            if b % quantum_tokens:
                raise ValueError(f"batch {b} tokens is not a multiple of the quantum {quantum_tokens} "
                                 f"(seq_len x ranks{' x 2 for the adaptive policy' if cfg.policy == 'adaptive' else ''})")
        self.cfg, self.quantum_tokens, self.lr_coupling = cfg, quantum_tokens, lr_coupling
        self.batch_tokens = cfg.global_batch_tokens
        self.last_change_step = 0
        self.estimator = NoiseScaleEstimator(beta=cfg.ema_beta)

    def decide(self, step: int, tokens_seen: int, measurement: Measurement | None = None) -> Decision:
        if measurement is not None:
            self.estimator.update(measurement)
        new, reason = self._propose(step, tokens_seen)
        changed = new != self.batch_tokens
        if changed:
            reason = f"step {step}: global batch {self.batch_tokens} -> {new} tokens ({reason})"
            self.batch_tokens, self.last_change_step = new, step
        scale = lr_scale(self.batch_tokens, self.cfg.global_batch_tokens, self.lr_coupling)
        return Decision(self.batch_tokens, scale, reason, changed, self._metrics())

    def _propose(self, step: int, tokens_seen: int) -> tuple[int, str]:
        if self.cfg.policy == "fixed":
            return self.batch_tokens, "fixed"
        if self.cfg.policy == "ramp":
            batch = self.cfg.global_batch_tokens
            for threshold, b in self.ramp:
                batch = b if tokens_seen >= threshold else batch
            return batch, f"ramp at {tokens_seen} tokens"
        return self._adaptive(step)

    def _adaptive(self, step: int) -> tuple[int, str]:
        target = self.target_tokens()
        if target is None or self.estimator.count < self.cfg.min_measurements:
            return self.batch_tokens, "waiting for measurements"
        if step - self.last_change_step < self.cfg.min_interval_steps:
            return self.batch_tokens, "minimum interval"
        goal = min(target, self.batch_tokens * self.cfg.max_growth, self.cfg.max_batch_tokens or math.inf)
        new = int(goal // self.quantum_tokens) * self.quantum_tokens
        if new < self.batch_tokens * (1 + self.cfg.min_relative_change):
            return self.batch_tokens, f"target {target:.3g} tokens: no worthwhile growth"
        return new, f"{self.cfg.target} target {target:.3g} tokens"

    def target_tokens(self) -> float | None:
        b_simple = self.estimator.b_simple_lower(self.cfg.confidence_z)
        if b_simple is None:
            return None
        # the norm test asks for b >= tr(Sigma) / (eta^2 |G|^2) = B_simple / eta^2 (AdAdaGrad, arXiv 2402.11215)
        base = b_simple / self.cfg.norm_test_eta**2 if self.cfg.target == "norm_test" else b_simple
        return base * self.cfg.target_multiplier

    def _metrics(self) -> dict[str, float]:
        b_simple = self.estimator.b_simple
        if b_simple is None:
            return {}
        lower = self.estimator.b_simple_lower(self.cfg.confidence_z)
        return {"b_simple": b_simple, "grad_noise_scale": b_simple, "critical_batch_tokens": b_simple,
                "grad_sq_norm_est": self.estimator.g_sq, "grad_trace_est": self.estimator.trace,
                **({"grad_sq_norm_stderr": self.estimator.g_sq_stderr} if self.estimator.count > 1 else {}),
                **({"b_simple_lower": lower} if lower is not None else {})}

    def state_dict(self) -> dict[str, Any]:
        return {"batch_tokens": self.batch_tokens, "last_change_step": self.last_change_step,
                "estimator": asdict(self.estimator)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        q = self.quantum_tokens  # a resume at another world size may change the quantum: round up to it
        self.batch_tokens = max(q, math.ceil(state["batch_tokens"] / q) * q)
        self.last_change_step = state["last_change_step"]
        self.estimator = NoiseScaleEstimator(**state["estimator"])
