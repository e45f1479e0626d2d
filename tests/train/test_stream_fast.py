"""The fast path of streaming backprop for unpacked rows (one document per row): each chunk attends only its
prefix through SDPA's lower-right causal mask (``attend_causal_rows``), and the block is recomputed exactly
as often as full checkpointing recomputes it (plus the K/V projections once more). Gradients equal the
plain path's; on CUDA the chunks run in the flash kernel."""

from __future__ import annotations

import pytest
import torch

from batchpilot.model import attention
from batchpilot.model.attention import attend_causal_rows, attend_rows
from batchpilot.model.llama import build_model, get_preset
from batchpilot.train import stream
from batchpilot.train.stream import apply_streaming

T = 37  # prime: no chunk size below it divides it


def config(**changes):
    return get_preset("tiny").with_(**{"num_layers": 2, "vocab_size": 97, **changes})


def batch():
    ids = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(3))
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    return ids, targets


def loss_and_grads(cfg, chunk_tokens: int | None, autocast: bool = False):
    model = build_model(cfg, seed=0)
    if chunk_tokens is not None:
        apply_streaming(model, chunk_tokens)
    ids, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, targets=targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("q_start,rows", [(0, 37), (0, 7), (9, 7), (30, 7), (36, 1)])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_attend_causal_rows_equals_the_masked_rows(q_start, rows, kv_heads):
    """Queries of rows [s, e) over keys [0, e) equal attend_rows' masked form over all keys, gradients too."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, T, 8, generator=g)[:, :, q_start:q_start + rows].requires_grad_()
    k, v = (torch.randn(2, kv_heads, T, 8, generator=g).requires_grad_() for _ in range(2))
    ref = attend_rows(q, k, v, q_start=q_start)
    end = q_start + q.shape[2]
    got = attend_causal_rows(q, k[:, :, :end], v[:, :, :end])
    torch.testing.assert_close(got, ref)
    weights = torch.randn(ref.shape, generator=g)
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    got_grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_attend_causal_rows_refuses_more_queries_than_keys():
    with pytest.raises(ValueError, match="query rows"):
        attend_causal_rows(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))


@pytest.mark.parametrize("chunk_tokens", [1, 6, 16, 37])
def test_unpacked_rows_take_the_fast_path_with_the_plain_gradients(chunk_tokens, monkeypatch):
    """No document mask: every chunk goes through attend_causal_rows (never the masked attend_rows), and the
    loss and gradients equal the plain model's (fp32, GQA: tiny has 4 heads over 2 kv heads)."""
    calls = []

    def masked(*args, **kwargs):
        raise AssertionError("an unpacked row took the masked path")

    def fast(q, k, v):
        calls.append((q.shape[2], k.shape[2]))
        return attend_causal_rows(q, k, v)

    ref_loss, ref = loss_and_grads(config(), None)
    monkeypatch.setattr(stream, "attend_rows", masked)
    monkeypatch.setattr(stream, "attend_causal_rows", fast)
    loss, got = loss_and_grads(config(), chunk_tokens)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    n = -(-T // chunk_tokens)
    assert len(calls) == 2 * 2 * n  # 2 layers, forward + backward, one call per chunk
    assert all(keys == min(T, (i % n + 1) * chunk_tokens) for i, (_, keys) in enumerate(calls[:n]))  # prefixes


def test_unpacked_rows_under_bf16_autocast_match_plain_autocast():
    (ref_loss, ref), (loss, got) = loss_and_grads(config(), None, True), loss_and_grads(config(), 8, True)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    flat = torch.cat([got[n].flatten() for n in ref]), torch.cat([ref[n].flatten() for n in ref])
    assert torch.nn.functional.cosine_similarity(*flat, dim=0) > 0.999


PROJECTIONS = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def projected_rows(streamed: bool) -> dict[str, int]:
    """Rows through each projection of a one-block model in one step (forward + backward)."""
    from torch.distributed._composable import checkpoint

    model = build_model(config(num_layers=1), seed=0)
    if streamed:
        apply_streaming(model, 8)
    else:
        checkpoint(model.layers[0])  # full checkpointing, as --activation-checkpointing full
    rows = dict.fromkeys(PROJECTIONS, 0)
    for name in PROJECTIONS:
        def count(module, args, out, name=name):
            rows[name] += args[0].shape[0] * args[0].shape[1]
        model.layers[0].get_submodule(name).register_forward_hook(count)
    ids, targets = batch()
    model(ids, targets=targets).backward()
    return rows


def test_projections_recomputed_as_often_as_checkpointing_plus_keys_values_once():
    """Streaming recomputes what full checkpointing recomputes (every projection but down_proj, whose output
    backward never needs: checkpointing's early stop, the streamed backward's hand-taken down_proj grads),
    plus K/V (and their input norm) once more for all rows but the last chunk's."""
    ckpt, streamed = projected_rows(False), projected_rows(True)
    n = 2 * T  # the batch's tokens
    assert ckpt == {**dict.fromkeys(PROJECTIONS, 2 * n), "mlp.down_proj": n}
    extra = n - 2 * 5  # rows [0, 32): the last chunk of 8 rows is rows 32..36
    assert streamed == {**ckpt, "input_layernorm": 2 * n + extra, "self_attn.k_proj": 2 * n + extra,
                        "self_attn.v_proj": 2 * n + extra}


def test_a_down_proj_that_is_not_a_plain_linear_keeps_the_graph_path():
    """LoRA's or float8's linear layers (here: a subclass of nn.Linear) are differentiated by autograd."""
    class Linear(torch.nn.Linear):
        pass

    def swap(model):
        for block in model.layers:
            old = block.mlp.down_proj
            block.mlp.down_proj = Linear(old.in_features, old.out_features, bias=False)
            block.mlp.down_proj.weight = old.weight
        return model

    ref_model, model = swap(build_model(config(), seed=0)), swap(build_model(config(), seed=0))
    apply_streaming(model, 8)
    assert all(stream._plain_down_proj(b, tuple(b.parameters())) is None for b in model.layers)
    ids, targets = batch()
    ref_model(ids, targets=targets).backward()
    model(ids, targets=targets).backward()
    for (name, p), ref in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-5, atol=1e-6, msg=name)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the flash kernel)")


