import pytest
import torch
from generate_reference import greedy_reference

import batchpilot
from batchpilot.data.tokenizer import Tokenizer
from batchpilot.generate.engine import Engine, EngineConfig
from batchpilot.generate.request import SamplingParams
from batchpilot.generate.kernels import attend_with_lse, merge_lse

N = 10
VARIANTS = {
    "shared+cascade": dict(),
    "shared, no cascade": dict(cascade=False),
    "no sharing": dict(prefix_sharing=False),
    "chunked prefill": dict(max_batch_tokens=7),
    "small blocks + preemption": dict(block_size=4, num_blocks=14, output_len_prior=1),
}


def _prompts(seed=1):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, 320, (21,), generator=g).tolist()
    return ([shared + torch.randint(0, 320, (n,), generator=g).tolist() for n in (1, 6, 13)]
            + [torch.randint(0, 320, (n,), generator=g).tolist() for n in (2, 19, 33)])


@pytest.fixture(scope="module")
def hf_reference(hf_pair):
    hf, _, _ = hf_pair
    out = []
    for p in _prompts():
        ids = torch.tensor([p])
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(gen[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_transformers(hf_pair, hf_reference, variant):
    _, model, _ = hf_pair
    engine = Engine(model, None, EngineConfig(min_prefix_len=1, **VARIANTS[variant]))
    engine.eos_ids = set()  # EOS on, but never produced: admission must guess lengths (and may preempt)
    results = engine.generate(_prompts(), SamplingParams(max_tokens=N))
    assert [r.output_ids for r in results] == hf_reference
    assert all(r.finish_reason == "length" for r in results)
    if "preemption" in variant:
        assert engine.stats.preemptions > 0
    assert engine.pool.num_free == engine.pool.num_blocks - 1  # everything freed but the trash block


def test_prefix_is_prefilled_once(llama_pair):
    _, model, _ = llama_pair
    prompts = _prompts()
    shared = Engine(model, None, EngineConfig(min_prefix_len=1))
    shared.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))
    plain = Engine(model, None, EngineConfig(prefix_sharing=False))
    plain.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))
    assert plain.stats.prefill_tokens - shared.stats.prefill_tokens == 2 * 21


def test_contiguous_reference_loop(hf_pair, hf_reference):
    _, model, _ = hf_pair
    assert [greedy_reference(model, p, N) for p in _prompts()] == hf_reference


def test_cascade_merge_equals_plain_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 8), torch.randn(2, 3, 20, 8), torch.randn(2, 3, 20, 8)  # k/v: (K, B, L, E)
    valid = torch.rand(3, 20) > 0.3
    valid[:, 0] = valid[:, 12] = True
    full, lse = attend_with_lse(q, k, v, valid)
    a, lse_a = attend_with_lse(q, k[:, :, :12], v[:, :, :12], valid[:, :12])
    b, lse_b = attend_with_lse(q, k[:, :, 12:], v[:, :, 12:], valid[:, 12:])
    merged, lse_m = merge_lse(a, lse_a, b, lse_b)
    torch.testing.assert_close(merged, full)
    torch.testing.assert_close(lse_m, lse)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.transpose(0, 1), v.transpose(0, 1),
                                                            attn_mask=valid[:, None, None])
    torch.testing.assert_close(full, sdpa)


def test_seeded_sampling_is_reproducible_and_batch_independent(llama_pair):
    _, model, _ = llama_pair
    prompts = _prompts()
    params = [SamplingParams(max_tokens=8, temperature=1.0, top_k=50, top_p=0.9, seed=7 + i, ignore_eos=True)
              for i in range(len(prompts))]
    first = Engine(model, None, EngineConfig(min_prefix_len=1)).generate(prompts, params)
    alone = Engine(model, None, EngineConfig(prefix_sharing=False)).generate(prompts[2:3], params[2:3])
    assert alone[0].output_ids == first[2].output_ids
    again = Engine(model, None, EngineConfig(max_batch_tokens=5)).generate(prompts, params)
    assert [r.output_ids for r in again] == [r.output_ids for r in first]
    other = Engine(model, None, EngineConfig()).generate(prompts, [SamplingParams(
        max_tokens=8, temperature=1.0, seed=100 + i, ignore_eos=True) for i in range(len(prompts))])
    assert [r.output_ids for r in other] != [r.output_ids for r in first]


