"""Hyperparameter scaling laws as pure functions: each cites its source and carries units in its names.

Counting conventions, exactly as the laws define them (``model/counting.py`` counts; docs/plan.md):
- N = ``counting.non_vocab_params``: attention + SwiGLU MLP of every layer, no embeddings, LM head or norms.
  q/k/v biases (Qwen2) *are* counted: they are attention parameters, and the Step Law grid (no biases)
  cannot tell either way; they are < 0.1% of N.
- tokens (D) are training tokens; batch sizes are in tokens per optimizer step; compute in FLOPs.

Design choice: a law is a small frozen ``Law`` value (name, source, fitted range, assumed schedule) plus
pure functions; the planner never branches on a law's name except through ``get_law``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


LrScalingRule = Literal["sqrt", "linear"]

# --- fitted ranges ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FittedRange:
    """Where a law was fitted; ``None`` means the law does not depend on (or did not report) that variable."""

    params: tuple[float, float] | None = None
    tokens: tuple[float, float] | None = None
    compute_flops: tuple[float, float] | None = None

    def extrapolations(self, *, params: float, tokens: float, compute_flops: float) -> list[str]:
        out = []
        for name, value, bounds in (("N (non-vocab params)", params, self.params), ("D (tokens)", tokens, self.tokens),
                                    ("C (FLOPs)", compute_flops, self.compute_flops)):
            if bounds is not None and not bounds[0] <= value <= bounds[1]:
                out.append(f"{name} = {value:.3g} is outside the fitted range [{bounds[0]:.3g}, {bounds[1]:.3g}]")
        return out


# --- Step Law (Li et al. 2025, "Predictable Scale: Part I", arXiv 2503.04715, section 3 and fig. 1) ---------
# eta_opt = 1.79 N^-0.713 D^0.307, B_opt = 0.58 D^0.571 (tokens). Constants from the project's web tool
# (step-law.github.io, tool.js); the means of the 1000 released bootstrap fits agree (1.797/-0.7129/0.3075,
# 0.5807/0.5709).
STEP_LAW_LR_COEF, STEP_LAW_LR_EXP_PARAMS, STEP_LAW_LR_EXP_TOKENS = 1.79, -0.713, 0.307
STEP_LAW_BATCH_COEF, STEP_LAW_BATCH_EXP_TOKENS = 0.58, 0.571
STEP_LAW_MIN_LR = 1e-5  # cosine to a FIXED minimum of 1e-5 (run names end in mlr1.00e-05)
# Released dense grid (step-law/steplaw data/): N 2.15e8 .. 1.07e9 (the 1B test model), D 4e9 .. 1e11.
STEP_LAW_RANGE = FittedRange(params=(2.1e8, 1.1e9), tokens=(4e9, 1e11))


def step_law_peak_lr(non_vocab_params: float, tokens: float) -> float:
    return STEP_LAW_LR_COEF * non_vocab_params**STEP_LAW_LR_EXP_PARAMS * tokens**STEP_LAW_LR_EXP_TOKENS


def step_law_batch_tokens(tokens: float) -> float:
    return STEP_LAW_BATCH_COEF * tokens**STEP_LAW_BATCH_EXP_TOKENS


# --- DeepSeek LLM (Bi et al. 2024, arXiv 2401.02954, section 3.1, eq. 1) ------------------------------------
# eta_opt = 0.3118 C^-0.1250, B_opt = 0.2920 C^0.3271 (tokens), C = M x D with M the non-embedding FLOPs per
# token 72 n_layer d^2 + 12 n_layer d l_seq. Fitted on C in 1e17..2e19, validated at 1e20.
DEEPSEEK_LR_COEF, DEEPSEEK_LR_EXP = 0.3118, -0.1250
DEEPSEEK_BATCH_COEF, DEEPSEEK_BATCH_EXP = 0.2920, 0.3271
DEEPSEEK_RANGE = FittedRange(compute_flops=(1e17, 2e19))
# Multi-step schedule (section 2.3): 2000 warmup steps, x0.316 after 80% of tokens, x0.1 after 90%.
DEEPSEEK_STEPS = ((0.8, 0.316), (0.9, 0.1))


def deepseek_multistep_factor(progress: float) -> float:
    """The share of peak LR after ``progress`` (0..1) of the training tokens (DeepSeek LLM, section 2.3)."""
    factor = 1.0
    for threshold, level in DEEPSEEK_STEPS:
        factor = level if progress >= threshold else factor
    return factor


def deepseek_flops_per_token(num_layers: int, hidden_size: int, seq_len: int) -> float:
    """M = 72 n_layer d^2 + 12 n_layer d l_seq (DeepSeek LLM eq. 2; MHA + 4d FFN by definition)."""
    return 72 * num_layers * hidden_size**2 + 12 * num_layers * hidden_size * seq_len


def deepseek_peak_lr(compute_flops: float) -> float:
    return DEEPSEEK_LR_COEF * compute_flops**DEEPSEEK_LR_EXP


def deepseek_batch_tokens(compute_flops: float) -> float:
    return DEEPSEEK_BATCH_COEF * compute_flops**DEEPSEEK_BATCH_EXP


# --- LR rescaling with batch (Granziol et al. 2020, "Learning Rates as a Function of Batch Size", ---------
# arXiv 2006.09092, sections 5-6: square root for adaptive optimizers, linear for SGD). This table is the one
# list of optimizer names: train/optim.py builds exactly these.
_RULES: dict[str, LrScalingRule] = {"adamw": "sqrt", "lamb": "sqrt", "sgd": "linear", "lars": "linear"}
OPTIMIZERS = tuple(_RULES)
# The one list of schedule names (train/schedule.py implements each; the planner may pick any).
SCHEDULES = ("cosine", "wsd", "power", "multistep", "constant")


def lr_scaling_rule(optimizer: str) -> LrScalingRule:
    """Square root for adaptive (Adam-family, LAMB) optimizers, linear for SGD and LARS."""
    if optimizer not in _RULES:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(_RULES)}")
    return _RULES[optimizer]


def rescale_lr(lr: float, *, from_batch: float, to_batch: float, rule: LrScalingRule) -> float:
    """The LR at ``to_batch`` given ``lr`` at ``from_batch``; the planner's rounding and the adaptive batch
    controller's coupling both use it."""
    ratio = to_batch / from_batch
    return lr * (math.sqrt(ratio) if rule == "sqrt" else ratio)


