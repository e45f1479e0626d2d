"""Fine-tuning through the trainer: token-weighted accumulation (the per-token mean on masked chat data),
`train --recipe sft` on raw chat JSONL end to end (masked, exported with its chat template, loaded by
transformers, answered by `batchpilot generate`), the tokenizer check, and LoRA runs equal to a naive loop."""

import json
import random

import pytest
from sft_fixtures import CHATML, WORDS, tiny_chat_model
import torch

from batchpilot.data.packing import PackedLoader
from batchpilot.data.prepare import PrepareConfig, prepare
from batchpilot.data.tokenizer import Tokenizer
from batchpilot.model.hf import load_model
from batchpilot.model.llama import LlamaConfig, build_model
from batchpilot.train import parallel
from batchpilot.train.config import TrainConfig
from batchpilot.train.trainer import accumulate_gradients, train

SEQ_LEN = 64


def conversations(num: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    out = []
    for _ in range(num):
        messages = []
        for _ in range(rng.randint(1, 2)):
            messages += [{"role": "user", "content": words(2, 8) + "?"}, {"role": "assistant", "content": "yes."}]
        out.append({"messages": messages})
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny HF model directory: random Llama weights, a BPE with ChatML special tokens and a chat template."""
    return tiny_chat_model(tmp_path_factory.mktemp("hf_model"), conversations(80, seed=1), num_layers=2,
                           num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def chat_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in conversations(120, seed=2)))
    return path


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, model_dir, chat_jsonl):
    out = tmp_path_factory.mktemp("prepared") / "ds"
    return prepare(PrepareConfig(sources=[str(chat_jsonl)], out_dir=str(out), tokenizer=str(model_dir),
                                 format="chat", val_fraction=0.1))


@pytest.mark.parametrize("pack", ["chunk", "conversation"])
def test_peeked_target_counts_are_the_batches_and_do_not_advance(chat_data, pack):
    loader = PackedLoader(chat_data, "train", SEQ_LEN, seed=0, pack=pack)
    for _ in range(3):
        state = loader.state_dict()
        counts = loader.peek_target_counts(6)
        assert loader.state_dict() == state
        batch = loader.take(6)
        assert counts.tolist() == (batch.targets != -100).sum(dim=1).tolist()
        assert 0 < counts.sum() < 6 * SEQ_LEN  # masked: some targets are prompt tokens


def test_token_weighted_accumulation_is_the_per_token_mean(chat_data):
    """Micro-batches of one row accumulate exactly the loss and gradients of one pass over all the rows."""
    config = LlamaConfig(vocab_size=Tokenizer.from_path(chat_data).vocab_size, hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2)
    model = build_model(config, seed=0).float()
    dims = parallel.ParallelDims(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    results = []
    for micro in (8, 1):
        model.zero_grad(set_to_none=True)
        loader = PackedLoader(chat_data, "train", SEQ_LEN, seed=0, pack="conversation")
        loss, _ = accumulate_gradients(model, loader, global_batch_tokens=8 * SEQ_LEN, seq_len=SEQ_LEN,
                                       micro_batch_size=micro, dims=dims)
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (full_loss, full_grads), (acc_loss, acc_grads) = results
    torch.testing.assert_close(acc_loss, full_loss, atol=1e-6, rtol=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(acc_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    # row weighting (the old rule) would differ: rows hold different numbers of assistant tokens
    loader = PackedLoader(chat_data, "train", SEQ_LEN, seed=0, pack="conversation")
    counts = loader.peek_target_counts(8)
    assert len(set(counts.tolist())) > 1


def sft_config(out, model_dir, data, **extra) -> TrainConfig:
    tree = {"out_dir": str(out), "model": {"name": str(model_dir)}, "data": {"path": str(data), "seq_len": SEQ_LEN},
            "recipe": {"name": "sft"}, "batch": {"global_batch_tokens": 4 * SEQ_LEN, "micro_batch_size": 2},
            "schedule": {"max_steps": 30}, "optim": {"lr": 3e-3},  # a tiny random model: a visible drop in 30 steps
            "logging": {"progress": False, "eval_every": 0, "eval_batches": 1}, "checkpoint": {"save_every": 100}}
    for dotted, value in extra.items():
        component, _, name = dotted.partition("__")
        tree.setdefault(component, {})[name] = value
    return TrainConfig.from_dict(tree)


def test_recipe_defaults_yield_to_flags(tmp_path, model_dir, chat_jsonl):
    cfg = sft_config(tmp_path / "run", model_dir, chat_jsonl)
    assert (cfg.schedule.name, cfg.optim.weight_decay, cfg.data.format) == ("constant", 0.0, "chat")
    assert cfg.optim.lr == 3e-3  # given, so it wins over the recipe's 2e-5
    assert cfg.schedule.warmup_tokens == min(25 * 4 * SEQ_LEN, 30 * 4 * SEQ_LEN // 20)
    plain = TrainConfig.from_dict({"out_dir": str(tmp_path), "schedule": {"max_steps": 1}})
    assert plain.schedule.name != "constant" or plain.optim.weight_decay != 0.0  # no recipe: nothing changes


def test_sft_run_end_to_end(tmp_path, model_dir, chat_jsonl):
    transformers = pytest.importorskip("transformers")
    from batchpilot.cli import main

    result = train(sft_config(tmp_path / "run", model_dir, chat_jsonl))
    run_dir = tmp_path / "run"
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0] - 0.5, losses
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["data"]["pack"] == "auto" and saved["schedule"]["name"] == "constant"
    meta = json.loads((run_dir / "data" / "meta.json").read_text())
    assert meta["format"] == "chat" and meta["loss_on"] == "assistant"
    assert 0 < meta["loss_tokens"]["train"] < meta["tokens"]["train"] / 2  # assistant turns only

    exported = run_dir / "model"
    assert Tokenizer.from_path(exported).chat_template == CHATML
    ours = load_model(exported).float().eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported).float().eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)

    job = tmp_path / "job.jsonl"
    job.write_text(json.dumps({"custom_id": "q", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"messages": [{"role": "user", "content": "the quick fox?"}],
                                        "max_tokens": 4}}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(exported), "--input", str(job), "--output", str(out),
                 "--no-progress"]) == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert record["response"]["status_code"] == 200
    assert result.steps == 30


def test_data_of_another_tokenizer_is_refused(tmp_path, model_dir, chat_jsonl):
    # a text dataset with its own BPE of the model's vocabulary size: the vocabulary size alone would pass
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": " ".join(WORDS[i:] + WORDS[:i])}) + "\n" for i in range(16)) * 20)
    vocab = Tokenizer.from_path(model_dir).vocab_size
    other = prepare(PrepareConfig(sources=[str(docs)], out_dir=str(tmp_path / "other"), vocab_size=vocab,
                                  val_fraction=0.1))
    cfg = sft_config(tmp_path / "run", model_dir, other, recipe__name="none")
    with pytest.raises(ValueError, match="another tokenizer"):
        train(cfg)


def test_lora_run_equals_apply_lora_and_a_naive_loop(tmp_path, model_dir, chat_data):
    pytest.importorskip("peft")
    from batchpilot.train.lora import LoraConfig, apply_lora, merge_lora

    steps, lr, batch_rows = 4, 1e-2, 4
    cfg = sft_config(tmp_path / "run", model_dir, chat_data, lora__rank=4, lora__alpha=8.0,
                     lora__target_modules="q_proj,v_proj,down_proj", schedule__max_steps=steps,
                     schedule__warmup_tokens=0, optim__lr=lr, optim__grad_clip=0.0, batch__micro_batch_size=batch_rows)
    train(cfg)

    model = apply_lora(load_model(model_dir).float(), LoraConfig(rank=4, alpha=8.0, seed=cfg.model.seed,
                                                                  target_modules=("q_proj", "v_proj", "down_proj")))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0,
                            betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    loader = PackedLoader(chat_data, "train", SEQ_LEN, seed=cfg.data.seed, pack="conversation")
    from batchpilot.train.trainer import forward_loss

    for _ in range(steps):
        loss = forward_loss(model, loader.take(batch_rows), torch.device("cpu"))
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = model(ids)
        exported = load_model(tmp_path / "run" / "model").float()(ids)
        base = load_model(model_dir).float()(ids)
    assert (unmerged - base).abs().max() > 1e-3  # the adapters moved the output
    torch.testing.assert_close(exported, unmerged, atol=1e-5, rtol=1e-5)  # merged export = unmerged naive model
    torch.testing.assert_close(merge_lora(model)(ids), unmerged, atol=1e-5, rtol=1e-5)


def test_fsdp2_cpu_offload_equals_the_plain_run():
    """FSDP2 CPU offload (parameters, gradients, AdamW states on the host) works on CPU/gloo: equal losses."""
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    dims = parallel.ParallelDims(device=torch.device("cpu"))
    ids = torch.randint(0, 128, (1, 2, 17), generator=torch.Generator().manual_seed(0)).expand(3, 2, 17)
    runs = []
    for offload in (False, True):
        model = build_model(config, seed=0).float()
        parallel.apply_fsdp(model, dims, param_dtype=None, offload="cpu" if offload else "none")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for step in ids:
            loss = model(step[:, :-1], targets=step[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        runs.append(losses)
    assert runs[0][-1] < runs[0][0]
    torch.testing.assert_close(torch.tensor(runs[1]), torch.tensor(runs[0]), atol=1e-6, rtol=1e-6)
