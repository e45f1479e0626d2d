"""A Llama-family decoder (Llama 2/3, Qwen2; Mixtral and Qwen2-MoE sparse MLPs) for one device, read top to bottom.

Parameter names are Hugging Face's (minus the ``model.`` prefix) so that ``hf.py`` is a near
identity map. RoPE uses HF's rotate-half convention, so no q/k permutation is needed on load.
Parallelism, compile and activation checkpointing are applied from outside (``train/parallel.py``).

Shape legend: B batch, T sequence, D hidden, H query heads, K kv heads, E head dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from batchpilot.model.loss import chunked_cross_entropy
from batchpilot.model.moe import EXPERT_IMPLS, RoutingRecord, RoutingSlot, SparseMoE

ARCHITECTURES = ("llama", "qwen2", "mixtral", "qwen2_moe")


@dataclass(kw_only=True, slots=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0 means hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear", ...} as in HF config.json
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2); o_proj never has one
    max_position_embeddings: int = 2048
    architecture: str = "llama"  # one of ARCHITECTURES: decides the HF class on export
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # HF config keys we carry but do not use
    # Mixture-of-Experts (num_experts == 0: dense). Names and layer pattern as in HF's Qwen2-MoE config:
    # layer i is sparse iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0  # 0 means intermediate_size
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = True  # sigmoid gate on the shared expert (Qwen2-MoE); False: DeepSeekMoE-style
    norm_topk_prob: bool = False  # renormalise the top-k weights to sum to 1 (Mixtral always does)
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001  # the load-balancing loss coefficient the trainer applies
    router_z_loss_coef: float = 0.0  # ST-MoE router z-loss coefficient (arXiv 2202.08906); 0: off
    moe_capacity_factor: float = 0.0  # 0: dropless; > 0: slots beyond ceil(cf N K / E) per expert are dropped
    moe_impl: str = "auto"  # experts as a per-expert loop, grouped GEMMs, or auto (grouped for bf16 on CUDA)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; supported: {', '.join(ARCHITECTURES)}")
        if self.moe_intermediate_size == 0:
            self.moe_intermediate_size = self.intermediate_size
        self.mlp_only_layers = tuple(self.mlp_only_layers)
        if self.num_experts < 0 or (self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts):
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts "
                             f"({self.num_experts})")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        if self.moe_impl not in EXPERT_IMPLS:
            raise ValueError(f"moe_impl must be one of {', '.join(EXPERT_IMPLS)}, got {self.moe_impl!r}")
        if self.moe_capacity_factor < 0:
            raise ValueError(f"moe_capacity_factor must be >= 0, got {self.moe_capacity_factor}")

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.num_experts > 0 and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    @property
    def num_moe_layers(self) -> int:
        """Closed form of sum(is_moe_layer(i) for i in range(num_layers)): counting stays O(1) in the depth."""
        if self.num_experts <= 0:
            return 0
        dense = {i for i in self.mlp_only_layers if 0 <= i < self.num_layers and (i + 1) % self.decoder_sparse_step == 0}
        return self.num_layers // self.decoder_sparse_step - len(dense)

    def with_(self, **changes: Any) -> LlamaConfig:
        return replace(self, **changes)


_LLAMA3_ROPE_1B = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
_LLAMA3_ROPE_8B = {**_LLAMA3_ROPE_1B, "factor": 8.0}

PRESETS: dict[str, LlamaConfig] = {
    # ~1.3M parameters: the CPU demo and tests (trains visibly on the KJV in minutes on 2 cores).
    "tiny": LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                        num_kv_heads=2, tie_word_embeddings=True, max_position_embeddings=1024),
    # ~124M: GPT-2-small-sized Llama.
    "llama-125m": LlamaConfig(vocab_size=50304, hidden_size=768, intermediate_size=2048, num_layers=12,
                              num_heads=12, num_kv_heads=12, tie_word_embeddings=True, max_position_embeddings=2048),
    # 1.24B: the Llama-3.2-1B shape, the benchmark model of the training and generation baselines.
    "llama-1b": LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                            num_kv_heads=8, head_dim=64, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE_1B,
                            tie_word_embeddings=True, max_position_embeddings=131072),
    # 8.03B: the Llama-3.1-8B shape.
    "llama-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                            num_kv_heads=8, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE_8B,
                            max_position_embeddings=131072),
    # 0.49B: the Qwen2.5-0.5B shape (q/k/v bias, tied, 2 KV heads).
    "qwen2-0.5b": LlamaConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                              num_heads=14, num_kv_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
                              tie_word_embeddings=True, attention_bias=True, architecture="qwen2",
                              max_position_embeddings=32768),
    # CPU MoE for tests and the balance experiment: 8 experts, top-2, a gated shared expert, layer 0 dense.
    "tiny-moe": LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                            num_kv_heads=2, tie_word_embeddings=True, max_position_embeddings=1024,
                            architecture="qwen2_moe", attention_bias=True, num_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=96, shared_expert_intermediate_size=96, mlp_only_layers=(0,)),
    # GPU MoE: 1.06B total non-vocabulary parameters, 0.26B activated (16 layers, d 1024, 32 experts of
    # I 576, top-4, a gated shared expert of 2048); Llama-3 vocabulary. Counts: counting.py.
    "moe-1b": LlamaConfig(vocab_size=128256, hidden_size=1024, intermediate_size=2816, num_layers=16,
                          num_heads=16, num_kv_heads=8, rope_theta=500000.0, tie_word_embeddings=True,
                          max_position_embeddings=8192, architecture="qwen2_moe", attention_bias=True,
                          num_experts=32, num_experts_per_tok=4, moe_intermediate_size=576,
                          shared_expert_intermediate_size=2048),
}


def get_preset(name: str) -> LlamaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return replace(PRESETS[name])


class AttnMeta(Protocol):
    """How attention is computed for one forward pass; ``None`` means plain causal attention.

    Training passes a document mask (``model/attention.py``); generation passes its paged-KV
    metadata. The model only calls ``attend``, so it never depends on either implementation.
    """

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor: ...


class Llama(nn.Module):
    inv_freq: torch.Tensor  # (head_dim / 2,) RoPE inverse frequencies, a non-persistent buffer

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        # given storage, so Embedding skips its own normal_ init: ``build_model`` or a checkpoint fills every weight,
        # and on the meta device that init is a decomposition whose first call imports dynamo (seconds of start-up)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def tie_weights(self) -> None:
        """Share the embedding with the LM head; call again after ``to_empty`` (which unties)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, *, targets: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attn_meta: AttnMeta | None = None,
                routing: RoutingRecord | None = None) -> torch.Tensor:
        """Logits (B, T, V), or, when ``targets`` is given, the mean cross-entropy over targets != -100.

        The loss path never materialises the full fp32 logits (``chunked_cross_entropy``). MoE layers write
        their routing statistics into ``routing`` when one is given (the load-balancing loss is formed from
        it by ``moe.BalanceAccumulator``; the returned loss is the LM loss only).
        """
        hidden = self.hidden_states(input_ids, position_ids=position_ids, attn_meta=attn_meta, routing=routing)
        if targets is None:
            return self.lm_head(hidden)
        return chunked_cross_entropy(hidden, self.lm_head.weight, targets)

    def hidden_states(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                      attn_meta: AttnMeta | None = None, routing: RoutingRecord | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        x = self.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        for i, layer in enumerate(self.layers):  # each MoE layer gets its own slot (moe.RoutingSlot says why)
            slot = routing.slot(i) if routing is not None and self.config.is_moe_layer(i) else None
            x = layer(x, cos, sin, attn_meta, slot)
        return self.norm(x)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range); residual output projections scaled by 1/sqrt(2 L) (GPT-2)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.num_layers))
            else:
                nn.init.normal_(p, std=std)
        self.inv_freq.copy_(rope_inv_freq(self.config).to(self.inv_freq.device))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = sparse_moe(config) if config.is_moe_layer(layer_idx) else MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_meta: AttnMeta | None, routing: RoutingSlot | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_meta)
        if isinstance(self.mlp, SparseMoE):
            return x + self.mlp(self.post_attention_layernorm(x), routing)
        return x + self.mlp(self.post_attention_layernorm(x))


