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

Two things make the compiled blocks (``--parallel.compile``: one ``torch.compile`` per block, all blocks sharing
one graph) start as fast under LoRA as in full fine-tuning (issue 21):

- Every block's input requires grad. With the embedding frozen, block 0's input would not while the others'
  would; dynamo guards on ``requires_grad`` and would compile the block twice (forward and backward each). A
  forward hook on the embedding marks its output (what HF's ``enable_input_require_grads`` does). Cost: the
  backward also computes block 0's input gradient, one extra matmul per linear of one block (1 / L of the
  blocks' backward matmul FLOPs; about 2% of a LoRA step's FLOPs at the llama-1b shape, LM head included).
- PEFT's LoRA ``Linear`` gets a lean forward (``LoraLinear``, a subclass: same parameters, state dict names and
  merge): ``base(x) + scale * B(A(dropout(x)))`` for the one active adapter, without PEFT's per-call result
  cast and, under autocast, without its cast of ``x`` to the adapter's fp32 dtype (autocast casts it back to
  bf16 for the matmul, so that round trip is exact and wasted). Any other state (merged, disabled, several
  adapters, extra arguments) falls back to PEFT's forward.
"""

from __future__ import annotations

import functools
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from batchpilot.model.llama import Llama

if TYPE_CHECKING:
    from peft.tuners.lora import Linear as PeftLoraLinear

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
    lean = lora_linear_class()
    for module in model.modules():
        if type(module) is peft.tuners.lora.Linear:  # vanilla LoRA: our LoraConfig has no DoRA or other variants
            module.__class__ = lean
    if model.embed_tokens not in _INPUT_GRAD_HOOKS:
        _INPUT_GRAD_HOOKS[model.embed_tokens] = model.embed_tokens.register_forward_hook(_output_requires_grad)
    return model


_INPUT_GRAD_HOOKS: weakref.WeakKeyDictionary[nn.Module, RemovableHandle] = weakref.WeakKeyDictionary()


def _output_requires_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """The frozen embedding's output requires grad, so block 0's input does as every other block's does (one
    compiled graph for all blocks, not two). Outside autograd (``no_grad``, inference mode) nothing changes."""
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)
    return output


@functools.cache
def lora_linear_class() -> type[PeftLoraLinear]:
    """``LoraLinear``: PEFT's ``lora.Linear`` with a lean forward for training (defined on first use, since peft is
    an optional dependency imported only when adapters are applied)."""
    from peft.tuners.lora import Linear

    class LoraLinear(Linear):
        """``base(x) + scale * B(A(dropout(x)))`` (Hu et al., eq. 3) for the single active, unmerged adapter."""

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            names = self.active_adapters
            if args or kwargs or self.disable_adapters or self.merged or len(names) != 1:
                return super().forward(x, *args, **kwargs)
            a, b = self.lora_A[names[0]], self.lora_B[names[0]]
            if x.dtype != a.weight.dtype and not torch.is_autocast_enabled(x.device.type):
                return super().forward(x)  # PEFT casts x to the adapter's dtype and the result back
            return self.base_layer(x) + b(a(self.lora_dropout[names[0]](x))) * self.scaling[names[0]]

    LoraLinear.__module__, LoraLinear.__qualname__ = __name__, "LoraLinear"  # pickle finds it through __getattr__
    return LoraLinear


def __getattr__(name: str) -> Any:
    """``batchpilot.train.lora.LoraLinear`` resolves lazily (PEP 562), so peft is imported only when it is used."""
    if name == "LoraLinear":
        return lora_linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    hook = _INPUT_GRAD_HOOKS.pop(model.embed_tokens, None)
    if hook is not None:
        hook.remove()
    return model

