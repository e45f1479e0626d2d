"""A training run's configuration: one ``TrainConfig`` made of the component configs, and its file form.

Each component owns its dataclass and validates it where it is defined: ``OptimConfig`` (optim.py),
``ScheduleConfig`` (schedule.py), ``BatchConfig`` (adaptive.py), ``ParallelConfig`` (parallel.py); the model,
data, checkpoint and logging components are small enough to live here. ``TrainConfig`` only checks what spans
two components (the batch is a multiple of seq_len, min_lr <= lr, the run has a horizon).

The file form is a nested mapping ``{component: {field: value}}`` (``to_dict`` / ``from_dict``): the run
directory's config.json, and what ``batchpilot train --config run.toml|run.yaml|run.json`` reads. Dotted names
(``optim.lr``) address one field; they are the command line's flags (``--optim.lr``) too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchpilot.model.llama import PRESETS
from batchpilot.model.moe import GRANULARITIES
from batchpilot.plan.planner import Plan
from batchpilot.train.adaptive import BatchConfig
from batchpilot.train.optim import OptimConfig
from batchpilot.train.parallel import ParallelConfig
from batchpilot.train.lora import LoraRunConfig
from batchpilot.train.schedule import ScheduleConfig


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    name: str = "tiny"  # preset name, HF model directory (fine-tune from its weights) or config.json
    seed: int = 0  # initial weights (and torch's global RNG)

    def __post_init__(self) -> None:
        if self.name not in PRESETS and not Path(self.name).exists():
            raise ValueError(f"--model.name {self.name!r} is neither a preset ({', '.join(PRESETS)}) nor a path")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    path: str = "default"  # "default" (embedded corpus), a prepared directory, or raw .txt/.jsonl/.parquet/dir
    text_field: str = "text"  # JSONL field / Parquet column holding the text
    seq_len: int = 256  # tokens per row
    seed: int = 0  # data order and the tokenizer trained for raw sources
    format: str = "auto"  # raw sources: "text", "chat" (conversations, masked loss); auto: chat under --recipe sft
    pack: str = "auto"  # "chunk" | "conversation" (whole conversations per row); auto: conversation for chat data
    loss_on: str = "assistant"  # chat data: loss on "assistant" turns only, or on "all" tokens

    def __post_init__(self) -> None:
        if self.seq_len <= 0:
            raise ValueError(f"--data.seq_len must be positive, got {self.seq_len}")
        if self.format not in ("auto", "text", "chat"):
            raise ValueError(f"--data.format must be auto, text or chat, got {self.format!r}")
        if self.pack not in ("auto", "chunk", "conversation"):
            raise ValueError(f"--data.pack must be auto, chunk or conversation, got {self.pack!r}")
        if self.loss_on not in ("assistant", "all"):
            raise ValueError(f"--data.loss_on must be assistant or all, got {self.loss_on!r}")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    save_every: int = 100  # steps between checkpoints (and one at the end)
    resume: bool = False  # continue the run in out_dir from its latest checkpoint (start it if it has none)
    resume_override: str = ""  # "lr=1e-3,min_lr=1e-5,max_steps=2000": the LR / schedule changes a resume may make
    keep: int = 2  # newest checkpoints kept (older ones are deleted after each save)

    def __post_init__(self) -> None:
        if self.save_every < 1:
            raise ValueError(f"--checkpoint.save_every must be >= 1 step, got {self.save_every}")
        if self.keep < 1:
            raise ValueError(f"--checkpoint.keep must be >= 1 checkpoint, got {self.keep}")


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    log_every: int = 1  # steps between metrics.jsonl records
    eval_every: int = 50  # steps between validation passes; 0: only at the end of the run
    eval_batches: int = 4  # validation micro-batches per pass
    tensorboard: bool = False  # also write TensorBoard scalars (needs the tensorboard package)
    progress: bool = True  # live progress bar (off when stdout is not a terminal)
    peak_tflops: float = 989.0  # per GPU, for MFU (H100/H200 dense bf16)

    def __post_init__(self) -> None:
        if self.log_every < 1 or self.eval_every < 0 or self.eval_batches < 1 or self.peak_tflops <= 0:
            raise ValueError("need --logging.log_every >= 1, --logging.eval_every >= 0 (0: only at the end), "
                             "--logging.eval_batches >= 1 and --logging.peak_tflops > 0")


@dataclass(kw_only=True, slots=True)
class RecipeConfig:
    name: str = "none"  # "sft": chat data with assistant-only loss and the SFT recipe's defaults (plan/sft.py)

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {self.name!r}")


RECIPES = ("none", "sft")


@dataclass(kw_only=True, slots=True)
class MoeConfig:
    """The load-balancing objective of MoE models (docs/moe.md); ignored for dense models."""

    balance: str = "global"  # micro | global | sequence: where f_i is counted (Qiu et al., arXiv 2501.11873)
    balance_coef: float | None = None  # LBL coefficient; none: the model config's router_aux_loss_coef
    z_loss_coef: float | None = None  # router z-loss coefficient (arXiv 2202.08906); none: router_z_loss_coef

    def __post_init__(self) -> None:
        if self.balance not in GRANULARITIES:
            raise ValueError(f"--moe.balance {self.balance!r}: choose one of {', '.join(GRANULARITIES)}")
        for name in ("balance_coef", "z_loss_coef"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"--moe.{name} must be >= 0, got {getattr(self, name)}")


# component name -> its config type; the order of TrainConfig's fields, of config.json and of --help
COMPONENTS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
                               "schedule": ScheduleConfig, "batch": BatchConfig, "parallel": ParallelConfig,
                               "checkpoint": CheckpointConfig, "logging": LoggingConfig, "lora": LoraRunConfig,
                               "recipe": RecipeConfig, "moe": MoeConfig}


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    out_dir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraRunConfig = field(default_factory=LoraRunConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    moe: MoeConfig = field(default_factory=MoeConfig)
    plan: Plan | None = field(default=None, repr=False)  # the plan this run executes, saved as plan.json

    def __post_init__(self) -> None:
        for name, kind in COMPONENTS.items():
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"TrainConfig.{name} must be a {kind.__name__}")
        if self.batch.global_batch_tokens % self.data.seq_len:
            raise ValueError(f"global batch ({self.batch.global_batch_tokens} tokens) must be a multiple of "
                             f"seq_len ({self.data.seq_len})")
        if self.schedule.max_steps is None and self.schedule.max_tokens is None:
            raise ValueError("give --schedule.max_steps (--max-steps) or --schedule.max_tokens (or --plan)")
        self._check_context_parallel()
        if self.parallel.offload != "none" and self.batch.auto_micro_batch:
            raise ValueError("--batch.auto_micro_batch with --parallel.offload cpu is not supported (the fitter's "
                             "memory model keeps parameters and optimizer states on the GPU); give "
                             "--batch.micro_batch_size")
        if self.schedule.min_lr > self.optim.lr:
            raise ValueError(f"need --schedule.min_lr <= --optim.lr (got lr={self.optim.lr}, "
                             f"min_lr={self.schedule.min_lr})")

    def _check_context_parallel(self) -> None:
        """What ``--parallel.context_parallel N`` needs from the other components, as one-line errors."""
        cp = self.parallel.context_parallel
        if cp == 1:
            return
        if self.data.seq_len % (2 * cp):
            raise ValueError(f"--data.seq_len {self.data.seq_len} must be a multiple of 2 x "
                             f"--parallel.context_parallel ({2 * cp}): each rank holds two of 2N equal chunks")
        if self.batch.auto_micro_batch:
            raise ValueError("--batch.auto_micro_batch with --parallel.context_parallel is not supported "
                             "(the fitter's memory model has no sequence split); give --batch.micro_batch_size")
        if self.batch.wants_noise():
            raise ValueError("--batch.policy adaptive / --batch.measure_noise with --parallel.context_parallel is "
                             "not supported (the noise measurement splits micro-batches over all ranks)")

    @property
    def total_tokens(self) -> int:
        s = self.schedule
        return s.max_tokens if s.max_tokens is not None else s.max_steps * self.batch.global_batch_tokens

    @property
    def warmup_tokens(self) -> int:
        """The schedule's warmup; default 5% of the horizon."""
        w = self.schedule.warmup_tokens
        return w if w is not None else self.total_tokens // 20

    def to_dict(self) -> dict[str, Any]:
        """The file form (config.json): ``out_dir`` and one mapping per component; the plan is in plan.json."""
        return {"out_dir": self.out_dir, **{name: dataclasses.asdict(getattr(self, name)) for name in COMPONENTS}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, plan: Plan | None = None, source: str = "config") -> TrainConfig:
        """The inverse of ``to_dict``; unknown components or fields are a one-line error naming them."""
        unknown = sorted(set(d) - {"out_dir", *COMPONENTS})
        if unknown:
            raise ValueError(f"{source}: unknown keys {', '.join(unknown)}; known: out_dir, {', '.join(COMPONENTS)}")
        if "out_dir" not in d:
            raise ValueError(f"{source}: no out_dir (pass --out)")
        d = with_recipe_defaults(d)
        parts = {}
        for name, kind in COMPONENTS.items():
            values = d.get(name) or {}
            if not isinstance(values, Mapping):
                raise ValueError(f"{source}: {name} must be a table of fields, got {type(values).__name__}")
            known = {f.name for f in dataclasses.fields(kind)}
            bad = sorted(set(values) - known)
            if bad:
                raise ValueError(f"{source}: unknown field{'s' if len(bad) > 1 else ''} "
                                 f"{', '.join(f'{name}.{b}' for b in bad)}")
            parts[name] = kind(**values)
        return cls(out_dir=str(d["out_dir"]), plan=plan, **parts)


