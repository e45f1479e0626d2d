"""The training loop: one ``train()`` that executes a run configuration (or a plan) on CPU, one GPU or many.

The global batch is set in tokens; ``micro_batch_size`` rows per rank are run per micro-step and
gradients are accumulated until the step's tokens are reached exactly (the last micro-batch may
be smaller). Schedules are functions of tokens seen, so a batch change during training (ramp or
adaptive policy) keeps warmup and decay where they were. Everything a resume needs (model,
optimizer, data position, batch controller, RNG) is in the checkpoint; ``resume=True`` continues
bit-for-bit on CPU.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from batchpilot.data.packing import Batch, PackedLoader
from batchpilot.io import write_json_atomic
from batchpilot.metrics import MetricsWriter, print0
from batchpilot.model.attention import DocumentMask, document_ids_from_positions
from batchpilot.model.llama import PRESETS, Llama
from batchpilot.model.counting import training_flops_per_token
from batchpilot.train import autofit, parallel, run
from batchpilot.train.adaptive import (POLICIES, BatchConfig, BatchController, Measurement, default_coupling,
                                       grad_sq_norm_tensor)
from batchpilot.train.checkpoint import latest_checkpoint, save_checkpoint
from batchpilot.train.optim import OptimConfig, build_optimizer
from batchpilot.train.schedule import SCHEDULES, ScheduleConfig, lr_at


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is left untouched."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    out_dir: str
    model: str = "tiny"  # preset name, HF model directory (fine-tune from its weights) or config.json
    data: str = "default"  # "default" (embedded corpus), a prepared directory, or raw .txt/.jsonl/.parquet/dir
    text_field: str = "text"
    seq_len: int = 256
    global_batch_tokens: int = 8192
    micro_batch_size: int = 16  # rows per rank per micro-step
    auto_micro_batch: bool = False  # fit the micro-batch to GPU memory, back off on OOM (train/autofit.py)
    max_steps: int | None = None
    max_tokens: int | None = None  # one of max_steps / max_tokens sets the horizon
    lr: float = 3e-3  # peak
    min_lr: float = 3e-4
    warmup_tokens: int | None = None  # default: 5% of the horizon
    schedule: str = "cosine"  # cosine | wsd | power | multistep | constant
    optimizer: str = "adamw"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    log_every: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False
    activation_checkpointing: str = "none"  # none | full | selective
    # one device: FSDP2 mixed precision (bf16 compute copies over fp32 masters, what every rank runs under torchrun)
    # instead of autocast over fp32 parameters; bf16 residual stream and saved activations (docs/scale.md)
    fsdp_one_device: bool = False
    float8: str | None = None  # tensorwise | rowwise: float8 matmuls in the blocks (torchao; parallel.apply_float8)
    peak_tflops: float = 989.0  # per GPU, for MFU (H100/H200 dense bf16)
    batch_policy: str = "fixed"  # fixed | ramp | adaptive (train/adaptive.py)
    batch_ramp: str | None = None  # ramp policy: "TOKENS:BATCH,..." e.g. "1e6:16384,4e6:32768"
    max_global_batch_tokens: int | None = None  # adaptive cap
    adaptive_min_interval_steps: int = 50
    adaptive_warmup_steps: int = 20  # measurements before the first change (lets the noise EMA settle)
    adaptive_target_multiplier: float = 1.0  # grow toward multiplier x B_simple
    lr_coupling: str | None = None  # sqrt | linear | none on batch changes; default by optimizer (laws.md 5)
    measure_noise: bool | None = None  # gradient noise scale every step; default: on for the adaptive policy
    resume: bool = False
    stop_at_step: int | None = None  # stop early (checkpointed) while the schedule still spans max_steps
    tensorboard: bool = False
    progress: bool = True
    plan: dict[str, Any] | None = field(default=None, repr=False)  # the plan this run executes, saved as plan.json

    def __post_init__(self) -> None:
        if self.seq_len <= 0 or self.micro_batch_size <= 0 or self.global_batch_tokens <= 0:
            raise ValueError("seq_len, micro_batch_size and global_batch_tokens must be positive")
        if self.global_batch_tokens % self.seq_len:
            raise ValueError(f"global batch ({self.global_batch_tokens} tokens) must be a multiple of "
                             f"seq_len ({self.seq_len})")
        parallel.check_float8_recipe(self.float8)
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("give exactly one of max_steps or max_tokens")
        if (self.max_steps or 1) <= 0 or (self.max_tokens or 1) <= 0:
            raise ValueError("max_steps / max_tokens must be positive")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0 (got lr={self.lr}, min_lr={self.min_lr})")
        choices = {"schedule": SCHEDULES, "optimizer": ("adamw", "lamb", "lars", "sgd"), "batch_policy": POLICIES,
                   "activation_checkpointing": ("none", "full", "selective"), "device": ("auto", "cpu", "cuda")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if self.model not in PRESETS and not Path(self.model).exists():
            raise ValueError(f"--model {self.model!r} is neither a preset ({', '.join(PRESETS)}) nor a path")

    @property
    def total_tokens(self) -> int:
        return self.max_tokens if self.max_tokens is not None else self.max_steps * self.global_batch_tokens

    @property
    def resolved_warmup_tokens(self) -> int:
        return self.warmup_tokens if self.warmup_tokens is not None else self.total_tokens // 20


@dataclass(kw_only=True, slots=True)
class TrainResult:
    run_dir: str
    steps: int
    tokens: int
    final_loss: float  # EMA-smoothed training loss at the end
    val_loss: float | None
    wall_seconds: float


@dataclass(kw_only=True, slots=True)
class TrainState:
    """What a resume needs beyond model and optimizer (JSON-serialisable)."""

    step: int = 0
    tokens: int = 0
    global_batch_tokens: int = 0  # the batch of the next step (changes under ramp / adaptive policies)
    lr_scale: float = 1.0  # LR coupling to the batch change, relative to the initial batch
    controller: dict[str, Any] = field(default_factory=dict)
    smooth_loss: float | None = None
    wall_seconds: float = 0.0
    loader: dict[str, Any] = field(default_factory=dict)
    rng: list[int] = field(default_factory=list)


def config_from_plan(plan: dict[str, Any], **overrides: Any) -> TrainConfig:
    """A TrainConfig that executes a plan as fixed: the trainer never re-derives these values."""
    model = plan.get("model")
    if isinstance(model, dict) and overrides.get("model") is None:
        raise ValueError("this plan was made for a model shape, not a preset: pass --model with its HF directory "
                         "or config.json")
    fixed = dict(
        model=model if isinstance(model, str) else overrides.pop("model"),
        seq_len=plan["seq_len"], global_batch_tokens=plan["global_batch_tokens"],
        micro_batch_size=plan["micro_batch_size"], max_steps=plan["total_steps"], lr=plan["peak_lr"],
        min_lr=plan.get("min_lr", 0.0), warmup_tokens=plan["warmup_steps"] * plan["global_batch_tokens"],
        schedule=plan["schedule"], activation_checkpointing=plan.get("activation_checkpointing", "none"),
    )
    clash = sorted(k for k in overrides if k in fixed and overrides[k] is not None)
    if clash:
        raise ValueError(f"the plan fixes {', '.join(clash)}; drop those flags or make a new plan")
    return TrainConfig(**fixed, **{k: v for k, v in overrides.items() if v is not None}, plan=plan)


def train(cfg: TrainConfig) -> TrainResult:
    dims = parallel.init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    run_dir = run.open_run_dir(cfg, dims)
    model_config = run.model_config(cfg)
    train_loader, val_loader = run.build_data(cfg, model_config, run_dir, dims)
    model = run.build_run_model(cfg, model_config, dims)
    optimizer = build_optimizer(model, OptimConfig(name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                   beta1=cfg.beta1, beta2=cfg.beta2))
    state = TrainState()
    if cfg.resume:
        saved = run.resume(run_dir, model, optimizer, train_loader)
        state = TrainState(**{f.name: saved[f.name] for f in fields(TrainState) if f.name in saved})
        print0(f"resumed from step {state.step} ({state.tokens:,} tokens)", rank=dims.rank)
    writer = MetricsWriter(run_dir if dims.rank == 0 else None, tensorboard=cfg.tensorboard)
    try:
        state, val_loss = _loop(cfg, model, optimizer, train_loader, val_loader, state, dims, run_dir, writer)
    finally:
        writer.close()
    run.export_model(model, train_loader, run_dir, dims)
    result = TrainResult(run_dir=str(run_dir), steps=state.step, tokens=state.tokens,
                         final_loss=state.smooth_loss or float("nan"), val_loss=val_loss,
                         wall_seconds=state.wall_seconds)
    if dims.rank == 0:
        write_json_atomic(run_dir / "result.json", asdict(result))
    return result


def _loop(cfg: TrainConfig, model: Llama, optimizer: torch.optim.Optimizer, train_loader: PackedLoader,
          val_loader: PackedLoader, state: TrainState, dims: parallel.ParallelDims, run_dir: Path,
          writer: MetricsWriter) -> tuple[TrainState, float | None]:
    sched = _schedule_config(cfg)
    controller = _batch_controller(cfg, dims)
    if state.controller:
        controller.load_state_dict(state.controller)
    state.global_batch_tokens = state.global_batch_tokens or cfg.global_batch_tokens
    measure = cfg.measure_noise if cfg.measure_noise is not None else cfg.batch_policy == "adaptive"
    flops_per_token = training_flops_per_token(model.config, cfg.seq_len)  # the planner's convention
    val_loss = None
    fitter = _fitter(cfg, model, state, dims) if cfg.auto_micro_batch else None
    with _progress(cfg, dims) as progress:
        task = progress.add_task("train", total=cfg.total_tokens, completed=state.tokens, loss=float("nan"), lr=0.0,
                                 tps=0.0, step=state.step)
        while state.tokens < cfg.total_tokens and state.step < (cfg.stop_at_step or math.inf):
            t0 = time.perf_counter()
            batch_tokens = state.global_batch_tokens
            # LR of the step that ends at tokens + batch (so the first step does not run at LR 0), times the
            # batch coupling; schedules count tokens, so warmup and decay stay put when the batch changes.
            lr = lr_at(state.tokens + batch_tokens, sched) * state.lr_scale
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm, measurement = train_step(
                model, optimizer, train_loader, global_batch_tokens=batch_tokens, seq_len=cfg.seq_len,
                micro_batch_size=cfg.micro_batch_size, dims=dims, grad_clip=cfg.grad_clip, measure_noise=measure,
                fitter=fitter)
            loss = parallel.mean_across_ranks(loss, dims)
            if not math.isfinite(loss):
                raise TrainingDiverged(f"loss became {loss} at step {state.step + 1}; "
                                       f"last good checkpoint: {latest_checkpoint(run_dir) or 'none'}")
            seconds = time.perf_counter() - t0
            state.step += 1
            state.tokens += batch_tokens
            state.wall_seconds += seconds
            state.smooth_loss = loss if state.smooth_loss is None else 0.9 * state.smooth_loss + 0.1 * loss
            decision = controller.decide(state.step, state.tokens, measurement)
            state.global_batch_tokens, state.lr_scale = decision.global_batch_tokens, decision.lr_scale
            record = _step_record(cfg, state, batch_tokens, loss, lr, grad_norm, seconds, flops_per_token, dims)
            record.update(decision.metrics)
            record["micro_batch_size"] = fitter.micro_batch_size if fitter else cfg.micro_batch_size
            if decision.changed:
                record["batch_change"] = decision.reason
                print0(decision.reason, rank=dims.rank)
            done = state.tokens >= cfg.total_tokens or state.step == cfg.stop_at_step
            if state.step % cfg.eval_every == 0 or done:
                val_loss = record["val_loss"] = evaluate(model, val_loader, cfg, dims)
            if state.step % cfg.log_every == 0 or "val_loss" in record or decision.changed:
                writer.log(record)
            progress.update(task, completed=state.tokens, loss=state.smooth_loss, lr=lr,
                            tps=record["tokens_per_s"], step=state.step)
            if progress.disable and dims.rank == 0 and (_is_report_step(state.tokens, batch_tokens, cfg) or done):
                print0(_log_line(record))
            if state.step % cfg.save_every == 0 or done:
                state.loader, state.controller = train_loader.state_dict(), controller.state_dict()
                state.rng = torch.get_rng_state().tolist()
                save_checkpoint(run_dir, state.step, model, optimizer, asdict(state), dims)
    return state, val_loss


def _fitter(cfg: TrainConfig, model: Llama, state: TrainState,
            dims: parallel.ParallelDims) -> autofit.MicroBatchFitter:
    rows_per_rank = state.global_batch_tokens // cfg.seq_len // dims.world_size
    return autofit.build_fitter(model.config, dims, rows_per_rank=rows_per_rank, seq_len=cfg.seq_len,
                                fallback_micro_batch_size=cfg.micro_batch_size, sharded=parallel.is_sharded(model),
                                checkpointing=cfg.activation_checkpointing == "full")


def _batch_controller(cfg: TrainConfig, dims: parallel.ParallelDims) -> BatchController:
    ramp = []
    for item in (cfg.batch_ramp or "").split(","):
        if item.strip():
            tokens, _, batch = item.partition(":")
            ramp.append((int(float(tokens)), int(float(batch))))
    return BatchController(BatchConfig(
        policy=cfg.batch_policy, initial_batch_tokens=cfg.global_batch_tokens,
        # adaptive growth moves in pairs of rows per rank, so a measured step splits into two equal halves
        # (accumulate_gradients); fixed and ramp batches only need whole rows per rank
        quantum_tokens=cfg.seq_len * dims.world_size * (2 if cfg.batch_policy == "adaptive" else 1),
        ramp=ramp,
        max_batch_tokens=cfg.max_global_batch_tokens, min_interval_steps=cfg.adaptive_min_interval_steps,
        min_measurements=cfg.adaptive_warmup_steps,
        target_multiplier=cfg.adaptive_target_multiplier,
        lr_coupling=cfg.lr_coupling or default_coupling(cfg.optimizer)))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: PackedLoader, *,
               global_batch_tokens: int, seq_len: int, micro_batch_size: int, dims: parallel.ParallelDims,
               grad_clip: float, measure_noise: bool = False,
               fitter: autofit.MicroBatchFitter | None = None) -> tuple[float, float, Measurement | None]:
    """One optimizer step over exactly ``global_batch_tokens`` tokens: (mean loss, grad norm, noise measurement).

    With a ``fitter`` the micro-batch is the fitter's, and an OOM on any rank redoes the step smaller. The loss
    and the norm are read together after the optimizer step is queued: one host sync per step, not one after
    backward and another after clipping (at llama-1b on an H200 the step is GPU-bound either way).
    """
    def grads(rows: int) -> tuple[torch.Tensor, Measurement | None]:
        return accumulate_gradients(model, loader, global_batch_tokens=global_batch_tokens, seq_len=seq_len,
                                    micro_batch_size=rows, dims=dims, measure_noise=measure_noise)

    def update() -> float:
        grad_norm = parallel.clip_grad_norm(model, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    if fitter is None:
        (loss, measurement), grad_norm = grads(micro_batch_size), update()
    else:
        fitter.rows_per_rank = global_batch_tokens // seq_len // dims.world_size
        (loss, measurement), grad_norm = autofit.run_step_with_oom_retry(
            grads, update, fitter=fitter, loader=loader, model=model, optimizer=optimizer, dims=dims)
    loss, grad_norm = torch.stack([loss.float(), grad_norm.float().to(loss.device)]).tolist()
    return loss, grad_norm, measurement


def accumulate_gradients(model: torch.nn.Module, loader: PackedLoader, *, global_batch_tokens: int, seq_len: int,
                         micro_batch_size: int, dims: parallel.ParallelDims,
                         measure_noise: bool = False) -> tuple[torch.Tensor, Measurement | None]:
    """Backward over the step's micro-batches into ``.grad``; returns this rank's mean loss (a 0-d tensor on the
    device, not yet read) and, if asked, the two-batch gradient-noise measurement (laws.md 4c): |g|^2 of the
    first micro-batch against the full batch.
    When measuring, a step that would be one micro-batch is run as two halves (the only extra cost is launches).

    Under FSDP2 the first micro-batch is reduce-scattered too when measuring, so its gradient averages
    ``world_size`` micro-batches: B_small = micro-batch rows x world x seq_len tokens.
    """
    rows_per_step = global_batch_tokens // seq_len
    if rows_per_step % dims.world_size:
        raise ValueError(f"global batch of {rows_per_step} rows does not split over {dims.world_size} ranks")
    rows_per_rank = rows_per_step // dims.world_size
    if measure_noise:  # at least two micro-batches: a step that fits one is split in halves to measure
        micro_batch_size = min(micro_batch_size, max(1, (rows_per_rank + 1) // 2))
    sizes = micro_batch_sizes(rows_per_rank, micro_batch_size)
    measure_noise = measure_noise and len(sizes) > 1  # one micro-batch gives no second batch size
    loss_sum = torch.zeros((), device=dims.device)
    small_sq_norm = torch.zeros(())
    for i, rows in enumerate(sizes):
        batch = loader.take(rows * dims.world_size, rank=dims.rank, world_size=dims.world_size)
        weight = rows / rows_per_rank  # each micro-batch weighted by its share of the step's tokens
        parallel.set_gradient_sync(model, i == len(sizes) - 1 or (measure_noise and i == 0))
        with _autocast(dims):
            loss = forward_loss(model, batch, dims.device)
        (loss * weight).backward()
        loss_sum += loss.detach() * weight
        if measure_noise and i == 0:  # kept on the device: read once, after the last micro-batch
            small_sq_norm = grad_sq_norm_tensor(model.parameters()) / weight**2
    if not measure_noise:
        return loss_sum, None
    big_sq_norm = grad_sq_norm_tensor(model.parameters())
    small, big = torch.stack([small_sq_norm.to(loss_sum.device), big_sq_norm.to(loss_sum.device)]).tolist()
    return loss_sum, Measurement(small_sq_norm=small, small_batch_tokens=sizes[0] * dims.world_size * seq_len,
                                 big_sq_norm=big, big_batch_tokens=global_batch_tokens)


def _is_report_step(tokens: int, batch_tokens: int, cfg: TrainConfig) -> bool:
    """The first step, and the step that crosses each tenth of the token budget."""
    tenth = max(1, cfg.total_tokens // 10)
    return tokens == batch_tokens or tokens // tenth != (tokens - batch_tokens) // tenth


def _log_line(record: dict[str, Any]) -> str:
    line = (f"step {record['step']}  tokens {record['tokens']:,}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"{record['tokens_per_s']:,.0f} tok/s")
    return line + (f"  val {record['val_loss']:.4f}" if "val_loss" in record else "")


def micro_batch_sizes(rows: int, micro_batch_size: int) -> list[int]:
    """Split ``rows`` into micro-batches of ``micro_batch_size`` with one smaller last one if needed."""
    full, rest = divmod(rows, micro_batch_size)
    return [micro_batch_size] * full + ([rest] if rest else [])


def forward_loss(model: torch.nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Mean loss of one micro-batch; documents packed in a row never attend to each other.

    Rows holding a single document take plain causal attention (the fastest kernel); the check
    runs on the CPU copy of the positions, so it costs no device sync.
    """
    single_document = not bool((batch.position_ids[:, 1:] == 0).any())
    position_ids = batch.position_ids.to(device, non_blocking=True)
    meta = None if single_document else DocumentMask(document_ids=document_ids_from_positions(position_ids))
    return model(batch.input_ids.to(device, non_blocking=True), targets=batch.targets.to(device, non_blocking=True),
                 position_ids=position_ids, attn_meta=meta)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: PackedLoader, cfg: TrainConfig, dims: parallel.ParallelDims) -> float:
    """Mean loss over the first ``eval_batches x micro_batch_size`` rows of the validation split.

    The rows are the same whatever the number of ranks (``eval_row_ranges``), so the validation loss of a
    run does not change when it is resumed on another number of GPUs.
    """
    model.eval()
    ranges = eval_row_ranges(loader.num_rows, eval_batches=cfg.eval_batches, micro_batch_size=cfg.micro_batch_size,
                             world_size=dims.world_size)
    loss_sum, row_count = 0.0, 0
    for batch, (start, stop) in zip(loader.eval_batches(ranges[0][1] - ranges[0][0], len(ranges)), ranges):
        rows = (stop - start) // dims.world_size
        lo, hi = dims.rank * rows, (dims.rank + 1) * rows
        local = Batch(input_ids=batch.input_ids[lo:hi], targets=batch.targets[lo:hi],
                      position_ids=batch.position_ids[lo:hi])
        with _autocast(dims):
            loss_sum += forward_loss(model, local, dims.device).item() * rows
        row_count += rows
    model.train()
    return parallel.mean_across_ranks(loss_sum, dims) / parallel.mean_across_ranks(row_count, dims)


