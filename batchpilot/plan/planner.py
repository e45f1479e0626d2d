"""The one dial: a ``Budget`` (model, data or compute or time, GPUs) becomes a frozen ``Plan`` the trainer executes.

Derivation order (``Plan.explain`` prints it with numbers): model shape -> N, FLOPs per token -> tokens D ->
the law's peak LR and batch (tokens) -> micro-batch and checkpointing that fit in memory -> global batch
rounded to micro-batch x accumulation x GPUs x sequence length -> LR rescaled for the rounding -> warmup,
steps, schedule -> time. ``batchpilot train --plan`` loads the ``Plan`` (``Plan.load``) and the trainer executes
it without re-deriving any of it; a run without a plan records the same type in its plan.json with the law
fields empty (``law`` and the predictions None). plan.json carries ``schema_version``.

Design choice: the step's rows per GPU are the nearest whole number to the law's batch; among the micro-batches
that fit (any whole number, not only powers of two) and divide those rows into whole accumulation steps -- or
reach them within ``ROWS_TOLERANCE`` (5%), e.g. for a prime number of rows; micro-batches below a reasonable
size are dropped when larger ones qualify -- the plan takes the one with the highest predicted tokens/s (MFU
per shape from ``--mfu-from``, plan/mfu.py); ties go to the rows nearer the law, then to the larger
micro-batch (with one assumed MFU everything ties). The LR follows the rounding with the optimizer's rescaling rule. GPU plans
compile the blocks (the memory model's compiled terms); CPU offload is planned when nothing else fits.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from batchpilot.model.hf import read_config
from batchpilot.io import write_json_atomic
from batchpilot.model import counting
from batchpilot.model.llama import PRESETS, LlamaConfig, get_preset
from batchpilot.plan import laws
from batchpilot.plan.memory import (CPU_MEMORY_GB_S, GIB, PCIE_GB_S, REASONABLE_MICRO_BATCH_TOKENS,
                                    RING_SCORE_CHUNK_BYTES,
                                    STREAM_CHUNK_TOKENS, MemoryEstimate, estimate_offload_peak, estimate_peak_bytes, fit_micro_batch, largest_fitting,
                                    offload_step_seconds, recompute_factor)
from batchpilot.plan.mfu import MfuTable, read_mfu_table


# Warmup: 2000 steps in both DeepSeek LLM (arXiv 2401.02954, section 2.3) and the Step Law recipe (arXiv
# 2503.04715, section 2), capped at 10% of the run (our rule) so short runs do not spend most of their steps
# warming up.
WARMUP_STEPS, WARMUP_MAX_FRACTION = 2000, 0.1
SCHEDULES = laws.SCHEDULES
# 2: compile, float8, offload, predicted_tokens_per_second, mfu_source (version 1 plans are read with the
# defaults a version 1 plan ran with: eager, no float8, no offload). 3: context_parallel (older plans: 1).
PLAN_SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
V2_DEFAULTS: dict[str, Any] = {"context_parallel": 1}
V1_DEFAULTS: dict[str, Any] = {"compile": False, "float8": None, "offload": "none",
                               "predicted_tokens_per_second": None, "mfu_source": None, **V2_DEFAULTS}
# The ring attention of train/context_parallel.py is plain fp32 matmuls over (query chunk x key block) scores with
# the causal mask applied to whole blocks, so it computes the full T x T scores (twice the causal FLOPs) at the
# GPU's fp32 rate, not its bf16 tensor-core rate. [H200] NVIDIA H200 datasheet: FP32 67 TFLOP/s (the planner's
# default GPU; other GPUs: a lower bound on the attention time is what this gives).
RING_ATTENTION_FP32_TFLOPS = 67.0
OFFLOAD_CHOICES = ("auto", "none", "cpu")
# Shape derived from --params: depth L from N = 12 L d^2 with d = 64 L (the llama-125m aspect ratio, nanochat's
# dim = 64 x depth), head_dim 64, MHA, SwiGLU width solving N exactly (multiple of 64), Llama-2 vocabulary.
DERIVED_ASPECT, DERIVED_HEAD_DIM, DERIVED_VOCAB = 64, 64, 32000


@dataclass(kw_only=True, slots=True)
class Budget:
    preset: str | None = None
    hf_config: str | None = None
    params: float | None = None  # non-vocabulary N; a Llama-like shape is derived for memory and time
    tokens: float | None = None
    compute_flops: float | None = None  # training FLOPs; D = C / FLOPs per token
    hours: float | None = None  # wall clock; D = GPUs x peak x MFU x seconds / FLOPs per token
    num_gpus: int = 1
    gpu_memory_gib: float = 80.0
    seq_len: int = 2048
    law: str = "step"  # step | deepseek | path/to/law.json
    optimizer: str = "adamw"
    schedule: str | None = None  # None: the schedule the law was fitted with
    gpu_peak_tflops: float = 989.0  # H100/H200 dense bf16
    mfu: float = 0.4
    mfu_from: str | None = None  # a train_throughput JSON, an MFU table or a metrics.jsonl (plan/mfu.py)
    headroom: float = 0.1
    compile: bool = True  # GPU plans compile the blocks (train/parallel.py apply_compile); memory uses its terms
    float8: str | None = None  # tensorwise | rowwise: torchao float8 matmuls in the blocks
    offload: str = "auto"  # auto: CPU offload (FSDP2 CPUOffloadPolicy) only when nothing else fits; none; cpu
    pcie_gb_s: float = PCIE_GB_S  # host link for the offloaded step time
    cpu_memory_gb_s: float = CPU_MEMORY_GB_S

    def __post_init__(self) -> None:
        models = [k for k in ("preset", "hf_config", "params") if getattr(self, k) is not None]
        amounts = [k for k in ("tokens", "compute_flops", "hours") if getattr(self, k) is not None]
        if len(models) != 1:
            raise ValueError(f"give exactly one of preset, hf_config, params (got {', '.join(models) or 'none'})")
        if len(amounts) != 1:
            raise ValueError(f"give exactly one of tokens, compute_flops, hours (got {', '.join(amounts) or 'none'})")
        for k in ("params", *amounts, "num_gpus", "gpu_memory_gib", "seq_len", "gpu_peak_tflops", "mfu"):
            if getattr(self, k) is not None and getattr(self, k) <= 0:
                raise ValueError(f"{k} must be > 0, got {getattr(self, k)}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if not 0 < self.mfu <= 1 or not 0 <= self.headroom < 1:
            raise ValueError(f"need 0 < mfu <= 1 and 0 <= headroom < 1, got {self.mfu}, {self.headroom}")
        laws.lr_scaling_rule(self.optimizer)  # validates the name
        if self.float8 not in (None, "tensorwise", "rowwise"):
            raise ValueError(f"--float8 {self.float8!r}: choose tensorwise or rowwise")
        if self.offload not in OFFLOAD_CHOICES:
            raise ValueError(f"--offload {self.offload!r}: choose one of {', '.join(OFFLOAD_CHOICES)}")
        if min(self.pcie_gb_s, self.cpu_memory_gb_s) <= 0:
            raise ValueError("--pcie-gb-s and --cpu-memory-gb-s must be > 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """What a run executes. Made by ``make_plan`` from a law, or recorded by the trainer for a run without one
    (then ``law`` and the predicted_* / memory / MFU fields are None)."""

    schema_version: int = PLAN_SCHEMA_VERSION
    model: str | dict[str, Any]  # preset name, HF directory / config.json path, or LlamaConfig fields
    num_params: int
    non_vocab_params: int
    seq_len: int
    num_gpus: int
    global_batch_tokens: int
    micro_batch_size: int
    grad_accum_steps: int
    peak_lr: float
    min_lr: float
    warmup_steps: int
    warmup_tokens: int
    total_steps: int
    total_tokens: int
    schedule: str
    optimizer: str
    activation_checkpointing: str  # "none" | "full" (train/parallel.py modes)
    sharding: str  # "none" | "fsdp"
    batch_policy: str = "fixed"  # train/adaptive.py policies; a planned batch is fixed
    predicted_peak_memory_bytes: int | None
    gpu_memory_bytes: int | None
    predicted_step_seconds: float | None
    predicted_total_seconds: float | None
    flops_per_token: float
    mfu: float | None
    tokens_per_param: float
    law: dict[str, Any] | None  # name, source, non_vocab_params, tokens, compute_flops, batch_tokens, peak_lr (raw)
    compile: bool = False  # torch.compile the blocks (--parallel.compile)
    float8: str | None = None  # --parallel.float8
    offload: str = "none"  # "none" | "cpu" (--parallel.offload: FSDP2 CPUOffloadPolicy)
    context_parallel: int = 1  # GPUs that split each sequence (--parallel.context_parallel; ring attention)
    predicted_tokens_per_second: float | None = None  # global batch / predicted step seconds, all GPUs
    mfu_source: str | None = None  # where ``mfu`` came from (a measured table, a run, or assumed)
    warnings: tuple[str, ...] = ()
    derivation: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["warnings"], d["derivation"] = list(self.warnings), list(self.derivation)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "plan") -> Plan:
        """A Plan from plan.json's object; a wrong ``schema_version`` or missing keys is a one-line error."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: a plan is a JSON object, got {type(d).__name__}")
        version = d.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise ValueError(f"{source}: schema_version {version!r}, this batchpilot reads "
                             f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}; make the plan again with "
                             f"`batchpilot plan --out`")
        if version == 1:  # upgraded in memory: a version 1 plan ran eager, without float8 or offload
            d = {**V1_DEFAULTS, **d, "schema_version": PLAN_SCHEMA_VERSION}
        elif version == 2:  # a version 2 plan split no sequence
            d = {**V2_DEFAULTS, **d, "schema_version": PLAN_SCHEMA_VERSION}
        names = {f.name for f in fields(cls)}
        missing = names - set(d) - {"warnings", "derivation", "batch_policy"}
        if missing:
            raise ValueError(f"{source} is missing {', '.join(sorted(missing))}")
        kept = {k: v for k, v in d.items() if k in names}
        try:
            return cls(**{**kept, "warnings": tuple(d.get("warnings", ())),
                          "derivation": tuple(d.get("derivation", ()))})
        except TypeError as e:
            raise ValueError(f"{source}: {e}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically: a temp file in the same directory, then rename."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plan file {path} not found")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"plan file {path} is not valid JSON: {e}") from None
        return cls.from_dict(d, source=str(path))

    def explain(self) -> str:
        lines = [f"{i}. {line}" for i, line in enumerate(self.derivation, 1)]
        return "\n".join(lines + [f"WARNING: {w}" for w in self.warnings])


# --- model and amount of data ---------------------------------------------------------------------------


def derive_shape(non_vocab_params: float) -> LlamaConfig:
    """A Llama-like shape with about ``non_vocab_params`` attention + MLP parameters (DERIVED_* constants)."""
    layers = max(1, round((non_vocab_params / (12 * DERIVED_ASPECT**2)) ** (1 / 3)))
    d = DERIVED_ASPECT * layers
    mlp = (non_vocab_params / layers - 4 * d * d) / (3 * d)
    return LlamaConfig(vocab_size=DERIVED_VOCAB, hidden_size=d, intermediate_size=max(64, 64 * round(mlp / 64)),
                       num_layers=layers, num_heads=d // DERIVED_HEAD_DIM, num_kv_heads=d // DERIVED_HEAD_DIM)


def resolve_model(budget: Budget) -> tuple[LlamaConfig, str | dict[str, Any], str]:
    """(config, what plan.json records as ``model``, one derivation line)."""
    if budget.preset is not None:
        return get_preset(budget.preset), budget.preset, f"model: preset {budget.preset}"
    if budget.hf_config is not None:
        config = read_config(budget.hf_config)
        return config, asdict(config), f"model: HF config {budget.hf_config}"
    config = derive_shape(budget.params)  # type: ignore[arg-type]
    line = (f"model: derived from N = {budget.params:.4g}: {config.num_layers} layers, d {config.hidden_size}, "
            f"MLP {config.intermediate_size}, vocab {config.vocab_size} (shape N = {counting.non_vocab_params(config):,}; "
            f"the laws use N as given)")
    return config, asdict(config), line


def training_tokens(budget: Budget, flops_per_token: float, mfu: float) -> tuple[float, str]:
    if budget.tokens is not None:
        return budget.tokens, f"D = {budget.tokens:.4g} tokens (given)"
    if budget.compute_flops is not None:
        d = budget.compute_flops / flops_per_token
        return d, f"D = C / (6N + attention) = {budget.compute_flops:.4g} / {flops_per_token:.4g} = {d:.4g} tokens"
    seconds = budget.hours * 3600  # type: ignore[operator]
    d = budget.num_gpus * budget.gpu_peak_tflops * 1e12 * mfu * seconds / flops_per_token
    return d, (f"D = GPUs x peak x MFU x time / (6N + attention) = {budget.num_gpus} x {budget.gpu_peak_tflops:g}e12"
               f" x {mfu:.3g} x {seconds:.4g} s / {flops_per_token:.4g} = {d:.4g} tokens")


# --- the plan --------------------------------------------------------------------------------------------


def law_point(law: laws.Law, config: LlamaConfig, n: float, tokens: float, seq_len: int) -> dict[str, Any]:
    c = laws.deepseek_flops_per_token(config.num_layers, config.hidden_size, seq_len) * tokens
    lr, batch = law.recommend(non_vocab_params=n, tokens=tokens, compute_flops=c)
    return {"name": law.name, "source": law.source, "non_vocab_params": n, "tokens": tokens, "compute_flops": c,
            "batch_tokens": batch, "peak_lr": lr, "schedule": law.schedule,
            "warnings": law.fitted_range.extrapolations(params=n, tokens=tokens, compute_flops=c)}


def schedule_and_min_lr(law: laws.Law, budget: Budget, peak_lr: float) -> tuple[str, float]:
    """The law's schedule unless overridden; min LR: the law's fixed floor (Step Law 1e-5), else 10% of peak
    (DeepSeek's last multi-step level)."""
    schedule = budget.schedule or law.schedule
    min_lr = law.min_lr if law.min_lr is not None else laws.DEEPSEEK_STEPS[-1][1] * peak_lr
    return schedule, min(min_lr, peak_lr)


# --- the micro-batch: memory, then predicted tokens/s -------------------------------------------------------------

# The step's rows may move this far from the nearest whole number to the law's batch so that a micro-batch divides
# them into whole accumulation steps: the loss is flat near the law's batch (Step Law, arXiv 2503.04715: a convex
# landscape with a broad near-optimal region around the fitted batch), and the LR follows the rounding.
ROWS_TOLERANCE = 0.05


@dataclass(frozen=True, slots=True)
class MicroBatchChoice:
    micro_batch_size: int
    grad_accum_steps: int
    mode: str  # "none" | "full" | "stream"
    sharding: str
    offload: str  # "none" | "cpu"
    compile: bool
    estimate: MemoryEstimate
    mfu: float  # model FLOPs utilisation predicted at this shape and mode
    mfu_source: str
    step_seconds: float
    candidates: int  # micro-batches compared
    mode_reason: str
    context_parallel: int = 1  # GPUs per sequence; rows are then per data-parallel rank (a group of that many)

    @property
    def rows_per_gpu(self) -> int:
        """Rows per data-parallel rank per step (per GPU without context parallelism)."""
        return self.micro_batch_size * self.grad_accum_steps


def recompute_factors(config: LlamaConfig) -> dict[str, float]:
    """``memory.recompute_factor`` of every checkpointing mode, the form ``MfuTable.lookup`` converts with."""
    return {m: recompute_factor(config, m) for m in ("none", "full", "stream")}


def mfu_table(budget: Budget) -> MfuTable:
    """``--mfu-from`` (plan/mfu.py), else the assumed ``--mfu`` for every shape (the documented fallback)."""
    if budget.mfu_from:
        return read_mfu_table(budget.mfu_from)
    return MfuTable.constant(budget.mfu, f"assumed MFU {budget.mfu:g} for every shape (--mfu; --mfu-from a "
                                         f"train_throughput JSON gives measured MFU per shape)")


def accumulation_options(rows_per_gpu: int, largest: int, seq_len: int) -> list[tuple[int, int]]:
    """(micro-batch, accumulation steps) for the micro-batches 1..largest whose whole accumulation steps give
    the step's rows exactly, or within ``ROWS_TOLERANCE``; of those, only the ones of at least a reasonable
    size (``REASONABLE_MICRO_BATCH_TOKENS``, or the largest that fits) when there are any, so that a prime
    number of rows does not leave micro-batch 1 as the only exact choice."""
    out = []
    for micro in range(1, max(1, min(largest, rows_per_gpu)) + 1):
        accum = max(1, round(rows_per_gpu / micro))
        if abs(micro * accum - rows_per_gpu) <= ROWS_TOLERANCE * rows_per_gpu:
            out.append((micro, accum))
    reasonable = min(largest, -(-REASONABLE_MICRO_BATCH_TOKENS // seq_len))
    return [o for o in out if o[0] >= reasonable] or out


def choose_micro_batch(config: LlamaConfig, budget: Budget, rows_per_gpu: int, table: MfuTable,
                       flops_per_token: float, rows_per_step: float | None = None) -> MicroBatchChoice:
    """The checkpointing mode from ``fit_micro_batch``; then, among the micro-batches that fit in that mode and
    make whole accumulation steps (``accumulation_options``), the one with the highest predicted tokens/s
    (ties: the rows nearer the law, then the larger micro-batch). CPU offload when nothing fits on the GPU (``--offload auto``) or when asked."""
    if budget.offload == "cpu":
        return choose_offload(config, budget, rows_per_gpu, table, flops_per_token)
    try:
        fit = fit_micro_batch(config, seq_len=budget.seq_len, optimizer=budget.optimizer, num_gpus=budget.num_gpus,
                              gpu_memory_gib=budget.gpu_memory_gib, headroom=budget.headroom,
                              max_micro_batch=rows_per_gpu, compile=budget.compile, float8=budget.float8)
    except ValueError as err:
        cp = choose_context_parallel(config, budget, rows_per_step or rows_per_gpu * budget.num_gpus, table,
                                     flops_per_token)
        if cp is not None:
            return cp
        if budget.offload == "none":
            raise
        try:
            return choose_offload(config, budget, rows_per_gpu, table, flops_per_token)
        except ValueError as offload_err:
            raise ValueError(f"{err}; {offload_err}") from None
    limit = budget.gpu_memory_gib * GIB * (1 - budget.headroom)
    recompute = recompute_factors(config)
    scored = []
    for micro, accum in accumulation_options(rows_per_gpu, fit.micro_batch_size, budget.seq_len):
        est = estimate_peak_bytes(config, micro_batch_size=micro, seq_len=budget.seq_len, optimizer=budget.optimizer,
                                  num_gpus=budget.num_gpus, sharding=fit.sharding, checkpointing=fit.mode == "full",
                                  stream_chunk_tokens=STREAM_CHUNK_TOKENS if fit.streaming else None,
                                  compile=budget.compile and not fit.streaming, float8=budget.float8,
                                  grad_accum_steps=accum)
        if est.total_bytes > limit:
            continue
        look = table.lookup(seq_len=budget.seq_len, micro_batch_size=micro, mode=fit.mode, float8=budget.float8,
                            bf16_params=fit.sharding == "fsdp", recompute=recompute)
        step = flops_per_token * micro * accum * budget.num_gpus * budget.seq_len / (
            budget.num_gpus * budget.gpu_peak_tflops * 1e12 * look.mfu)
        scored.append((micro * accum * budget.num_gpus * budget.seq_len / step,
                       -abs(micro * accum - rows_per_gpu), micro, accum, est, look, step))
    if not scored:  # the largest that fits makes no whole accumulation within the tolerance: keep the nearest
        micro = fit.micro_batch_size
        accum = max(1, round(rows_per_gpu / micro))
        look = table.lookup(seq_len=budget.seq_len, micro_batch_size=micro, mode=fit.mode, float8=budget.float8,
                            bf16_params=fit.sharding == "fsdp", recompute=recompute)
        step = flops_per_token * micro * accum * budget.seq_len / (budget.gpu_peak_tflops * 1e12 * look.mfu)
        scored.append((0.0, 0, micro, accum, fit.estimate, look, step))
    _, _, micro, accum, est, look, step = max(scored, key=lambda s: s[:3])
    return MicroBatchChoice(micro_batch_size=micro, grad_accum_steps=accum, mode=fit.mode, sharding=fit.sharding,
                            offload="none", compile=budget.compile and not fit.streaming, estimate=est, mfu=look.mfu,
                            mfu_source=look.source, step_seconds=step, candidates=len(scored),
                            mode_reason=fit.reason)


def choose_context_parallel(config: LlamaConfig, budget: Budget, rows_per_step: float, table: MfuTable,
                            flops_per_token: float) -> MicroBatchChoice | None:
    """When one sequence does not fit a GPU: split each over ``cp`` GPUs (ring attention, Li et al. 2021,
    arXiv 2105.13120; ``train/context_parallel.py``), the smallest power of two that fits, FSDP2 over all GPUs.

    Memory: the planner's model at ``seq_len / cp`` tokens per GPU (every token-wise tensor is local), plus the
    ring's transient: a key/value block arriving while the current one is used (2 x 2 x (T / cp) x kv_dim, fp32)
    and one query chunk's fp32 scores, probabilities and mask (``RING_SCORE_CHUNK_BYTES`` each). Rows are per
    data-parallel rank (GPUs / cp of them): the law's rows per step over those ranks, nearest whole. Time: the
    non-attention FLOPs at the MFU, the ring attention's full-square FLOPs at the fp32 rate
    (``RING_ATTENTION_FP32_TFLOPS``). Eager blocks (the ring is not validated inside compiled ones); None when no
    split fits or fewer than 2 GPUs."""
    limit = budget.gpu_memory_gib * GIB * (1 - budget.headroom)
    cp = 2
    while cp <= budget.num_gpus:
        if budget.num_gpus % cp == 0 and budget.seq_len % (2 * cp) == 0:
            local = budget.seq_len // cp
            rows = max(1, round(rows_per_step / (budget.num_gpus // cp)))
            est = estimate_peak_bytes(config, micro_batch_size=1, seq_len=local, optimizer=budget.optimizer,
                                      num_gpus=budget.num_gpus, sharding="fsdp", checkpointing=True,
                                      grad_accum_steps=rows)
            ring = 4 * 4 * local * config.num_kv_heads * config.head_dim + 3 * RING_SCORE_CHUNK_BYTES
            if est.total_bytes + ring <= limit:
                return _context_parallel_choice(config, budget, cp, rows, est, ring, table, flops_per_token)
        cp *= 2
    return None


def _context_parallel_choice(config: LlamaConfig, budget: Budget, cp: int, rows: int, est: MemoryEstimate,
                             ring_bytes: float, table: MfuTable, flops_per_token: float) -> MicroBatchChoice:
    recompute = recompute_factors(config)
    look = table.lookup(seq_len=budget.seq_len // cp, micro_batch_size=1, mode="full", float8=budget.float8,
                        bf16_params=True, recompute=recompute)
    attention_per_token = 6 * config.num_layers * config.num_heads * config.head_dim * budget.seq_len  # causal
    other = (flops_per_token - attention_per_token) * budget.seq_len / (budget.gpu_peak_tflops * 1e12 * look.mfu)
    # full square (2x causal), and its forward recomputed under checkpointing (x 4/3 of forward + backward)
    ring = 2 * attention_per_token * budget.seq_len * recompute["full"] / (RING_ATTENTION_FP32_TFLOPS * 1e12)
    step = rows * (other + ring) / cp  # each GPU does 1 / cp of every row of its group
    est = replace(est, activations=est.activations + ring_bytes)
    return MicroBatchChoice(micro_batch_size=1, grad_accum_steps=rows, mode="full", sharding="fsdp", offload="none",
                            compile=False, estimate=est, mfu=look.mfu, mfu_source=look.source, step_seconds=step,
                            candidates=1, context_parallel=cp,
                            mode_reason=f"context parallelism over {cp} GPUs: one {budget.seq_len:,}-token sequence "
                                        f"does not fit a GPU; {budget.seq_len // cp:,} tokens per GPU, ring "
                                        f"attention (Li et al. 2021, arXiv 2105.13120), full checkpointing, eager "
                                        f"blocks; its attention is plain fp32 math, timed at "
                                        f"{RING_ATTENTION_FP32_TFLOPS:g} TFLOP/s")


def choose_offload(config: LlamaConfig, budget: Budget, rows_per_gpu: int, table: MfuTable,
                   flops_per_token: float) -> MicroBatchChoice:
    """FSDP2 + CPUOffloadPolicy, full checkpointing, eager blocks: the micro-batch with the highest predicted
    tokens/s among those whose peak GPU bytes (``memory.estimate_offload_peak``) fit; the step time adds the
    host link and the CPU AdamW step (``memory.offload_step_seconds``)."""
    limit = budget.gpu_memory_gib * GIB * (1 - budget.headroom)

    def estimate(micro: int) -> MemoryEstimate:
        return estimate_offload_peak(config, budget.seq_len, micro_batch_size=micro, checkpointing=True,
                                     num_gpus=budget.num_gpus)

    largest = largest_fitting(lambda m: estimate(m).total_bytes <= limit, max(1, min(rows_per_gpu, 512)))
    if largest == 0:
        need = estimate(1).total_bytes / (1 - budget.headroom) / GIB
        raise ValueError(f"even CPU offload needs {need:.1f} GiB per GPU at micro-batch 1 (seq_len {budget.seq_len})")
    recompute = recompute_factors(config)
    scored = []
    options = accumulation_options(rows_per_gpu, largest, budget.seq_len)
    for micro, accum in options or [(largest, max(1, round(rows_per_gpu / largest)))]:
        look = table.lookup(seq_len=budget.seq_len, micro_batch_size=micro, mode="full", float8=None,
                            bf16_params=True, recompute=recompute)
        compute = flops_per_token * micro * accum * budget.seq_len / (budget.gpu_peak_tflops * 1e12 * look.mfu)
        step = offload_step_seconds(config, compute_seconds=compute, micro_steps=accum, num_gpus=budget.num_gpus,
                                    pcie_gb_s=budget.pcie_gb_s, cpu_memory_gb_s=budget.cpu_memory_gb_s)
        scored.append((micro * accum / step, -abs(micro * accum - rows_per_gpu), micro, accum, look, step))
    _, _, micro, accum, look, step = max(scored, key=lambda s: s[:3])
    return MicroBatchChoice(micro_batch_size=micro, grad_accum_steps=accum, mode="full", sharding="fsdp",
                            offload="cpu", compile=False, estimate=estimate(micro), mfu=look.mfu,
                            mfu_source=look.source, step_seconds=step, candidates=len(scored),
                            mode_reason="CPU offload: the model does not fit on the GPU"
                                        if budget.offload == "auto" else "CPU offload (--offload cpu)")


def hours_mfu(table: MfuTable, budget: Budget) -> float:
    """The MFU that turns --hours into tokens: the table's at the largest measured micro-batch, no checkpointing."""
    return table.lookup(seq_len=budget.seq_len, micro_batch_size=1 << 20, mode="none", float8=budget.float8,
                        bf16_params=budget.num_gpus > 1, recompute={}).mfu


def make_plan(budget: Budget) -> Plan:
    config, model_ref, model_line = resolve_model(budget)
    law = laws.get_law(budget.law)
    n = budget.params if budget.params is not None else counting.non_vocab_params(config)
    fpt = counting.training_flops_per_token(config, budget.seq_len)
    table = mfu_table(budget)
    tokens, tokens_line = training_tokens(budget, fpt, hours_mfu(table, budget))
    point = law_point(law, config, n, tokens, budget.seq_len)

    raw_sequences = point["batch_tokens"] / budget.seq_len
    rows_per_gpu = max(1, round(raw_sequences / budget.num_gpus))  # the step's rows per GPU, nearest whole
    choice = choose_micro_batch(config, budget, rows_per_gpu, table, fpt, rows_per_step=raw_sequences)
    data_ranks = budget.num_gpus // choice.context_parallel  # a context-parallel group shares its rows
    global_tokens = choice.rows_per_gpu * data_ranks * budget.seq_len
    rule = laws.lr_scaling_rule(budget.optimizer)
    peak_lr = laws.rescale_lr(point["peak_lr"], from_batch=point["batch_tokens"], to_batch=global_tokens, rule=rule)
    total_steps = max(1, round(tokens / global_tokens))
    schedule, min_lr = schedule_and_min_lr(law, budget, peak_lr)
    warmup_steps = min(WARMUP_STEPS, int(WARMUP_MAX_FRACTION * total_steps))
    step_s = choice.step_seconds
    total = counting.total_params(config)
    plan = Plan(model=model_ref, num_params=total, non_vocab_params=int(n), seq_len=budget.seq_len,
                num_gpus=budget.num_gpus, global_batch_tokens=global_tokens, micro_batch_size=choice.micro_batch_size,
                grad_accum_steps=choice.grad_accum_steps, peak_lr=peak_lr, min_lr=min_lr, total_steps=total_steps,
                warmup_steps=warmup_steps, warmup_tokens=warmup_steps * global_tokens,
                total_tokens=total_steps * global_tokens, schedule=schedule, optimizer=budget.optimizer,
                activation_checkpointing=choice.mode, sharding=choice.sharding,
                predicted_peak_memory_bytes=int(choice.estimate.total_bytes),
                gpu_memory_bytes=int(budget.gpu_memory_gib * GIB), predicted_step_seconds=step_s,
                predicted_total_seconds=step_s * total_steps, flops_per_token=fpt, mfu=choice.mfu,
                tokens_per_param=tokens / total, law={k: v for k, v in point.items() if k != "warnings"},
                compile=choice.compile, float8=budget.float8 if choice.offload == "none" else None,
                offload=choice.offload, context_parallel=choice.context_parallel,
                predicted_tokens_per_second=global_tokens / step_s,
                mfu_source=choice.mfu_source)
    lines = derivation(plan, law, choice, budget, model_line=model_line, tokens_line=tokens_line,
                       raw_rows_per_gpu=raw_sequences / data_ranks)
    if choice.context_parallel == 1:
        lines += context_parallel_note(config, budget, choice.mode)
    return replace(plan, warnings=tuple(point["warnings"] + plan_warnings(plan, law)), derivation=lines)


def plan_warnings(plan: Plan, law: laws.Law) -> list[str]:
    out = []
    if plan.global_batch_tokens > 1.5 * plan.law["batch_tokens"]:
        out.append(f"{plan.num_gpus} GPUs x micro-batch {plan.micro_batch_size} x {plan.seq_len} tokens is "
                   f"{plan.global_batch_tokens / plan.law['batch_tokens']:.1f}x the law's batch; use fewer GPUs "
                   f"or a shorter seq_len")
    if plan.schedule != law.schedule:
        out.append(f"{law.name} was fitted with a {law.schedule} schedule; its LR is not validated under "
                   f"{plan.schedule}")
    return out


def derivation(plan: Plan, law: laws.Law, choice: MicroBatchChoice, budget: Budget, *, model_line: str,
               tokens_line: str, raw_rows_per_gpu: float) -> tuple[str, ...]:
    """The numbered steps of ``Plan.explain``."""
    p, raw = plan, plan.law
    if choice.offload == "cpu":
        compile_line = ("compile: off: the CPU-offload path is planned eager (FSDP2 CPUOffloadPolicy with compiled "
                        "blocks is not validated)")
    elif choice.compile:
        compile_line = ("compile: on (a GPU plan compiles every block, --parallel.compile; inductor): the memory "
                        "model counts what the compiled blocks save (memory.compiled_block_terms)"
                        + ("" if p.activation_checkpointing != "stream" else "; streamed blocks stay eager"))
    else:
        compile_line = "compile: off (--no-compile): the memory model counts eager blocks"
    if p.float8:
        compile_line += f"; float8 {p.float8} matmuls in the blocks (torchao Float8Linear)"
    where = ("CPU offload (FSDP2 CPUOffloadPolicy: parameters, gradients and AdamW states in host memory; "
             "memory.estimate_offload_peak), " if choice.offload == "cpu" else "")
    memory_line = (
        f"memory: {where}checkpointing {p.activation_checkpointing}, sharding {p.sharding}: micro-batch "
        f"{p.micro_batch_size} x {p.grad_accum_steps} accumulation = {choice.rows_per_gpu} rows per "
        f"{'GPU' if p.context_parallel == 1 else 'data-parallel rank'} (law: "
        f"{raw_rows_per_gpu:.1f}); the highest predicted tokens/s among {choice.candidates} micro-batch"
        f"{'es' if choice.candidates != 1 else ''} that fit "
        f"within {1 - budget.headroom:.0%} of {budget.gpu_memory_gib:g} GiB and make whole accumulation steps "
        f"(rows within {ROWS_TOLERANCE:.0%}); {p.predicted_peak_memory_bytes / GIB:.2f} GiB "
        f"(peak at {choice.estimate.peak_moment})"
        + (f"; chose {choice.mode_reason}" if choice.mode_reason else "")
        + (f"; streaming backprop in chunks of {STREAM_CHUNK_TOKENS} tokens (StreamBP, arXiv 2506.03077)"
           if p.activation_checkpointing == "stream" else ""))
    time_line = (f"time = FLOPs per token x batch / (GPUs x {budget.gpu_peak_tflops:g} TFLOP/s x MFU {p.mfu:.3g})"
                 f" [MFU: {p.mfu_source}; recomputation is inside this MFU]")
    if p.context_parallel > 1:
        time_line = (f"time = (FLOPs per token without attention x batch / (GPUs x {budget.gpu_peak_tflops:g} "
                     f"TFLOP/s x MFU {p.mfu:.3g}) [MFU: {p.mfu_source}]) + the ring attention's full-square "
                     f"FLOPs (2x causal, recomputed once) at {RING_ATTENTION_FP32_TFLOPS:g} TFLOP/s fp32")
    if choice.offload == "cpu":
        time_line += (f", then max(that, the host link: 3 x 4 bytes/param x {p.grad_accum_steps} micro-steps at "
                      f"{budget.pcie_gb_s:g} GB/s) + the CPU AdamW step (28 bytes/param at "
                      f"{budget.cpu_memory_gb_s:g} GB/s; ZeRO-Offload, arXiv 2101.06840)")
    time_line += (f" = {p.predicted_step_seconds:.3g} s/step, {p.predicted_tokens_per_second:,.0f} tokens/s -> "
                  f"{p.predicted_total_seconds / 3600:.3g} h; {p.tokens_per_param:.3g} tokens per parameter")
    return (
        model_line,
        f"N (attention + MLP, no embeddings/head/norms) = {p.non_vocab_params:,}; total params = {p.num_params:,}",
        f"FLOPs per token = 6 x matmul params + 6 L (H E) T = {p.flops_per_token:.4g}",
        tokens_line,
        f"law {law.name} ({law.source}): peak LR {raw['peak_lr']:.4g}, batch {raw['batch_tokens']:.4g} tokens"
        + (f" (C = M D = {raw['compute_flops']:.4g} FLOPs)" if law.kind == "deepseek" else ""),
        compile_line,
        memory_line,
        f"global batch = {p.micro_batch_size} x {p.grad_accum_steps} accum x "
        + (f"{p.num_gpus} GPUs" if p.context_parallel == 1 else
           f"{p.num_gpus // p.context_parallel} data-parallel ranks of {p.context_parallel} GPUs")
        + f" x {p.seq_len} = "
        f"{p.global_batch_tokens:,} tokens (law: {raw['batch_tokens']:,.0f})",
        f"peak LR = {raw['peak_lr']:.4g} x {laws.lr_scaling_rule(p.optimizer)}({p.global_batch_tokens} / "
        f"{raw['batch_tokens']:.0f}) = {p.peak_lr:.4g} (Granziol et al. 2020: sqrt for Adam-family, linear for "
        f"SGD/LARS)",
        f"steps = D / batch = {p.total_steps:,}; warmup = min({WARMUP_STEPS}, {WARMUP_MAX_FRACTION:.0%} of steps) = "
        f"{p.warmup_steps:,}; schedule {p.schedule}, min LR {p.min_lr:.3g}",
        time_line,
    )


def context_parallel_note(config: LlamaConfig, budget: Budget, mode: str) -> tuple[str, ...]:
    """With several GPUs and a checkpointed or streamed plan: what ring-attention context parallelism over all
    GPUs (``train/context_parallel.py``: seq_len / GPUs tokens per rank, FSDP2 over the same GPUs) would need.
    Stated, not chosen: the planner splits sequences only when one does not fit a GPU
    (``choose_context_parallel``)."""
    if budget.num_gpus < 2 or mode == "none" or budget.seq_len % (2 * budget.num_gpus):
        return ()
    est = estimate_peak_bytes(config, micro_batch_size=1, seq_len=budget.seq_len // budget.num_gpus,
                              optimizer=budget.optimizer, num_gpus=budget.num_gpus, sharding="fsdp")
    return (f"context parallelism over {budget.num_gpus} GPUs ({budget.seq_len // budget.num_gpus:,} tokens per GPU, "
            f"no recompute) would need {est.total_bytes / GIB:.1f} GiB at micro-batch 1 (ring attention, Liu et al., "
            f"arXiv 2310.01889); not chosen: one sequence fits a GPU, and the ring's attention is plain fp32 math",)


def compare(budget: Budget) -> dict[str, Plan]:
    """What each built-in law (and the budget's own law file, if any) recommends for the same budget."""
    names = list(laws.LAWS) + ([budget.law] if budget.law not in laws.LAWS else [])
    plans = {name: make_plan(replace(budget, law=name, schedule=None)) for name in names}
    return {plan.law["name"]: plan for plan in plans.values()}  # a law file is shown by its own name
