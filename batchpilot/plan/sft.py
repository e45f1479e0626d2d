"""The SFT recipe as a pure planner: batch, learning rate, epochs, warmup and schedule for supervised fine-tuning,
and the early signals that rank configurations before they finish.

Source: "Unveiling the Secret Recipe: A Guide For Supervised Fine-Tuning Small LLMs" (Pareja et al., arXiv
2412.13337), 3B-7B models, four model families, instruction data spanning knowledge and skills. What the paper
states (abstract and sections on batch size, learning rate, warmup/schedule, stacked vs phased training):
  (i)   larger batches paired with LOWER learning rates give better MMLU / MT-Bench / Open LLM Leaderboard
        scores; its large batches are ~3,840 and ~7,680 samples, against TULU's 128 (Wang et al., arXiv
        2306.04751, who fine-tune at batch 128, LR 2e-5);
  (ii)  early training dynamics predict the final model: LOWER gradient norms and HIGHER loss early on go with
        better final models, so sub-optimal runs can be stopped early;
  (iii) omitting warmup and using a constant learning rate does not hurt;
  (iv)  stacked training (all data at once) matches phased training and is more sample efficient.
What is OUR choice, not the paper's (its exact learning-rate grid is not restated here): the learning rate
values (TULU's 2e-5 at batch 128, falling log-linearly to 1e-5 at the paper's 3,840), the minimum number of
optimizer steps that caps the batch on small datasets, the epoch counts, and a short warmup kept as cheap
insurance. Each number of a plan carries a line saying which it is.

Memory: the micro-batch comes from ``memory.fit_micro_batch`` (full fine-tuning, AdamW); when the model does
not fit even at micro-batch 1 the plan says so and proposes CPU offload instead of failing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from batchpilot.model.counting import non_vocab_params, total_params, training_flops_per_token
from batchpilot.model.llama import LlamaConfig
from batchpilot.plan.memory import (CPU_ADAM_BYTES_PER_PARAM, CPU_MEMORY_GB_S, GIB, OFFLOAD_BYTES_PER_PARAM, PCIE_GB_S,
                                    fit_micro_batch, largest_fitting, offload_step_seconds,
                                    predict_offload_peak_bytes)

__all__ = ["CPU_ADAM_BYTES_PER_PARAM", "OFFLOAD_BYTES_PER_PARAM"]  # re-exported: the offload constants' old home
from batchpilot.plan.planner import PLAN_SCHEMA_VERSION, Plan

PAPER = "Pareja et al., arXiv 2412.13337"
TULU = "Wang et al., arXiv 2306.04751"
PAPER_LARGE_BATCH_EXAMPLES = 3840  # [paper] the smaller of its two large batches (~3,840 and ~7,680 samples)
TULU_BATCH_EXAMPLES, TULU_LR = 128, 2e-5  # [TULU] the small-batch baseline the paper argues against
LARGE_BATCH_LR = 1e-5  # [ours] "lower LR with the large batch": half of TULU's, at the paper's 3,840
MIN_OPTIMIZER_STEPS = 50  # [ours] a run needs enough updates for the early signals and the LR to matter
MIN_BATCH_EXAMPLES = 16  # [ours]
PAPER_PARAMS_RANGE = (3e9, 7.5e9)  # [paper] the model sizes it studies
WARMUP_STEPS_MAX, WARMUP_FRACTION = 25, 0.05  # [ours] the paper finds warmup does not matter; keep it short
# CPU offload: plan/memory.py's constants and functions (host link, CPU AdamW step, peak GPU bytes).
GPU_PEAK_TFLOPS, ASSUMED_MFU = 989.0, 0.4  # H100/H200 dense bf16; the pretraining planner's default MFU


@dataclass(kw_only=True, slots=True)
class SftBudget:
    config: LlamaConfig  # the model's shape (read from the model directory's config.json)
    examples: int  # N: conversations / instruction pairs in the training set
    tokens_per_example: int  # T: mean tokens of one (rendered) example
    num_gpus: int = 1
    gpu_memory_gib: float = 80.0
    seq_len: int = 0  # packed row length; 0: the smallest power of two >= max(2048, T)
    headroom: float = 0.1
    epochs: int = 0  # 0: the recipe's choice
    pcie_gb_s: float = PCIE_GB_S  # host link, for the step time of CPU offload
    cpu_memory_gb_s: float = CPU_MEMORY_GB_S
    gpu_peak_tflops: float = GPU_PEAK_TFLOPS
    mfu: float = ASSUMED_MFU

    def __post_init__(self) -> None:
        if self.examples < 1:
            raise ValueError(f"--examples must be positive, got {self.examples}")
        if self.tokens_per_example < 1:
            raise ValueError(f"--tokens-per-example must be positive, got {self.tokens_per_example}")
        if self.num_gpus < 1 or self.gpu_memory_gib <= 0:
            raise ValueError("--gpus and --gpu-memory-gib must be positive")
        if min(self.pcie_gb_s, self.cpu_memory_gb_s, self.gpu_peak_tflops, self.mfu) <= 0:
            raise ValueError("--pcie-gb-s, --cpu-memory-gb-s, --gpu-peak-tflops and --mfu must be positive")
        if self.seq_len < 0 or self.epochs < 0:
            raise ValueError("--seq-len and --epochs must be >= 0 (0: the recipe's choice)")
        if self.seq_len == 0:
            self.seq_len = 2 ** math.ceil(math.log2(max(2048, self.tokens_per_example)))


@dataclass(frozen=True, kw_only=True, slots=True)
class SftPlan:
    batch_examples: int  # examples per optimizer step (global)
    batch_tokens: int  # tokens per optimizer step, ~ batch_examples * T
    peak_lr: float
    schedule: str  # "constant": the paper finds constant as good as cosine
    warmup_steps: int
    epochs: int
    steps: int  # optimizer steps over all epochs
    seq_len: int
    rows_per_step: int  # packed rows of seq_len per optimizer step (global)
    micro_batch_rows: int  # rows per GPU per forward/backward; 0 when offload is needed
    grad_accum_steps: int
    offload: str  # "none" or "cpu" (the model does not fit the GPUs even at micro-batch 1)
    explanation: list[str] = field(default_factory=list)  # one line per number: the rule and its source
    checkpointing: bool = False  # the memory fit needs activation checkpointing
    predicted_step_seconds: float = 0.0  # compute at the assumed MFU; with offload, max(compute, host link) + CPU step


def plan_sft(budget: SftBudget) -> SftPlan:
    """The SFT recipe for ``budget`` (see the module docstring for what comes from the paper)."""
    n, t = budget.examples, budget.tokens_per_example
    lines: list[str] = []
    epochs = budget.epochs or (3 if n < 10_000 else 2)
    lines.append(f"epochs {epochs}: " + ("given" if budget.epochs else
                 f"[ours] 3 below 10k examples, else 2 (TULU trains 2, {TULU}); all data stacked in one mix, "
                 f"no phases [paper (iv): stacked matches phased and is more sample efficient, {PAPER}]"))

    cap = max(MIN_BATCH_EXAMPLES, n * epochs // MIN_OPTIMIZER_STEPS)
    batch = min(PAPER_LARGE_BATCH_EXAMPLES, cap, n)
    lines.append(f"batch {batch} examples: [paper (i)] large batches (~3,840 / ~7,680 samples vs TULU's 128) "
                 f"fine-tune better, {PAPER}" + ("" if batch == PAPER_LARGE_BATCH_EXAMPLES else
                 f"; capped [ours] to keep >= {MIN_OPTIMIZER_STEPS} optimizer steps on {n:,} examples x {epochs}"))

    lr = large_batch_lr(batch)
    lines.append(f"peak LR {lr:.2g}: [paper (i)] lower LR with the larger batch; the values are [ours]: TULU's "
                 f"{TULU_LR:g} at batch {TULU_BATCH_EXAMPLES} ({TULU}), log-linearly down to {LARGE_BATCH_LR:g} "
                 f"at {PAPER_LARGE_BATCH_EXAMPLES}")

    steps = max(1, n * epochs // batch)
    warmup = min(WARMUP_STEPS_MAX, int(WARMUP_FRACTION * steps))
    lines.append(f"constant LR, {warmup} warmup steps: [paper (iii)] no warmup and a constant LR do not hurt, "
                 f"{PAPER}; the short warmup is [ours] (cheap insurance for fresh AdamW moments)")

    rows = max(1, math.ceil(batch * t / budget.seq_len))
    micro, accum, offload, checkpointing = _fit(budget, rows, lines)
    step_seconds = predicted_step_seconds(budget, rows, offload=offload, micro=micro)
    lines.append(f"step time {step_seconds:.3g} s: " + (
        f"compute at MFU {budget.mfu:g} of {budget.gpu_peak_tflops:g} TFLOP/s" if offload == "none" else
        f"max(compute, parameters twice and gradients once per micro-step over a {budget.pcie_gb_s:g} GB/s host "
        f"link) + the CPU AdamW step at {budget.cpu_memory_gb_s:g} GB/s (ZeRO-Offload, arXiv 2101.06840; Fuyou, "
        "arXiv 2403.06504)"))
    params = total_params(budget.config)
    if not PAPER_PARAMS_RANGE[0] <= params <= PAPER_PARAMS_RANGE[1]:
        lines.append(f"note: {params / 1e9:.2f}B parameters is outside the paper's 3B-7B models: its findings are "
                     "extrapolated")
    lines.append(f"early stopping: [paper (ii)] rank configurations by early gradient norm (lower is better) and "
                 f"early loss (higher is better), {PAPER}; `batchpilot sweep --recipe sft` stops the rest early")
    return SftPlan(batch_examples=batch, batch_tokens=batch * t, peak_lr=lr, schedule="constant",
                   warmup_steps=warmup, epochs=epochs, steps=steps, seq_len=budget.seq_len, rows_per_step=rows,
                   micro_batch_rows=micro, grad_accum_steps=accum, offload=offload, explanation=lines,
                   checkpointing=checkpointing, predicted_step_seconds=step_seconds)


def predicted_step_seconds(budget: SftBudget, rows: int, *, offload: str, micro: int = 1) -> float:
    """Seconds per optimizer step: the step's FLOPs at the assumed MFU, and under CPU offload the host-link
    traffic (overlapped with compute) and the CPU AdamW step (not overlapped); see the constants above."""
    cfg, gpus = budget.config, budget.num_gpus
    tokens_per_gpu = rows * budget.seq_len / gpus
    compute = training_flops_per_token(cfg, budget.seq_len) * tokens_per_gpu / (budget.gpu_peak_tflops * 1e12
                                                                              * budget.mfu)
    if offload == "none":
        return compute
    micro_steps = max(1, math.ceil(rows / (gpus * max(1, micro))))
    return offload_step_seconds(cfg, compute_seconds=compute, micro_steps=micro_steps, num_gpus=gpus,
                                pcie_gb_s=budget.pcie_gb_s, cpu_memory_gb_s=budget.cpu_memory_gb_s)


def to_plan(sft: SftPlan, budget: SftBudget, model: str) -> Plan:
    """The SFT plan as the trainer's ``Plan`` (plan.json) for ``train --plan PLAN --recipe sft --data ...``:
    ``model`` is the HF directory; the explanation becomes the derivation, offload a warning."""
    micro = max(1, sft.micro_batch_rows)
    rows_per_gpu = math.ceil(sft.rows_per_step / budget.num_gpus)
    batch_tokens = rows_per_gpu * budget.num_gpus * sft.seq_len  # whole rows on every GPU
    warnings = ("the model does not fit for full fine-tuning: run with --parallel.offload cpu or --lora.rank",) \
        if sft.offload == "cpu" else ()
    peak = predict_offload_peak_bytes(budget.config, sft.seq_len, micro_batch_size=micro, num_gpus=budget.num_gpus,
                                      include_overhead=True) if sft.offload == "cpu" else None
    params = total_params(budget.config)
    flops = training_flops_per_token(budget.config, sft.seq_len)
    return Plan(schema_version=PLAN_SCHEMA_VERSION, model=model, num_params=params,
                non_vocab_params=non_vocab_params(budget.config),
                seq_len=sft.seq_len, num_gpus=budget.num_gpus, global_batch_tokens=batch_tokens,
                micro_batch_size=micro, grad_accum_steps=math.ceil(rows_per_gpu / micro), peak_lr=sft.peak_lr,
                min_lr=0.0, warmup_steps=sft.warmup_steps, warmup_tokens=sft.warmup_steps * batch_tokens,
                total_steps=sft.steps, total_tokens=sft.steps * batch_tokens, schedule=sft.schedule,
                optimizer="adamw",
                activation_checkpointing="full" if sft.checkpointing else "none",
                sharding="fsdp" if budget.num_gpus > 1 or sft.offload == "cpu" else "none",
                predicted_peak_memory_bytes=peak, gpu_memory_bytes=int(budget.gpu_memory_gib * 2**30),
                predicted_step_seconds=sft.predicted_step_seconds,
                predicted_total_seconds=sft.predicted_step_seconds * sft.steps, flops_per_token=flops,
                mfu=budget.mfu, tokens_per_param=sft.steps * batch_tokens / params, law=None,
                offload=sft.offload, predicted_tokens_per_second=batch_tokens / sft.predicted_step_seconds,
                mfu_source=f"assumed MFU {budget.mfu:g}", warnings=warnings, derivation=tuple(sft.explanation))


def sft_run_defaults(*, global_batch_tokens: int, total_tokens: int | None) -> dict[str, object]:
    """The dotted training fields ``train --recipe sft`` sets unless the file or the flags do: a constant LR
    [paper (iii)] at TULU's 2e-5 (the recipe's LR for a batch of <= 128 examples, ``large_batch_lr``: a run
    without a plan does not know its examples, so it takes the small-batch end; ``plan --recipe sft`` sizes
    both), no weight decay (TULU, Wang et al., arXiv 2306.04751), and a warmup of min(25 steps, 5%) [ours] when the horizon is known."""
    out: dict[str, object] = {"schedule.name": "constant", "optim.lr": large_batch_lr(TULU_BATCH_EXAMPLES),
                              "optim.weight_decay": 0.0, "schedule.min_lr": 0.0, "data.format": "chat"}
    if total_tokens:
        out["schedule.warmup_tokens"] = min(WARMUP_STEPS_MAX * global_batch_tokens,
                                            int(WARMUP_FRACTION * total_tokens))
    return out


def large_batch_lr(batch_examples: int) -> float:
    """[ours] TULU's 2e-5 at batch <= 128, log-linear in the batch down to 1e-5 at >= 3,840 (paper (i): lower)."""
    lo, hi = math.log(TULU_BATCH_EXAMPLES), math.log(PAPER_LARGE_BATCH_EXAMPLES)
    frac = min(1.0, max(0.0, (math.log(batch_examples) - lo) / (hi - lo)))
    return float(f"{math.exp(math.log(TULU_LR) + frac * (math.log(LARGE_BATCH_LR) - math.log(TULU_LR))):.3g}")


