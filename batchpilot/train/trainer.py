"""The training loop: one ``train()`` that executes a run configuration (and its plan) on CPU, one GPU or many.

The global batch is set in tokens; ``micro_batch_size`` rows per rank are run per micro-step and
gradients are accumulated until the step's tokens are reached exactly (the last micro-batch may
be smaller). Schedules are functions of tokens seen, so a batch change during training (ramp or
adaptive policy) keeps warmup and decay where they were. Everything a resume needs (model,
optimizer, data position, batch controller, RNG) is in the checkpoint; ``resume=True`` continues
bit-for-bit on CPU. A step whose loss or gradient norm is not finite is never applied (``TrainingDiverged``
names the last checkpoint, which is finite: parameters are checked before every save).
"""

from __future__ import annotations

import math
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from batchpilot.data.packing import Batch, PackedLoader
from batchpilot.io import write_json_atomic
from batchpilot.metrics import MetricsWriter, print0
from batchpilot.model.attention import DocumentMask, document_ids_from_positions
from batchpilot.model.llama import Llama, LlamaConfig
from batchpilot.model.counting import training_flops_per_token
from batchpilot.plan.planner import Plan
from batchpilot.model.moe import MoeObjective, RoutingRecord
from batchpilot.train import autofit, parallel, run
from batchpilot.train.adaptive import BatchController, Measurement, default_coupling, grad_sq_norm_tensor
from batchpilot.train.checkpoint import latest_checkpoint, save_checkpoint
from batchpilot.train.config import LoggingConfig, MoeConfig, TrainConfig
from batchpilot.train.context_parallel import ContextParallelMesh, init_dp_cp_mesh, shard_batch
from batchpilot.train.optim import OptimConfig, build_optimizer, local
from batchpilot.train.schedule import Schedule, lr_at

__all__ = ["NonFiniteUpdate", "TrainConfig", "TrainResult", "TrainState", "TrainingDiverged", "accumulate_gradients",
           "evaluate", "forward_loss", "train", "train_step"]


class TrainingDiverged(RuntimeError):
    """The loss, gradient norm or parameters became NaN or Inf; the named checkpoint is finite and untouched."""


class NonFiniteUpdate(RuntimeError):
    """Raised by ``train_step`` before ``optimizer.step()`` when the loss or the gradient norm is not finite."""


@dataclass(kw_only=True, slots=True)
class TrainResult:
    run_dir: str
    steps: int
    tokens: int
    final_loss: float  # EMA-smoothed training loss at the end
    val_loss: float | None
    wall_seconds: float
    stopped_by: str | None = None  # SIGTERM / SIGINT: stopped early, checkpointed, not exported


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


def train(cfg: TrainConfig, *, stop_on_signals: bool = False) -> TrainResult:
    """Execute ``cfg``. ``stop_on_signals`` (the CLI sets it): SIGTERM / SIGINT checkpoint at the next step
    boundary and return early (``TrainResult.stopped_by``); off, the caller's signal handlers stay in charge."""
    dims = parallel.init_distributed(cfg.parallel.device, offload=cfg.parallel.offload)
    torch.manual_seed(cfg.model.seed)
    model_config = run.model_config(cfg.model)
    cp_mesh = context_parallel_mesh(cfg, model_config, dims)
    plan = cfg.plan if cfg.plan is not None else run.executed_plan(cfg, model_config, dims)
    # rank 0 holds RUN/.lock until the run ends: a second `train` on the directory fails fast. Nothing else is
    # written to the directory until model and data are validated; a failed start leaves it as it was.
    handle = run.open_run_dir(cfg.out_dir, cfg.checkpoint, cfg.to_dict(), dims)
    try:
        with _stop_on_signals(stop_on_signals) as stop:
            return _train(cfg, handle, plan, model_config, dims, stop, cp_mesh)
    finally:
        handle.release()


def context_parallel_mesh(cfg: TrainConfig, config: LlamaConfig,
                          dims: parallel.ParallelDims) -> ContextParallelMesh | None:
    """The dp x cp grid of ``--parallel.context_parallel N`` (None for N = 1); one-line errors for what the
    ranks or the model cannot run (the config's own combinations are checked by ``TrainConfig``)."""
    size = cfg.parallel.context_parallel
    if size == 1:
        return None
    if dims.world_size % size:
        raise ValueError(f"--parallel.context_parallel {size}: WORLD_SIZE {dims.world_size} is not a multiple of it "
                         f"(start {size} x data-parallel ranks with torchrun --nproc-per-node)")
    if config.num_experts:
        raise ValueError("--parallel.context_parallel with an MoE model is not supported: the balance loss counts "
                         "routing over whole sequences and micro-batches")
    return init_dp_cp_mesh(dims.device.type, cp_size=size)