def eval_row_ranges(num_rows: int, *, eval_batches: int, micro_batch_size: int,
                    world_size: int) -> list[tuple[int, int]]:
    """Global validation batches as row ranges [start, stop): together always the first
    ``eval_batches x micro_batch_size`` rows (a multiple of the ranks), each batch split evenly over ranks."""
    total = min(eval_batches * micro_batch_size, num_rows) // world_size * world_size
    per_batch = min(micro_batch_size * world_size, total)
    return [(start, min(start + per_batch, total)) for start in range(0, total, per_batch)]


def _autocast(dims: parallel.ParallelDims):
    # bf16 autocast on GPU; plain fp32 on CPU (CPU bf16 is slow and would break exact-resume tests).
    if dims.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _schedule_config(cfg: TrainConfig) -> ScheduleConfig:
    return ScheduleConfig(name=cfg.schedule, peak_lr=cfg.lr, min_lr=cfg.min_lr,
                          warmup_tokens=cfg.resolved_warmup_tokens, total_tokens=cfg.total_tokens,
                          power_batch_sequences=cfg.global_batch_tokens // cfg.seq_len)


def _step_record(cfg: TrainConfig, state: TrainState, batch_tokens: int, loss: float, lr: float, grad_norm: float,
                 seconds: float, flops_per_token: float, dims: parallel.ParallelDims) -> dict[str, Any]:
    tokens_per_s = batch_tokens / seconds
    record = {"step": state.step, "tokens": state.tokens, "loss": loss, "lr": lr, "lr_scale": state.lr_scale,
              "grad_norm": grad_norm, "global_batch_tokens": batch_tokens, "tokens_per_s": tokens_per_s,
              "step_seconds": seconds, "wall_seconds": state.wall_seconds}
    if dims.device.type == "cuda":
        tflops = flops_per_token * tokens_per_s / dims.world_size / 1e12
        record.update(tflops_per_gpu=tflops, mfu=tflops / cfg.peak_tflops,
                      peak_memory_bytes=torch.cuda.max_memory_allocated(dims.device))
    return record


def _progress(cfg: TrainConfig, dims: parallel.ParallelDims):
    """A live bar over the token budget: step, loss, LR, tokens/s and ETA."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    fields = "step {task.fields[step]}  loss {task.fields[loss]:.3f}  lr {task.fields[lr]:.2e}  " \
             "{task.fields[tps]:,.0f} tok/s"
    return Progress(TextColumn("[bold]train"), BarColumn(), TextColumn(fields), TimeRemainingColumn(),
                    disable=not cfg.progress or dims.rank != 0)
