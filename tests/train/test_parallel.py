"""FSDP2 on 2 CPU ranks (gloo) trains exactly like one process: the real ``train()``, same losses.

``run_ranks`` is the spawn helper the other distributed tests import: each rank is a fresh
'spawn' process with torchrun's environment variables, one thread, and reports through files
(tensors in queues break when the child exits first). A rank that hangs fails the test instead
of the whole run (a deadlock shows up as a timeout).
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from batchpilot.data.prepare import PrepareConfig, prepare
from batchpilot.metrics import read_metrics
from batchpilot.train import parallel
from batchpilot.train.config import TrainConfig, config_from_legacy
from batchpilot.train.trainer import train

WORDS = "in the beginning god created heaven and earth was without form void darkness upon face of deep".split()


def make_dataset(root: Path) -> str:
    """A small prepared dataset (byte-level BPE with 300 tokens) built from synthetic text."""
    rng = random.Random(0)
    docs = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) for _ in range(300))
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(prepare(PrepareConfig(sources=[str(root / "corpus.jsonl")], out_dir=str(root / "data"),
                                     vocab_size=300, val_fraction=0.1)))


def tiny_run(out_dir: Path, data: str, **overrides) -> TrainConfig:
    """2 layers of the tiny preset's width; 8 rows of 32 tokens per step (4 per rank at 2 ranks), 2 micro-batches."""
    base = dict(data=data, model="tiny", seq_len=32, global_batch_tokens=256,
                micro_batch_size=2, max_steps=3, lr=3e-3, schedule="constant", warmup_tokens=0, eval_every=1000,
                eval_batches=1, save_every=1000, progress=False, device="cpu")
    return config_from_legacy(str(out_dir), **{**base, **overrides})


def losses(run_dir: str | Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        fn(*args)
    finally:
        parallel.shutdown_distributed()
    exit_now()


def exit_now() -> None:
    """Leave a finished rank without interpreter finalization: there, Gloo worker threads that still hold
    tensors can abort the process (SIGABRT, "terminate called without an active exception"; about one full
    test run in three here; pytorch/pytorch#179291) after all work and checks are done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable, *args, world_size: int = 2, timeout: float = 60.0) -> None:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks; fail on a non-zero exit or a hang."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_entry, args=(r, world_size, port, fn, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for i in hung:
        procs[i].kill()
        procs[i].join()
    assert not hung, f"ranks {hung} did not finish within {timeout} s (deadlock?)"
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world_size, f"rank exit codes {codes}"


def _train_worker(cfg_dict: dict) -> None:
    train(TrainConfig(**cfg_dict))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return make_dataset(tmp_path_factory.mktemp("corpus"))


def test_fsdp2_train_matches_single_process(dataset, tmp_path):
    single = train(tiny_run(tmp_path / "single", dataset))
    cfg = tiny_run(tmp_path / "fsdp", dataset)
    run_ranks(_train_worker, {f: getattr(cfg, f) for f in cfg.__slots__})
    ref, got = losses(single.run_dir), losses(tmp_path / "fsdp")
    assert len(got) == len(ref) == 3
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert ref[-1] < ref[0]
    result = json.loads((tmp_path / "fsdp" / "result.json").read_text())
    assert result["steps"] == 3
    exported = (tmp_path / "fsdp" / "model" / "model.safetensors")  # the gathered FSDP2 weights, written by rank 0
    assert exported.is_file()


def test_parallelize_order_and_noop_on_one_process(tiny_config):
    from batchpilot.model.llama import build_model

    model = build_model(tiny_config, seed=0)
    names = [n for n, _ in model.named_parameters()]
    parallel.parallelize(model, parallel.ParallelDims(), activation_checkpointing="selective")
    assert [n for n, _ in model.named_parameters()] == names  # composable AC keeps FQNs (checkpoints, export)
    assert not parallel.is_sharded(model)
    with pytest.raises(ValueError, match="activation checkpointing"):
        parallel.apply_ac(model, "sometimes")


def test_fsdp_on_one_device_computes_in_bf16_over_fp32_masters(tiny_config):
    """``fsdp_one_device``: a one-rank FSDP2 mesh; parameters stay fp32, the forward runs in bf16."""
    from batchpilot.model.llama import build_model
    from batchpilot.train.optim import OptimConfig, build_optimizer

    x = torch.randint(0, tiny_config.vocab_size, (2, 16))
    reference = build_model(tiny_config, seed=0)
    model = build_model(tiny_config, seed=0)
    try:
        parallel.parallelize(model, parallel.ParallelDims(), param_dtype=torch.bfloat16, fsdp_one_device=True)
        assert parallel.is_sharded(model) and all(p.dtype == torch.float32 for p in model.parameters())
        optimizer = build_optimizer(model, OptimConfig(lr=1e-2))  # before any forward: the sharded fp32 params
        seen = []
        model.layers[0].register_forward_hook(lambda m, a, out: seen.append(out.dtype))
        loss = model(x, targets=x)
        assert seen == [torch.bfloat16]
        assert loss.item() == pytest.approx(reference(x, targets=x).item(), rel=2e-2)
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
        optimizer.step()
        assert model(x, targets=x).item() < loss.item()
    finally:
        parallel.shutdown_distributed()