def sparse_moe(config: LlamaConfig) -> SparseMoE:
    return SparseMoE(hidden_size=config.hidden_size, num_experts=config.num_experts,
                     top_k=config.num_experts_per_tok, expert_intermediate_size=config.moe_intermediate_size,
                     norm_topk_prob=config.norm_topk_prob,
                     shared_intermediate_size=config.shared_expert_intermediate_size,
                     shared_expert_gate=config.shared_expert_gate, capacity_factor=config.moe_capacity_factor,
                     impl=config.moe_impl)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_meta: AttnMeta | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, E)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, E)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, E)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if attn_meta is None:
            gqa = self.num_kv_heads != self.num_heads
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = attn_meta.attend(q, k, v, self.layer_idx)  # (B, H, T, E)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, H*E) -> (B, T, D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    """Normalise in fp32 and cast back before the weight, exactly as HF does (parity to 1e-6)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/E), with Llama-3 or linear scaling when the config asks for it."""
    dim = config.head_dim
    # on the CPU, even under a meta-device context: meta ops run Python decompositions that import dynamo
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return llama3_scale_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")


def llama3_scale_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, 1, T, E), computed in fp32 then cast (as HF does)."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # (B, T, E/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, E)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def build_model(config: LlamaConfig, *, device: str | torch.device = "cpu", seed: int | None = None) -> Llama:
    """Build on the meta device, materialise on `device`, then initialise (no double init of big models)."""
    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device=device)
    model.tie_weights()
    if seed is not None:
        torch.manual_seed(seed)
    model.init_weights()
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
