"""The fused Triton sampler against the torch path (``sampling.sample_torch``): the same tokens.

On CPU the kernel runs under the Triton interpreter, when triton is installed (it is not a project dependency):

    PYTHONPATH=$PWD:/path/to/triton TRITON_INTERPRET=1 python -m pytest -q tests/generate/test_sampling_triton.py

Without triton every test here skips. Under the interpreter ``exp``/``log`` are numpy's (torch CPU's are within an
ulp), which could only move a top-p cut decided within ~1e-7 of ``top_p`` or a draw whose two best scores are an
ulp apart; the seeds here have none, so the tokens are asserted equal. The GPU test (``-m gpu``) runs the kernel
natively at V = 128,256.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import pytest
import torch

triton = pytest.importorskip("triton")

from batchpilot.generate import sampling_triton as st  # noqa: E402
from batchpilot.generate.sampling import (gumbel_noise, keep_threshold, sample, sample_torch,  # noqa: E402
                                          uniform_noise)
from tests.generate.test_sampling import params, rows  # noqa: E402

CPU = not torch.cuda.is_available()
if CPU and not st.interpreted():
    pytest.skip("triton without a GPU: set TRITON_INTERPRET=1 to run the kernel on CPU", allow_module_level=True)
DEV = "cpu" if CPU else "cuda"


def run(logits, t, k, p, seeds, steps, *, any_filter=True, **kw):
    """(kernel tokens, torch tokens, the kernel's threshold keys) of the same inputs."""
    args = dict(temperature=t, top_k=k, top_p=p, seeds=seeds, steps=steps, any_random=True, any_filter=any_filter)
    args = {n: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for n, v in args.items()}
    x = logits.to(DEV)
    kw.setdefault("block", 2048 if CPU else 1024)  # the interpreter's cost is per op: wide blocks
    del args["any_random"]
    got, thr = st.sample_and_threshold_triton(x, **args, **kw)
    args["any_random"] = True
    return got.cpu(), sample_torch(x, **args).cpu(), thr.cpu()


def draw(*args, **kw):
    return run(*args, **kw)[:2]


def check(logits, t, k, p, seeds, steps, **kw) -> torch.Tensor:
    """Tokens equal, and on every sampled row the kernel's threshold keeps exactly ``keep_threshold``'s tokens;
    returns the tokens."""
    got, ref, thr = run(logits, t, k, p, seeds, steps, **kw)
    assert torch.equal(got, ref)
    keys, want = keep_threshold(logits, logits.float() / t.clamp_min(1e-6)[:, None], k, p)
    sampled = t > 0
    assert torch.equal((keys >= thr[:, None])[sampled], (keys >= want[:, None])[sampled])
    return got


def case(kind: str, mode: str, n: int, V: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(zlib.crc32(f"{kind}/{mode}/{V}/{dtype}".encode()))
    logits = rows(kind, n, V, g).to(dtype)
    t, k, p = params(n, mode, g)
    seeds, steps = torch.randint(0, 2**62, (n,), generator=g), torch.randint(0, 5000, (n,), generator=g)
    return logits, t, k, p, seeds, steps


@pytest.mark.parametrize("kind", ["uniform", "peaked", "ties", "zipf"])
@pytest.mark.parametrize("mode", ["top_k", "top_p", "both", "mixed"])
def test_kernel_tokens_equal_the_torch_path_fp32(kind, mode):
    """fp32 logits (32-bit keys of s): near-uniform, peaked, tied and Zipf rows; every filter mode; V = 3,001 is
    not a multiple of the block."""
    check(*case(kind, mode, 8, 3001))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["uniform", "peaked", "ties"])
def test_kernel_tokens_equal_the_torch_path_16_bit(dtype, kind):
    """16-bit logits: keys from their own bits (16 bisection bits), per-row mixtures of filters and greedy rows."""
    check(*case(kind, "mixed", 12, 4099, dtype))


@pytest.mark.parametrize("candidates,block,sums,split", [(2, 512, "kahan", "value"), (4, 256, "fp64", "key"),
                                                          (8, 128, "kahan", "value"), (4, 512, "fp64", "value")])
def test_every_split_block_and_summation_gives_the_same_tokens(candidates, block, sums, split):
    """Thresholds per pass, their spacing (in value or in key), block size and the mass sums (fp64 lanes or fp32
    Kahan lanes) change the work, not the tokens (blocks of 128 also make the argmax ties cross block
    boundaries); a row with -inf logits (banned tokens) has an infinite bracket end, where value splits stop."""
    kw = dict(candidates=candidates, block=block, sums=sums, split=split)
    for dtype in (torch.float32, torch.bfloat16):
        check(*case("ties", "both", 4, 1100, dtype), **kw)
    logits, t, k, p, seeds, steps = case("uniform", "top_p", 4, 1100)
    logits[1, ::7] = float("-inf")
    check(logits, t, k, p, seeds, steps, **kw)


@pytest.mark.parametrize("compact", [0, 300])
def test_packing_the_bracket_changes_no_token(compact):
    """The passes after the bracket's tokens are packed into the scratch row (every row here, V <= the default
    capacity) give what full passes give: never packing (0), and packing only once <= 300 tokens are left."""
    for dtype in (torch.float32, torch.bfloat16):
        check(*case("uniform", "both", 6, 2500, dtype), compact=compact)
        check(*case("zipf", "top_k", 4, 2500, dtype), compact=compact)


def test_unfiltered_rows_and_rows_without_a_filter():
    """``any_filter`` False, and rows with top_k = 0 and top_p = 1 under ``any_filter`` True, draw from every
    token; both equal the torch path."""
    logits, t, k, p, seeds, steps = case("uniform", "mixed", 8, 2000)
    k, p = torch.zeros_like(k), torch.ones_like(p)
    for any_filter in (False, True):
        got, ref = draw(logits, t, k, p, seeds, steps, any_filter=any_filter)
        assert torch.equal(got, ref)


def test_greedy_rows_ties_and_temperature_extremes():
    """Temperature 0 rows take the first maximal index (``torch.argmax``'s documented tie rule), including exact
    ties across the row; tiny and huge temperatures; top_k = 1; a very small top_p keeps the top token only."""
    V = 2500
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(1))
    logits[0, [7, 900, 2400]] = 9.0  # a three-way tie for the greedy row
    logits[1] = 0.0  # a constant row: greedy 0, sampled draws decided by the noise alone
    logits[2, 1234] = float("-inf")
    t = torch.tensor([0.0, 0.0, 1e-4, 50.0, 1.0, 0.7, 1e-6, 3.0])
    k = torch.tensor([0, 0, 0, 40, 1, 0, 0, 5])
    p = torch.tensor([1.0, 1.0, 0.9, 0.99, 1.0, 1e-7, 1.0, 0.5])
    seeds, steps = torch.tensor([2**31, 2**32 + 3, 2**63 - 1, -5, 2**40, 7, 2**31 - 1, 0]), torch.arange(8)
    check(logits, t, k, p, seeds, steps)
    got = draw(logits, t, k, p, seeds, steps)[0]
    assert got[0] == 7 and got[1] == 0
    assert got[4] == logits[4].argmax() and got[5] == logits[5].argmax()  # top_k 1; top_p below the top share
    got, ref = draw(logits[1:2].expand(64, V), torch.ones(64), torch.zeros(64, dtype=torch.long), torch.ones(64),
                    torch.arange(64) + 2**33, torch.zeros(64, dtype=torch.long), any_filter=False)
    assert torch.equal(got, ref) and len(set(got.tolist())) > 50  # noise only: different tokens per seed