def with_recipe_defaults(d: Mapping[str, Any]) -> Mapping[str, Any]:
    """``d`` with the recipe's defaults (``--recipe sft``: plan/sft.py's ``sft_run_defaults``) for the fields
    it does not set; what the file or the flags give always wins."""
    recipe = d.get("recipe")
    if not isinstance(recipe, Mapping) or recipe.get("name") != "sft":
        return d
    from batchpilot.plan.sft import sft_run_defaults

    tree = {k: dict(v) if isinstance(v, Mapping) else v for k, v in d.items()}
    batch = tree.get("batch", {}).get("global_batch_tokens", BatchConfig().global_batch_tokens)
    schedule = tree.get("schedule", {})
    steps = schedule.get("max_steps")
    total = schedule.get("max_tokens") or (steps * batch if steps else None)
    for dotted, value in sft_run_defaults(global_batch_tokens=batch, total_tokens=total).items():
        component, _, name = dotted.partition(".")
        part = tree.setdefault(component, {})
        if isinstance(part, dict):
            part.setdefault(name, value)
    return tree


def field_types() -> dict[str, type]:
    """Every dotted field name (``optim.lr``) and its dataclass field, for flags and config files."""
    import typing

    out = {}
    for name, kind in COMPONENTS.items():
        hints = typing.get_type_hints(kind)
        for f in dataclasses.fields(kind):
            out[f"{name}.{f.name}"] = hints[f.name]
    return out


