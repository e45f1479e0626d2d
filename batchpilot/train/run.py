"""What a training run is built from and leaves behind: its directory, model, data, resume and export.

Kept apart from the loop (``trainer.py``) so that the loop reads top to bottom; every function takes the
component configs it needs (``train/config.py``), never the whole run. The run directory is never overwritten
silently: a non-empty one needs ``resume``, and a resume must use the same model, data, batch, optimizer,
schedule and seed as the run it continues.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batchpilot.data.packing import PackedLoader
from batchpilot.data.prepare import PrepareConfig, check_tokenizer_matches, load_meta, prepare
from batchpilot.data.tokenizer import Tokenizer
from batchpilot.io import FileLock, LockedError, read_jsonl, write_json_atomic, write_text_atomic
from batchpilot.model import counting
from batchpilot.model.hf import load_model, read_config, save_model
from batchpilot.model.llama import PRESETS, Llama, LlamaConfig, build_model, get_preset
from batchpilot.plan.planner import Plan
from batchpilot.train import parallel
from batchpilot.train.checkpoint import clean_leftovers, find_resumable_checkpoint, full_model_state, load_checkpoint
from batchpilot.train.config import CheckpointConfig, DataConfig, ModelConfig, TrainConfig
from batchpilot.train.lora import LoraConfig, apply_lora, merge_lora
from batchpilot.train.parallel import ParallelConfig

LOCK_NAME = ".lock"  # RUN/.lock: one train process per run directory
STAGING_NAME = ".data.staging"  # raw --data is prepared here and moved to RUN/data once the start is validated
# What a start that failed or was killed may leave in a run directory; the "not empty" check ignores them
LEFTOVER_PREFIXES = (LOCK_NAME, STAGING_NAME, f".{STAGING_NAME}.tmp-")


@dataclass(kw_only=True, slots=True)
class RunDir:
    """A locked run directory before and after its start is committed (config.json, plan.json, RUN/data)."""

    path: Path
    lock: FileLock | None  # rank 0's RUN/.lock, held until the run ends
    created: bool  # rank 0 created the directory: a failed start removes it again
    had_lock_file: bool  # RUN/.lock existed before this start
    overrides: dict[str, dict[str, object]]  # resume overrides to log at commit (field -> from/to)

    @property
    def staging(self) -> Path:
        return self.path / STAGING_NAME

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def rollback(self) -> None:
        """Rank 0, after a failed start: leave the directory as it was before the command (lock released)."""
        if self.lock is None:
            return
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            _remove_leftovers(self.path)
            if not self.had_lock_file:
                (self.path / LOCK_NAME).unlink(missing_ok=True)
        self.release()


def _contents(run_dir: Path) -> list[Path]:
    """What the directory holds beyond the leftovers of a failed or killed start."""
    if not run_dir.is_dir():
        return []
    return [p for p in run_dir.iterdir() if not p.name.startswith(LEFTOVER_PREFIXES)]


def _remove_leftovers(run_dir: Path) -> None:
    """The staging directory (and prepare's own temporary) of a start that failed or was killed, and the temporary
    directory of an export that was killed (``save_model`` writes ``.model.*`` beside ``model/``)."""
    for p in [*run_dir.glob(f"{STAGING_NAME}*"), *run_dir.glob(f".{STAGING_NAME}.tmp-*"), *run_dir.glob(".model.*")]:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _check_run_dir(run_dir: Path, checkpoint: CheckpointConfig) -> bool:
    """Whether ``run_dir`` holds a run (config.json); refuses a directory this command may not use."""
    has_run = (run_dir / "config.json").is_file()
    contents = _contents(run_dir)
    if checkpoint.resume and not has_run and contents:
        raise ValueError(f"nothing to resume in {run_dir} (no config.json) and it is not empty; choose another --out")
    if not checkpoint.resume and contents:
        raise FileExistsError(f"run directory {run_dir} exists and is not empty; pass --resume to continue it "
                              f"or choose another --out")
    return has_run


def open_run_dir(out_dir: str, checkpoint: CheckpointConfig, record: dict[str, Any],
                 dims: parallel.ParallelDims) -> RunDir:
    """Check the run directory and lock it, writing nothing else: config.json, plan.json and RUN/data are written
    by :func:`commit_run_dir` once model and data are validated, and :meth:`RunDir.rollback` undoes the lock.
    Never overwrites a run silently; ``resume`` on a missing or empty directory, or one without checkpoints,
    starts the run there (one command a scheduler can re-run)."""
    run_dir = Path(out_dir)
    _check_run_dir(run_dir, checkpoint)
    parallel.barrier(dims)  # every rank checks the directory before rank 0 locks it
    handle = RunDir(path=run_dir, lock=None, created=False, had_lock_file=False, overrides={})
    if dims.rank == 0:
        handle.created, handle.had_lock_file = not run_dir.exists(), (run_dir / LOCK_NAME).exists()
        try:
            handle.lock = FileLock(run_dir / LOCK_NAME, what=f"run directory {run_dir}").acquire()
        except LockedError as e:
            raise ValueError(str(e)) from None
        try:
            has_run = _check_run_dir(run_dir, checkpoint)  # again, under the lock
            if checkpoint.resume and has_run:
                handle.overrides = check_same_run(record, run_dir,
                                                  overrides=parse_overrides(checkpoint.resume_override))
            _remove_leftovers(run_dir)
            for name in clean_leftovers(run_dir):  # interrupted saves: safe to remove while we hold the lock
                print(f"removed leftover checkpoints/{name}")
        except BaseException:
            handle.rollback()
            raise
    parallel.barrier(dims)
    return handle


def commit_run_dir(handle: RunDir, record: dict[str, Any], plan: Plan, loaders: tuple[PackedLoader, ...],
                   dims: parallel.ParallelDims) -> None:
    """Model and data are validated: move staged data to RUN/data and write config.json and plan.json."""
    parallel.barrier(dims)
    if dims.rank == 0:
        if handle.staging.is_dir():
            os.replace(handle.staging, handle.path / "data")
        if handle.overrides:
            log = handle.path / "resume_overrides.jsonl"
            lines = log.read_text() if log.is_file() else ""
            write_text_atomic(log, lines + json.dumps(handle.overrides) + "\n")
        write_json_atomic(handle.path / "config.json", record)
        plan.save(handle.path / "plan.json")
    parallel.barrier(dims)
    for loader in loaders:
        if loader.data_dir == handle.staging:
            loader.data_dir = handle.path / "data"  # the shards stay open; the tokenizer is read from here


def parse_overrides(text: str) -> dict[str, str]:
    """``"lr=1e-3,min_lr=1e-5"`` -> {"optim.lr": "1e-3", "schedule.min_lr": "1e-5"}: what a resume may change."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        dotted = RESUME_OVERRIDABLE.get(key.strip())
        if not sep or dotted is None:
            raise ValueError(f"--checkpoint.resume_override {item!r}: write KEY=VALUE with KEY one of "
                             f"{', '.join(RESUME_OVERRIDABLE)}")
        out[dotted] = value.strip()
    return out


# What ``--checkpoint.resume_override`` may change on a resume: the LR and the schedule only.
RESUME_OVERRIDABLE = {"lr": "optim.lr", "min_lr": "schedule.min_lr", "schedule": "schedule.name",
                      "warmup_tokens": "schedule.warmup_tokens", "max_steps": "schedule.max_steps",
                      "max_tokens": "schedule.max_tokens", "decay_fraction": "schedule.decay_fraction",
                      "decay_shape": "schedule.decay_shape"}
# What a resume may change freely: how the run is executed and logged, not what it computes.
RESUME_FREE = {"out_dir", "checkpoint.resume", "checkpoint.resume_override", "checkpoint.save_every",
               "schedule.stop_at_step", "batch.micro_batch_size", "batch.auto_micro_batch", "parallel.device",
               "parallel.compile", "parallel.float8", "parallel.fsdp_one_device", "parallel.offload",
               "parallel.context_parallel", "logging.log_every",
               "logging.eval_every", "logging.eval_batches", "logging.tensorboard", "logging.progress",
               "logging.peak_tflops", "checkpoint.keep"}


def _flatten(tree: dict[str, Any]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def check_same_run(record: dict[str, Any], run_dir: Path, *,
                   overrides: dict[str, str]) -> dict[str, dict[str, object]]:
    """A resume computes the run it continues: any difference outside ``RESUME_FREE`` is refused, naming it,
    unless ``--checkpoint.resume_override`` names it (LR and schedule only). Returns what changed (field ->
    from/to), which :func:`commit_run_dir` appends to RUN/resume_overrides.jsonl. An override whose value is
    already the run's is a no-op, so a scheduler can re-run the same command."""
    saved, new = _flatten(json.loads((run_dir / "config.json").read_text())), _flatten(record)
    changed = sorted(k for k in set(saved) | set(new) if k not in RESUME_FREE and saved.get(k) != new.get(k))
    refused = [k for k in changed if k not in overrides.keys()]
    if refused:
        hint = "; the LR and schedule may change with --checkpoint.resume_override KEY=VALUE" if any(
            k in RESUME_OVERRIDABLE.values() for k in refused) else ""
        raise ValueError(f"cannot resume {run_dir} with a different "
                         f"{', '.join(f'{k} ({saved.get(k)!r} -> {new.get(k)!r})' for k in refused)}{hint}")
    if changed:
        print(f"resume overrides: {', '.join(f'{k} {saved.get(k)!r} -> {new.get(k)!r}' for k in changed)}")
    return {k: {"from": saved.get(k), "to": new.get(k)} for k in changed}


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics.jsonl records past ``step`` (steps a resume re-runs are logged once) and a torn last line."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def model_config(model: ModelConfig) -> LlamaConfig:
    return get_preset(model.name) if model.name in PRESETS else read_config(model.name)


def build_run_model(model: ModelConfig, config: LlamaConfig, par: ParallelConfig,
                    dims: parallel.ParallelDims, lora: LoraConfig | None = None) -> Llama:
    has_weights = Path(model.name).is_dir() and any(Path(model.name).glob("model.safetensors*"))
    # Under CPU offload the model is built (or loaded) in host memory: it may not fit the GPU. ``fully_shard``
    # then moves one block at a time to the GPU and its shard back to pinned host memory, and the buffers stay.
    device = torch.device("cpu") if par.offload == "cpu" else dims.device
    net = load_model(model.name, device=device) if has_weights else build_model(config, device=device,
                                                                                  seed=model.seed)
    if lora is not None:  # after loading, before parallelize: FSDP2 shards the adapters with their layers
        net = apply_lora(net, lora)
    if par.master_dtype == "bfloat16":  # before sharding: the shards, their gradients and AdamW's states in bf16
        net = net.to(torch.bfloat16)
    # bf16 compute copies on GPU; on CPU, a one-device FSDP2 run keeps fp32 (the path the CPU tests check)
    one_device_fsdp = par.sharded_on_one_device
    param_dtype = torch.bfloat16 if dims.device.type == "cuda" else (torch.float32 if one_device_fsdp else None)
    return parallel.parallelize(net, dims, activation_checkpointing=par.activation_checkpointing,
                                compile=par.compile, param_dtype=param_dtype, fsdp_one_device=one_device_fsdp,
                                float8=par.float8, stream_chunk=par.stream_chunk, offload=par.offload,
                                stream_offload=par.stream_offload)


def build_data(data: DataConfig, model: ModelConfig, model_config: LlamaConfig, run_dir: Path,
               dims: parallel.ParallelDims) -> tuple[PackedLoader, PackedLoader]:
    data_dir = Path(data.path)
    model_tokenizer = str(Path(model.name)) if Path(model.name, "tokenizer.json").is_file() else None
    if not (data_dir / "meta.json").is_file():  # raw text: RUN/data (a resume), else staged until the commit
        data_dir = run_dir / "data" if (run_dir / "data" / "meta.json").is_file() else run_dir / STAGING_NAME
        fmt = "text" if data.format == "auto" else data.format
        if fmt == "chat" and model_tokenizer is None:
            raise ValueError(f"chat data needs a --model.name directory with tokenizer.json and a chat template "
                             f"(got {model.name!r})")
        if dims.rank == 0:
            prepare(PrepareConfig(sources=[data.path], out_dir=str(data_dir), tokenizer=model_tokenizer,
                                  vocab_size=model_config.vocab_size, text_field=data.text_field, seed=data.seed,
                                  format=fmt, loss_on=data.loss_on))
        parallel.barrier(dims)
    if model_tokenizer is not None:  # the vocabulary size alone cannot tell two tokenizers apart
        check_tokenizer_matches(data_dir, Tokenizer.from_path(model_tokenizer))
    pack = data.pack if data.pack != "auto" else (
        "conversation" if load_meta(data_dir).get("format") == "chat" else "chunk")
    train_loader = PackedLoader(data_dir, "train", data.seq_len, seed=data.seed, pack=pack)
    if train_loader.tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(f"tokenizer has {train_loader.tokenizer.vocab_size} tokens but the model only "
                         f"{model_config.vocab_size}")
    val_loader = PackedLoader(data_dir, "val", data.seq_len, seed=data.seed, pack=pack)
    if val_loader.num_rows < dims.world_size:
        raise ValueError(f"validation split has {val_loader.num_rows} rows of {data.seq_len} tokens, fewer than the "
                         f"{dims.world_size} ranks; raise --val-fraction when preparing or lower --seq-len")
    return train_loader, val_loader


def resume(run_dir: Path, model: Llama, optimizer: torch.optim.Optimizer, loader: PackedLoader,
           dims: parallel.ParallelDims) -> dict[str, Any] | None:
    """Load the latest checkpoint in place; restore the data position and RNG; return the trainer state
    (None when the run has no checkpoint yet: it starts from step 0). ``latest`` damaged or naming a damaged
    checkpoint: the newest intact one is used, saying so; none intact: a one-line ValueError."""
    path, messages = find_resumable_checkpoint(run_dir)
    for line in messages if dims.rank == 0 else ():
        print(f"batchpilot: {line}", file=sys.stderr)
    if path is None:
        return None
    saved = load_checkpoint(path, model, optimizer, verify=False)  # find_resumable_checkpoint verified it
    loader.load_state_dict(saved["loader"])
    if saved.get("rng"):
        torch.set_rng_state(torch.tensor(saved["rng"], dtype=torch.uint8))
    return saved


def export_model(model: Llama, loader: PackedLoader, run_dir: Path, dims: parallel.ParallelDims, *,
                 lora: LoraConfig | None = None, source_dir: str | None = None) -> None:
    """Write the final weights in HF format (plus tokenizer.json) to run_dir/model for sample/generate.

    LoRA runs export merged weights (an ordinary HF checkpoint); a model fine-tuned from ``source_dir`` keeps
    its ``generation_config.json`` (the dataset's tokenizer, checked equal to the model's, carries the chat
    template and special tokens)."""
    state = full_model_state(model)  # a collective under FSDP2: every rank takes part
    if dims.rank != 0:
        return
    plain = build_model(model.config, device="cpu")
    if lora is not None:
        plain = apply_lora(plain, lora)
    plain.load_state_dict(state)
    if lora is not None:
        plain = merge_lora(plain)
    tok = loader.tokenizer  # EOS / BOS / PAD ids and the chat template travel with the export
    save_model(plain, run_dir / "model", bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    tok.save(run_dir / "model", model_max_length=model.config.max_position_embeddings)
    generation = Path(source_dir or "", "generation_config.json")
    if source_dir and generation.is_file():  # the source's sampling defaults and stop ids, not ours
        shutil.copyfile(generation, run_dir / "model" / generation.name)


def executed_plan(cfg: TrainConfig, config: LlamaConfig, dims: parallel.ParallelDims) -> Plan:
    """The Plan a run without ``--plan`` executes (no law: ``law`` and the predictions are None), so every run
    directory records its layout in the one plan.json schema."""
    data_ranks = max(1, dims.world_size // cfg.parallel.context_parallel)  # a cp group shares its rows
    rows_per_rank = cfg.batch.global_batch_tokens // cfg.data.seq_len // data_ranks
    total_params = counting.total_params(config)
    sharded = dims.world_size > 1 or cfg.parallel.sharded_on_one_device
    return Plan(model=cfg.model.name, num_params=total_params, non_vocab_params=counting.non_vocab_params(config),
                seq_len=cfg.data.seq_len, num_gpus=dims.world_size, global_batch_tokens=cfg.batch.global_batch_tokens,
                micro_batch_size=cfg.batch.micro_batch_size,
                grad_accum_steps=-(-rows_per_rank // cfg.batch.micro_batch_size), peak_lr=cfg.optim.lr,
                min_lr=cfg.schedule.min_lr, warmup_steps=cfg.warmup_tokens // cfg.batch.global_batch_tokens,
                warmup_tokens=cfg.warmup_tokens, total_tokens=cfg.total_tokens,
                total_steps=-(-cfg.total_tokens // cfg.batch.global_batch_tokens), schedule=cfg.schedule.name,
                optimizer=cfg.optim.name, activation_checkpointing=cfg.parallel.activation_checkpointing,
                sharding="fsdp" if sharded else "none", batch_policy=cfg.batch.policy,
                predicted_peak_memory_bytes=None, gpu_memory_bytes=None, predicted_step_seconds=None,
                predicted_total_seconds=None, flops_per_token=counting.training_flops_per_token(config, cfg.data.seq_len),
                mfu=None, tokens_per_param=cfg.total_tokens / total_params, law=None,
                compile=cfg.parallel.compile, float8=cfg.parallel.float8, offload=cfg.parallel.offload,
                context_parallel=cfg.parallel.context_parallel)