def test_kept_set_edges_match_keep_threshold():
    """Ten tie groups of 120 tokens: top_k at a group's end (120, 240) and one past it (121, which keeps the whole
    next group), and a top_p cut; the tokens equal the torch path's and lie in ``keep_threshold``'s kept sets."""
    V = 1200
    base = torch.arange(V, dtype=torch.float32).remainder(10)  # ten tie groups of 120 tokens
    logits = torch.stack([base, base, base, base]) * 0.5
    t = torch.ones(4)
    k = torch.tensor([120, 121, 240, 0])
    p = torch.tensor([1.0, 1.0, 1.0, 0.5])
    seeds, steps = torch.arange(4) + 2**35, torch.full((4,), 3)
    check(logits, t, k, p, seeds, steps)
    keys, thr = keep_threshold(logits, logits / t[:, None], k, p)
    assert (keys >= thr[:, None]).sum(dim=-1).tolist()[:3] == [120, 240, 240]


def test_noise_is_bit_equal_to_the_torch_stream():
    """The kernel's uniform words equal ``sampling.uniform_noise`` bit for bit (uint32 wrap and logical shifts
    against int32 masking), seeds over the whole int64 range; Gumbel noise equal up to the log's rounding."""
    seeds = torch.tensor([0, 1, 2**31, 2**32 + 1, 2**62 + 5, 2**63 - 1, -1, -(2**40)])
    steps = torch.tensor([0, 3, 7, 2**33, 1, 9, 4, 100])
    V = 3000
    u = st.noise_triton(seeds.to(DEV), steps.to(DEV), V, gumbel=False).cpu()
    assert torch.equal(u.view(torch.int32), uniform_noise(seeds, steps, V).view(torch.int32))
    g = st.noise_triton(seeds.to(DEV), steps.to(DEV), V, gumbel=True).cpu()
    torch.testing.assert_close(g, gumbel_noise(seeds, steps, V), rtol=1e-6, atol=1e-6)