def set_dotted(tree: dict[str, Any], dotted: str, value: object) -> None:
    """``tree["optim"]["lr"] = value`` for ``dotted = "optim.lr"``."""
    component, _, name = dotted.partition(".")
    tree.setdefault(component, {})[name] = value


# The settings a plan fixes, as dotted fields; ``plan_settings`` is how the trainer's config takes a Plan.
PLAN_FIELDS = ("model.name", "data.seq_len", "batch.global_batch_tokens", "batch.micro_batch_size",
               "batch.policy", "schedule.max_steps", "schedule.name", "schedule.min_lr", "schedule.warmup_tokens",
               "optim.lr", "optim.name", "parallel.activation_checkpointing", "parallel.offload",
               "parallel.compile", "parallel.float8", "parallel.context_parallel")


def plan_settings(plan: Plan) -> dict[str, object]:
    """The dotted fields a plan fixes (``PLAN_FIELDS``), with the plan's values; a plan made for a model shape
    (``model`` a dict) leaves ``model.name`` to the caller (its HF directory or config.json)."""
    settings: dict[str, object] = {
        "data.seq_len": plan.seq_len, "batch.global_batch_tokens": plan.global_batch_tokens,
        "batch.micro_batch_size": plan.micro_batch_size, "batch.policy": plan.batch_policy,
        "schedule.max_steps": plan.total_steps, "schedule.name": plan.schedule, "schedule.min_lr": plan.min_lr,
        "schedule.warmup_tokens": plan.warmup_tokens, "optim.lr": plan.peak_lr, "optim.name": plan.optimizer,
        "parallel.activation_checkpointing": plan.activation_checkpointing}
    if isinstance(plan.model, str):
        settings["model.name"] = plan.model
    if getattr(plan, "offload", "none") == "cpu":  # schema 2 plans: a plan that only fits offloaded says so
        settings["parallel.offload"] = "cpu"
    # the plan's memory fit assumed these blocks (compiled blocks save fewer bytes, float8 ones fewer still), so
    # its micro-batch holds only with them: the plan fixes them too
    settings["parallel.compile"] = plan.compile
    if plan.float8 is not None:
        settings["parallel.float8"] = plan.float8
    if plan.context_parallel > 1:  # a plan that splits each sequence over GPUs (schema 3)
        settings["parallel.context_parallel"] = plan.context_parallel
    return settings


