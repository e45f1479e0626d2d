"""LoRA through PEFT on our model: fine-tuning equals PEFT's own wrapping of the transformers model (same
weights, same adapter init, same data and optimizer), and the merged export equals the unmerged model."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from batchpilot import load_model, save_model  # noqa: E402
from batchpilot.train.lora import LoraConfig, apply_lora, has_lora, merge_lora  # noqa: E402

VOCAB = 128
LORA = LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"), seed=3)


def hf_model(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    cls, cfg = ((transformers.LlamaForCausalLM, transformers.LlamaConfig) if arch == "llama"
                else (transformers.Qwen2ForCausalLM, transformers.Qwen2Config))
    torch.manual_seed(0)
    return cls(cfg(**common)).float()


def data(steps: int):
    """The same two rows every step (memorised quickly, so the losses move visibly)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, 2, 17), generator=g).expand(steps, 2, 17)
    targets = ids[:, :, 1:].clone()
    targets[:, :, :5] = -100  # a masked prompt, as in chat data
    return ids[:, :, :-1], targets


def train(model, loss_fn, steps=6):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    losses = []
    for inputs, targets in zip(*data(steps)):
        loss = loss_fn(model, inputs, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def hf_loss(model, inputs, targets):
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def our_loss(model, inputs, targets):
    return model(inputs, targets=targets)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_finetune_equals_peft_on_transformers(arch, tmp_path):
    hf = hf_model(arch)
    hf.save_pretrained(tmp_path / "base")
    ours = apply_lora(load_model(tmp_path / "base").float(), LORA)
    torch.manual_seed(LORA.seed)  # PEFT's own wrapping, with the same seed for the A matrices' init
    hf_peft = peft.get_peft_model(hf, peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=0.0,
                                                      target_modules=list(LORA.target_modules)))
    ours_lora = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    theirs_lora = {n.removeprefix("base_model.model.model."): p for n, p in hf_peft.named_parameters()
                   if p.requires_grad}
    assert ours_lora.keys() == theirs_lora.keys() and len(ours_lora) == 2 * 2 * len(LORA.target_modules)
    for name, p in ours_lora.items():  # same init: the same seed draws the same A matrices in the same order
        assert torch.equal(p, theirs_lora[name]), name

    expected = train(hf_peft, hf_loss)
    got = train(ours, our_loss)
    assert expected[-1] < expected[0] - 0.05  # it learned something
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-4, rtol=1e-4)
    for name, p in ours_lora.items():
        torch.testing.assert_close(p, theirs_lora[name], atol=1e-4, rtol=1e-3, msg=name)


def test_merged_export_equals_unmerged_logits(tmp_path):
    hf_model("llama").save_pretrained(tmp_path / "base")
    model = apply_lora(load_model(tmp_path / "base").float(), LORA)
    train(model, our_loss, steps=3)  # B is non-zero after training: the adapters change the output
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = model(ids)
        base = load_model(tmp_path / "base").float()(ids)
    assert (unmerged - base).abs().max() > 1e-3
    merged = merge_lora(model)
    assert not has_lora(merged) and not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), unmerged, atol=1e-5, rtol=1e-5)
    save_model(merged, tmp_path / "merged")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="target-modules"):
        LoraConfig(target_modules=("lm_head",))


def _fsdp_lora_steps(model, batches, rank: int, world_size: int) -> list[float]:
    """AdamW steps on the adapters; each rank takes its contiguous share of every batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    out = []
    for inputs, targets in batches:
        per_rank = len(inputs) // world_size
        lo, hi = rank * per_rank, (rank + 1) * per_rank
        loss = model(inputs[lo:hi], targets=targets[lo:hi])
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.detach())
    return out


def _tiny_lora_model():
    from batchpilot.model.llama import LlamaConfig, build_model

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, tie_word_embeddings=True)
    return apply_lora(build_model(config, seed=0), LORA)


def _fsdp_worker(out_file: str) -> None:
    import torch.distributed as dist

    from batchpilot.train import parallel

    dims = parallel.init_distributed("cpu")
    model = _tiny_lora_model()
    parallel.apply_fsdp(model, dims, param_dtype=None)
    inputs, targets = data(4)
    losses = _fsdp_lora_steps(model, list(zip(inputs, targets)), dims.rank, dims.world_size)
    mean = torch.stack(losses)
    dist.all_reduce(mean)
    if dims.rank == 0:
        with open(out_file, "w") as f:
            f.write(" ".join(str(x) for x in (mean / dims.world_size).tolist()))


def test_fsdp2_lora_on_two_ranks_matches_one_process(tmp_path):
    from tests.train.test_parallel import run_ranks

    run_ranks(_fsdp_worker, str(tmp_path / "losses.txt"))
    got = [float(x) for x in (tmp_path / "losses.txt").read_text().split()]
    inputs, targets = data(4)
    model = _tiny_lora_model()
    expected = []
    for step, (x, y) in enumerate(zip(inputs, targets)):  # the mean of the two halves' losses, one process
        params = [p for p in model.parameters() if p.requires_grad]
        if step == 0:
            opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        halves = [model(x[:1], targets=y[:1]), model(x[1:], targets=y[1:])]
        loss = (halves[0] + halves[1]) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        expected.append(loss.item())
    assert expected[-1] < expected[0]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=1e-5)
