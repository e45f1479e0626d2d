"""LoRA on compiled blocks (issue 21): one graph for all blocks, and our lean LoRA forward equals PEFT's.

The graph counts use dynamo with a counting backend in front of ``aot_eager`` (no Inductor: the guard on
``requires_grad`` that made block 0 compile apart is dynamo's, so the count is the same; the test stays fast)."""

import pytest
import torch

peft = pytest.importorskip("peft")

from batchpilot.model.llama import LlamaConfig, build_model  # noqa: E402
from batchpilot.train.lora import LoraConfig, apply_lora, lora_linear_class, merge_lora  # noqa: E402

VOCAB = 64
LORA = LoraConfig(rank=4, alpha=8.0, seed=3)


def tiny_model(num_layers: int = 3):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=num_layers, num_heads=4,
                         num_kv_heads=2, tie_word_embeddings=True)
    return build_model(config, seed=0)


def nonzero_adapters(model) -> None:
    """B starts at zero (the adapted model starts as the base); give it values so the adapters matter."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def compile_blocks(model) -> list[int]:
    """Compile each block as ``parallel.apply_compile`` does; returns a list that grows by one per graph."""
    graphs: list[int] = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    for block in model.layers:
        block.compile(backend=counting)
    return graphs


def loss_and_grads(model, steps: int = 1):
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def peft_only(model):
    """LoRA as PEFT injects it, without our forward or input hook (the path before the fix)."""
    torch.manual_seed(LORA.seed)
    peft.inject_adapter_in_model(peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha,
                                                 target_modules=list(LORA.target_modules)), model)
    return model


def test_lora_blocks_compile_once_and_match_eager():
    model = apply_lora(tiny_model(), LORA)
    nonzero_adapters(model)
    eager_loss, eager_grads = loss_and_grads(model)
    graphs = compile_blocks(model)
    loss, grads = loss_and_grads(model, steps=2)
    assert len(graphs) == 1  # three blocks, one graph: block 0's input requires grad as the others' do
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_peft_alone_compiles_block_zero_apart():
    """The reason for the hook: with PEFT's injection alone, the frozen embedding's output does not require grad,
    dynamo's guard on it fails for block 1, and the blocks compile twice."""
    model = peft_only(tiny_model())
    graphs = compile_blocks(model)
    loss_and_grads(model)
    assert len(graphs) == 2


def test_full_finetuning_compiles_once():
    model = tiny_model()
    graphs = compile_blocks(model)
    loss_and_grads(model)
    assert len(graphs) == 1


def test_model_with_our_forward_equals_peft_model():
    """Whole model, fp32: loss and every adapter gradient of apply_lora equal PEFT's injection alone."""
    ours, theirs = apply_lora(tiny_model(), LORA), peft_only(tiny_model())
    nonzero_adapters(ours)
    nonzero_adapters(theirs)
    assert all(type(m) is peft.tuners.lora.Linear for m in theirs.modules() if isinstance(m, peft.tuners.lora.Linear))
    assert dict(ours.named_parameters()).keys() == dict(theirs.named_parameters()).keys()
    loss, grads = loss_and_grads(ours)
    expected_loss, expected_grads = loss_and_grads(theirs)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    assert grads.keys() == expected_grads.keys() and len(grads) == 3 * 2 * len(LORA.target_modules)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def adapted_linear(dropout: float = 0.0):
    """One LoraLinear on a 16 -> 24 layer with non-zero A and B."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(16, 24))
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0"]),
                                 layer)
    module = layer[0]
    module.__class__ = lora_linear_class()
    with torch.no_grad():
        module.lora_B["default"].weight.normal_(0, 0.1)
    return module


def forward_and_grads(module, forward, x, seed: int = 0):
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same dropout mask for both forwards
        out = forward(module, x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    adapters = {n: p.grad.clone() for n, p in module.named_parameters() if "lora_" in n}
    return out.detach(), x.grad, adapters


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_lean_forward_equals_peft_forward(dropout):
    """fp32: values, the input gradient and the A/B gradients of our forward equal PEFT's ``lora.Linear.forward``."""
    module = adapted_linear(dropout)
    module.train()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    got = forward_and_grads(module, type(module).forward, x)
    expected = forward_and_grads(module, peft.tuners.lora.Linear.forward, x)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-7)
    assert got[2].keys() == expected[2].keys() and len(got[2]) == 2
    for name, g in got[2].items():
        torch.testing.assert_close(g, expected[2][name], rtol=1e-6, atol=1e-7, msg=name)


def test_lean_forward_under_autocast_equals_peft_forward():
    """bf16 autocast over fp32 adapters, bf16 input: skipping PEFT's cast of x to fp32 changes no bit (autocast
    casts it back to bf16 for the matmul)."""
    module = adapted_linear()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2)).bfloat16()

    def autocast(forward):
        def run(m, inp):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return forward(m, inp)
        return run

    got = forward_and_grads(module, autocast(type(module).forward), x)
    expected = forward_and_grads(module, autocast(peft.tuners.lora.Linear.forward), x)
    assert got[0].dtype == expected[0].dtype == torch.bfloat16
    for a, b in [(got[0], expected[0]), (got[1], expected[1]), *zip(got[2].values(), expected[2].values())]:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_other_states_take_peft_forward():
    """Disabled or merged adapters, and a dtype PEFT would cast, go through PEFT's own forward."""
    module = adapted_linear()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = module.base_layer(x)
        adapted = module(x)
        assert (adapted - base).abs().max() > 1e-3
        module.enable_adapters(False)
        torch.testing.assert_close(module(x), base, rtol=0, atol=0)
        module.enable_adapters(True)
        module.merge()
        torch.testing.assert_close(module(x), adapted, rtol=1e-5, atol=1e-6)
        module.unmerge()
        module.to(torch.float64)
        module.lora_A["default"].float()  # adapters in another dtype than the input: PEFT casts
        module.lora_B["default"].float()
        out = module(x.double())
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, adapted.double(), rtol=1e-5, atol=1e-6)


def test_input_hook_only_under_autograd_and_removed_by_merge():
    model = apply_lora(tiny_model(num_layers=1), LORA)
    ids = torch.zeros(1, 4, dtype=torch.long)
    assert model.embed_tokens(ids).requires_grad
    with torch.no_grad():
        assert not model.embed_tokens(ids).requires_grad
    with torch.inference_mode():
        assert not model.embed_tokens(ids).requires_grad
    merge_lora(model)
    model.embed_tokens.weight.requires_grad_(False)
    assert not model.embed_tokens(ids).requires_grad  # the hook is gone with the adapters


def test_adapted_model_pickles():
    """``LoraLinear`` is defined on first use but resolves by name, so a whole adapted model pickles."""
    import io

    model = apply_lora(tiny_model(num_layers=1), LORA)
    nonzero_adapters(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=False)
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)
    assert type(back.layers[0].self_attn.q_proj) is lora_linear_class()