def test_dispatch_keeps_the_torch_path_off_cuda_and_rejects_what_the_kernel_does_not_compute():
    logits = torch.randn(3, 100)
    kw = dict(temperature=torch.ones(3), top_k=torch.zeros(3, dtype=torch.long), top_p=torch.ones(3),
              seeds=torch.arange(3), steps=torch.zeros(3, dtype=torch.long), any_random=True, any_filter=False)
    assert torch.equal(sample(logits, **kw), sample_torch(logits, **kw))  # CPU tensors: the torch path
    assert st.supported(logits, kw["temperature"])
    assert not st.supported(logits, kw["temperature"].double())  # torch's s would be fp64
    assert not st.supported(logits.double(), kw["temperature"])
    with pytest.raises(ValueError, match="candidates"):
        st.sample_triton(logits, **kw, candidates=3)
    with pytest.raises(ValueError, match="sums"):
        st.sample_triton(logits, **kw, sums="fp16")
    with pytest.raises(ValueError, match="split"):
        st.sample_triton(logits, **kw, split="rank")
    assert st.default_sums(torch.device("cpu")) == "kahan"


def test_benchmark_reports_the_kernel_column():
    """``benchmarks/sampler_micro.py``'s Triton column (CUDA only in the benchmark itself) on a tiny shape."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "sampler_micro.py"
    spec = importlib.util.spec_from_file_location("sampler_micro", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    logits = torch.randn(3, 512, generator=torch.Generator().manual_seed(2)).to(DEV)
    cfg = {"4,256,4": dict(candidates=4, block=256, num_warps=4),
           "split[tiny]": dict(path="split", config=st.SplitConfig(chunk=256, block=256, draw_block=256,
                                                                   finish_block=256, num_warps=8))}
    shape = bench._shape(logits, 1, not CPU, triton=cfg)
    assert set(shape["greedy_rows"]) == {"triton_ms[4,256,4]", "triton_ms[split[tiny]]"}
    for case in ("temperature", "top_p", "top_k"):
        assert shape[case]["triton_agree[4,256,4]"] == 1.0 and shape[case]["triton_agree[split[tiny]]"] == 1.0
    assert bench._triton_configs(["8,512,8"], cuda=False) == {}



# ---- the split-row path: (row, chunk) programs; small chunks so that rows span several (the last one partial) ----

SPLIT = st.SplitConfig(chunk=1024, block=1024, draw_block=1024, finish_block=1024, num_warps=16)  # few, wide
# interpreter steps (its cost is per op): the packing loop takes 32 x num_warps tokens per step


def split(**kw):
    """Keyword arguments of the split path with ``SPLIT`` changed by ``kw``."""
    return dict(path="split", config=dataclasses.replace(SPLIT, **kw))


def routes() -> set[str]:
    return {st.ROUTES[r] for r in st.LAST_ROUTES}


@pytest.mark.parametrize("kind", ["uniform", "peaked", "ties", "zipf"])
@pytest.mark.parametrize("mode", ["top_p", "mixed"])
def test_split_path_tokens_equal_the_torch_path_fp32(kind, mode):
    """fp32 logits over 3 chunks (V = 3,001): the same tokens and kept sets as the torch path (mixed: greedy,
    unfiltered, top-k, top-p and both on one batch)."""
    check(*case(kind, mode, 8, 3001), **split())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["uniform", "peaked", "ties"])
def test_split_path_tokens_equal_the_torch_path_16_bit(dtype, kind):
    """16-bit logits (keys from their own bits), per-row mixtures of greedy, unfiltered and filtered rows."""
    check(*case(kind, "mixed", 12, 4099, dtype), **split())


def test_split_path_near_uniform_rows_pack_the_bracket():
    """randn logits (a random-weight model: the top-p nucleus is most of the vocabulary, the benchmark's rows):
    top-p 0.95, top-k 50 and both, fp32 and bf16; the rows finish on their packed bracket, and with
    ``compact=0`` on full-row passes, with the same tokens."""
    g = torch.Generator().manual_seed(15)
    V = 9000
    logits = torch.randn(6, V, generator=g) * 2
    t = torch.full((6,), 0.8)
    k = torch.tensor([0, 0, 50, 50, 0, 300])
    p = torch.tensor([0.95, 0.95, 1.0, 0.95, 0.5, 0.99])
    seeds, steps = torch.arange(6) * 7919, torch.full((6,), 5)
    for dtype in (torch.float32, torch.bfloat16):
        check(logits.to(dtype), t, k, p, seeds, steps, **split(chunk=2048))
        assert routes() <= {"packed", "closed bracket"} and "packed" in routes()
    check(logits.bfloat16(), t, k, p, seeds, steps, **split(chunk=2048, compact=0))
    assert routes() == {"full-row passes"}


@pytest.mark.parametrize("kw", [dict(passes=1, candidates=16), dict(passes=3, candidates=2, split="key"),
                                dict(candidates=4, finish_candidates=2, compact=200),
                                dict(chunk=512, block=256, draw_block=128, num_warps=2, finish_candidates=16,
                                     finish_block=256)])
def test_split_path_every_config_gives_the_same_tokens(kw):
    """Approximate passes and their candidates, key or value spacing, chunk and block sizes, the packing capacity
    and the finishing program's candidates change the work, not the tokens; both exact sums too."""
    for dtype, sums in ((torch.float32, "kahan"), (torch.bfloat16, "fp64")):
        check(*case("uniform", "both", 4, 2100, dtype), sums=sums, **split(**kw))
        check(*case("ties", "top_k", 3, 2100, dtype), sums=sums, **split(**kw))


def test_split_path_bans_outliers_and_extreme_temperatures():
    """-inf logits (bans) and -100 biases below a top-p cut (the bracket starts above them), a row of one finite
    token, temperatures 1e-6 (the approximate masses' error bound is infinite there: counts only, full-row
    passes), 2e-4 (a bound of ~10% of Z: most candidates stay uncertain) and 50, top_k = 1, top_p below the top
    token's share and top_p = 0 (nothing kept: token 0)."""
    V = 2500
    logits = torch.randn(10, V, generator=torch.Generator().manual_seed(3))
    logits[0, ::5] = float("-inf")
    logits[1, 1::3] = float("-inf")
    logits[2, ::4] -= 100.0
    logits[3, ::2] -= 100.0
    logits[4] = float("-inf")
    logits[4, 1777] = 0.5
    t = torch.tensor([0.8, 1.0, 0.8, 1.2, 1.0, 1e-6, 50.0, 0.7, 1.0, 2e-4])
    k = torch.tensor([0, 40, 0, 30, 0, 0, 0, 1, 0, 0])
    p = torch.tensor([0.95, 1.0, 0.9, 0.99, 0.9, 0.9, 0.97, 1.0, 0.0, 0.9])
    seeds, steps = torch.arange(10) + 2**40, torch.arange(10)
    for dtype in (torch.float32, torch.bfloat16):
        got = check(logits.to(dtype), t, k, p, seeds, steps, **split())
        assert got[4] == 1777 and got[7] == logits[7].to(dtype).argmax() and got[8] == 0
        assert st.ROUTES[st.LAST_ROUTES[8]] == "nothing kept"


def test_split_path_unfiltered_batches_and_greedy_rows():
    """``any_filter`` False (one read: greedy and the draw), R = 1, a constant row (the noise alone decides) and
    exact greedy ties across chunks (the first index)."""
    V = 3000
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(4))
    logits[0, [5, 1500, 2999]] = 9.0
    logits[1] = 0.0
    t = torch.tensor([0.0, 1.0, 0.7, 0.0, 2.0])
    zk, op = torch.zeros(5, dtype=torch.long), torch.ones(5)
    seeds, steps = torch.arange(5) + 11, torch.zeros(5, dtype=torch.long)
    for any_filter in (False, True):
        got, ref = draw(logits, t, zk, op, seeds, steps, any_filter=any_filter, **split())
        assert torch.equal(got, ref) and got[0] == 5
        got, ref = draw(logits[2:3], t[2:3], zk[:1], op[:1], seeds[:1], steps[:1], any_filter=any_filter, **split())
        assert torch.equal(got, ref)


