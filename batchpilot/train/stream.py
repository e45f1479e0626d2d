"""Streaming backpropagation: exact gradients of the transformer blocks, computed one chunk of the sequence at a time.

StreamBP (Luo et al. 2025, "StreamBP: Memory-Efficient Exact Backpropagation for Long Sequence Training of
LLMs", arXiv 2506.03077, Section 3): a block's output at row i depends on the input rows <= i only through
the keys and values, so its backward decomposes along the sequence. Here, per block:

- forward (no graph kept): chunk by chunk, the chunk's Q, K, V (one input norm), its K/V written into the
  sequence's buffers, attention over the keys of rows [0, chunk end), o_proj and the MLP; only the block input
  is saved (as activation checkpointing does);
- backward: K and V of all rows but the last chunk's recomputed without a graph (kept, as the paper keeps
  earlier chunks' keys and values, in the attention dtype), then the chunks from last to first. Chunk c's
  graph holds its own Q/K/V projections; its keys are spliced after the earlier rows' keys, so one
  ``autograd.grad`` call gives the chunk's input gradient (residual, query and its own key/value paths), the
  gradient of the earlier rows' keys/values (accumulated in fp32), and the parameter gradients. Going
  backwards in the sequence, the key/value gradients of a chunk are complete (later queries all came first)
  when its own graph runs: they enter as extra output gradients of its K/V projections. down_proj's forward
  is not recomputed (its gradients are taken by hand, ``_grads_before_down_proj``), as full checkpointing's
  early stop skips it.

Attention: an unpacked row (no document mask) attends only the prefix [0, chunk end) with SDPA's
lower-right causal mask (``attend_causal_rows``: the flash kernel on CUDA, no (C x T) tensor), so the chunks
together cost one causal attention; packed rows keep the document mask over all T keys (``attend_rows``).

Activation memory: the saved block inputs, plus for the block being differentiated one chunk's graph and
O(T) keys/values (``estimate_stream_activation_bytes``). The LM head and the loss already work by chunks
(``model/loss.py``: the logits never exist in full), so a streamed model's backward never holds a
T x V or T x I tensor. Cost: a second forward of every block in backward, like full checkpointing, plus
the K/V projections once more (``tests/train/test_stream_fast.py`` counts them).

Shape legend: B batch, T sequence, C chunk, D hidden, H heads, K kv heads, E head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from batchpilot.model.attention import DocumentMask, attend_causal_rows, attend_rows
from batchpilot.model.llama import MLP, apply_rope
# the planner's memory model of a streamed block lives in plan/ (plan does not import train); re-exported here
from batchpilot.plan.memory import estimate_stream_activation_bytes, stream_backward_working_bytes

__all__ = ["StreamConfig", "StreamingBlock", "apply_streaming", "estimate_stream_activation_bytes",
           "stream_backward_working_bytes"]


@dataclass(kw_only=True, slots=True)
class StreamConfig:
    chunk_tokens: int = 4096  # --stream-chunk: rows of the sequence per backward chunk
    # --parallel.stream_offload: the saved input in pinned host memory (CUDA), copied back for the block's backward
    offload_inputs: bool = False

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1:
            raise ValueError(f"--stream-chunk must be >= 1, got {self.chunk_tokens}")


class StreamingBlock(nn.Module):
    """A ``Block`` whose forward keeps only its input and whose backward streams over the sequence.

    It adopts the block's submodules under their names, so parameter names (checkpoints, HF export, FSDP2
    wrapping) are those of the plain block.
    """

    def __init__(self, block: nn.Module, chunk_tokens: int, offload_inputs: bool = False) -> None:
        super().__init__()
        cfg = StreamConfig(chunk_tokens=chunk_tokens, offload_inputs=offload_inputs)
        self.chunk_tokens, self.offload_inputs = cfg.chunk_tokens, cfg.offload_inputs
        self.input_layernorm = block.input_layernorm
        self.self_attn = block.self_attn
        self.post_attention_layernorm = block.post_attention_layernorm
        self.mlp = block.mlp

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_meta: DocumentMask | None, routing: object | None = None) -> torch.Tensor:
        if routing is not None:
            raise ValueError("streaming backprop does not record MoE routing (no balance loss); use "
                             "--parallel.activation_checkpointing full for MoE models")
        if attn_meta is not None and not isinstance(attn_meta, DocumentMask):
            raise ValueError(f"streaming backprop supports causal or document-masked attention, "
                             f"not {type(attn_meta).__name__}")
        if not torch.is_grad_enabled():  # evaluation: the same chunked forward, no Function needed
            return _forward_chunked(self, x, cos, sin, attn_meta)
        params = tuple(self.parameters())
        return _StreamBlock.apply(x, cos, sin, attn_meta, self, *params)


def apply_streaming(model: nn.Module, chunk_tokens: int, *, offload_inputs: bool = False) -> None:
    """Stream the backward of every block of a built ``Llama`` in chunks of ``chunk_tokens`` rows (in place);
    ``offload_inputs``: each block keeps its saved input in pinned host memory (CUDA tensors only).

    Applied where activation checkpointing would be (``--activation-checkpointing stream``), instead of it,
    before compile and FSDP2. Blocks are not compiled under streaming (the chunk loop runs in Python).
    """
    if getattr(model.config, "num_experts", 0):
        raise ValueError("--parallel.activation_checkpointing stream does not support MoE models yet (the "
                         "routing record and balance loss are not streamed); use full")
    for i, block in enumerate(model.layers):
        if not isinstance(block, StreamingBlock):
            model.layers[i] = StreamingBlock(block, chunk_tokens, offload_inputs)


# --- the block, by chunks ------------------------------------------------------------------------------------


def _chunks(seq_len: int, chunk_tokens: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_tokens, seq_len)) for s in range(0, seq_len, chunk_tokens)]


def _attention_dtype(x: torch.Tensor, like: torch.Tensor) -> torch.dtype:
    """The dtype SDPA computes in: autocast's, else the tensors' own. Keys and values are kept in it."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else like.dtype