def _train(cfg: TrainConfig, handle: run.RunDir, plan: Plan, model_config: LlamaConfig,
           dims: parallel.ParallelDims, stop: _StopRequest, cp: ContextParallelMesh | None = None) -> TrainResult:
    run_dir = handle.path
    try:
        train_loader, val_loader = run.build_data(cfg.data, cfg.model, model_config, run_dir, dims)
        lora = cfg.lora.adapter_config(seed=cfg.model.seed)
        model = run.build_run_model(cfg.model, model_config, cfg.parallel, dims, lora=lora)
        optimizer = build_optimizer(model, optimizer_config(cfg))
        run.commit_run_dir(handle, cfg.to_dict(), plan, (train_loader, val_loader), dims)
    except BaseException:
        if dims.rank == 0:
            handle.rollback()
        raise
    state = TrainState()
    if cfg.checkpoint.resume:
        saved = run.resume(run_dir, model, optimizer, train_loader, dims)
        if saved is None:
            print0(f"no checkpoint in {run_dir} yet: starting the run", rank=dims.rank)
        else:
            state = TrainState(**{f.name: saved[f.name] for f in fields(TrainState) if f.name in saved})
            print0(f"resumed from step {state.step} ({state.tokens:,} tokens)", rank=dims.rank)
        if dims.rank == 0:
            run.truncate_metrics(run_dir, state.step)  # steps re-run from here on are logged once
    writer = MetricsWriter(run_dir if dims.rank == 0 else None, tensorboard=cfg.logging.tensorboard)
    try:
        state, val_loss = _loop(cfg, model, optimizer, train_loader, val_loader, state, dims, run_dir, writer, stop, cp)
    finally:
        writer.close()
    result = TrainResult(run_dir=str(run_dir), steps=state.step, tokens=state.tokens,
                         final_loss=state.smooth_loss or float("nan"), val_loss=val_loss,
                         wall_seconds=state.wall_seconds, stopped_by=stop.signal_name)
    if stop.signal_name is not None:  # preempted: the checkpoint is written, the model is not exported
        print0(f"stopped by {stop.signal_name} at step {state.step} (checkpointed); resume with: batchpilot train "
               f"--config {run_dir / 'config.json'} --out {run_dir} --checkpoint.resume", rank=dims.rank)
        return result
    run.export_model(model, train_loader, run_dir, dims, lora=lora, source_dir=cfg.model.name)
    if dims.rank == 0:
        write_json_atomic(run_dir / "result.json", asdict(result))
    return result


def optimizer_config(cfg: TrainConfig) -> OptimConfig:
    """The run's optimizer settings; under CPU offload AdamW steps the CPU shards with torch's fused CPU kernel
    (torch >= 2.4; ``optim.fused`` None would pick the per-tensor loop for CPU parameters). An explicit
    ``--optim.fused`` wins."""
    if cfg.parallel.offload == "cpu" and cfg.optim.name == "adamw" and cfg.optim.fused is None:
        return replace(cfg.optim, fused=True)
    return cfg.optim