def test_split_path_is_batch_invariant():
    """A row's token depends on its own logits and parameters only: alone, in a batch, and in a shuffled batch."""
    logits, t, k, p, seeds, steps = case("uniform", "mixed", 6, 2500, torch.bfloat16)
    got = draw(logits, t, k, p, seeds, steps, **split())[0]
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = draw(logits[perm], t[perm], k[perm], p[perm], seeds[perm], steps[perm], **split())[0]
    assert torch.equal(shuffled, got[perm])
    for i in (1, 4):
        one = draw(logits[i:i + 1], t[i:i + 1], k[i:i + 1], p[i:i + 1], seeds[i:i + 1], steps[i:i + 1], **split())[0]
        assert one.item() == got[i].item()


def test_split_config_validates_and_parses_and_the_path_is_chosen_by_the_row_length():
    assert st.SplitConfig.parse("chunk=4096,passes=3,split=key") == st.SplitConfig(chunk=4096, passes=3, split="key")
    for bad, match in (("chunk=1000", "chunk"), ("chunk=512,block=1024", "multiple"), ("candidates=3", "candidates"),
                       ("passes=0", "passes"), ("split=rank", "split"), ("warps=4", "unknown"),
                       ("finish_warps=3", "finish_warps"), ("compact=-1", "compact")):
        with pytest.raises(ValueError, match=match):
            st.SplitConfig.parse(bad)
    assert st.choose_path(768, 128_256) == "split" and st.choose_path(768, 8192) == "row"
    assert st.choose_path(4, 3000, SPLIT) == "split"
    logits = torch.randn(2, 100)
    kw = dict(temperature=torch.ones(2), top_k=torch.zeros(2, dtype=torch.long), top_p=torch.ones(2),
              seeds=torch.arange(2), steps=torch.zeros(2, dtype=torch.long), any_random=True, any_filter=False)
    with pytest.raises(ValueError, match="path"):
        st.sample_triton(logits, **kw, path="rows")