# --- Power scheduler (Shen et al. 2024, "Power Scheduler", arXiv 2408.13359, eq. 6 and section 4) ----------
# lr(n) = min(eta_max, beta a n^b), n tokens seen, beta batch in SEQUENCES; a = 4, b = -0.51, eta_max = 0.02
# (the released dolomite-engine configs). muP base learning rates: not valid under standard parametrization.
# train/schedule.py's ``power`` schedule evaluates this function.
POWER_A, POWER_B, POWER_MAX_LR = 4.0, -0.51, 0.02


def power_scheduler_lr(tokens_seen: float, *, batch_sequences: float, a: float = POWER_A, b: float = POWER_B,
                       max_lr: float = POWER_MAX_LR) -> float:
    if tokens_seen <= 0:
        return max_lr  # n^b -> infinity as n -> 0 (b < 0), so the cap binds
    return min(max_lr, batch_sequences * a * tokens_seen**b)


# --- Law values the planner uses ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PowerLaw:
    """value = coef x N^exp_params x D^exp_tokens (the law.json form, docs/CONTRACTS.md)."""

    coef: float
    exp_params: float
    exp_tokens: float

    def __call__(self, non_vocab_params: float, tokens: float) -> float:
        return self.coef * non_vocab_params**self.exp_params * tokens**self.exp_tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class Law:
    """A law the planner can use: ``kind`` picks the variables (steplaw form: N, D; deepseek: C = M D)."""

    name: str
    kind: Literal["steplaw", "deepseek"]
    source: str
    schedule: str  # the schedule the law was fitted under
    fitted_range: FittedRange
    lr: PowerLaw | None = None  # steplaw form only
    batch: PowerLaw | None = None
    min_lr: float | None = None  # fixed floor; None means a fraction of peak (schedule-specific)

    def recommend(self, *, non_vocab_params: float, tokens: float, compute_flops: float) -> tuple[float, float]:
        """(peak LR, batch in tokens)."""
        if self.kind == "deepseek":
            return deepseek_peak_lr(compute_flops), deepseek_batch_tokens(compute_flops)
        assert self.lr is not None and self.batch is not None
        return self.lr(non_vocab_params, tokens), self.batch(non_vocab_params, tokens)


STEP_LAW = Law(name="step", kind="steplaw", source="Step Law, Li et al. 2025 (arXiv 2503.04715)", schedule="cosine",
               fitted_range=STEP_LAW_RANGE, min_lr=STEP_LAW_MIN_LR,
               lr=PowerLaw(coef=STEP_LAW_LR_COEF, exp_params=STEP_LAW_LR_EXP_PARAMS, exp_tokens=STEP_LAW_LR_EXP_TOKENS),
               batch=PowerLaw(coef=STEP_LAW_BATCH_COEF, exp_params=0.0, exp_tokens=STEP_LAW_BATCH_EXP_TOKENS))
DEEPSEEK_LAW = Law(name="deepseek", kind="deepseek", source="DeepSeek LLM, Bi et al. 2024 (arXiv 2401.02954)",
                   schedule="multistep", fitted_range=DEEPSEEK_RANGE)
LAWS = {law.name: law for law in (STEP_LAW, DEEPSEEK_LAW)}


def _pair(value: object) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))  # type: ignore[index]


def law_from_dict(d: dict, *, source: str = "") -> Law:
    """A user-fitted law in the law.json format of docs/CONTRACTS.md (form "steplaw")."""
    if d.get("form", "steplaw") != "steplaw":
        raise ValueError(f"unsupported law form {d.get('form')!r}; supported: steplaw")
    try:
        lr, batch = PowerLaw(**d["lr"]), PowerLaw(**d["batch"])
    except (KeyError, TypeError) as e:
        name = source or d.get("name")
        raise ValueError(f"law file {name!r} needs lr and batch {{coef, exp_params, exp_tokens}}: {e}") from None
    fitted = d.get("fitted_range") or {}
    return Law(name=str(d.get("name") or Path(source).stem or "fitted"), kind="steplaw",
               source=str(d.get("source") or source), schedule=str(d.get("schedule", "cosine")),
               fitted_range=FittedRange(params=_pair(fitted.get("params")), tokens=_pair(fitted.get("tokens"))),
               lr=lr, batch=batch, min_lr=d.get("min_lr", STEP_LAW_MIN_LR))


def load_law(path: str | os.PathLike) -> Law:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"law file {path} does not exist")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"law file {path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        kind = {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(d), "number")
        raise ValueError(f"{path}: a JSON {kind}, not a law object")
    return law_from_dict(d, source=str(path))


def get_law(name_or_path: str) -> Law:
    """A built-in law by name (``step``, ``deepseek``) or a law.json file."""
    if name_or_path in LAWS:
        return LAWS[name_or_path]
    if name_or_path.endswith(".json"):
        return load_law(name_or_path)
    raise ValueError(f"unknown law {name_or_path!r}; choose one of: {', '.join(LAWS)}, or a law.json path")