@cuda
@pytest.mark.parametrize("kv_heads", [32, 8], ids=["mha", "gqa"])
def test_cuda_attend_causal_rows_runs_flash_and_matches_the_mask(kv_heads):
    """bf16 autocast over fp32 inputs (the trainer's case): the flash kernel takes the chunk (the backend a
    profiler sees), and output and gradients equal the masked reference's (fp32 math)."""
    g = torch.Generator(device="cuda").manual_seed(5)
    S, C = 4096, 1024
    q = torch.randn(1, 32, C, 64, device="cuda", generator=g).requires_grad_()
    k, v = (torch.randn(1, kv_heads, S, 64, device="cuda", generator=g).requires_grad_() for _ in range(2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = attend_causal_rows(q, k, v)
        out.float().sum().backward()
    kernels = " ".join(e.name for e in prof.events()).lower()
    assert "flash" in kernels
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = attention.attend_rows(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), q_start=S - C)
    ref.sum().backward()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999


@cuda
def test_cuda_streamed_gradients_match_plain_under_autocast():
    cfg = get_preset("tiny").with_(num_layers=2)
    ids = torch.randint(0, cfg.vocab_size, (1, 2048), device="cuda")
    targets = ids.roll(-1, dims=1)

    def run(chunk):
        model = build_model(cfg, device="cuda", seed=0)
        if chunk:
            apply_streaming(model, chunk)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, targets=targets)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    (ref_loss, ref), (loss, got) = run(None), run(512)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > 0.999