def _project(block: StreamingBlock, x: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE'd queries (B, H, C, E), keys and values (B, K, C, E) of rows x (B, C, D), one input norm for all."""
    attn = block.self_attn
    B, C, _ = x.shape
    h = block.input_layernorm(x)
    q = attn.q_proj(h).view(B, C, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(B, C, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(B, C, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _keys_values(block: StreamingBlock, x: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE'd keys and values of rows x (B, C, D) -> (B, K, C, E) each (no queries)."""
    attn = block.self_attn
    B, C, _ = x.shape
    h = block.input_layernorm(x)
    k = attn.k_proj(h).view(B, C, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(B, C, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    return apply_rope(k, cos, sin), v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
            attn_meta: DocumentMask | None) -> torch.Tensor:
    """Rows [q_start, q_start + C) of q (B, H, C, E) over keys k, v (B, K, >= q_start + C, E).

    An unpacked row attends only its prefix, lower-right causal (``attend_causal_rows``: SDPA's flash /
    efficient kernels on CUDA); packed rows take the document mask over all T keys (``attend_rows``:
    FlexAttention on CUDA, one key length for every chunk so it compiles once).
    """
    if attn_meta is None:
        end = q_start + q.shape[2]
        return attend_causal_rows(q, k[:, :, :end], v[:, :, :end])
    return attend_rows(q, k, v, q_start=q_start, document_ids=attn_meta.document_ids)


def _block_rest(block: StreamingBlock, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The block after attention: residual + o_proj, then the MLP. x (B, C, D), out (B, H, C, E)."""
    B, C, _ = x.shape
    y = x + block.self_attn.o_proj(out.transpose(1, 2).reshape(B, C, -1))  # (B, C, H*E) -> (B, C, D)
    return y + block.mlp(block.post_attention_layernorm(y))


def _prefix_keys_values(block: StreamingBlock, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V (B, K, end, E) of rows [0, end), in the attention dtype, chunk by chunk (no T x D temporaries)."""
    parts = [_keys_values(block, x[:, s:e], cos[:, :, s:e], sin[:, :, s:e])
             for s, e in _chunks(end, block.chunk_tokens)]
    if not parts:
        attn = block.self_attn
        empty = x.new_empty(x.shape[0], attn.num_kv_heads, 0, attn.head_dim, dtype=_attention_dtype(x, x))
        return empty, empty
    dtype = _attention_dtype(x, parts[0][0])
    return (torch.cat([k.to(dtype) for k, _ in parts], dim=2), torch.cat([v.to(dtype) for _, v in parts], dim=2))


def _forward_chunked(block: StreamingBlock, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     attn_meta: DocumentMask | None) -> torch.Tensor:
    """The block's output, chunk by chunk, without a graph. Chunk c projects its rows once (Q, K, V from one
    norm) and writes its K/V into the sequence's buffers before attending: rows [0, e) are all it can see."""
    B, T, _ = x.shape
    attn = block.self_attn
    k_all = v_all = None
    rows = []
    for s, e in _chunks(T, block.chunk_tokens):
        q, k, v = _project(block, x[:, s:e], cos[:, :, s:e], sin[:, :, s:e])
        if k_all is None:
            dtype = _attention_dtype(x, k)
            k_all = k.new_zeros(B, attn.num_kv_heads, T, attn.head_dim, dtype=dtype)  # zeros: rows past the
            v_all = v.new_zeros(B, attn.num_kv_heads, T, attn.head_dim, dtype=dtype)  # chunk are masked
        k_all[:, :, s:e], v_all[:, :, s:e] = k, v
        rows.append(_block_rest(block, x[:, s:e], _attend(q, k_all, v_all, s, attn_meta)))
    return torch.cat(rows, dim=1)


class _StreamBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_meta: DocumentMask | None,
                block: StreamingBlock, *params: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        # Parameters are held as references, not saved tensors: FSDP2 frees and refills their storage between
        # forward and backward (an all-gather), which a saved tensor's version check would reject.
        ctx.attn_meta, ctx.block, ctx.params, ctx.device = attn_meta, block, params, x.device
        ctx.save_for_backward(_to_host(x) if block.offload_inputs and x.is_cuda else x, cos, sin)
        return _forward_chunked(block, x, cos, sin, attn_meta)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, cos, sin = ctx.saved_tensors
        x = x.to(ctx.device, non_blocking=True)  # an offloaded input comes back (pinned: an async copy); else no-op
        block, attn_meta, params = ctx.block, ctx.attn_meta, ctx.params
        enabled, dtype = ctx.autocast
        with torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            grad_x, param_grads = _backward(block, x, cos, sin, attn_meta, grad_out, params)
        return grad_x, None, None, None, None, *param_grads


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """A copy of CUDA tensor ``x`` in pinned host memory, queued on the current stream: the kernels that later
    reuse x's GPU memory run after it on that stream, and the copy back in backward is ordered after it too. At
    long sequences the transfer is O(T) against the block's O(T^2) attention (llama-1b, 512k tokens, fp32 inputs:
    4.3 GB a block each way over PCIe, next to a step of minutes)."""
    host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
    host.copy_(x, non_blocking=True)
    return host


def _backward(block: StreamingBlock, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              attn_meta: DocumentMask | None, grad_out: torch.Tensor,
              params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    chunks = _chunks(x.shape[1], block.chunk_tokens)
    # K, V kept for the loop: an unpacked row's chunks need the earlier rows only (the last chunk's own come
    # with its graph); the document mask takes all T keys
    known = chunks[-1][0] if attn_meta is None else x.shape[1]
    with torch.no_grad():
        k_all, v_all = _prefix_keys_values(block, x, cos, sin, known)  # (B, K, known, E)
    grad_k = torch.zeros(*k_all.shape[:2], x.shape[1], k_all.shape[3], dtype=torch.float32, device=x.device)
    grad_v = torch.zeros_like(grad_k)  # fp32 sums of the later chunks' key/value gradients
    grad_x = torch.empty_like(x)
    param_grads: list[torch.Tensor | None] = [None] * len(params)
    down = _plain_down_proj(block, params)
    for s, e in reversed(chunks):
        with torch.enable_grad():
            x_c = x[:, s:e].detach().requires_grad_()
            q, k_c, v_c = _project(block, x_c, cos[:, :, s:e], sin[:, :, s:e])  # with their graph
            k_pre = k_all[:, :, :s].detach().requires_grad_()  # earlier rows: leaves, their grads accumulate
            v_pre = v_all[:, :, :s].detach().requires_grad_()
            keys, values = [k_pre, k_c.to(k_pre.dtype)], [v_pre, v_c.to(v_pre.dtype)]
            if attn_meta is not None:  # the document mask takes all T keys; later rows are masked: no gradient
                keys.append(k_all[:, :, e:])
                values.append(v_all[:, :, e:])
            out = _attend(q, torch.cat(keys, dim=2), torch.cat(values, dim=2), s, attn_meta)
            # the later chunks' gradients of this chunk's keys/values are complete now (causality)
            kv_grads = (grad_k[:, :, s:e].to(k_c.dtype), grad_v[:, :, s:e].to(v_c.dtype))
            inputs = (x_c, k_pre, v_pre, *params)
            if down is None:
                outputs, out_grads = (_block_rest(block, x_c, out), k_c, v_c), (grad_out[:, s:e], *kv_grads)
                grads = torch.autograd.grad(outputs, inputs, out_grads, allow_unused=True, materialize_grads=True)
            else:
                grads = _grads_before_down_proj(block, x_c, out, grad_out[:, s:e], (k_c, v_c), kv_grads, inputs,
                                                down)
        grad_x[:, s:e] = grads[0]
        if s > 0:
            grad_k[:, :, :s] += grads[1]
            grad_v[:, :, :s] += grads[2]
        for i, g in enumerate(grads[3:]):
            param_grads[i] = g if param_grads[i] is None else param_grads[i].add_(g)
    return grad_x, param_grads


def _plain_down_proj(block: StreamingBlock, params: tuple[torch.Tensor, ...]) -> int | None:
    """Index in ``params`` of the MLP's down_proj weight when it is a plain bias-free ``nn.Linear`` of a SwiGLU
    ``MLP`` (not LoRA's or float8's linear), else None: its gradients are then taken by hand."""
    mlp = block.mlp
    if type(mlp) is not MLP or type(mlp.down_proj) is not nn.Linear or mlp.down_proj.bias is not None:
        return None
    return next((i for i, p in enumerate(params) if p is mlp.down_proj.weight), None)


def _grads_before_down_proj(block: StreamingBlock, x: torch.Tensor, out: torch.Tensor, grad_y: torch.Tensor,
                            kv: tuple[torch.Tensor, torch.Tensor], kv_grads: tuple[torch.Tensor, torch.Tensor],
                            inputs: tuple[torch.Tensor, ...], down: int) -> tuple[torch.Tensor, ...]:
    """A chunk's gradients without recomputing the block's last matmul (down_proj's forward).

    The block's output y + down(a) needs no value in backward, only its gradient g: the residual y gets g,
    the SwiGLU product a gets g W_down, and W_down's gradient is g^T a (all in a's dtype, as autograd's
    linear backward under autocast). Full checkpointing skips that forward too: non-reentrant checkpointing
    stops recomputing once the saved tensors backward needs exist (PyTorch ``torch.utils.checkpoint``,
    early stop), and nothing past the MLP product is saved.
    """
    mlp = block.mlp
    B, C, _ = x.shape
    y = x + block.self_attn.o_proj(out.transpose(1, 2).reshape(B, C, -1))
    h = block.post_attention_layernorm(y)
    act = F.silu(mlp.gate_proj(h)) * mlp.up_proj(h)  # (B, C, I)
    g = grad_y.to(act.dtype)
    weight = inputs[3 + down]
    grad_act = g @ weight.to(act.dtype)  # (B, C, D) @ (D, I)
    grads = list(torch.autograd.grad((y, act, *kv), inputs, (grad_y, grad_act, *kv_grads), allow_unused=True,
                                     materialize_grads=True))
    grads[3 + down] = (g.reshape(B * C, -1).t() @ act.reshape(B * C, -1)).to(weight.dtype)  # (D, I)
    return tuple(grads)