def _fit(budget: SftBudget, rows: int, lines: list[str]) -> tuple[int, int, str, bool]:
    try:
        fit = fit_micro_batch(budget.config, seq_len=budget.seq_len, optimizer="adamw", num_gpus=budget.num_gpus,
                              gpu_memory_gib=budget.gpu_memory_gib, headroom=budget.headroom,
                              max_micro_batch=max(1, math.ceil(rows / budget.num_gpus)))
    except ValueError as e:
        lines.append(f"memory: full fine-tuning does not fit ({e}); offload parameters, gradients and optimizer "
                     "states to CPU (--parallel.offload cpu) or use LoRA (--lora.rank)")
        return _fit_offload(budget, rows, lines)
    micro = fit.micro_batch_size
    accum = math.ceil(rows / (micro * budget.num_gpus))
    lines.append(f"{rows} rows of {budget.seq_len} tokens per step: micro-batch {micro} rows x {budget.num_gpus} "
                 f"GPU(s) x {accum} accumulation steps (memory model, {fit.sharding} sharding"
                 f"{', checkpointing' if fit.checkpointing else ''})")
    return micro, accum, "none", fit.checkpointing


def _fit_offload(budget: SftBudget, rows: int, lines: list[str]) -> tuple[int, int, str, bool]:
    """Micro-batch under CPU offload (checkpointing on): the largest whose predicted peak GPU bytes
    (``memory.predict_offload_peak_bytes`` with the CUDA context) stay within the headroom; 0 if none."""
    limit = budget.gpu_memory_gib * GIB * (1 - budget.headroom)
    cap = max(1, math.ceil(rows / budget.num_gpus))

    def fits(micro: int) -> bool:
        return predict_offload_peak_bytes(budget.config, budget.seq_len, micro_batch_size=micro,
                                          num_gpus=budget.num_gpus, include_overhead=True) <= limit

    micro = largest_fitting(fits, cap)
    if micro == 0:
        lines.append(f"memory: even CPU offload does not fit at micro-batch 1 ({budget.gpu_memory_gib:g} GiB): "
                     "use LoRA (--lora.rank) or more GPUs")
        return 0, 0, "cpu", True
    accum = math.ceil(rows / (micro * budget.num_gpus))
    peak = predict_offload_peak_bytes(budget.config, budget.seq_len, micro_batch_size=micro, num_gpus=budget.num_gpus)
    lines.append(f"memory under CPU offload (FSDP2 CPUOffloadPolicy, checkpointing): micro-batch {micro} rows x "
                 f"{budget.num_gpus} GPU(s) x {accum} accumulation steps, {peak / GIB:.1f} GiB peak GPU memory "
                 "predicted (memory.predict_offload_peak_bytes)")
    return micro, accum, "cpu", True
