"""MoE: HF parity (Mixtral, Qwen2-MoE) both ways, grouped vs loop experts, the balance loss at three
granularities against hand computations and the two-rank oracle, capacity, counting."""

import pytest
import torch
import torch.nn.functional as F

from batchpilot.model import counting
from batchpilot.model.llama import LlamaConfig, build_model, count_params, get_preset
from batchpilot.model.moe import (
    BalanceAccumulator,
    Experts,
    LayerRouting,
    RoutingRecord,
    balance_loss,
    capacity_mask,
    routing_metrics,
    z_loss,
)

from batchpilot.model.hf import load_model, read_config, save_model

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, rms_norm_eps=1e-6)
HF_CASES = {
    "mixtral": ("mixtral", dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                                tie_word_embeddings=False)),
    "qwen2moe-shared-dense-layer": ("qwen2_moe", dict(intermediate_size=96, num_experts=6, num_experts_per_tok=2,
                                                      moe_intermediate_size=32, shared_expert_intermediate_size=80,
                                                      mlp_only_layers=[1], tie_word_embeddings=True)),
    "qwen2moe-norm-topk-sparse-step": ("qwen2_moe", dict(intermediate_size=96, num_experts=4, num_experts_per_tok=3,
                                                         moe_intermediate_size=40, norm_topk_prob=True,
                                                         shared_expert_intermediate_size=64, decoder_sparse_step=2,
                                                         tie_word_embeddings=False)),
}


@pytest.fixture
def transformers():
    """Imported per test, not per module: the spawned gloo ranks below import this module too."""
    return pytest.importorskip("transformers")


def hf_model(transformers, family: str, overrides: dict):
    if family == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**COMMON, **overrides))
    else:
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**COMMON, **overrides))
    with torch.no_grad():  # non-zero biases and a router sharp enough that top-k choices differ per token
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
            elif name.endswith("gate.weight"):
                p.normal_(std=0.5)
    return model.eval()


@pytest.mark.parametrize("case", HF_CASES)
def test_load_hf_moe_matches_logits(case, tmp_path, transformers):
    torch.manual_seed(0)
    hf = hf_model(transformers, *HF_CASES[case])
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    assert ours.config.architecture == HF_CASES[case][0] and ours.config.num_experts > 0
    assert count_params(ours) == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", HF_CASES)
def test_save_moe_then_transformers_loads(case, tmp_path, transformers):
    torch.manual_seed(1)
    hf = hf_model(transformers, *HF_CASES[case])
    hf.save_pretrained(tmp_path / "src")
    ours = load_model(tmp_path / "src").eval()
    save_model(ours, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)
    ids = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        assert (back(ids).logits - ours(ids)).abs().max().item() <= 1e-4
    assert read_config(tmp_path / "out") == ours.config


def test_preset_round_trips_through_transformers(tmp_path, transformers):
    ours = build_model(get_preset("tiny-moe"), seed=0).eval()
    save_model(ours, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 4096, (1, 12))
    with torch.no_grad():
        assert (back(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_dense_layer_pattern():
    cfg = get_preset("tiny-moe").with_(num_layers=6, mlp_only_layers=(0,), decoder_sparse_step=2)
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        get_preset("tiny-moe").with_(num_experts_per_tok=9)
    with pytest.raises(ValueError, match="moe_impl"):
        get_preset("tiny-moe").with_(moe_impl="fast")


# --- experts: grouped GEMM path vs the per-expert loop --------------------------------------------------------


def experts_and_routing(num_tokens=37, num_experts=5, top_k=2, dim=16, inter=24):
    g = torch.Generator().manual_seed(0)
    experts = Experts(dim, inter, num_experts, "loop")
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g) * 0.2)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g) * 0.2)
    x = torch.randn(num_tokens, dim, generator=g)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    logits[:, 3] = -1e4  # expert 3 gets no token: an empty group
    top_w, top_idx = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return experts, x, top_idx, top_w


