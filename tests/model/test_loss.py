"""The fused chunked linear+CE equals F.cross_entropy on full logits: loss and both gradients."""

import pytest
import torch
import torch.nn.functional as F

from batchpilot.model.loss import IGNORE_INDEX, chunked_cross_entropy

N, D, V = 37, 24, 101  # odd sizes: the last chunk is short


def inputs(dtype: torch.dtype, *, ignore_every: int = 5):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, N, D, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * 0.2).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (1, N), generator=g)
    targets[:, ::ignore_every] = IGNORE_INDEX
    return hidden, weight, targets


def reference(hidden, weight, targets, scale: float = 1.0):
    logits = (hidden.float() @ weight.float().T).reshape(-1, V)
    loss = F.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE_INDEX) * scale
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), gh.float(), gw.float()


def fused(hidden, weight, targets, scale: float = 1.0, **kw):
    loss = chunked_cross_entropy(hidden, weight, targets, **kw) * scale
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), gh.float(), gw.float()


@pytest.mark.parametrize("chunk_tokens", [None, 8, 1000])
def test_fp32_matches_full_logits(chunk_tokens):
    h, w, t = inputs(torch.float32)
    ref = reference(h, w, t, scale=0.7)
    out = fused(h, w, t, scale=0.7, chunk_tokens=chunk_tokens)  # scale: backward multiplies by grad_output
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_matches_full_logits():
    h, w, t = inputs(torch.bfloat16)
    ref = reference(h, w, t)
    out = fused(h, w, t, chunk_tokens=8)
    assert out[1].dtype == torch.float32 and h.dtype == torch.bfloat16
    torch.testing.assert_close(out[0], ref[0], rtol=1e-2, atol=1e-2)
    for a, b in zip(out[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_autocast_fp32_weights_match_bf16_reference():
    """fp32 master weights under bf16 autocast (the one-GPU trainer) compute like bf16 inputs."""
    h, w, t = inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(h, w, t, chunk_tokens=8)
    ref = reference(h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_(), t)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-2, atol=1e-2)
    for a, b in zip(out[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_all_ignored_gives_zero_loss_and_grads():
    h, w, t = inputs(torch.float32)
    t[:] = IGNORE_INDEX
    loss, gh, gw = fused(h, w, t)
    assert loss.item() == 0.0 and gh.abs().max() == 0 and gw.abs().max() == 0


def test_tied_weight_grads_accumulate():
    """A tied embedding gets the head gradient added to its lookup gradient (as in Llama with tie_word_embeddings)."""
    h, w, t = inputs(torch.float32)
    emb = F.embedding(torch.arange(3), w).sum()
    (chunked_cross_entropy(h, w, t, chunk_tokens=8) + emb).backward()
    ref_w = w.detach().clone().requires_grad_()
    logits = (h.detach() @ ref_w.T).reshape(-1, V)
    loss = F.cross_entropy(logits, t.reshape(-1)) + F.embedding(torch.arange(3), ref_w).sum()
    loss.backward()
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cuda_compiled_path_matches_reference_under_autocast():
    """The GPU path (bf16 GEMMs, compiled softmax/grad kernel, fp32-out addmm) against fp32 full logits."""
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(4, 1000, 256, device="cuda", generator=g).requires_grad_()
    weight = (torch.randn(5000, 256, device="cuda", generator=g) * 0.05).requires_grad_()
    targets = torch.randint(0, 5000, (4, 1000), device="cuda", generator=g)
    targets[:, ::7] = IGNORE_INDEX
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=1536)  # uneven last chunk
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    ref = F.cross_entropy((hidden.bfloat16().float() @ weight.bfloat16().float().T).reshape(-1, 5000),
                          targets.reshape(-1), ignore_index=IGNORE_INDEX)
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gh, rh, rtol=3e-2, atol=2e-5)
    torch.testing.assert_close(gw, rw, rtol=3e-2, atol=2e-5)


def test_moe_forward_with_routing_record_returns_the_same_lm_loss():
    """Passing a RoutingRecord only reports routing: the LM loss and its gradients are unchanged; the
    balance loss reaches the routers and, through the routing weights, nothing else."""
    from batchpilot.model.llama import build_model, get_preset
    from batchpilot.model.moe import BalanceAccumulator, RoutingRecord

    model = build_model(get_preset("tiny-moe").with_(num_layers=2), seed=0)
    ids = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = model(ids[:, :-1], targets=ids[:, 1:])
    record = RoutingRecord()
    with_record = model(ids[:, :-1], targets=ids[:, 1:], routing=record)
    assert torch.equal(plain, with_record) and sorted(record.by_layer) == [1]
    lbl = BalanceAccumulator("micro", 8).loss(record)
    grads = torch.autograd.grad(lbl, list(model.parameters()), allow_unused=True)
    touched = {n for (n, _), g in zip(model.named_parameters(), grads) if g is not None and g.abs().max() > 0}
    assert "layers.1.mlp.gate.weight" in touched
    # everything after the router gets no gradient from it: experts, shared expert, final norm, head
    after_router = [n for n in touched if n == "norm.weight" or n.startswith("lm_head")
                    or (n.startswith("layers.1.mlp.") and n != "layers.1.mlp.gate.weight")]
    assert not after_router


def test_frozen_weight_gets_no_gradient_and_the_same_hidden_gradient():
    """A frozen head (LoRA on a tied embedding): no weight gradient is computed, the hidden gradient is unchanged."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 5))
    chunked_cross_entropy(hidden, weight, targets, chunk_tokens=3).backward()
    want = hidden.grad.clone()
    hidden.grad = None
    trained = weight.clone().requires_grad_(True)
    chunked_cross_entropy(hidden, trained, targets, chunk_tokens=3).backward()
    torch.testing.assert_close(hidden.grad, want)
    assert weight.grad is None and trained.grad is not None
    logits = hidden.detach() @ trained.detach().T
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))
    torch.testing.assert_close(chunked_cross_entropy(hidden, weight, targets).double(), ref)