class _StopRequest:
    """Set by SIGTERM / SIGINT; the loop checkpoints and stops at the next step boundary. A second signal while
    the stop is pending acts as it would have without us (Ctrl-C twice aborts at once)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: object) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            return
        previous = self.previous.get(signum, signal.SIG_DFL)
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.raise_signal(signum)


@contextmanager
def _stop_on_signals(enabled: bool) -> Iterator[_StopRequest]:
    """SIGTERM (SLURM and Kubernetes preemption) and SIGINT (Ctrl-C) request a checkpointed stop; the previous
    handlers come back afterwards. Only when ``enabled`` (the ``train`` command; a library caller such as a
    sweep or a test keeps its own handlers) and in the main thread (signals are delivered there only)."""
    stop = _StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    stop.previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in stop.previous.items():
            signal.signal(sig, handler)


def _loop(cfg: TrainConfig, model: Llama, optimizer: torch.optim.Optimizer, train_loader: PackedLoader,
          val_loader: PackedLoader, state: TrainState, dims: parallel.ParallelDims, run_dir: Path,
          writer: MetricsWriter, stop: _StopRequest,
          cp: ContextParallelMesh | None = None) -> tuple[TrainState, float | None]:
    sched = _schedule(cfg)
    controller = _batch_controller(cfg, data_ranks(dims, cp))
    if state.controller:
        controller.load_state_dict(state.controller)
    state.global_batch_tokens = state.global_batch_tokens or cfg.batch.global_batch_tokens
    measure = cfg.batch.wants_noise()
    seq_len, micro_batch_size, log = cfg.data.seq_len, cfg.batch.micro_batch_size, cfg.logging
    flops_per_token = training_flops_per_token(model.config, seq_len)  # the planner's convention
    total_tokens, stop_at_step = cfg.total_tokens, cfg.schedule.stop_at_step
    val_loss = None
    fitter = _fitter(cfg, model, state, dims) if cfg.batch.auto_micro_batch else None
    moe = moe_objective(cfg.moe, model.config, dims)
    with _progress(log, dims) as progress:
        task = progress.add_task("train", total=total_tokens, completed=state.tokens, loss=float("nan"), lr=0.0,
                                 tps=0.0, step=state.step)
        while state.tokens < total_tokens and state.step < (stop_at_step or math.inf):
            t0 = time.perf_counter()
            batch_tokens = state.global_batch_tokens
            # LR of the step that ends at tokens + batch (so the first step does not run at LR 0), times the
            # batch coupling; schedules count tokens, so warmup and decay stay put when the batch changes.
            lr = lr_at(state.tokens + batch_tokens, sched) * state.lr_scale
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                loss, grad_norm, measurement = train_step(
                    model, optimizer, train_loader, global_batch_tokens=batch_tokens, seq_len=seq_len,
                    micro_batch_size=micro_batch_size, dims=dims, grad_clip=cfg.optim.grad_clip,
                    measure_noise=measure, fitter=fitter, moe=moe, cp=cp,
                    sync_every_micro_batch=cfg.parallel.offload == "cpu")
            except NonFiniteUpdate as e:
                raise TrainingDiverged(f"{e} at step {state.step + 1}, not applied; last good checkpoint: "
                                       f"{latest_checkpoint(run_dir) or 'none'}") from None
            loss = parallel.mean_across_ranks(loss, dims)
            seconds = time.perf_counter() - t0
            state.step += 1
            state.tokens += batch_tokens
            state.wall_seconds += seconds
            state.smooth_loss = loss if state.smooth_loss is None else 0.9 * state.smooth_loss + 0.1 * loss
            decision = controller.decide(state.step, state.tokens, measurement)
            state.global_batch_tokens, state.lr_scale = decision.global_batch_tokens, decision.lr_scale
            record = _step_record(log, state, batch_tokens, loss, lr, grad_norm, seconds, flops_per_token, dims)
            record.update(decision.metrics)
            record.update(_moe_record(moe, dims) if moe else {})
            record["micro_batch_size"] = fitter.micro_batch_size if fitter else micro_batch_size
            if decision.changed:
                record["batch_change"] = decision.reason
                print0(decision.reason, rank=dims.rank)
            # a signal on any rank stops every rank at this step boundary, checkpointed
            signalled = parallel.any_across_ranks(stop.signal_name is not None, dims)
            if signalled and stop.signal_name is None:
                stop.signal_name = "a signal on another rank"
            done = state.tokens >= total_tokens or state.step == stop_at_step or signalled
            if (log.eval_every and state.step % log.eval_every == 0) or done:
                val_loss = record["val_loss"] = evaluate(model, val_loader, eval_batches=log.eval_batches,
                                                         micro_batch_size=micro_batch_size, dims=dims, cp=cp)
            if state.step % log.log_every == 0 or "val_loss" in record or decision.changed:
                writer.log(record)
            progress.update(task, completed=state.tokens, loss=state.smooth_loss, lr=lr,
                            tps=record["tokens_per_s"], step=state.step)
            if progress.disable and dims.rank == 0 and (_is_report_step(state.tokens, batch_tokens, total_tokens)
                                                        or done):
                print0(_log_line(record))
            if state.step % cfg.checkpoint.save_every == 0 or done:
                if not _parameters_finite(model, dims):
                    raise TrainingDiverged(f"parameters became NaN or Inf by step {state.step}; last good "
                                           f"checkpoint: {latest_checkpoint(run_dir) or 'none'}")
                state.loader, state.controller = train_loader.state_dict(), controller.state_dict()
                state.rng = torch.get_rng_state().tolist()
                save_checkpoint(run_dir, state.step, model, optimizer, asdict(state), dims, keep=cfg.checkpoint.keep)
            if signalled:
                break
    return state, val_loss


def _parameters_finite(model: torch.nn.Module, dims: parallel.ParallelDims) -> bool:
    """Whether every parameter is finite on every rank (checked before each checkpoint is written)."""
    bad = any(not bool(torch.isfinite(local(p.detach())).all()) for p in model.parameters())
    return not parallel.any_across_ranks(bad, dims)


def moe_objective(moe: MoeConfig, config: LlamaConfig, dims: parallel.ParallelDims) -> MoeObjective | None:
    """The balance loss and z-loss of an MoE model (None for dense models); coefficients default to the model's."""
    if not config.num_experts:
        return None
    return MoeObjective(moe.balance, config.num_experts,
                        balance_coef=config.router_aux_loss_coef if moe.balance_coef is None else moe.balance_coef,
                        z_loss_coef=config.router_z_loss_coef if moe.z_loss_coef is None else moe.z_loss_coef,
                        all_reduce=parallel.sum_across_ranks_fn(dims))