def test_stop_strings_and_eos(model_dir):
    model, tok = batchpilot.load_model(model_dir), Tokenizer.from_path(model_dir)
    engine = Engine(model, tok, EngineConfig())
    full = engine.generate(["And God said"], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert full.text == tok.decode(full.output_ids) and len(full.output_ids) == 12
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 2]
    cut = Engine(model, tok, EngineConfig()).generate(["And God said"], SamplingParams(max_tokens=12, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    eos = full.output_ids[3]
    engine.eos_ids = {eos}
    ended = engine.generate(["And God said"], SamplingParams(max_tokens=12))[0]
    assert ended.finish_reason == "stop" and ended.output_ids[-1] == eos
    assert len(ended.output_ids) == full.output_ids.index(eos) + 1


def test_triton_kernel_matches_torch_path():
    """Runs natively on CUDA, or on CPU under TRITON_INTERPRET=1; skipped where triton is absent."""
    import os

    from batchpilot.generate.kernels import paged_attention_torch, paged_attention_triton, triton

    cuda = torch.cuda.is_available()
    if triton is None or not (cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs triton on CUDA, or TRITON_INTERPRET=1")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    K, E, bs, blocks = 2, 64, 16, 64
    kc, vc = (torch.randn(K, blocks * bs, E, device=device, dtype=dtype) for _ in range(2))
    for B, Qn in [(3, 4), (2, 40)]:
        q = torch.randn(B, K, Qn, E, device=device, dtype=dtype)
        tables = torch.stack([torch.randperm(blocks)[:10] for _ in range(B)]).to(device)
        lens = torch.tensor([1, 150, 77][:B], device=device)
        o1, l1 = paged_attention_torch(q, kc, vc, tables, lens, bs)
        for splits in (1, 3):  # split keys (Flash-Decoding) merge to the same result; length 1 leaves splits empty
            o2, l2 = paged_attention_triton(q, kc, vc, tables, lens, bs, splits=splits)
            torch.testing.assert_close(o2.float(), o1.float(), atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(l2, l1, atol=2e-2, rtol=2e-2)
    q_lens = torch.tensor([16, 0], device=device)  # padding queries: the split path leaves them unwritten too
    o1, l1 = paged_attention_torch(q, kc, vc, tables, lens[:2], bs)
    o2, l2 = paged_attention_triton(q, kc, vc, tables, lens[:2], bs, q_lens, splits=2)
    torch.testing.assert_close(o2[0, :, :16].float(), o1[0, :, :16].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(l2[0, :, :16], l1[0, :, :16], atol=2e-2, rtol=2e-2)
    # cascade groups: each sequence's queries are all heads of some decode rows, read and written in place
    D, G = 7, 4
    qd = torch.randn(D, K, G, E, device=device, dtype=dtype)
    q_rows = torch.tensor([[5, 0, 2, D], [3, D, D, D], [D, D, D, D]], device=device)  # D: a padded member slot
    sizes = torch.tensor([3, 1, 0], device=device)
    tables = torch.stack([torch.randperm(blocks)[:10] for _ in range(3)]).to(device)
    lens = torch.tensor([60, 1, 0], device=device)
    (o1, l1), (o2, l2) = (f(qd, kc, vc, tables, lens, bs, sizes * G, q_rows)
                          for f in (paged_attention_torch, paged_attention_triton))
    grouped = torch.tensor([0, 2, 3, 5], device=device)
    torch.testing.assert_close(o2[grouped].float(), o1[grouped].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(l2[grouped], l1[grouped], atol=2e-2, rtol=2e-2)
    ungrouped = torch.tensor([1, 4, 6], device=device)  # in no group: "no keys" for the merge
    assert (o2[ungrouped] == 0).all() and (l2[ungrouped] == float("-inf")).all()
    assert (o1[ungrouped] == 0).all() and (l1[ungrouped] == float("-inf")).all()
    want = paged_attention_torch(qd[[5, 0, 2]].transpose(0, 1).reshape(1, K, 3 * G, E), kc, vc, tables[:1], lens[:1], bs)
    torch.testing.assert_close(o1[[5, 0, 2]], want[0].view(K, 3, G, E).transpose(0, 1))


@pytest.mark.parametrize("decode_steps", [1, 4])
@pytest.mark.parametrize("cascade", [True, False])
def test_static_decode_buffers_match_eager(hf_pair, hf_reference, cascade, decode_steps):
    """The CUDA-graph path (padded rows, tables and groups; trash block; multi-step decode advancing its
    inputs on the device) run eagerly on CPU."""

    _, model, _ = hf_pair
    engine = Engine(model, None, EngineConfig(min_prefix_len=1, cascade=cascade, prefix_sharing=cascade,
                                              decode_steps=decode_steps))
    graphs = engine.runner.attach_graphs(max_rows=8, max_groups=2, capture=False)
    results = engine.generate(_prompts(), SamplingParams(max_tokens=N, ignore_eos=True))
    assert [r.output_ids for r in results] == hf_reference
    assert graphs.enabled and {rows for rows, *_ in graphs.graphs} >= {8}
    assert {groups for _, groups, _ in graphs.graphs} == ({1} if cascade else {0})
    assert engine.stats.output_tokens == len(results) * N
    assert (engine.stats.steps > engine.stats.round_trips) == (decode_steps > 1)
    assert engine.pool.num_free == engine.pool.num_blocks - 1  # every block back but the trash block


def test_compiled_decode_graphs_match_eager(hf_pair, hf_reference):
    """torch.compile'd decode forward (fused around the opaque paged attention), several buckets: HF's tokens."""

    _, model, _ = hf_pair
    engine = Engine(model, None, EngineConfig(min_prefix_len=1, decode_steps=4))
    graphs = engine.runner.attach_graphs(max_rows=8, max_groups=2, capture=False, compile=True,
                                         reuse_first_uses=0)  # every bucket its own graph at once
    lengths = (N, N, 3, 5, N, 2)  # requests end at different steps: batches of 6, 4, 3 rows (buckets 8, 4)
    results = engine.generate(_prompts(), [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths])
    assert [r.output_ids for r in results] == [ref[:n] for ref, n in zip(hf_reference, lengths)]
    assert graphs.enabled and len({rows for rows, *_ in graphs.graphs}) >= 2


@pytest.mark.parametrize("reuse", [0, 2, 1000])
def test_a_new_bucket_first_runs_on_a_larger_captured_graph(hf_pair, hf_reference, reuse):
    """A shrinking batch's first uses of a smaller bucket replay the larger graph (more padding rows), and the
    bucket gets its own graph after ``reuse_first_uses`` uses: HF's tokens either way."""
    _, model, _ = hf_pair
    engine = Engine(model, None, EngineConfig(min_prefix_len=1, decode_steps=1))
    graphs = engine.runner.attach_graphs(max_rows=8, max_groups=2, capture=False, reuse_first_uses=reuse)
    lengths = (N, N, 3, 5, N, 2)  # batches of 6 rows (bucket 8), then 4 and 3 (bucket 4) for N - 5 steps
    results = engine.generate(_prompts(), [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths])
    assert [r.output_ids for r in results] == [ref[:n] for ref, n in zip(hf_reference, lengths)]
    buckets = {rows for rows, *_ in graphs.graphs}
    assert 8 in buckets and (4 in buckets) == (reuse < 1000)  # reuse 1000: the 4- and 3-row steps ran on 8 rows
    assert graphs.captures == len(graphs.graphs)  # each graph built once, with its reference step
    assert (graphs.borrowed_steps > 0) == (reuse > 0)  # rounds counted where a smaller batch ran on 8 rows
    if reuse == 2:
        assert graphs.uses[next(k for k in graphs.graphs if k[0] == 4)] == 3  # captured on its third use
        assert graphs.borrowed_steps >= 2  # bucket 4's first two uses (and any key with fewer cascade groups)


def test_mismatching_compiled_graphs_fall_back_to_eager_graphs(hf_pair, hf_reference):
    """A compiled forward that fails the self-check is replaced by the eager one; graphs stay on, outputs exact."""
    from batchpilot.generate.graphs import greedy_tokens

    _, model, _ = hf_pair
    engine = Engine(model, None, EngineConfig(min_prefix_len=1, decode_steps=4))
    graphs = engine.runner.attach_graphs(max_rows=8, max_groups=2, capture=False)
    graphs.tokens = lambda *args: (greedy_tokens(*args) + 1) % model.config.vocab_size  # a miscompiled forward
    results = engine.generate(_prompts(), SamplingParams(max_tokens=N, ignore_eos=True))
    assert [r.output_ids for r in results] == hf_reference
    assert graphs.enabled and graphs.graphs and graphs.tokens is greedy_tokens
    assert "not near ties" in graphs.compile_off_reason
    assert engine.stats.steps > engine.stats.round_trips  # multi-step graph decode ran after the fallback


def test_multi_step_decode_stops_at_eos_and_max_tokens(llama_pair):
    """Tokens past a request's end (EOS mid-run, short max_tokens) are dropped: same outputs as one step at a time."""

    _, model, _ = llama_pair
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 320, (int(n),), generator=g).tolist() for n in torch.randint(3, 40, (9,))]
    params = [SamplingParams(max_tokens=m, ignore_eos=False) for m in (1, 2, 3, 5, 7, 9, 12, 17, 30)]
    free_run = Engine(model, None, EngineConfig(prefix_sharing=False)).generate(prompts, SamplingParams(max_tokens=30))
    eos = free_run[-1].output_ids[3]  # a token the longest request emits mid-run: EOS ends it (and maybe others) early
    outputs = {}
    for steps in (1, 8):
        engine = Engine(model, None, EngineConfig(prefix_sharing=False, decode_steps=steps))
        engine.eos_ids = {eos}
        engine.runner.attach_graphs(max_rows=16, capture=False)
        outputs[steps] = [(r.output_ids, r.finish_reason) for r in engine.generate(prompts, params)]
        assert engine.pool.num_free == engine.pool.num_blocks - 1
        assert (engine.stats.steps > engine.stats.round_trips) == (steps > 1)
    assert outputs[8] == outputs[1]
    assert any(reason == "stop" for _, reason in outputs[1]) and any(reason == "length" for _, reason in outputs[1])


def test_one_token_prefix_and_suffix(llama_pair):
    """A 1-token group prefix and 1-token suffixes run through the decode path: same tokens as no sharing."""
    _, model, _ = llama_pair
    prompts = [[5, 6, 7], [5, 8, 9], [5, 8], [11, 12, 13, 14], [11, 12, 13, 15]]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    plain = Engine(model, None, EngineConfig(prefix_sharing=False)).generate(prompts, params)
    for cascade in (True, False):
        engine = Engine(model, None, EngineConfig(min_prefix_len=1, cascade=cascade))
        shared = engine.generate(prompts + [[5, 6, 1]], [params] * 5 + [SamplingParams(max_tokens=0)])
        assert [r.output_ids for r in shared] == [r.output_ids for r in plain] + [[]]
        assert engine.pool.num_free == engine.pool.num_blocks - 1


@pytest.mark.gpu
def test_gpu_fast_paths_agree_with_the_torch_path(hf_pair):
    """On CUDA: Triton attention + CUDA graphs give the tokens of the torch path (bf16; rare ties may flip)."""
    model = batchpilot.load_model(hf_pair[2], device="cuda", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, 320, (40,), generator=g).tolist()
    prompts = [shared + torch.randint(0, 320, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (40,))]
    prompts += [torch.randint(0, 320, (int(n),), generator=g).tolist() for n in torch.randint(2, 90, (40,))]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    ref = Engine(model, None, EngineConfig(min_prefix_len=8, num_blocks=1024, triton=False, cuda_graphs=False))
    ref = ref.generate(prompts, params)
    fast = Engine(model, None, EngineConfig(min_prefix_len=8, num_blocks=1024))
    out = fast.generate(prompts, params)
    assert fast.runner.triton_verified and fast.runner.use_triton and fast.runner.graphs.enabled
    assert fast.runner.graphs.graphs, "no CUDA graph was captured"
    same = sum(a == b for r, f in zip(ref, out) for a, b in zip(r.output_ids, f.output_ids))
    assert same >= 0.95 * sum(len(r.output_ids) for r in ref)


@pytest.mark.gpu
def test_gpu_graphs_survive_a_longer_job_after_a_short_one(hf_pair):
    """A job with longer requests widens the block tables and drops the graphs; capturing again into the old pool
    failed the caching allocator's use_count assert and switched graphs off (one H200, 2026-12-01)."""
    model = batchpilot.load_model(hf_pair[2], device="cuda", dtype=torch.bfloat16)
    engine = Engine(model, None, EngineConfig(num_blocks=2048, compile=False))
    prompts = [[5 + i, 6, 7, 8] for i in range(24)]
    engine.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))
    width = engine.runner.graphs.width
    engine.generate(prompts, SamplingParams(max_tokens=200, ignore_eos=True))
    graphs = engine.runner.graphs
    assert graphs.width > width and graphs.enabled, graphs.off_reason
    assert graphs.graphs, "no CUDA graph was captured after the widening"


def test_dropping_an_engine_frees_its_kv_cache_without_a_garbage_collection(llama_pair):
    """No reference cycle between the runner and its decode graphs: a notebook or a sweep that builds engines one
    after another gets each KV cache back when the engine goes, not at the next collection (on one H200 a second
    engine found no memory for its cache)."""
    import gc
    import weakref

    _, model, _ = llama_pair
    gc.collect()
    gc.disable()
    try:
        engine = Engine(model, None, EngineConfig(num_blocks=256))
        engine.runner.attach_graphs(max_rows=8, capture=False)  # the GPU's graph objects, run eagerly on CPU
        engine.generate([[5, 6, 7, 8]] * 3, SamplingParams(max_tokens=4, ignore_eos=True))
        engine.generate([[5, 6, 7, 8]] * 3, SamplingParams(max_tokens=4, temperature=0.8, seed=1, ignore_eos=True))
        assert engine.runner.graphs.graphs  # graphs were built
        kv = weakref.ref(engine.runner.kv.k)
        del engine
        assert kv() is None
    finally:
        gc.enable()


def test_static_decode_buffers_with_several_groups(llama_pair):

    _, model, _ = llama_pair
    g = torch.Generator().manual_seed(5)
    heads = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (9, 17, 5)]
    prompts = [h + torch.randint(0, 320, (k,), generator=g).tolist() for h in heads for k in (1, 4, 7)]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    plain = Engine(model, None, EngineConfig(prefix_sharing=False)).generate(prompts, params)
    engine = Engine(model, None, EngineConfig(min_prefix_len=1, max_num_seqs=12))
    graphs = engine.runner.attach_graphs(max_rows=12, capture=False)
    assert [r.output_ids for r in engine.generate(prompts, params)] == [r.output_ids for r in plain]
    assert graphs.enabled and (12, 4, 0) in graphs.graphs  # 3 groups padded to 4, 9 rows padded to 12


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_interrupted_decode_rounds_give_the_same_tokens(hf_pair, hf_reference, temperature):
    """The server ends a multi-step decode round early when a request arrives (``Engine.step(stop=...)``): the
    rows then carry fewer tokens from that round, and every row's tokens are the uninterrupted run's."""
    _, model, _ = hf_pair
    params = SamplingParams(max_tokens=N, ignore_eos=True, temperature=temperature, top_p=0.9, seed=3)

    def run(stop_pattern):
        engine = Engine(model, None, EngineConfig(min_prefix_len=1, decode_steps=4))
        engine.runner.attach_graphs(max_rows=8, max_groups=2, capture=False)
        asked = []

        def stop():
            asked.append(stop_pattern[len(asked) % len(stop_pattern)])
            return asked[-1]

        step = engine.step
        engine.step = lambda scheduler, stop_=None: step(scheduler, stop=stop if stop_pattern else None)
        results = engine.generate(_prompts(), params)
        return [r.output_ids for r in results], engine, asked

    ref, ref_engine, _ = run(())
    got, engine, asked = run((False, True, False, False, True))
    assert got == ref
    if temperature == 0:
        assert got == hf_reference
    assert any(asked)  # rounds were cut ...
    assert engine.stats.round_trips > ref_engine.stats.round_trips  # ... so the job took more of them
    assert engine.pool.num_free == engine.pool.num_blocks - 1  # no block kept by a cut round
