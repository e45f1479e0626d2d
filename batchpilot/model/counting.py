"""Counting a model from its config: parameters, FLOPs per token, KV-cache bytes. One owner for every count.

The planner (``plan/``), the trainer's MFU, the generation roofline and the benchmarks all count with these
functions, so "N", "FLOPs per token" and "KV bytes per token" mean the same thing everywhere.

Conventions:
- ``non_vocab_params`` (N) = attention (q, k, v, o; GQA-sized k/v; q/k/v biases) + SwiGLU MLP of every
  layer; no embeddings, LM head or norms. This is Step Law's N (Li et al. 2025, "Predictable Scale: Part I",
  arXiv 2503.04715: every released dense run has N = L (4 d^2 + 3 d d_ffn) exactly for MHA).
- ``training_flops_per_token`` = 6 x matmul parameters + 6 L (H E) T: forward + backward (Kaplan et al. 2020,
  arXiv 2001.08361, section 2.1; PaLM, arXiv 2204.02311, appendix B), with the causal half of attention.
"""

from __future__ import annotations

from batchpilot.model.llama import LlamaConfig


def non_vocab_params(config: LlamaConfig) -> int:
    """Attention (incl. GQA k/v and q/k/v biases) + SwiGLU MLP parameters of all layers (Step Law's N)."""
    d, q_dim, kv_dim = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    attention = d * q_dim + 2 * d * kv_dim + q_dim * d
    if config.attention_bias:
        attention += q_dim + 2 * kv_dim
    mlp = 3 * d * config.intermediate_size
    return config.num_layers * (attention + mlp)


def total_params(config: LlamaConfig) -> int:
    """Every parameter of ``Llama(config)``: N + embeddings (+ untied head) + RMSNorm weights."""
    vocab = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    norms = (2 * config.num_layers + 1) * config.hidden_size
    return non_vocab_params(config) + vocab + norms


def matmul_params(config: LlamaConfig) -> int:
    """Parameters a token goes through in matmuls: N + the LM head (the embedding lookup is not a matmul)."""
    return non_vocab_params(config) + config.vocab_size * config.hidden_size


def block_params(config: LlamaConfig) -> float:
    """Matmul parameters of one transformer block."""
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