def _moe_record(moe: MoeObjective, dims: parallel.ParallelDims) -> dict[str, float]:
    """The step's routing metrics over all ranks: losses averaged, load extremes over ranks, dropped slots summed."""
    m = moe.step_metrics()
    means = dict(zip(m, parallel.mean_list_across_ranks(list(m.values()), dims), strict=True))
    most, least = parallel.max_across_ranks([m["max_load"], -m["min_load"]], dims)
    means.update(max_load=most, min_load=-least, dropped_slots=means["dropped_slots"] * dims.world_size)
    return {f"moe/{k}": v for k, v in means.items()}


def _fitter(cfg: TrainConfig, model: Llama, state: TrainState,
            dims: parallel.ParallelDims) -> autofit.MicroBatchFitter:
    rows_per_rank = state.global_batch_tokens // cfg.data.seq_len // dims.world_size
    return autofit.build_fitter(model.config, dims, rows_per_rank=rows_per_rank, seq_len=cfg.data.seq_len,
                                fallback_micro_batch_size=cfg.batch.micro_batch_size,
                                sharded=parallel.is_sharded(model),
                                # streaming keeps every block's input, as full checkpointing does
                                checkpointing=cfg.parallel.activation_checkpointing.replace("stream", "full"),
                                compile=cfg.parallel.compile, float8=cfg.parallel.float8)


