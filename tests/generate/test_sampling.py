"""The sort-free sampler against sort-based references; its hash, batch invariance and distribution (CPU, fp32)."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from batchpilot.generate.sampling import (gumbel_noise, keep_threshold, lowbias32, row_keys, sample,
                                          uniform_from_bits, uniform_noise)

M32 = 0xFFFFFFFF


def py_lowbias32(x: int) -> int:
    """lowbias32 on Python ints, every step reduced mod 2^32 explicitly (no reliance on wrapping)."""
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    x ^= x >> 16
    return x


def as_u32(t: torch.Tensor) -> list[int]:
    return [v & M32 for v in t.tolist()]


def old_sample(logits, *, temperature, top_k, top_p, seeds, steps):
    """The sampler before issue 15, verbatim but for the noise (passed the new one): the full-vocabulary sort."""
    greedy = logits.argmax(dim=-1)
    scaled = logits.float() / temperature.clamp_min(1e-6)[:, None]
    gumbel = gumbel_noise(seeds, steps, logits.shape[-1])
    vals, idx = scaled.sort(dim=-1, descending=True)  # (R, V)
    ranks = torch.arange(vals.shape[-1], device=vals.device)[None]
    keep = (ranks < top_k[:, None]) | (top_k[:, None] <= 0)
    probs = vals.softmax(dim=-1)
    keep &= (probs.cumsum(dim=-1) - probs) < top_p[:, None]  # smallest set with mass >= top_p
    keep[:, 0] = True
    choice = torch.where(keep, vals + gumbel.gather(1, idx), float("-inf")).argmax(dim=-1)
    drawn = idx.gather(1, choice[:, None])[:, 0]
    old_keep = torch.zeros_like(keep).scatter_(1, idx, keep)
    margin = ((probs.cumsum(dim=-1) - probs) - top_p[:, None]).abs().amin(dim=-1)  # closest call of the cut
    return torch.where(temperature > 0, drawn, greedy), old_keep, margin


def sort_keep(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
              top_p: torch.Tensor) -> torch.Tensor:
    """The same semantics by a stable sort, made tie-exact: a token is kept iff the first of its tie group is
    (rank < top_k, exclusive mass < top_p), masses in fp64 of the same fp32 ``exp(s - max)``."""
    s = logits.float() / temperature.clamp_min(1e-6)[:, None]
    s = s + 0.0
    vals, idx = s.sort(dim=-1, descending=True, stable=True)
    e = (vals - vals[:, :1]).exp()
    e64 = e.double()
    exclusive = e64.cumsum(dim=-1) - e64
    V = s.shape[-1]
    pos = torch.arange(V)[None].expand_as(vals)
    starts = torch.ones_like(vals, dtype=torch.bool)
    starts[:, 1:] = vals[:, 1:] != vals[:, :-1]
    first = torch.where(starts, pos, 0).cummax(dim=-1).values  # the first position of each token's tie group
    limit = top_p.double()[:, None] * e.sum(dim=-1, dtype=torch.float64)[:, None]
    keep = (top_k[:, None] <= 0) | (first < top_k[:, None])
    keep &= (top_p[:, None] >= 1) | (exclusive.gather(1, first) < limit)
    keep[:, 0] = True
    return torch.zeros_like(keep).scatter_(1, idx, keep)


def new_keep(logits, temperature, top_k, top_p):
    scaled = logits.float() / temperature.clamp_min(1e-6)[:, None]
    keys, t = keep_threshold(logits, scaled, top_k, top_p)
    return keys >= t[:, None]


def rows(kind: str, n: int, V: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, V, generator=g)
    if kind == "uniform":  # random-weight models: the nucleus is most of the vocabulary
        return x * 0.05
    if kind == "peaked":
        return x * 6.0
    if kind == "ties":  # a coarse grid: big tie groups at every cut
        return (x * 2).round() / 2
    if kind == "zipf":
        return -1.1 * torch.log(torch.arange(1, V + 1).float())[None].expand(n, V)[:, torch.randperm(V, generator=g)]
    raise ValueError(kind)


def params(n: int, mode: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    temperature = 0.3 + 1.5 * torch.rand(n, generator=g)
    top_k = torch.randint(1, 300, (n,), generator=g)
    top_p = 0.05 + 0.9 * torch.rand(n, generator=g)
    if mode == "top_k":
        top_p = torch.ones(n)
    elif mode == "top_p":
        top_k = torch.zeros(n, dtype=torch.long)
    elif mode == "mixed":  # some rows greedy, some unfiltered, some one filter
        temperature[::4] = 0.0
        top_k[1::3] = 0
        top_p[2::5] = 1.0
        top_k[3::7] = 1
    return temperature, top_k, top_p


@pytest.mark.parametrize("kind", ["uniform", "peaked", "ties", "zipf"])
@pytest.mark.parametrize("mode", ["top_k", "top_p", "both", "mixed"])
def test_threshold_equals_the_tie_exact_sort(kind, mode):
    g = torch.Generator().manual_seed(zlib.crc32(f"{kind}/{mode}".encode()))
    n, V = 64, 3000
    logits = rows(kind, n, V, g)
    t, k, p = params(n, mode, g)
    assert torch.equal(new_keep(logits, t, k, p), sort_keep(logits, t, k, p))
    seeds, steps = torch.randint(0, 2**62, (n,), generator=g), torch.randint(0, 5000, (n,), generator=g)
    drawn = sample(logits, temperature=t, top_k=k, top_p=p, seeds=seeds, steps=steps, any_random=True,
                   any_filter=True)
    s = logits / t.clamp_min(1e-6)[:, None]
    ref = torch.where(sort_keep(logits, t, k, p), s + gumbel_noise(seeds, steps, V), -math.inf).argmax(dim=-1)
    assert torch.equal(drawn, torch.where(t > 0, ref, logits.argmax(dim=-1)))


def test_threshold_full_vocabulary_near_uniform_and_16_bit_logits():
    """V = 128,256 rows whose nucleus is most of the vocabulary (fp64 masses resolve single tokens there), and
    bf16 logits, whose keys take 16 bisection steps."""
    g = torch.Generator().manual_seed(7)
    logits = rows("uniform", 4, 128_256, g)
    t, k, p = torch.tensor([1.0, 0.8, 1.2, 0.7]), torch.tensor([0, 0, 100_000, 0]), torch.tensor([0.95, 0.5, 0.9, 1.0])
    keep = new_keep(logits, t, k, p)
    assert torch.equal(keep, sort_keep(logits, t, k, p))
    assert 50_000 < int(keep[0].sum()) < 128_256
    scaled = logits / t[:, None]
    for bits in (8, 16):  # every radix digit width finds the same threshold
        assert torch.equal(keep_threshold(logits, scaled, k, p, bits=bits)[1], keep_threshold(logits, scaled, k, p)[1])
    lb = rows("ties", 32, 5000, g).bfloat16()
    t, k, p = params(32, "mixed", g)
    assert torch.equal(new_keep(lb, t, k, p), sort_keep(lb, t, k, p))
    s16 = lb.float() / t.clamp_min(1e-6)[:, None]
    assert torch.equal(keep_threshold(lb, s16, k, p, bits=16)[1], keep_threshold(lb, s16, k, p, bits=8)[1])


def test_threshold_agrees_with_the_old_sampler_away_from_ties_and_rounding():
    """The literal old implementation (fp32 cumsum, sort order at ties) keeps the same tokens and draws the same
    token wherever its cut is not a near call (no ties, no exclusive mass within 1e-4 of top_p)."""
    g = torch.Generator().manual_seed(3)
    n, V = 256, 2000
    logits = rows("peaked", n, V, g)
    t, k, p = params(n, "mixed", g)
    seeds, steps = torch.arange(n) * 977, torch.arange(n)
    old, old_k, margin = old_sample(logits, temperature=t, top_k=k, top_p=p, seeds=seeds, steps=steps)
    new = sample(logits, temperature=t, top_k=k, top_p=p, seeds=seeds, steps=steps, any_random=True,
                 any_filter=True)
    clear = margin > 1e-4
    assert int(clear.sum()) > 0.7 * n  # top_p = 1 rows are near calls of an fp32 cumsum that reaches ~1
    assert torch.equal(new_keep(logits, t, k, p)[clear], old_k[clear])
    assert torch.equal(new[clear], old[clear])


def test_top_token_always_kept_and_neutral_filters_keep_everything():
    g = torch.Generator().manual_seed(5)
    logits = rows("peaked", 16, 500, g)
    t = torch.ones(16)
    keep = new_keep(logits, t, torch.ones(16, dtype=torch.long), torch.full((16,), 1e-6))
    assert torch.equal(keep.sum(dim=-1), torch.ones(16, dtype=torch.long))
    assert torch.equal(keep.float().argmax(dim=-1), logits.argmax(dim=-1))
    assert bool(new_keep(logits, t, torch.zeros(16, dtype=torch.long), torch.ones(16)).all())
    kw = dict(temperature=t, top_k=torch.zeros(16, dtype=torch.long), top_p=torch.ones(16),
              seeds=torch.arange(16), steps=torch.zeros(16, dtype=torch.long), any_random=True)
    assert torch.equal(sample(logits, **kw, any_filter=True), sample(logits, **kw, any_filter=False))


def test_lowbias32_wraps_like_the_exact_reference():
    """torch's int32 multiply wraps mod 2^32 (two's complement) and the masked shifts are logical."""
    assert (torch.tensor([2**31 - 1], dtype=torch.int32) * 3).item() == 2**31 - 3
    words = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 0x9E3779B9] + list(range(12345, 2**32, 2**32 // 997))
    signed = [w - 2**32 if w >= 2**31 else w for w in words]
    got = as_u32(lowbias32(torch.tensor(signed, dtype=torch.int32)))
    assert got == [py_lowbias32(w) for w in words]
    assert py_lowbias32(1) != py_lowbias32(2)


def test_row_keys_fold_64_bit_seeds_and_match_the_formula():
    seeds = torch.tensor([0, 1, 2**31, 2**32 + 1, 2**62 + 5, 2**63 - 1, -1, -(2**40)], dtype=torch.int64)
    steps = torch.tensor([0, 3, 7, 2**33, 1, 9, 4, 100])
    got = as_u32(row_keys(seeds, steps))
    ref = []
    for s, st in zip(seeds.tolist(), steps.tolist(), strict=True):
        k = py_lowbias32((s & M32) ^ 0x9E3779B9)
        k = py_lowbias32(k ^ ((s >> 32) & M32))
        ref.append(py_lowbias32(k ^ (st & M32)))
    assert got == ref
    assert len(set(as_u32(row_keys(torch.tensor([5, 5 + 2**32, 5 + 2**40]), torch.zeros(3, dtype=torch.long))))) == 3


def test_uniform_is_open_and_gumbel_finite():
    edge = torch.tensor([-1, 0, 2**31 - 1, -(2**31)], dtype=torch.int32)  # k = 2^24 - 1, 0, ...
    u = uniform_from_bits(edge)
    assert bool(((u > 0) & (u < 1)).all())
    assert bool(torch.isfinite(-torch.log(-torch.log(u))).all())
    v = uniform_noise(torch.arange(64), torch.zeros(64, dtype=torch.long), 4096)
    assert 0.49 < float(v.mean()) < 0.51 and bool(((v > 0) & (v < 1)).all())
    word = py_lowbias32(int(row_keys(torch.tensor([9]), torch.tensor([4]))[0]) + 17 * 0x9E3779B9)
    assert float(uniform_noise(torch.tensor([9]), torch.tensor([4]), 20)[0, 17]) == pytest.approx(
        ((word >> 8) + 0.5) / 2**24, abs=2**-24)


def test_a_rows_draw_depends_only_on_its_seed_and_step():
    """The same row gives the same token in batches of different size and order (fp32, CPU)."""
    g = torch.Generator().manual_seed(11)
    n, V = 24, 4000
    logits = torch.cat([rows("uniform", 8, V, g), rows("peaked", 8, V, g), rows("ties", 8, V, g)])
    t, k, p = params(n, "mixed", g)
    seeds, steps = torch.randint(0, 2**63 - 1, (n,), generator=g), torch.randint(0, 10**6, (n,), generator=g)

    def draw(at):
        return sample(logits[at], temperature=t[at], top_k=k[at], top_p=p[at], seeds=seeds[at], steps=steps[at],
                      any_random=True, any_filter=True)

    full = draw(torch.arange(n))
    perm = torch.randperm(n, generator=g)
    assert torch.equal(draw(perm), full[perm])
    for i in range(n):
        assert int(draw(torch.tensor([i]))[0]) == int(full[i])
    assert torch.equal(draw(torch.tensor([3, 3, 3])), full[[3, 3, 3]])


def test_frequencies_follow_the_renormalised_nucleus():
    """12,000 seeds of one row: chi-square of the counts against softmax(logits / T) on the kept set; tokens outside
    it are never drawn. Seeds are fixed, so the test is deterministic (the bound is the 1e-6 tail of chi2, 4 dof)."""
    logits = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.7, 0.3, -0.5, -2.0])
    T, top_p, top_k, N = 0.8, 0.9, 6, 12_000
    probs = (logits / T).softmax(dim=-1)
    exclusive = probs.cumsum(dim=-1) - probs
    kept = (exclusive < top_p) & (torch.arange(8) < top_k)
    expected = torch.where(kept, probs, 0.0)
    expected = expected / expected.sum() * N
    drawn = sample(logits[None].expand(N, 8), temperature=torch.full((N,), T), top_k=torch.full((N,), top_k),
                   top_p=torch.full((N,), top_p), seeds=torch.arange(N) * 7919 + 2**40,
                   steps=torch.full((N,), 12), any_random=True, any_filter=True)
    counts = torch.bincount(drawn, minlength=8).double()
    assert int(counts[~kept].sum()) == 0
    chi2 = float((((counts - expected) ** 2) / expected.clamp_min(1e-12))[kept].sum())
    assert int(kept.sum()) == 5 and chi2 < 33.4  # chi2(4) survival 1e-6 = 33.38
    # the same over steps of one seed: a request's successive draws are independent of each other
    by_step = sample(logits[None].expand(N, 8), temperature=torch.full((N,), T), top_k=torch.full((N,), top_k),
                     top_p=torch.full((N,), top_p), seeds=torch.full((N,), 42), steps=torch.arange(N),
                     any_random=True, any_filter=True)
    counts = torch.bincount(by_step, minlength=8).double()
    assert float((((counts - expected) ** 2) / expected.clamp_min(1e-12))[kept].sum()) < 33.4


def test_unfiltered_sampling_follows_softmax_and_greedy_rows_take_the_argmax():
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    N = 30_000
    drawn = sample(logits[None].expand(N, 4), temperature=torch.ones(N), top_k=torch.zeros(N, dtype=torch.long),
                   top_p=torch.ones(N), seeds=torch.arange(N), steps=torch.zeros(N, dtype=torch.long),
                   any_random=True, any_filter=False)
    expected = logits.softmax(dim=-1).double() * N
    counts = torch.bincount(drawn, minlength=4).double()
    assert float(((counts - expected) ** 2 / expected).sum()) < 30.7  # chi2(3) survival 1e-6
    t = torch.tensor([0.0, 1.0, 0.0])
    x = torch.randn(3, 50)
    out = sample(x, temperature=t, top_k=torch.tensor([3, 3, 0]), top_p=torch.tensor([0.5, 1.0, 1.0]),
                 seeds=torch.arange(3), steps=torch.zeros(3, dtype=torch.long), any_random=True, any_filter=True)
    assert int(out[0]) == int(x[0].argmax()) and int(out[2]) == int(x[2].argmax())


def test_sampler_micro_benchmark_runs_and_reports_every_case(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "sampler_micro.py"
    spec = importlib.util.spec_from_file_location("sampler_micro", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--rows", "3", "--vocab", "512", "--reps", "1", "--device", "cpu", "--out", str(tmp_path)])
    assert set(out["shapes"]) == {"R3_float32", "R3_bfloat16"}
    assert set(out["shapes"]["R3_float32"]) == {"greedy_ms", "temperature", "top_p", "top_k"}
    assert (tmp_path / "sampler_micro.json").is_file()
    logits = torch.randn(6, 512)  # the benchmark's copy of the old sampler is the old sampler (sort semantics)
    kw = dict(temperature=torch.zeros(6), top_k=torch.zeros(6, dtype=torch.long), top_p=torch.ones(6),
              seeds=torch.arange(6), steps=torch.zeros(6, dtype=torch.long), any_random=True, any_filter=True)
    assert torch.equal(bench.old_sample(logits, **kw), logits.argmax(dim=-1))


@pytest.mark.gpu
def test_cuda_kept_sets_equal_the_cpu_reference_and_capture_in_a_graph():
    """On the GPU (``pytest -q tests/generate/test_sampling.py -m gpu``): the radix select with fp64 atomics keeps the
    sort reference's sets at V = 128,256, the draws match the CPU's, and ``sample`` replays inside a CUDA graph."""
    g = torch.Generator().manual_seed(13)
    R, V = 96, 128_256
    logits = torch.cat([rows("uniform", 32, V, g), rows("peaked", 32, V, g), rows("ties", 32, V, g)])
    t, k, p = params(R, "mixed", g)
    seeds, steps = torch.randint(0, 2**62, (R,), generator=g), torch.randint(0, 5000, (R,), generator=g)
    dev = [x.cuda() for x in (logits, t, k, p, seeds, steps)]
    assert torch.equal(new_keep(*dev[:4]).cpu(), sort_keep(logits, t, k, p))
    assert torch.equal(new_keep(dev[0].bfloat16(), *dev[1:4]).cpu(), sort_keep(logits.bfloat16(), t, k, p))
    kw = dict(temperature=dev[1], top_k=dev[2], top_p=dev[3], seeds=dev[4], steps=dev[5], any_random=True,
              any_filter=True)
    on_gpu = sample(dev[0], **kw)
    on_cpu = sample(logits, temperature=t, top_k=k, top_p=p, seeds=seeds, steps=steps, any_random=True,
                    any_filter=True)
    assert (on_gpu.cpu() == on_cpu).float().mean().item() >= 0.98  # fp32 log/exp may differ by an ulp
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sample(dev[0], **kw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sample(dev[0], **kw)
    kw["steps"].add_(1)
    graph.replay()
    assert torch.equal(out, sample(dev[0], **kw))


def test_memory_headroom_follows_the_sampler_in_use(monkeypatch):
    """The engine reserves the sampling peak of the path that will run: the Triton kernel on CUDA, else torch ops."""
    from batchpilot.generate import sampling, sampling_triton

    monkeypatch.setattr(sampling_triton, "HAVE_TRITON", True)
    assert sampling.peak_vocab_floats(torch.device("cuda")) == 4
    assert sampling.peak_vocab_floats(torch.device("cpu")) == 14
    monkeypatch.setattr(sampling_triton, "HAVE_TRITON", False)
    assert sampling.peak_vocab_floats(torch.device("cuda")) == 14
