"""What a training run is built from and leaves behind: its directory, model, data, resume and export.

Kept apart from the loop (``trainer.py``) so that the loop reads top to bottom; every function takes the
component configs it needs (``train/config.py``), never the whole run. The run directory is never overwritten
silently: a non-empty one needs ``resume``, and a resume must use the same model, data, batch, optimizer,
schedule and seed as the run it continues.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from batchpilot.data.packing import PackedLoader
from batchpilot.data.prepare import PrepareConfig, prepare
from batchpilot.io import write_json_atomic
from batchpilot.model import counting
from batchpilot.model.hf import load_model, read_config, save_model
from batchpilot.model.llama import PRESETS, Llama, LlamaConfig, build_model, get_preset
from batchpilot.plan.planner import Plan
from batchpilot.train import parallel
from batchpilot.train.checkpoint import full_model_state, latest_checkpoint, load_checkpoint
from batchpilot.train.config import CheckpointConfig, DataConfig, ModelConfig, TrainConfig
from batchpilot.train.parallel import ParallelConfig

# The fields a resume must keep (dotted names of config.json); the rest may differ.
SAME_RUN_FIELDS = ("model.name", "data.path", "data.seq_len", "data.seed", "model.seed",
                   "batch.global_batch_tokens", "optim.name", "optim.lr", "schedule.name")


def open_run_dir(out_dir: str, checkpoint: CheckpointConfig, record: dict[str, Any], plan: Plan,
                 dims: parallel.ParallelDims) -> Path:
    """Create the run directory; never overwrite one silently; write ``record`` as config.json and the plan."""
    run_dir = Path(out_dir)
    has_run = (run_dir / "config.json").exists()
    if checkpoint.resume and not has_run:
        raise ValueError(f"nothing to resume in {run_dir} (no config.json)")
    if not checkpoint.resume and run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} exists and is not empty; pass --resume to continue it "
                              f"or choose another --out")
    parallel.barrier(dims)  # every rank checks the directory before rank 0 creates it
    if dims.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint.resume:
            check_same_run(record, run_dir)
        write_json_atomic(run_dir / "config.json", record)
        plan.save(run_dir / "plan.json")
    parallel.barrier(dims)
    return run_dir


def check_same_run(record: dict[str, Any], run_dir: Path) -> None:
    saved = json.loads((run_dir / "config.json").read_text())

    def get(tree: dict[str, Any], dotted: str) -> object:
        component, _, name = dotted.partition(".")
        part = tree.get(component)
        return part.get(name) if isinstance(part, dict) else None

    changed = [f"{k} ({get(saved, k)!r} -> {get(record, k)!r})" for k in SAME_RUN_FIELDS
               if get(saved, k) != get(record, k)]
    if changed:
        raise ValueError(f"cannot resume {run_dir} with a different {', '.join(changed)}")


def model_config(model: ModelConfig) -> LlamaConfig:
    return get_preset(model.name) if model.name in PRESETS else read_config(model.name)


def build_run_model(model: ModelConfig, config: LlamaConfig, par: ParallelConfig,
                    dims: parallel.ParallelDims) -> Llama:
    has_weights = Path(model.name).is_dir() and any(Path(model.name).glob("model.safetensors*"))
    net = load_model(model.name, device=dims.device) if has_weights else build_model(config, device=dims.device,
                                                                                       seed=model.seed)
    # bf16 compute copies on GPU; on CPU, a one-device FSDP2 run keeps fp32 (the path the CPU tests check)
    param_dtype = torch.bfloat16 if dims.device.type == "cuda" else (torch.float32 if par.fsdp_one_device else None)
    return parallel.parallelize(net, dims, activation_checkpointing=par.activation_checkpointing,
                                compile=par.compile, param_dtype=param_dtype, fsdp_one_device=par.fsdp_one_device,
                                float8=par.float8, stream_chunk=par.stream_chunk)


def build_data(data: DataConfig, model: ModelConfig, model_config: LlamaConfig, run_dir: Path,
               dims: parallel.ParallelDims) -> tuple[PackedLoader, PackedLoader]:
    data_dir = Path(data.path)
    if not (data_dir / "meta.json").is_file():
        data_dir = run_dir / "data"
        tokenizer = str(Path(model.name)) if Path(model.name, "tokenizer.json").is_file() else None
        if dims.rank == 0:
            prepare(PrepareConfig(sources=[data.path], out_dir=str(data_dir), tokenizer=tokenizer,
                                  vocab_size=model_config.vocab_size, text_field=data.text_field, seed=data.seed))
        parallel.barrier(dims)
    train_loader = PackedLoader(data_dir, "train", data.seq_len, seed=data.seed)
    if train_loader.tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(f"tokenizer has {train_loader.tokenizer.vocab_size} tokens but the model only "
                         f"{model_config.vocab_size}")
    val_loader = PackedLoader(data_dir, "val", data.seq_len, seed=data.seed)
    if val_loader.num_rows < dims.world_size:
        raise ValueError(f"validation split has {val_loader.num_rows} rows of {data.seq_len} tokens, fewer than the "
                         f"{dims.world_size} ranks; raise --val-fraction when preparing or lower --seq-len")
    return train_loader, val_loader


def resume(run_dir: Path, model: Llama, optimizer: torch.optim.Optimizer, loader: PackedLoader) -> dict[str, Any]:
    """Load the latest checkpoint in place; restore the data position and RNG; return the trainer state."""
    path = latest_checkpoint(run_dir)
    if path is None:
        raise ValueError(f"no checkpoint to resume in {run_dir}/checkpoints")
    saved = load_checkpoint(path, model, optimizer)
    loader.load_state_dict(saved["loader"])
    if saved.get("rng"):
        torch.set_rng_state(torch.tensor(saved["rng"], dtype=torch.uint8))
    return saved


def export_model(model: Llama, loader: PackedLoader, run_dir: Path, dims: parallel.ParallelDims) -> None:
    """Write the final weights in HF format (plus tokenizer.json) to run_dir/model for sample/generate."""
    state = full_model_state(model)  # a collective under FSDP2: every rank takes part
    if dims.rank != 0:
        return
    plain = build_model(model.config, device="cpu")
    plain.load_state_dict(state)
    save_model(plain, run_dir / "model")
    loader.tokenizer.save(run_dir / "model")


def executed_plan(cfg: TrainConfig, config: LlamaConfig, dims: parallel.ParallelDims) -> Plan:
    """The Plan a run without ``--plan`` executes (no law: ``law`` and the predictions are None), so every run
    directory records its layout in the one plan.json schema."""
    rows_per_rank = cfg.batch.global_batch_tokens // cfg.data.seq_len // dims.world_size
    total_params = counting.total_params(config)
    sharded = dims.world_size > 1 or cfg.parallel.fsdp_one_device
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
                mfu=None, tokens_per_param=cfg.total_tokens / total_params, law=None)