@pytest.mark.gpu
@pytest.mark.skipif(CPU or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="native kernel only")
def test_cuda_kernel_agrees_with_the_torch_path_at_full_vocabulary_and_captures():
    """On the GPU (``pytest -q tests/generate/test_sampling_triton.py -m gpu``): R = 768, V = 128,256, bf16 and fp32
    logits, near-uniform, peaked and tied rows in every filter mode: the row kernel's and the split path's tokens
    (and the split path's temperature-only draw) against the torch path's on CUDA. Agreement >= 99.5%: libdevice's expf/logf are the functions torch's CUDA exp/log call, so only the
    summation order of the masses differs (the torch path's fp64 atomics add in any order, the kernel sums Kahan
    lanes) and the kernel's flush of subnormal probabilities to zero; each moves a cut only when ``top_p * Z``
    lies within ~1e-14 relative of a cumulative mass, so the measured rate should be 100%; the bound leaves room
    for an ulp of FMA contraction inside libdevice against the CUDA build of torch. Then a replay inside a CUDA
    graph equals an eager call at the next step, for both paths."""
    R, V = 768, 128_256
    g = torch.Generator().manual_seed(21)
    kinds = ["uniform", "peaked", "ties"]
    logits = torch.cat([rows(kinds[i % 3], R // 12, V, g) for i in range(12)]).cuda()
    t, k, p = (x.cuda() for x in params(R, "mixed", g))
    seeds, steps = torch.randint(0, 2**62, (R,), generator=g).cuda(), torch.randint(0, 5000, (R,), generator=g).cuda()
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        kw = dict(temperature=t, top_k=k, top_p=p, seeds=seeds, steps=steps, any_random=True, any_filter=True)
        ref = sample_torch(x, **kw)
        kw0 = kw | dict(any_filter=False, top_k=torch.zeros_like(k), top_p=torch.ones_like(p))  # temperature only
        ref0 = sample_torch(x, **kw0)
        for path in ("row", "split"):
            rates[f"{path}/{dtype}"] = (st.sample_triton(x, **kw, path=path) == ref).float().mean().item()
            rates[f"{path}/{dtype}/temperature"] = (st.sample_triton(x, **kw0, path=path) == ref0).float().mean().item()
        assert torch.equal(sample(x, **kw), st.sample_triton(x, **kw))  # the dispatch takes the kernel on CUDA
    print("kernel/torch token agreement:", rates)
    assert min(rates.values()) >= 0.995, rates
    x = logits.bfloat16()
    for path in ("row", "split"):
        kw = dict(temperature=t, top_k=k, top_p=p, seeds=seeds, steps=steps.clone(), any_random=True, any_filter=True,
                  path=path)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            st.sample_triton(x, **kw)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = st.sample_triton(x, **kw)
        kw["steps"].add_(1)
        graph.replay()
        assert torch.equal(out, st.sample_triton(x, **kw))
