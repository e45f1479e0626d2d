"""Issue 16, engine side: logprobs, prompt logprobs / score, n samples, penalties, logit_bias, min_tokens."""

import pytest
import torch
from generate_reference import processed_greedy_reference

from batchpilot.generate.engine import Engine, EngineConfig
from batchpilot.generate.request import SamplingParams, request_seed, sample_seed


def _prompts(seed=2):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, 320, (19,), generator=g).tolist()
    return [shared + torch.randint(0, 320, (n,), generator=g).tolist() for n in (1, 5, 9)] + [
        torch.randint(0, 320, (n,), generator=g).tolist() for n in (3, 14)]


def _hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """(T, V) log-softmax of transformers' logits over the sequence."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("config", [dict(min_prefix_len=1), dict(prefix_sharing=False), dict(max_batch_tokens=6)])
def test_output_logprobs_equal_transformers(hf_pair, config):
    hf, model, _ = hf_pair
    engine = Engine(model, None, EngineConfig(**config))
    engine.eos_ids = set()
    out = engine.generate(_prompts(), SamplingParams(max_tokens=6, logprobs=3))
    for c in out:
        ref = _hf_logprobs(hf, c.prompt_ids + c.output_ids)[len(c.prompt_ids) - 1:-1]  # rows predicting outputs
        assert len(c.logprobs) == len(c.output_ids) == 6
        for i, lp in enumerate(c.logprobs):
            assert lp.token_id == c.output_ids[i]
            torch.testing.assert_close(lp.logprob, ref[i, lp.token_id].item(), atol=1e-4, rtol=1e-4)
            top_v, top_i = ref[i].topk(3)
            assert [t for t, _ in lp.top] == top_i.tolist()
            torch.testing.assert_close([v for _, v in lp.top], top_v.tolist(), atol=1e-4, rtol=1e-4)
    assert all(c.prompt_logprobs is None for c in out)


@pytest.mark.parametrize("config", [dict(min_prefix_len=1), dict(min_prefix_len=1, cascade=False),
                                    dict(prefix_sharing=False, max_batch_tokens=7)])
def test_prompt_logprobs_and_score_equal_transformers(hf_pair, config):
    hf, model, _ = hf_pair
    prompts = _prompts()
    engine = Engine(model, None, EngineConfig(**config))
    out = engine.generate(prompts, [SamplingParams(max_tokens=2, prompt_logprobs=2)] * 4
                          + [SamplingParams(max_tokens=0, prompt_logprobs=0)])
    for c in out:
        ref = _hf_logprobs(hf, c.prompt_ids)
        assert len(c.prompt_logprobs) == len(c.prompt_ids) and c.prompt_logprobs[0] is None
        got = torch.tensor([lp.logprob for lp in c.prompt_logprobs[1:]])
        want = ref[torch.arange(len(c.prompt_ids) - 1), torch.tensor(c.prompt_ids[1:])]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        k = len(c.prompt_logprobs[1].top)
        assert all([t for t, _ in lp.top] == ref[i].topk(k).indices.tolist()
                   for i, lp in enumerate(c.prompt_logprobs[1:]))
    assert len(out[-1].output_ids) == 0 and [len(c.prompt_logprobs[1].top) for c in out] == [2, 2, 2, 2, 0]

    contexts = [p[:-3] for p in prompts] + [[]]
    continuations = [p[-3:] for p in prompts] + [prompts[0][:4]]
    scores = Engine(model, None, EngineConfig(**config)).score(contexts, continuations)
    for ctx, cont, s in zip(contexts, continuations, scores):
        ref = _hf_logprobs(hf, ctx + cont)
        start = max(1, len(ctx))
        seq = ctx + cont
        want = [ref[i - 1, seq[i]].item() for i in range(start, len(seq))]
        torch.testing.assert_close(s.logprobs, want, atol=1e-4, rtol=1e-4)
        assert s.is_greedy == all(ref[i - 1].argmax().item() == seq[i] for i in range(start, len(seq)))
    greedy_cont = Engine(model, None, EngineConfig()).generate([prompts[1]], SamplingParams(max_tokens=3))[0]
    assert Engine(model, None, EngineConfig()).score([prompts[1]], [greedy_cont.output_ids])[0].is_greedy


def test_score_shares_contexts_through_prefix_groups(llama_pair):
    _, model, _ = llama_pair
    ctx = _prompts()[0]
    conts = [[1, 2], [3, 4, 5], [6], [7, 8]]
    shared = Engine(model, None, EngineConfig(min_prefix_len=1))
    a = shared.score([ctx] * 4, conts)
    plain = Engine(model, None, EngineConfig(prefix_sharing=False))
    b = plain.score([ctx] * 4, conts)
    assert plain.stats.prefill_tokens - shared.stats.prefill_tokens >= 3 * (len(ctx) - 1)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.logprobs, y.logprobs, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="continuation"):
        shared.score([[]], [[5]])


def test_n_samples_share_the_prompt_and_have_their_own_seed_streams(llama_pair):
    _, model, _ = llama_pair
    prompts = _prompts()[:2]
    params = SamplingParams(max_tokens=6, temperature=1.0, top_p=0.95, seed=11, n=3, ignore_eos=True, logprobs=0)
    shared = Engine(model, None, EngineConfig(min_prefix_len=1))
    out = shared.generate(prompts, params)
    assert [(c.index, c.sample_index) for c in out] == [(i, j) for i in range(2) for j in range(3)]
    assert len({tuple(c.output_ids) for c in out[:3]}) > 1  # samples differ
    assert all(len(c.logprobs) == 6 for c in out)
    for c in out:  # sample j == a lone n = 1 request seeded with sample_seed(seed, j), no sharing
        alone = Engine(model, None, EngineConfig(prefix_sharing=False)).generate(
            [c.prompt_ids], SamplingParams(max_tokens=6, temperature=1.0, top_p=0.95, ignore_eos=True,
                                           seed=sample_seed(11, c.sample_index)))[0]
        assert alone.output_ids == c.output_ids
    plain = Engine(model, None, EngineConfig(prefix_sharing=False))
    plain.generate(prompts, params)
    assert plain.stats.prefill_tokens - shared.stats.prefill_tokens >= 2 * 2 * 19  # 2 extra samples x 2 prompts


def test_repetition_penalty_equals_transformers(llama_pair):
    hf, model, _ = llama_pair
    engine = Engine(model, None, EngineConfig(min_prefix_len=1))
    engine.eos_ids = set()
    for penalty in (1.3, 0.7):
        out = engine.generate(_prompts()[2:], SamplingParams(max_tokens=8, repetition_penalty=penalty))
        for c in out:
            ids = torch.tensor([c.prompt_ids])
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                              do_sample=False, eos_token_id=None, pad_token_id=0, repetition_penalty=penalty)
            assert c.output_ids == gen[0, ids.shape[1]:].tolist()


def test_presence_frequency_bias_and_min_tokens_equal_a_naive_loop(llama_pair):
    _, model, _ = llama_pair
    prompts = _prompts()
    free = Engine(model, None, EngineConfig()).generate(prompts[:1], SamplingParams(max_tokens=8, ignore_eos=True))
    eos = free[0].output_ids[1]  # the greedy run would stop at token 2: min_tokens must hold it off
    bias = ((3, 5.0), (17, -100.0), (eos, 0.5))
    params = SamplingParams(max_tokens=8, presence_penalty=1.5, frequency_penalty=0.7, logit_bias=bias,
                            min_tokens=5, logprobs=1)
    engine = Engine(model, None, EngineConfig(min_prefix_len=1, max_batch_tokens=9))
    engine.eos_ids = {eos}
    out = engine.generate(prompts, params)
    for c in out:
        want, lps = processed_greedy_reference(model, c.prompt_ids, 8, presence=1.5, frequency=0.7,
                                               bias=dict(bias), banned=eos, min_tokens=5)
        if eos in want[5:]:
            want = want[:want.index(eos, 5) + 1]
        assert c.output_ids == want
        assert eos not in c.output_ids[:5] and len(c.output_ids) >= 5
        torch.testing.assert_close([lp.logprob for lp in c.logprobs],
                                   [lp[t].item() for lp, t in zip(lps, want)], atol=1e-4, rtol=1e-4)


def test_sampling_params_validation():
    for bad, field in [(dict(temperature=2.5), "temperature"), (dict(top_p=0), "top_p"), (dict(n=0), "n"),
                       (dict(logprobs=21), "logprobs"), (dict(prompt_logprobs=-1), "prompt_logprobs"),
                       (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency"),
                       (dict(repetition_penalty=0), "repetition_penalty"), (dict(logit_bias=((5, 101.0),)), "bias"),
                       (dict(logit_bias=((5, 1.0), (2, 1.0))), "sorted"), (dict(min_tokens=-1), "min_tokens")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)


def test_request_seed_is_stable_and_keyed():
    assert request_seed(0, "a") == request_seed(0, "a") != request_seed(0, "b") != request_seed(1, "a")
    assert 0 <= request_seed(123, "x") < 2**63
    assert sample_seed(7, 0) == 7 and sample_seed(7, 1) != sample_seed(7, 2)


def test_llm_api_matches_the_engine(model_dir):
    import batchpilot
    from batchpilot.data.tokenizer import Tokenizer
    from batchpilot.generate import LLM

    llm = LLM(model_dir, dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=3, n=2, ignore_eos=True)
    outs = llm.generate(["And God said", "In the beginning"], params)
    engine = Engine(batchpilot.load_model(model_dir), Tokenizer.from_path(model_dir), EngineConfig())
    ref = engine.generate(["And God said", "In the beginning"], params)
    assert [o.index for o in outs] == [0, 1] and [len(o.outputs) for o in outs] == [2, 2]
    assert [c.output_ids for o in outs for c in o.outputs] == [c.output_ids for c in ref]
    assert outs[0].outputs[0].text == llm.tokenizer.decode(outs[0].outputs[0].output_ids)
    tok = llm.tokenizer
    s = llm.score(["And God said"], [" Let there be"])[0]
    want = engine.score([tok.encode_prompt("And God said")], [tok.encode(" Let there be")])[0]
    assert s == want and len(s.logprobs) == len(tok.encode(" Let there be"))
    with pytest.raises(ValueError, match="dtype"):
        LLM(model_dir, dtype="int8")


@pytest.mark.parametrize("config", [dict(min_prefix_len=1, decode_steps=1), dict(min_prefix_len=1, decode_steps=4),
                                    dict(prefix_sharing=False, decode_steps=8), dict(min_prefix_len=1, cascade=False)])
def test_sampling_in_decode_graphs_is_batch_sharing_and_step_independent(llama_pair, config):
    """Issue 15: temperature / top-k / top-p / seeds inside the decode graphs (run eagerly on CPU, fp32): a
    request's tokens depend on its seed and step only, not on neighbours, sharing or steps per round trip."""
    _, model, _ = llama_pair
    prompts = _prompts() * 2
    penalties = dict(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2, logit_bias=((3, 2.0),),
                     min_tokens=6, ignore_eos=False)
    params = [SamplingParams(max_tokens=9, temperature=0.8 if i % 4 else 0.0, top_p=0.95 if i % 2 else 1.0,
                             top_k=20 if i % 3 == 0 else 0, seed=40 + i,
                             **(penalties if i % 5 == 1 else dict(ignore_eos=True))) for i in range(len(prompts))]
    ref = Engine(model, None, EngineConfig(prefix_sharing=False))  # eager, no graphs
    ref.eos_ids = {7, 300}
    ref = ref.generate(prompts, params)
    engine = Engine(model, None, EngineConfig(**config))
    engine.eos_ids = {7, 300}
    graphs = engine.runner.attach_graphs(max_rows=16, capture=False)
    out = engine.generate(prompts, params)
    assert [c.output_ids for c in out] == [c.output_ids for c in ref]
    assert graphs.enabled and any(kind > 0 for *_, kind in graphs.graphs) == config.get("cascade", True)
    multi_step = config.get("decode_steps", 32) > 1 and config.get("cascade", True)  # no graphs for inline prefixes
    assert (engine.stats.steps > engine.stats.round_trips) == multi_step
    alone = Engine(model, None, EngineConfig())
    alone.runner.attach_graphs(max_rows=16, capture=False)
    alone.eos_ids = {7, 300}
    assert [c.output_ids for c in alone.generate(prompts[5:7], params[5:7])] == [c.output_ids for c in ref[5:7]]
    assert any(kind & 4 for *_, kind in graphs.graphs) == config.get("cascade", True)  # penalised graphs ran
