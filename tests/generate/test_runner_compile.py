"""Compiled eager steps (prefill chunks, mixed steps): the same tokens as the eager forward, and a clean fallback.

On CUDA the runner compiles ``packed_hidden`` when ``compile`` is on; here the same compiled function is put in
place by hand on CPU (inductor's CPU backend), so the equivalence is checked without a GPU.
"""

import random

import pytest
import torch

import batchpilot
from batchpilot.generate import Engine, EngineConfig, SamplingParams
from batchpilot.generate.runner import packed_hidden


def _job():
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(5, 70))] for _ in range(12)]
    return prompts, SamplingParams(max_tokens=6, ignore_eos=True)


def test_compiled_eager_steps_match_the_eager_forward(llama_pair):
    _, model, _ = llama_pair
    prompts, params = _job()
    cfg = EngineConfig(cpu_kv_tokens=4096, max_batch_tokens=96)  # several prefill chunks and mixed steps
    want = [c.output_ids for c in Engine(model, None, cfg).generate(prompts, params)]
    engine = Engine(model, None, cfg)
    engine.runner.hidden = torch.compile(packed_hidden, dynamic=True)
    got = [c.output_ids for c in engine.generate(prompts, params)]
    assert engine.runner.compile_off_reason is None  # the compiled function ran every step
    assert engine.stats.prefill_tokens > 0 and got == want


def test_a_failing_compile_falls_back_to_eager_steps(llama_pair):
    _, model, _ = llama_pair
    prompts, params = _job()
    cfg = EngineConfig(cpu_kv_tokens=4096, max_batch_tokens=96)
    want = [c.output_ids for c in Engine(model, None, cfg).generate(prompts, params)]
    engine = Engine(model, None, cfg)

    def broken(*args):
        raise RuntimeError("inductor failed")

    engine.runner.hidden = broken
    with pytest.warns(UserWarning, match="compiled eager steps disabled: RuntimeError: inductor failed"):
        got = [c.output_ids for c in engine.generate(prompts, params)]
    assert got == want and engine.runner.hidden is packed_hidden
    assert engine.runner.compile_off_reason == "RuntimeError: inductor failed"


def test_compile_is_cuda_only_by_default():
    model = batchpilot.load_model("tiny")
    assert Engine(model, None, EngineConfig(cpu_kv_tokens=1024)).runner.hidden is packed_hidden
