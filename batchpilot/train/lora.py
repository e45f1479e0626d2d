"""LoRA adapters on our ``Llama`` through PEFT, and their merge back into plain weights for export.

LoRA ("LoRA: Low-Rank Adaptation of Large Language Models", Hu et al., arXiv 2106.09685, eq. 3) freezes a
linear layer's weight W and learns ``h = W x + (alpha / r) * B A x`` with A (r x in) and B (out x r); B starts
at zero so the adapted model starts as the base model. We do not reimplement it: PEFT's
``inject_adapter_in_model`` swaps the target ``nn.Linear`` modules of any ``nn.Module`` for its LoRA layers
(our model uses Hugging Face's module names, ``q_proj`` ... ``down_proj``, so PEFT's usual targets apply)
and freezes everything else. The model stays our ``Llama`` (no wrapper class, parameter names gain
``.base_layer`` / ``.lora_A.default`` parts), so FSDP2, compile and the fused loss apply to it as before.

``merge_lora`` folds ``(alpha / r) B A`` into each W and puts the plain ``nn.Linear`` back, so ``save_model``
writes an ordinary HF checkpoint that transformers loads without PEFT.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from batchpilot.model.llama import Llama

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(kw_only=True, slots=True)
class LoraConfig:
    rank: int = 16  # r
    alpha: float = 32.0  # the update is scaled by alpha / rank (Hu et al., sec. 4.1)
    dropout: float = 0.0  # on the adapter's input, as in PEFT
    target_modules: tuple[str, ...] = LINEAR_MODULES  # our choice: all linear layers (QLoRA, arXiv 2305.14314)
    seed: int | None = None  # seed of the A matrices' init; None uses the global torch RNG

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"--lora.rank must be positive, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"--lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora.dropout must be in [0, 1), got {self.dropout}")
        self.target_modules = tuple(self.target_modules)
        unknown = sorted(set(self.target_modules) - set(LINEAR_MODULES))
        if not self.target_modules or unknown:
            raise ValueError(f"--lora.target-modules must be among {', '.join(LINEAR_MODULES)}, got "
                             f"{', '.join(unknown) or 'none'}")


@dataclass(kw_only=True, slots=True)
class LoraRunConfig:
    """The ``lora`` component of a training run (``--lora.rank`` ...); ``rank`` 0 is full fine-tuning."""

    rank: int = 0  # 0: no adapters, every weight trains
    alpha: float = 0.0  # 0: 2 x rank (the update scale alpha / rank is then 2, our choice)
    dropout: float = 0.0
    target_modules: str = "all"  # comma-separated among LINEAR_MODULES, or "all"

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"--lora.rank must be >= 0 (0: no LoRA), got {self.rank}")
        if self.alpha < 0:
            raise ValueError(f"--lora.alpha must be >= 0 (0: 2 x rank), got {self.alpha}")
        if self.rank:
            self.adapter_config(seed=None)  # validates dropout and the target modules where they are given

    def adapter_config(self, *, seed: int | None) -> LoraConfig | None:
        """The adapters this component asks for, or None for full fine-tuning."""
        if not self.rank:
            return None
        targets = LINEAR_MODULES if self.target_modules == "all" else tuple(
            t.strip() for t in self.target_modules.split(",") if t.strip())
        return LoraConfig(rank=self.rank, alpha=self.alpha or 2.0 * self.rank, dropout=self.dropout,
                          target_modules=targets, seed=seed)


def apply_lora(model: Llama, cfg: LoraConfig) -> Llama:
    """``model`` itself with LoRA adapters in its target linear layers; only the adapters stay trainable."""
    import peft

    # PEFT annotates lora_alpha as int but scales by alpha / r in floating point; a float alpha is what users set
    peft_cfg = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,  # type: ignore[arg-type]
                               target_modules=list(cfg.target_modules), bias="none")
    rng = torch.random.fork_rng(devices=[]) if cfg.seed is not None else nullcontext()
    with rng:
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        peft.inject_adapter_in_model(peft_cfg, model)
    for name, p in model.named_parameters():  # PEFT freezes the base already; say so rather than rely on it
        p.requires_grad_("lora_" in name)
    return model


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def merge_lora(model: Llama) -> Llama:
    """``model`` with every adapter folded into its base weight and the plain ``nn.Linear`` put back (for export)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in adapted:
        module.merge(safe_merge=True)  # safe_merge: refuses to write NaN/inf weights
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model