def naive_moe(experts, x, top_idx, top_w):
    """Token by token, k by k: the definition."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(top_idx.shape[1]):
            e = top_idx[t, k]
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            out[t] += top_w[t, k] * (experts.down_proj[e] @ (F.silu(gate) * up))
    return out


def test_loop_experts_match_naive_definition():
    experts, x, idx, w = experts_and_routing()
    with torch.no_grad():
        torch.testing.assert_close(experts.forward_loop(x, idx, w), naive_moe(experts, x, idx, w),
                                   rtol=1e-5, atol=1e-6)


def test_grouped_experts_match_loop_on_cpu():
    """The sort-by-expert permutation and both grouped GEMMs (fp32 on CPU, forward; backward runs on CUDA)."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    experts, x, idx, w = experts_and_routing()
    with torch.no_grad():
        try:
            grouped = experts.forward_grouped(x, idx, w)
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"_grouped_mm not available on CPU here: {e}")
        torch.testing.assert_close(grouped, experts.forward_loop(x, idx, w), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_grouped_experts_match_loop_on_cuda_bf16_with_grads():
    """Against the loop at the same precision (bf16 autocast: only the summation order and the rounding of the
    top-k weights differ), and within bf16's error of the fp32 loop, relative to the output's scale (outputs of
    ~10 cancel to ~0 in places, where an absolute tolerance of bf16 error does not hold)."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    experts, x, idx, w = experts_and_routing(num_tokens=512, num_experts=8, dim=128, inter=256)
    experts = experts.cuda()
    x, idx, w = x.cuda().requires_grad_(), idx.cuda(), w.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        grouped = experts.forward_grouped(x, idx, w)
        loop = experts.forward_loop(x, idx, w)
    (g_x,) = torch.autograd.grad(grouped.float().sum(), x)
    (l_x,) = torch.autograd.grad(loop.float().sum(), x)
    scale, grad_scale = loop.float().abs().max().item(), l_x.abs().max().item()
    torch.testing.assert_close(grouped.float(), loop.float(), rtol=0, atol=1e-2 * scale)
    torch.testing.assert_close(g_x.float(), l_x.float(), rtol=0, atol=1e-2 * grad_scale)
    ref = experts.forward_loop(x, idx, w)  # fp32
    (r_x,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(grouped.float(), ref, rtol=0, atol=2e-2 * scale)
    torch.testing.assert_close(g_x.float(), r_x, rtol=0, atol=2e-2 * grad_scale)


def test_capacity_mask_drops_late_slots():
    top_idx = torch.tensor([[0], [0], [0], [1]])  # 4 tokens, K=1, E=2: capacity ceil(1.0 * 4 / 2) = 2
    assert capacity_mask(top_idx, 2, 1.0).view(-1).tolist() == [True, True, False, True]


def test_capacity_factor_counts_dropped_tokens():
    model = build_model(get_preset("tiny-moe").with_(moe_capacity_factor=0.5), seed=0)
    record = RoutingRecord()
    model(torch.randint(0, 4096, (2, 32)), routing=record)
    metrics = routing_metrics(record, 8)
    assert metrics["dropped_slots"] > 0  # half the slots fit at most


# --- the load-balancing loss ----------------------------------------------------------------------------------


def routing(counts, prob_sums, tokens_per_seq):
    counts, prob_sums = torch.tensor(counts, dtype=torch.float32), torch.tensor(prob_sums, dtype=torch.float32)
    return LayerRouting(counts=counts, prob_sums=prob_sums, tokens_per_seq=tokens_per_seq,
                        z_sum=torch.zeros(()), dropped=torch.zeros(()))


def record_of(*layers):
    return RoutingRecord(by_layer=dict(enumerate(layers)))


# The two-rank oracle (E = 4, K = 1): rank 0 routes its 4 tokens to expert 0, rank 1 its 4 tokens to expert 1.
RANK0 = routing([[4, 0, 0, 0]], [[2.8, 0.4, 0.4, 0.4]], 4)  # mean probabilities [0.7, 0.1, 0.1, 0.1]
RANK1 = routing([[0, 4, 0, 0]], [[0.4, 2.8, 0.4, 0.4]], 4)


def test_micro_batch_lbl_is_2_8_on_each_rank():
    for r in (RANK0, RANK1):
        assert BalanceAccumulator("micro", 4).loss(record_of(r)).item() == pytest.approx(2.8)


def test_global_lbl_is_1_6_on_each_rank():
    """f from the counts summed over both ranks ([0.5, 0.5, 0, 0]): 4 (0.5 0.7 + 0.5 0.1) = 1.6."""
    for mine, other in ((RANK0, RANK1), (RANK1, RANK0)):
        acc = BalanceAccumulator("global", 4, all_reduce=lambda c, o=other: c + o.counts.sum(0))
        assert acc.loss(record_of(mine)).item() == pytest.approx(1.6)


def test_balanced_routing_gives_one():
    r = routing([[2, 2, 2, 2]], [[2.0, 2.0, 2.0, 2.0]], 8)
    for g in ("micro", "global", "sequence"):
        assert BalanceAccumulator(g, 4).loss(record_of(r)).item() == pytest.approx(1.0)


def test_sequence_level_by_hand():
    """Two sequences of 2 tokens, E = 2, K = 1: seq 0 -> both to e0 (p [0.6, 0.4]), seq 1 -> one each (p [.5, .5])."""
    r = routing([[2, 0], [1, 1]], [[1.2, 0.8], [1.0, 1.0]], 2)
    seq0, seq1 = 2 * (1.0 * 0.6), 2 * (0.5 * 0.5 + 0.5 * 0.5)
    assert BalanceAccumulator("sequence", 2).loss(record_of(r)).item() == pytest.approx((seq0 + seq1) / 2)
    micro = 2 * (0.75 * (2.2 / 4) + 0.25 * (1.8 / 4))  # f = [3/4, 1/4], P = [0.55, 0.45]
    assert BalanceAccumulator("micro", 2).loss(record_of(r)).item() == pytest.approx(micro)


def test_global_buffer_accumulates_over_micro_batches_and_resets():
    acc = BalanceAccumulator("global", 4)
    first = acc.loss(record_of(RANK0))  # buffer = rank-0 counts: the micro-batch value
    second = acc.loss(record_of(RANK1))  # buffer = both: f = [0.5, 0.5, 0, 0], P of micro-batch 2
    assert first.item() == pytest.approx(2.8) and second.item() == pytest.approx(1.6)
    acc.step()
    assert acc.loss(record_of(RANK1)).item() == pytest.approx(2.8)


def test_lbl_averages_over_layers():
    assert BalanceAccumulator("micro", 4).loss(record_of(RANK0, RANK1)).item() == pytest.approx(2.8)


def test_balance_loss_gradient_flows_through_probabilities_only():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]], requires_grad=True)
    counts = torch.tensor([[4.0, 0, 0, 0]], requires_grad=True)
    balance_loss(counts, probs * 4, 4, 4).backward()
    assert counts.grad is None or counts.grad.abs().max() == 0
    torch.testing.assert_close(probs.grad, torch.tensor([[4.0, 0, 0, 0]]))


def moe_batch():
    model = build_model(get_preset("tiny-moe").with_(num_layers=2, mlp_only_layers=()), seed=3)
    ids = torch.randint(0, 4096, (4, 16), generator=torch.Generator().manual_seed(0))
    return model, ids


def test_global_lbl_over_two_simulated_ranks_equals_single_process():
    """Ranks hold halves of the batch; the mean of their global LBLs (what DDP's gradient mean sees) equals
    the LBL of one process over all tokens, value and gradient."""
    model, ids = moe_batch()
    whole = RoutingRecord()
    model(ids, targets=ids, routing=whole)
    single = BalanceAccumulator("micro", 8).loss(whole)  # one process, one micro-batch: f over all tokens
    (g_single,) = torch.autograd.grad(single, model.layers[0].mlp.gate.weight)

    halves = [RoutingRecord(), RoutingRecord()]
    for rec, part in zip(halves, ids.chunk(2)):
        model(part, targets=part, routing=rec)

    def all_reduce_for(layer_order):  # sums this rank's counts with the other rank's, layer by layer
        others = iter(layer_order)
        return lambda c: c + next(others)

    losses = []
    for r in range(2):
        other = halves[1 - r]
        acc = BalanceAccumulator("global", 8, all_reduce=all_reduce_for([x.counts.sum(0) for x in other.layers()]))
        losses.append(acc.loss(halves[r]))
    mean = (losses[0] + losses[1]) / 2
    (g_mean,) = torch.autograd.grad(mean, model.layers[0].mlp.gate.weight)
    torch.testing.assert_close(mean, single, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_mean, g_single, rtol=1e-4, atol=1e-7)


def test_model_routing_record_matches_router():
    model, ids = moe_batch()
    record = RoutingRecord()
    logits = model(ids, routing=record)
    assert logits.shape == (4, 16, 4096) and sorted(record.by_layer) == [0, 1]
    for r in record.layers():
        assert r.counts.shape == (4, 8) and r.counts.sum().item() == 4 * 16 * 2  # K = 2 slots per token
        torch.testing.assert_close(r.prob_sums.sum(-1), torch.full((4,), 16.0))
    assert z_loss(record.layers()).item() > 0
    metrics = routing_metrics(record, 8)
    assert metrics["max_load"] >= 1.0 >= metrics["min_load"] and metrics["dropped_slots"] == 0


def test_z_loss_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])  # one sequence, two tokens
    lse = torch.logsumexp(logits, -1)
    r = LayerRouting(counts=torch.zeros(1, 2), prob_sums=torch.zeros(1, 2), tokens_per_seq=2,
                     z_sum=lse.pow(2).sum(), dropped=torch.zeros(()))
    assert z_loss([r]).item() == pytest.approx(((lse ** 2).mean()).item())


def test_unknown_granularity_names_the_flag():
    with pytest.raises(ValueError, match="--moe.balance"):
        BalanceAccumulator("batch", 4)


def test_dense_model_unchanged_by_moe_fields():
    """A dense config ignores every MoE field: the same parameters and logits as before."""
    ids = torch.randint(0, 4096, (1, 8))
    a = build_model(get_preset("tiny"), seed=0)
    b = build_model(get_preset("tiny").with_(num_experts_per_tok=1, router_z_loss_coef=1.0), seed=0)
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


# --- counting -------------------------------------------------------------------------------------------------


def test_counting_total_matches_module_and_activated_by_hand():
    cfg = get_preset("tiny-moe")
    assert counting.total_params(cfg) == count_params(build_model(cfg))
    d, layers = cfg.hidden_size, cfg.num_layers
    attention = d * d + 2 * d * (cfg.num_kv_heads * cfg.head_dim) + d * d + d + 2 * cfg.num_kv_heads * cfg.head_dim
    shared = 3 * d * cfg.shared_expert_intermediate_size + d
    moe_active = 2 * 3 * d * cfg.moe_intermediate_size + d * 8 + shared
    dense = 3 * d * cfg.intermediate_size
    assert counting.activated_non_vocab_params(cfg) == layers * attention + dense + (layers - 1) * moe_active
    assert counting.matmul_params(cfg) == counting.activated_non_vocab_params(cfg) + cfg.vocab_size * d


def test_gpu_preset_is_about_1b_total_quarter_active():
    cfg = get_preset("moe-1b")
    assert 0.95e9 < counting.non_vocab_params(cfg) < 1.15e9
    assert 0.22e9 < counting.activated_non_vocab_params(cfg) < 0.28e9


def test_dense_counts_unchanged():
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=4)
    assert counting.non_vocab_params(cfg) == counting.activated_non_vocab_params(cfg) == 2 * (4 * 32 * 32 + 3 * 32 * 64)


# --- two real gloo ranks -------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, port: int, out: str) -> None:
    """One rank: its half of the batch, global LBL with a real all-reduce, the router gradient averaged."""
    import os
    import sys

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, ids = moe_batch()
        record = RoutingRecord()
        model(ids.chunk(2)[rank], routing=record)

        def all_reduce(counts: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(counts)
            return counts

        loss = BalanceAccumulator("global", 8, all_reduce=all_reduce).loss(record)
        (grad,) = torch.autograd.grad(loss, model.layers[0].mlp.gate.weight)
        both = torch.stack([loss.detach(), torch.zeros(())])
        dist.all_reduce(both)
        dist.all_reduce(grad)
        if rank == 0:
            torch.save({"loss": both[0] / 2, "grad": grad / 2}, out)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter finalization (gloo worker threads can abort it; pytorch/pytorch#179291)


def test_global_lbl_on_two_gloo_ranks_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    ctx, port, out = mp.get_context("spawn"), _free_port(), str(tmp_path / "rank0.pt")
    procs = [ctx.Process(target=_gloo_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive and [p.exitcode for p in procs] == [0, 0]
    model, ids = moe_batch()
    record = RoutingRecord()
    model(ids, routing=record)
    single = BalanceAccumulator("micro", 8).loss(record)
    (g_single,) = torch.autograd.grad(single, model.layers[0].mlp.gate.weight)
    got = torch.load(out)
    torch.testing.assert_close(got["loss"], single.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["grad"], g_single, rtol=1e-4, atol=1e-7)


def test_grouped_model_matches_loop_model_on_cpu():
    """The whole model with grouped experts (fp32 forward on CPU) equals the per-expert loop model."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    loop = build_model(get_preset("tiny-moe").with_(moe_impl="loop"), seed=0).eval()
    grouped = build_model(get_preset("tiny-moe").with_(moe_impl="grouped"), seed=0).eval()
    ids = torch.randint(0, 4096, (2, 16))
    with torch.no_grad():
        try:
            got = grouped(ids)
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"_grouped_mm not available on CPU here: {e}")
        torch.testing.assert_close(got, loop(ids), rtol=1e-5, atol=1e-5)


def test_compiled_moe_blocks_share_one_graph():
    """Every compiled MoE block runs one graph: a block that keyed the routing record by its layer index was
    specialised per layer, and past dynamo's recompile limit (8) the remaining blocks ran eagerly."""
    from torch._dynamo.utils import counters

    config = get_preset("tiny-moe").with_(num_layers=10, mlp_only_layers=(), moe_impl="grouped")
    model = build_model(config, seed=0).to(torch.bfloat16)  # grouped GEMMs take bf16
    for layer in model.layers:
        layer.compile()
    torch._dynamo.reset()
    counters.clear()
    record = RoutingRecord()
    with torch.no_grad():
        model(torch.randint(0, 4096, (2, 16)), routing=record)
    assert sorted(record.by_layer) == list(range(10))
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_dispatch_and_combine_rows_gradients_match_autograd_of_plain_indexing():
    """The grouped path's gather-only permutations (moe.DispatchRows, moe.CombineRows) against autograd through
    index_select / index_add on the same permutation, in float64."""
    from batchpilot.model.moe import CombineRows, DispatchRows

    g = torch.Generator().manual_seed(0)
    n, k, d, e = 7, 3, 5, 4
    top_idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])  # (N, K) distinct experts
    order = torch.argsort(top_idx.reshape(-1), stable=True)
    pos = torch.empty_like(order).scatter_(0, order, torch.arange(n * k)).view(n, k)
    x = torch.randn(n, d, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(n * k, d, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(n, k, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: DispatchRows.apply(a, order // k, pos), (x,))
    assert torch.autograd.gradcheck(lambda a, b: CombineRows.apply(a, b, pos, order), (y, w))
    plain_xs = x.index_select(0, order // k)
    torch.testing.assert_close(DispatchRows.apply(x, order // k, pos), plain_xs)
    plain_out = torch.zeros(n, d, dtype=torch.float64).index_add(0, order // k,
                                                                 y * w.reshape(-1).index_select(0, order)[:, None])
    torch.testing.assert_close(CombineRows.apply(y, w, pos, order), plain_out)
