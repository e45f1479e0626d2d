"""What a training run is built from and leaves behind: its directory, model, data, resume and export.

Kept apart from the loop (``trainer.py``) so that the loop reads top to bottom. The run directory is
never overwritten silently: a non-empty one needs ``resume``, and a resume must use the same model,
data, batch, optimizer, schedule and seed as the run it continues.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from batchpilot.data.packing import PackedLoader
from batchpilot.data.prepare import PrepareConfig, prepare
from batchpilot.io import write_json_atomic
from batchpilot.model.hf import load_model, read_config, save_model
from batchpilot.model.llama import PRESETS, Llama, LlamaConfig, build_model, get_preset
from batchpilot.train import parallel
from batchpilot.train.checkpoint import full_model_state, latest_checkpoint, load_checkpoint

if TYPE_CHECKING:
    from batchpilot.train.trainer import TrainConfig


def open_run_dir(cfg: "TrainConfig", dims: parallel.ParallelDims) -> Path:
    """Create the run directory; never overwrite one silently; write config.json and plan.json."""
    run_dir = Path(cfg.out_dir)
    has_run = (run_dir / "config.json").exists()
    if cfg.resume and not has_run:
        raise ValueError(f"nothing to resume in {run_dir} (no config.json)")
    if not cfg.resume and run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} exists and is not empty; pass --resume to continue it "
                              f"or choose another --out")
    parallel.barrier(dims)  # every rank checks the directory before rank 0 creates it
    if dims.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            check_same_run(cfg, run_dir)
        write_json_atomic(run_dir / "config.json", {k: v for k, v in asdict(cfg).items() if k != "plan"})
        write_json_atomic(run_dir / "plan.json", cfg.plan if cfg.plan is not None else executed_plan(cfg, dims))
    parallel.barrier(dims)
    return run_dir


def check_same_run(cfg: "TrainConfig", run_dir: Path) -> None:
    saved = json.loads((run_dir / "config.json").read_text())
    keys = ("model", "seq_len", "global_batch_tokens", "optimizer", "schedule", "lr", "seed", "data")
    changed = [f"{k} ({saved.get(k)!r} -> {getattr(cfg, k)!r})" for k in keys if saved.get(k) != getattr(cfg, k)]
    if changed:
        raise ValueError(f"cannot resume {run_dir} with a different {', '.join(changed)}")


def model_config(cfg: "TrainConfig") -> LlamaConfig:
    return get_preset(cfg.model) if cfg.model in PRESETS else read_config(cfg.model)


def build_run_model(cfg: "TrainConfig", config: LlamaConfig, dims: parallel.ParallelDims) -> Llama:
    has_weights = Path(cfg.model).is_dir() and any(Path(cfg.model).glob("model.safetensors*"))
    model = load_model(cfg.model, device=dims.device) if has_weights else build_model(config, device=dims.device,
                                                                                          seed=cfg.seed)
    # bf16 compute copies on GPU; on CPU, a one-device FSDP2 run keeps fp32 (the path the CPU tests check)
    param_dtype = torch.bfloat16 if dims.device.type == "cuda" else (torch.float32 if cfg.fsdp_one_device else None)
    return parallel.parallelize(model, dims, activation_checkpointing=cfg.activation_checkpointing,
                                compile=cfg.compile, param_dtype=param_dtype, fsdp_one_device=cfg.fsdp_one_device,
                                float8=cfg.float8)


def build_data(cfg: "TrainConfig", model_config: LlamaConfig, run_dir: Path,
                dims: parallel.ParallelDims) -> tuple[PackedLoader, PackedLoader]:
    data_dir = Path(cfg.data)
    if not (data_dir / "meta.json").is_file():
        data_dir = run_dir / "data"
        tokenizer = str(Path(cfg.model)) if Path(cfg.model, "tokenizer.json").is_file() else None
        if dims.rank == 0:
            prepare(PrepareConfig(sources=[cfg.data], out_dir=str(data_dir), tokenizer=tokenizer,
                                  vocab_size=model_config.vocab_size, text_field=cfg.text_field, seed=cfg.seed))
        parallel.barrier(dims)
    train_loader = PackedLoader(data_dir, "train", cfg.seq_len, seed=cfg.seed)
    if train_loader.tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(f"tokenizer has {train_loader.tokenizer.vocab_size} tokens but the model only "
                         f"{model_config.vocab_size}")
    val_loader = PackedLoader(data_dir, "val", cfg.seq_len, seed=cfg.seed)
    if val_loader.num_rows < dims.world_size:
        raise ValueError(f"validation split has {val_loader.num_rows} rows of {cfg.seq_len} tokens, fewer than the "
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


def executed_plan(cfg: "TrainConfig", dims: parallel.ParallelDims) -> dict[str, Any]:
    """What a run without ``--plan`` executes, in plan.json's keys, so every run directory records its layout."""
    rows_per_rank = cfg.global_batch_tokens // cfg.seq_len // dims.world_size
    return {"source": "flags (no planner law)", "model": cfg.model, "seq_len": cfg.seq_len,
            "global_batch_tokens": cfg.global_batch_tokens, "micro_batch_size": cfg.micro_batch_size,
            "grad_accum_steps": -(-rows_per_rank // cfg.micro_batch_size), "num_gpus": dims.world_size,
            "peak_lr": cfg.lr, "min_lr": cfg.min_lr, "schedule": cfg.schedule,
            "warmup_tokens": cfg.resolved_warmup_tokens,
            "total_tokens": cfg.total_tokens, "total_steps": -(-cfg.total_tokens // cfg.global_batch_tokens),
            "batch_policy": cfg.batch_policy, "activation_checkpointing": cfg.activation_checkpointing}