def _batch_controller(cfg: TrainConfig, dims: parallel.ParallelDims) -> BatchController:
    # adaptive growth moves in pairs of rows per rank, so a measured step splits into two equal halves
    # (accumulate_gradients); fixed and ramp batches only need whole rows per rank
    quantum = cfg.data.seq_len * dims.world_size * (2 if cfg.batch.policy == "adaptive" else 1)
    return BatchController(cfg.batch, quantum_tokens=quantum,
                           lr_coupling=cfg.batch.lr_coupling or default_coupling(cfg.optim.name))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: PackedLoader, *,
               global_batch_tokens: int, seq_len: int, micro_batch_size: int, dims: parallel.ParallelDims,
               grad_clip: float, measure_noise: bool = False,
               fitter: autofit.MicroBatchFitter | None = None,
               moe: MoeObjective | None = None,
               cp: ContextParallelMesh | None = None,
               sync_every_micro_batch: bool = False) -> tuple[float, float, Measurement | None]:
    """One optimizer step over exactly ``global_batch_tokens`` tokens: (mean loss, grad norm, noise measurement).

    With a ``fitter`` the micro-batch is the fitter's, and an OOM on any rank redoes the step smaller. The loss
    and the norm are read together after the optimizer step is queued: one host sync per step, not one after
    backward and another after clipping (at llama-1b on an H200 the step is GPU-bound either way).
    ``sync_every_micro_batch`` (CPU offload): FSDP2 reduces and offloads the gradients after every micro-batch, so
    they accumulate in host memory. Skipping the sync accumulates whole unsharded fp32 gradients of every block
    on the GPU instead: 32 GB at 8B parameters, measured on an H200 (40.2 GB peak where 15 GB was predicted).
    """
    def grads(rows: int) -> tuple[torch.Tensor, Measurement | None]:
        return accumulate_gradients(model, loader, global_batch_tokens=global_batch_tokens, seq_len=seq_len,
                                    micro_batch_size=rows, dims=dims, measure_noise=measure_noise, moe=moe, cp=cp,
                                    sync_every_micro_batch=sync_every_micro_batch)

    def update() -> torch.Tensor:
        grad_norm = parallel.clip_grad_norm(model, grad_clip)
        # one host sync before the step: a non-finite gradient norm (or loss: its gradients are NaN too)
        # must never reach the parameters or the optimizer state
        if not bool(torch.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteUpdate(f"gradient norm became {float(grad_norm)}")
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
    if not math.isfinite(loss):  # a non-finite loss with finite gradients (e.g. an Inf that was clipped)
        raise NonFiniteUpdate(f"loss became {loss}")
    return loss, grad_norm, measurement


def accumulate_gradients(model: torch.nn.Module, loader: PackedLoader, *, global_batch_tokens: int, seq_len: int,
                         micro_batch_size: int, dims: parallel.ParallelDims,
                         measure_noise: bool = False,
                         moe: MoeObjective | None = None,
                         cp: ContextParallelMesh | None = None,
                         sync_every_micro_batch: bool = False) -> tuple[torch.Tensor, Measurement | None]:
    """Backward over the step's micro-batches into ``.grad``; returns this rank's mean loss (a 0-d tensor on the
    device, not yet read) and, if asked, the two-batch gradient-noise measurement (McCandlish et al. 2018, arXiv 1812.06162, appendix A): |g|^2 of the
    first micro-batch against the full batch.
    When measuring, a step that would be one micro-batch is run as two halves (the only extra cost is launches).

    Under FSDP2 the first micro-batch is reduce-scattered too when measuring, so its gradient averages
    ``world_size`` micro-batches: B_small = micro-batch rows x world x seq_len tokens.

    With ``moe`` each micro-batch's routing record adds the balance and z-losses to its backward (the returned
    loss stays the LM loss); the global-batch LBL's count buffer starts empty with the step.

    With ``cp`` (context parallelism) the rows are split over the data-parallel ranks only; the ranks of a cp
    group take the same rows, each its load-balanced slice of their sequence (``shard_batch``), and each
    weights its local mean loss by ``loss_weight`` (cp x its share of the group's targets) on top of the
    micro-batch weight: FSDP2's mean over all dp x cp ranks is then the step's per-token mean gradient.
    """
    if cp is not None and (measure_noise or moe is not None):
        raise ValueError("--parallel.context_parallel does not support noise measurement or MoE balance losses")
    data = data_ranks(dims, cp)
    rows_per_step = global_batch_tokens // seq_len
    if rows_per_step % data.world_size:
        raise ValueError(f"global batch of {rows_per_step} rows does not split over {data.world_size} "
                         f"data-parallel ranks")
    rows_per_rank = rows_per_step // data.world_size
    if measure_noise:  # at least two micro-batches: a step that fits one is split in halves to measure
        micro_batch_size = min(micro_batch_size, max(1, (rows_per_rank + 1) // 2))
    sizes = micro_batch_sizes(rows_per_rank, micro_batch_size)
    measure_noise = measure_noise and len(sizes) > 1  # one micro-batch gives no second batch size
    weights = micro_batch_weights(loader, sizes, rows_per_rank=rows_per_rank, dims=data)
    loss_sum = torch.zeros((), device=dims.device)
    small_sq_norm = torch.zeros(())
    if moe is not None:
        moe.start_step()
    for i, (rows, weight) in enumerate(zip(sizes, weights)):
        batch = loader.take(rows * data.world_size, rank=data.rank, world_size=data.world_size)
        last = i == len(sizes) - 1
        parallel.set_gradient_sync(model, sync_every_micro_batch or last or (measure_noise and i == 0))
        with _autocast(dims):
            if cp is not None:
                loss, shard_weight = context_parallel_loss(model, batch, dims.device, cp)
                objective, weight = loss, weight * shard_weight
            elif moe is None:
                objective = loss = forward_loss(model, batch, dims.device)
            else:  # the balance and z-losses from this micro-batch's routing record
                loss = forward_loss(model, batch, dims.device, routing=(record := RoutingRecord()))
                objective = loss + moe.aux_loss(record)
        (objective * weight).backward()
        loss_sum += loss.detach() * weight
        if measure_noise and i == 0:  # kept on the device: read once, after the last micro-batch
            small_sq_norm = grad_sq_norm_tensor(model.parameters()) / weight**2
    if not measure_noise:
        return loss_sum, None
    big_sq_norm = grad_sq_norm_tensor(model.parameters())
    small, big = torch.stack([small_sq_norm.to(loss_sum.device), big_sq_norm.to(loss_sum.device)]).tolist()
    return loss_sum, Measurement(small_sq_norm=small, small_batch_tokens=sizes[0] * dims.world_size * seq_len,
                                 big_sq_norm=big, big_batch_tokens=global_batch_tokens)


def data_ranks(dims: parallel.ParallelDims, cp: ContextParallelMesh | None) -> parallel.ParallelDims:
    """The ranks the data is split over: all of them, or under context parallelism the data-parallel ones
    (this rank's cp group shares its rows). For slicing data only; collectives use ``dims``."""
    if cp is None:
        return dims
    return parallel.ParallelDims(rank=cp.dp_rank, local_rank=dims.local_rank, world_size=cp.dp_size,
                                 device=dims.device)


def context_parallel_loss(model: torch.nn.Module, batch: Batch, device: torch.device,
                          cp: ContextParallelMesh) -> tuple[torch.Tensor, float]:
    """This rank's mean loss over its slice of the micro-batch's sequence, attention by the ring, and the
    slice's loss weight (``shard_batch``); packed rows carry their positions and document ids with them."""
    single_document = not bool((batch.position_ids[:, 1:] == 0).any())
    local = shard_batch(batch.input_ids.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True),
                        cp.cp_group, position_ids=None if single_document else batch.position_ids.to(device))
    loss = model(local.input_ids, targets=local.targets, position_ids=local.position_ids, attn_meta=local.attn_meta)
    return loss, local.loss_weight


def micro_batch_weights(loader: PackedLoader, sizes: list[int], *, rows_per_rank: int,
                        dims: parallel.ParallelDims) -> list[float]:
    """Each micro-batch's loss weight: its loss targets (``targets != -100``) times ``world_size`` over the
    step's targets on all ranks, so that the accumulated gradient, averaged over ranks by the data-parallel
    reduction, is the gradient of the per-token mean loss of the whole step (masked chat data included).

    The counts come from the loader's CPU view of the step's rows before any transfer: no collective, no
    device sync. Plain text (every target valid) gives ``rows * T * W / (rows_per_rank * W * T)``, the same
    float as ``rows / rows_per_rank`` (Python divides integers with one correct rounding), so text runs are
    bit-identical to row weighting. Loaders without ``peek_target_counts`` are weighted by rows.
    """
    peek = getattr(loader, "peek_target_counts", None)
    if peek is None:
        return [rows / rows_per_rank for rows in sizes]
    world = dims.world_size
    counts = peek(rows_per_rank * world).tolist()
    total = sum(counts)
    if total == 0:  # a step without a single loss target: nothing to learn, every weight is 0
        return [0.0] * len(sizes)
    weights, offset = [], 0
    for rows in sizes:
        mine = offset + dims.rank * rows
        weights.append(sum(counts[mine:mine + rows]) * world / total)
        offset += rows * world
    return weights


def _is_report_step(tokens: int, batch_tokens: int, total_tokens: int) -> bool:
    """The first step, and the step that crosses each tenth of the token budget."""
    tenth = max(1, total_tokens // 10)
    return tokens == batch_tokens or tokens // tenth != (tokens - batch_tokens) // tenth


def _log_line(record: dict[str, Any]) -> str:
    line = (f"step {record['step']}  tokens {record['tokens']:,}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"{record['tokens_per_s']:,.0f} tok/s")
    return line + (f"  val {record['val_loss']:.4f}" if "val_loss" in record else "")


def micro_batch_sizes(rows: int, micro_batch_size: int) -> list[int]:
    """Split ``rows`` into micro-batches of ``micro_batch_size`` with one smaller last one if needed."""
    full, rest = divmod(rows, micro_batch_size)
    return [micro_batch_size] * full + ([rest] if rest else [])


def forward_loss(model: torch.nn.Module, batch: Batch, device: torch.device,
                 routing: RoutingRecord | None = None) -> torch.Tensor:
    """Mean loss of one micro-batch; documents packed in a row never attend to each other.

    Rows holding a single document take plain causal attention (the fastest kernel); the check
    runs on the CPU copy of the positions, so it costs no device sync.
    """
    single_document = not bool((batch.position_ids[:, 1:] == 0).any())
    position_ids = batch.position_ids.to(device, non_blocking=True)
    meta = None if single_document else DocumentMask(document_ids=document_ids_from_positions(position_ids))
    moe = {"routing": routing} if routing is not None else {}  # dense callers need not know the keyword
    return model(batch.input_ids.to(device, non_blocking=True), targets=batch.targets.to(device, non_blocking=True),
                 position_ids=position_ids, attn_meta=meta, **moe)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: PackedLoader, *, eval_batches: int, micro_batch_size: int,
             dims: parallel.ParallelDims, cp: ContextParallelMesh | None = None) -> float:
    """Mean loss over the first ``eval_batches x micro_batch_size`` rows of the validation split.

    The rows are the same whatever the number of ranks (``eval_row_ranges``), so the validation loss of a
    run does not change when it is resumed on another number of GPUs. Under context parallelism the rows are
    split over the data-parallel ranks and each cp rank's loss is weighted by its slice's ``loss_weight``, so
    the mean over a cp group is the group's mean loss.
    """
    model.eval()
    data = data_ranks(dims, cp)
    ranges = eval_row_ranges(loader.num_rows, eval_batches=eval_batches, micro_batch_size=micro_batch_size,
                             world_size=data.world_size)
    loss_sum, row_count = 0.0, 0
    for batch, (start, stop) in zip(loader.eval_batches(ranges[0][1] - ranges[0][0], len(ranges)), ranges):
        rows = (stop - start) // data.world_size
        lo, hi = data.rank * rows, (data.rank + 1) * rows
        local = Batch(input_ids=batch.input_ids[lo:hi], targets=batch.targets[lo:hi],
                      position_ids=batch.position_ids[lo:hi])
        with _autocast(dims):
            if cp is None:
                loss_sum += forward_loss(model, local, dims.device).item() * rows
            else:
                loss, weight = context_parallel_loss(model, local, dims.device, cp)
                loss_sum += loss.item() * weight * rows
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


def _schedule(cfg: TrainConfig) -> Schedule:
    return Schedule(config=cfg.schedule, peak_lr=cfg.optim.lr, total_tokens=cfg.total_tokens,
                    warmup_tokens=cfg.warmup_tokens,
                    batch_sequences=cfg.batch.global_batch_tokens // cfg.data.seq_len)


def _step_record(log: LoggingConfig, state: TrainState, batch_tokens: int, loss: float, lr: float, grad_norm: float,
                 seconds: float, flops_per_token: float, dims: parallel.ParallelDims) -> dict[str, Any]:
    tokens_per_s = batch_tokens / seconds
    record = {"step": state.step, "tokens": state.tokens, "loss": loss, "lr": lr, "lr_scale": state.lr_scale,
              "grad_norm": grad_norm, "global_batch_tokens": batch_tokens, "tokens_per_s": tokens_per_s,
              "step_seconds": seconds, "wall_seconds": state.wall_seconds}
    if dims.device.type == "cuda":
        tflops = flops_per_token * tokens_per_s / dims.world_size / 1e12
        record.update(tflops_per_gpu=tflops, mfu=tflops / log.peak_tflops,
                      peak_memory_bytes=torch.cuda.max_memory_allocated(dims.device))
    record["peak_host_memory_bytes"] = _peak_host_memory_bytes()
    return record


def _peak_host_memory_bytes() -> int:
    """This process's peak resident host memory (what CPU offload's shards and optimizer states add to)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _progress(log: LoggingConfig, dims: parallel.ParallelDims):
    """A live bar over the token budget: step, loss, LR, tokens/s and ETA."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    fields = "step {task.fields[step]}  loss {task.fields[loss]:.3f}  lr {task.fields[lr]:.2e}  " \
             "{task.fields[tps]:,.0f} tok/s"
    return Progress(TextColumn("[bold]train"), BarColumn(), TextColumn(fields), TimeRemainingColumn(),
                    disable=not log.progress or dims.rank != 0)
