"""Fused linear + cross-entropy that never materialises the full fp32 logits.

The LM head of a 128k-vocabulary model turns 8192 tokens into 4.2 GB of fp32 logits, and
autograd keeps them (and their gradient) alive until backward. Here the forward pass walks over
chunks of tokens, computes each chunk's logits, loss and gradients at once, and keeps only the
gradients w.r.t. the hidden states (N x D) and the head weight (V x D). Backward then just
scales them in place by the incoming gradient. Cost: the head's backward matmuls run during
forward, so peak memory falls by the logits' size at no extra FLOPs; the loss cannot be
backpropagated twice (``retain_graph``), which training never does.

Speed (GPU): the matmuls run in the compute dtype (bf16 under autocast or with bf16 parameters;
cuBLAS accumulates in fp32), and the chunk's softmax/gradient is one compiled kernel pass that
reads the bf16 logits and writes bf16 gradients (~8 bytes per logit instead of ~50 for the
eager fp32 chain). The head-weight gradient accumulates in fp32 across chunks (``addmm`` with
an fp32 output where the build has it). Per chunk, two C x V buffers in the compute dtype are
live (logits and their gradient): chunks hold ~2^29 bf16 / 2^28 fp32 logits (1 GiB each).
Everything else (CPU, no Triton) runs the same math eagerly in fp32: that is the tested path.

Shape legend: N tokens (B*T flattened), D hidden, V vocab, C chunk of tokens.
"""

from __future__ import annotations

import functools

import torch

IGNORE_INDEX = -100
CHUNK_BYTES = 1 << 30  # bytes of one chunk's logits buffer (its gradient buffer is as big)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          *, chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (entries equal to -100 are ignored)."""
    dtype = _compute_dtype(hidden, weight)
    if chunk_tokens is None:
        chunk_tokens = max(256, CHUNK_BYTES // (weight.shape[0] * dtype.itemsize))
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, dtype)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick, or the common dtype of the inputs outside autocast."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # casts are explicit below
            # a frozen head (LoRA on a tied embedding) needs no weight gradient: one of the three V x D GEMMs per
            # chunk and the V x D fp32 accumulator are skipped
            loss, grad_h, grad_w = _forward_and_grads(hidden, weight, targets, chunk_tokens, dtype,
                                                      weight_grad=ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)  # grad_w may be None (save_for_backward takes None)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors  # scaled in place: no second copy of V x D
        return (grad_hidden.mul_(grad_output), None if grad_weight is None else grad_weight.mul_(grad_output),
                None, None, None)


def _forward_and_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                       dtype: torch.dtype, *,
                       weight_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)  # (N, D)
    w = weight.to(dtype)  # (V, D); a no-op unless fp32 master weights run under autocast
    t = targets.reshape(-1)  # (N,)
    valid = t != IGNORE_INDEX
    safe_t = torch.where(valid, t, 0)
    row_scale = valid.to(torch.float32) / valid.sum().clamp(min=1).to(torch.float32)  # d(mean)/d(row loss)
    softmax_ce = _softmax_ce_kernel(h.device.type)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if weight_grad else None
    num_chunks = max(1, -(-h.shape[0] // chunk_tokens))
    chunk_tokens = max(1, -(-h.shape[0] // num_chunks))  # equal chunks: one compiled shape, no small last GEMM
    for start in range(0, h.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        logits = h[rows] @ w.T  # (C, V), fp32 accumulation inside the GEMM
        chunk_loss, grad_logits = softmax_ce(logits, safe_t[rows], row_scale[rows])
        del logits
        loss += chunk_loss
        torch.mm(grad_logits, w, out=grad_h[rows])  # (C, D)
        if grad_w is not None:
            _accumulate_fp32(grad_w, grad_logits.T, h[rows])  # (V, D) += (V, C) @ (C, D)
    return loss, grad_h.view(hidden.shape).to(hidden.dtype), None if grad_w is None else grad_w.to(weight.dtype)


def _softmax_ce(logits: torch.Tensor, targets: torch.Tensor,
                row_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of row_scale-weighted CE over the chunk, and d(that)/d(logits) = (softmax - onehot) * row_scale."""
    x = logits.float()  # (C, V)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)  # (C, 1)
    target_logit = x.gather(1, targets[:, None])  # (C, 1)
    loss = ((lse - target_logit).squeeze(1) * row_scale).sum()
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]  # (C, V), fused away when compiled
    grad = (torch.exp(x - lse) - onehot.to(x.dtype)) * row_scale[:, None]
    return loss, grad.to(logits.dtype)


@functools.cache
def _softmax_ce_kernel(device_type: str):
    """One fused Triton pass on CUDA (compiled once per process); eager elsewhere."""
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if has_triton():
            return torch.compile(_softmax_ce, dynamic=None)
    return _softmax_ce


def _accumulate_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out (fp32) += a @ b, with a, b in a lower precision: straight into fp32 where cuBLAS allows it."""
    if a.dtype != out.dtype and _has_fp32_out_addmm(a.device.type, a.dtype):
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        out.add_(a @ b)


@functools.cache
def _has_fp32_out_addmm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``addmm(..., out_dtype=float32)`` works for this device and input dtype (CUDA builds >= 2.8)."""
    try:
        out = torch.ones(2, 2, device=device_type)
        one = torch.ones(2, 2, dtype=dtype, device=device_type)
        torch.addmm(out, one, one, out_dtype=torch.float32, out=out)
        return bool((out == 3).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False
