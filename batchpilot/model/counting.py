"""Counting a model from its config: parameters, FLOPs per token, KV-cache bytes. One owner for every count.

The planner (``plan/``), the trainer's MFU, the generation roofline and the benchmarks all count with these
functions, so "N", "FLOPs per token" and "KV bytes per token" mean the same thing everywhere.

Conventions:
- ``non_vocab_params`` (N) = attention (q, k, v, o; GQA-sized k/v; q/k/v biases) + SwiGLU MLP of every
  layer; no embeddings, LM head or norms. This is Step Law's N (Li et al. 2025, "Predictable Scale: Part I",
  arXiv 2503.04715: every released dense run has N = L (4 d^2 + 3 d d_ffn) exactly for MHA).
- ``training_flops_per_token`` = 6 x matmul parameters + 6 L (H E) T: forward + backward (Kaplan et al. 2020,
  arXiv 2001.08361, section 2.1; PaLM, arXiv 2204.02311, appendix B), with the causal half of attention.
- MoE: ``non_vocab_params`` counts every expert (TOTAL N); ``activated_non_vocab_params`` counts the K routed
  experts a token goes through (plus router and shared expert), and FLOPs per token use the activated count.
  Step Law's MoE convention: its released MoE grid (``data/moe_lr_bs_loss.csv`` of the Step Law release, Li
  et al., arXiv 2503.04715) lists both the total and the activated non-vocabulary N; recomputing the law's
  learning rate on its 16 MoE (config, D) groups puts the grid-best LR at 0.41-1.67x the prediction with
  total N but 0.87-9.5x with activated N (2-10x off for the 1-of-89 / 2-of-88 / 1-of-8 sparse configs). So
  the planner feeds Step Law the TOTAL non-vocabulary N for MoE; the paper text does not settle it.
"""

from __future__ import annotations

from batchpilot.model.llama import LlamaConfig


def non_vocab_params(config: LlamaConfig) -> int:
    """Attention (incl. GQA k/v and q/k/v biases) + MLP parameters of all layers, every expert counted (Step
    Law's N, total for MoE)."""
    return _layers_params(config, activated=False)


def activated_non_vocab_params(config: LlamaConfig) -> int:
    """Non-vocabulary parameters one token goes through: the K routed experts, router and shared expert of
    each MoE layer (equal to ``non_vocab_params`` for a dense model)."""
    return _layers_params(config, activated=True)


def _layers_params(config: LlamaConfig, *, activated: bool) -> int:
    """Attention of every layer + dense MLPs + MoE MLPs, by layer counts (a crafted config with 10^9 layers is
    counted at once, so the loader can refuse it before allocating)."""
    moe = config.num_moe_layers
    dense = config.num_layers - moe
    moe_mlp = _moe_mlp_params(config, activated=activated) if moe else 0
    return config.num_layers * _attention_params(config) + dense * 3 * config.hidden_size * config.intermediate_size \
        + moe * moe_mlp


def _attention_params(config: LlamaConfig) -> int:
    d, q_dim, kv_dim = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    attention = d * q_dim + 2 * d * kv_dim + q_dim * d
    if config.attention_bias:
        attention += q_dim + 2 * kv_dim
    return attention


def _moe_mlp_params(config: LlamaConfig, *, activated: bool) -> int:
    d = config.hidden_size
    experts = config.num_experts_per_tok if activated else config.num_experts
    params = experts * 3 * d * config.moe_intermediate_size + d * config.num_experts  # experts + router
    if config.shared_expert_intermediate_size:
        params += 3 * d * config.shared_expert_intermediate_size + (d if config.shared_expert_gate else 0)
    return params


def total_params(config: LlamaConfig) -> int:
    """Every parameter of ``Llama(config)``: N + embeddings (+ untied head) + RMSNorm weights."""
    vocab = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    norms = (2 * config.num_layers + 1) * config.hidden_size
    return non_vocab_params(config) + vocab + norms


def matmul_params(config: LlamaConfig) -> int:
    """Parameters a token goes through in matmuls: activated N + the LM head (the embedding lookup is not a
    matmul). For MoE this is what the FLOPs (and MFU) count, not the total."""
    return activated_non_vocab_params(config) + config.vocab_size * config.hidden_size


def block_params(config: LlamaConfig) -> float:
    """Matmul parameters of one transformer block (mean over blocks; every expert counted for MoE)."""
    return non_vocab_params(config) / config.num_layers


def training_flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """6 x matmul parameters + 6 L (H E) T: forward + backward, causal attention counted at half of 12 L H E T.

    The trainer computes its MFU with this function, so the MFU in a run's metrics.jsonl means the same as the
    planner's.
    """
    return 6 * matmul_params(config) + 6 * config.num_layers * config.num_heads * config.head_dim * seq_len


def kv_bytes_per_token(config: LlamaConfig, *, dtype_bytes: int = 2) -> int:
    """KV-cache bytes per cached token: k and v, every layer, K heads of E."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype_bytes