# Flat names of the release before the components: each is now the dotted field(s) on the right. The CLI
# keeps them as deprecated flags for one release; tests and old scripts may build a config from them.
LEGACY_NAMES: dict[str, tuple[str, ...]] = {
    "model": ("model.name",), "data": ("data.path",), "text_field": ("data.text_field",),
    "seq_len": ("data.seq_len",), "seed": ("model.seed", "data.seed"),
    "global_batch_tokens": ("batch.global_batch_tokens",), "micro_batch_size": ("batch.micro_batch_size",),
    "auto_micro_batch": ("batch.auto_micro_batch",), "batch_policy": ("batch.policy",),
    "batch_ramp": ("batch.ramp",), "max_global_batch_tokens": ("batch.max_batch_tokens",),
    "adaptive_min_interval_steps": ("batch.min_interval_steps",),
    "adaptive_warmup_steps": ("batch.min_measurements",),
    "adaptive_target_multiplier": ("batch.target_multiplier",), "lr_coupling": ("batch.lr_coupling",),
    "measure_noise": ("batch.measure_noise",),
    "max_steps": ("schedule.max_steps",), "max_tokens": ("schedule.max_tokens",),
    "stop_at_step": ("schedule.stop_at_step",), "min_lr": ("schedule.min_lr",),
    "warmup_tokens": ("schedule.warmup_tokens",), "schedule": ("schedule.name",),
    "lr": ("optim.lr",), "optimizer": ("optim.name",), "weight_decay": ("optim.weight_decay",),
    "beta1": ("optim.beta1",), "beta2": ("optim.beta2",), "grad_clip": ("optim.grad_clip",),
    "eval_every": ("logging.eval_every",), "eval_batches": ("logging.eval_batches",),
    "log_every": ("logging.log_every",), "tensorboard": ("logging.tensorboard",),
    "progress": ("logging.progress",), "peak_tflops": ("logging.peak_tflops",),
    "save_every": ("checkpoint.save_every",), "resume": ("checkpoint.resume",),
    "keep_checkpoints": ("checkpoint.keep",),
    "device": ("parallel.device",), "compile": ("parallel.compile",),
    "activation_checkpointing": ("parallel.activation_checkpointing",),
    "fsdp_one_device": ("parallel.fsdp_one_device",), "float8": ("parallel.float8",),
}


def config_from_legacy(out_dir: str, **flat: object) -> TrainConfig:
    """A TrainConfig from the flat names of ``LEGACY_NAMES`` (``lr=1e-2, max_steps=6``)."""
    tree: dict[str, Any] = {"out_dir": out_dir}
    for name, value in flat.items():
        if name not in LEGACY_NAMES:
            raise ValueError(f"unknown flat name {name!r}")
        for dotted in LEGACY_NAMES[name]:
            set_dotted(tree, dotted, value)
    return TrainConfig.from_dict(tree)
