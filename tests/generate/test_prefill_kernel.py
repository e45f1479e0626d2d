"""The Triton prefill attention kernel against its torch reference, and the engine with it against the packed SDPA path.

Runs natively on CUDA (bf16), or on CPU under TRITON_INTERPRET=1 (fp32); skipped where triton is absent (CI).
"""

import os
import random

import pytest
import torch

from batchpilot.generate import Engine, EngineConfig, SamplingParams
from batchpilot.generate.kernels import PrefillChunks, prefill_attention_torch, prefill_attention_triton, triton

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(triton is None or not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
                                reason="needs triton on CUDA, or TRITON_INTERPRET=1")
DEVICE, DTYPE = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)


def _chunks(lens: list[tuple[int, int]], S: int, G: int, block_m: int, rng: random.Random) -> PrefillChunks:
    """(n, L) per chunk: n queries at the end of an L-token context whose slots are random distinct cache slots."""
    q_start = k_start = 0
    host, slots, tile_chunk, tile_row = [], [], [], []
    for c, (n, L) in enumerate(lens):
        host.append((q_start, n, L, k_start))
        slots += rng.sample(range(S), L)
        for r in range(0, n * G, block_m):
            tile_chunk.append(c)
            tile_row.append(r)
        q_start, k_start = q_start + n, k_start + L

    def t(x):
        return torch.tensor(x, dtype=torch.long, device=DEVICE)

    cols = list(zip(*host))
    return PrefillChunks(t(cols[0]), t(cols[1]), t(cols[2]), t(cols[3]), t(slots), t(tile_chunk), t(tile_row), host)


@pytest.mark.parametrize("H,K,E", [(4, 2, 16), (6, 2, 32), (4, 4, 16)])  # GQA, G = 3 (no power of two), MHA
def test_kernel_matches_the_torch_reference(H, K, E):
    rng = random.Random(H * 10 + K)
    torch.manual_seed(0)
    S = 512
    kc, vc = (torch.randn(K, S, E, device=DEVICE, dtype=DTYPE) for _ in range(2))
    # a chunk that is its whole context, one at the end of a long context, one-token-wide and odd-sized ones
    lens = [(37, 37), (5, 130), (2, 2), (70, 200), (16, 16)]
    m = _chunks(lens, S, H // K, 32, rng)
    q = torch.randn(sum(n for n, _ in lens), H, E, device=DEVICE, dtype=DTYPE)
    want = prefill_attention_torch(q.float(), kc, vc, m)
    got = prefill_attention_triton(q, kc, vc, m, block_m=32)
    tol = 2e-2 if DTYPE == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_torch_reference_is_causal_attention_over_the_context():
    """The reference itself, against attention written out for one chunk (the queries are the context's last n)."""
    rng = random.Random(1)
    K, H, E, S, n, L = 2, 4, 8, 64, 3, 10
    kc, vc = torch.randn(K, S, E, dtype=torch.float64), torch.randn(K, S, E, dtype=torch.float64)
    m = _chunks([(n, L)], S, H // K, 16, rng)
    m = PrefillChunks(*(x.cpu() for x in (m.q_start, m.q_len, m.ctx_len, m.k_start, m.k_slots, m.tile_chunk,
                                          m.tile_row)), m.host)
    q = torch.randn(n, H, E, dtype=torch.float64)
    got = prefill_attention_torch(q, kc, vc, m)
    slots = m.k_slots
    for i in range(n):
        for h in range(H):
            keys = slots[:L - n + i + 1]
            w = (kc[h // (H // K), keys] @ q[i, h] / E ** 0.5).softmax(0)
            torch.testing.assert_close(got[i, h], w @ vc[h // (H // K), keys])


def test_engine_on_the_kernels_equals_the_torch_paths(llama_pair):
    """Prefill kernel vs packed SDPA, decode kernel (own rows, and shared-prefix groups with padded member slots)
    vs the torch reference: the same greedy tokens."""
    _, model, _ = llama_pair
    model = model.to(DEVICE)
    rng = random.Random(0)
    head = [rng.randrange(3, 300) for _ in range(40)]  # a shared prefix: chunks over prefix + own blocks
    prompts = [head + [rng.randrange(3, 300) for _ in range(rng.randint(3, 50))] for _ in range(6)]
    prompts += [[rng.randrange(3, 300) for _ in range(rng.randint(5, 90))] for _ in range(4)]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    # num_blocks: two engines live at once (the first one's cache would eat the second one's memory budget)
    cfg = EngineConfig(num_blocks=256, max_batch_tokens=64, cuda_graphs=False, compile=False)
    base = Engine(model, None, cfg)
    base.runner.paged_attention.prefill_triton = False
    want = [c.output_ids for c in base.generate(prompts, params)]
    engine = Engine(model, None, cfg)
    kernels = engine.runner.paged_attention
    kernels.prefill_triton = kernels.use_triton = True  # decode rows and cascade groups (q_lens) on Triton too
    got = [c.output_ids for c in engine.generate(prompts, params)]
    assert kernels.prefill_verified and kernels.prefill_triton and kernels.verified and kernels.use_triton
    assert engine.stats.prefill_tokens > 0 and got == want
