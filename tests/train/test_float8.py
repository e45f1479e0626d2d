"""Float8 training (``--float8``, torchao): only the blocks' linears change, parameter names stay, losses track
the plain path, and a stopped float8 run resumes to the uninterrupted run's losses.

On CPU torch runs float8 matmuls in software (very slow), so these use micro shapes; the GPU test runs the
compiled tensorwise path on real float8 tensor cores.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from batchpilot.model.hf import config_to_hf
from batchpilot.model.llama import LlamaConfig, build_model
from batchpilot.train import parallel
from batchpilot.train.optim import OptimConfig, build_optimizer
from batchpilot.train.config import TrainConfig, config_from_legacy
from batchpilot.train.trainer import train

pytest.importorskip("torchao.float8")

from test_parallel import losses, run_ranks  # noqa: E402  (tests/train is on sys.path under pytest)

MICRO = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    tie_word_embeddings=True)


def _float8_linears(model: torch.nn.Module) -> list[str]:
    from torchao.float8.float8_linear import Float8Linear

    return [name for name, m in model.named_modules() if isinstance(m, Float8Linear)]


def test_only_block_linears_become_float8_and_names_stay():
    plain, model = build_model(MICRO, seed=0), build_model(MICRO, seed=0)
    parallel.parallelize(model, parallel.ParallelDims(), float8="tensorwise")
    converted = _float8_linears(model)
    per_block = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj"}
    assert {n.split(".", 2)[2] for n in converted} == per_block and len(converted) == 7 * MICRO.num_layers
    assert "lm_head" not in converted  # the fused loss's matmul stays in the compute dtype
    assert list(model.state_dict()) == list(plain.state_dict())  # checkpoints and HF export unchanged
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


def test_float8_errors_are_clear(monkeypatch):
    with pytest.raises(ValueError, match="choose one of tensorwise, rowwise"):
        parallel.apply_float8(build_model(MICRO), "fp4", torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # as if torchao were not installed
    with pytest.raises(RuntimeError, match=r"needs torchao: pip install 'batchpilot\[float8\]'"):
        parallel.apply_float8(build_model(MICRO), "tensorwise", torch.device("cpu"))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_training_tracks_plain_training(recipe):
    """Same init, same batches (two, alternating, so that the loss can fall), AdamW: float8 losses stay within
    3% of fp32 ones (micro shapes make float8 rounding relatively large)."""
    batches = [torch.randint(0, MICRO.vocab_size, (4, 33), generator=torch.Generator().manual_seed(i % 2))
               for i in range(8)]

    def trajectory(float8: str | None) -> list[float]:
        model = build_model(MICRO, seed=0)
        parallel.parallelize(model, parallel.ParallelDims(), float8=float8)
        optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.0))
        losses = []
        for rows in batches:
            loss = model(rows[:, :-1], targets=rows[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    plain, float8 = trajectory(None), trajectory(recipe)
    assert float8 == pytest.approx(plain, rel=3e-2), (plain, float8)
    assert float8 != plain  # the matmuls really ran in float8
    assert float8[-1] < float8[0] - 0.5


def test_float8_under_activation_checkpointing_gives_the_same_gradients():
    """The recomputed forward casts the same tensors to float8 again: gradients equal the un-checkpointed ones."""
    rows = torch.randint(0, MICRO.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    grads = []
    for ac in ("none", "full"):
        model = build_model(MICRO, seed=0)
        parallel.parallelize(model, parallel.ParallelDims(), activation_checkpointing=ac, float8="tensorwise")
        model(rows[:, :-1], targets=rows[:, 1:]).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _micro_run(tmp_path, data, out: str, **kw) -> TrainConfig:
    """MICRO shape, 4 rows of 32 tokens per step in micro-batches of 2, float8 tensorwise, on CPU."""
    model_dir = tmp_path / "micro"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config_to_hf(MICRO)))
    base = dict(model=str(model_dir), data=str(data), seq_len=32,
                global_batch_tokens=128, micro_batch_size=2, max_steps=4, lr=1e-2, min_lr=1e-3, eval_every=2,
                eval_batches=1, save_every=2, progress=False, device="cpu", float8="tensorwise")
    return config_from_legacy(str(tmp_path / out), **{**base, **kw})


def test_float8_run_resumes_to_the_uninterrupted_losses(tmp_path, tiny_data):
    full = train(_micro_run(tmp_path, tiny_data, "full"))
    train(_micro_run(tmp_path, tiny_data, "resumed", stop_at_step=2))
    resumed = train(_micro_run(tmp_path, tiny_data, "resumed", resume=True))
    assert resumed.steps == 4
    assert losses(resumed.run_dir) == losses(full.run_dir)  # bit-identical on CPU
    saved = json.loads((tmp_path / "full" / "config.json").read_text())
    assert saved["parallel"]["float8"] == "tensorwise"
    # the checkpoint does not depend on float8: a run can resume without it
    longer = _micro_run(tmp_path, tiny_data, "resumed", resume=True, max_steps=6, float8=None)
    longer.checkpoint.resume_override = "max_steps=6"  # a longer horizon changes the schedule: said explicitly
    assert train(longer).steps == 6


def _train_worker(cfg_dict: dict) -> None:
    train(TrainConfig(**cfg_dict))


def test_float8_under_fsdp2_matches_single_process(tmp_path, tiny_data):
    """2 ranks (gloo): float8 casts of all-gathered weights and per-rank micro-batches give the single process's
    losses (each rank's micro-batch is one of the single process's, so the activation scales are the same)."""
    single = train(_micro_run(tmp_path, tiny_data, "single"))
    cfg = _micro_run(tmp_path, tiny_data, "fsdp")
    run_ranks(_train_worker, {f: getattr(cfg, f) for f in cfg.__slots__})
    want, got = losses(single.run_dir), losses(tmp_path / "fsdp")
    assert len(got) == len(want) == 4
    assert got == pytest.approx(want, rel=1e-4), (want, got)


@pytest.mark.gpu
def test_float8_compiled_on_gpu_tracks_bf16():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a GPU with float8 tensor cores")
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_layers=2, num_heads=8,
                         num_kv_heads=4, tie_word_embeddings=True)
    rows = torch.randint(0, config.vocab_size, (8, 257), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    losses = {}
    for recipe in (None, "tensorwise"):
        model = build_model(config, device="cuda", seed=0)
        parallel.parallelize(model, parallel.ParallelDims(device=torch.device("cuda")), compile=True, float8=recipe)
        optimizer = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0))
        trajectory = []
        for _ in range(5):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(rows[:, :-1], targets=rows[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            trajectory.append(loss.item())
        losses[recipe] = trajectory
    assert losses["tensorwise"] == pytest.approx(losses[None], rel=2e-2)
