"""MoE models through the real trainer: the balance loss at the chosen granularity, its metrics, and the
global-batch LBL on 2 gloo ranks equal to one process over the same tokens (Qiu et al., arXiv 2501.11873)."""

from __future__ import annotations

import pytest

from batchpilot.metrics import read_metrics
from batchpilot.train.config import MoeConfig, TrainConfig, config_from_legacy
from batchpilot.train.trainer import train
from tests.train.test_parallel import make_dataset, run_ranks

METRICS = ("moe/lbl_micro", "moe/lbl_sequence", "moe/lbl_global", "moe/z_loss", "moe/max_load", "moe/min_load",
           "moe/dropped_slots")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return make_dataset(tmp_path_factory.mktemp("corpus"))


def moe_run(out_dir, data: str, *, balance: str = "global", **overrides) -> TrainConfig:
    base = dict(data=data, model="tiny-moe", seq_len=32, global_batch_tokens=128, micro_batch_size=2,
                max_steps=3, lr=3e-3, schedule="constant", warmup_tokens=0, eval_every=1000, eval_batches=1,
                save_every=1000, progress=False, device="cpu")
    cfg = config_from_legacy(str(out_dir), **{**base, **overrides})
    cfg.moe = MoeConfig(balance=balance, balance_coef=0.5, z_loss_coef=1e-3)
    return cfg


def records(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def test_tiny_moe_trains_and_logs_routing_metrics(dataset, tmp_path):
    got = records(train(moe_run(tmp_path / "run", dataset, max_steps=4, lr=1e-2)).run_dir)
    assert len(got) == 4
    assert got[-1]["loss"] < got[0]["loss"]
    for r in got:
        assert set(METRICS) <= set(r)
        assert r["moe/max_load"] >= 1 >= r["moe/min_load"] >= 0
        assert r["moe/lbl_micro"] > 0 and r["moe/z_loss"] > 0
    # one micro-batch on one rank: the global buffer holds exactly the micro-batch's counts
    one = records(train(moe_run(tmp_path / "one", dataset, max_steps=1, micro_batch_size=4)).run_dir)[0]
    assert one["moe/lbl_global"] == pytest.approx(one["moe/lbl_micro"], rel=1e-6)


def test_moe_config_validation_names_the_flag():
    with pytest.raises(ValueError, match="--moe.balance"):
        MoeConfig(balance="batch")
    with pytest.raises(ValueError, match="--moe.z_loss_coef"):
        MoeConfig(z_loss_coef=-1.0)


def _train_worker(cfg_dict: dict) -> None:
    train(TrainConfig(**cfg_dict))


def test_global_lbl_on_two_ranks_equals_one_process(dataset, tmp_path):
    """2 ranks x 1 micro-batch of 2 rows against 1 process x 1 micro-batch of the same 4 rows: the counts are
    all-reduced before the loss is formed, so the LM loss, the global LBL and (through the gradient) the second
    step's loss agree; the micro-batch LBL, local to each rank, does not."""
    single = records(train(moe_run(tmp_path / "single", dataset, max_steps=2, micro_batch_size=4)).run_dir)
    cfg = moe_run(tmp_path / "ranks", dataset, max_steps=2, micro_batch_size=2)
    run_ranks(_train_worker, {f: getattr(cfg, f) for f in cfg.__slots__}, timeout=120.0)
    ranks = records(tmp_path / "ranks")
    assert [r["loss"] for r in ranks] == pytest.approx([r["loss"] for r in single], rel=1e-5, abs=1e-6)
    assert [r["moe/lbl_global"] for r in ranks] == pytest.approx([r["moe/lbl_global"] for r in single], rel=1e-5)
    assert ranks[0]["moe/lbl_micro"] != pytest.approx(single[0]["moe/lbl_micro"], rel=1e-6)


def test_plan_for_an_moe_preset_then_train_executes_it(tmp_path, tiny_text_dir):
    import json

    from batchpilot.cli import main

    plan_path = tmp_path / "plan.json"
    assert main(["plan", "--preset", "tiny-moe", "--tokens", "4096", "--gpus", "1", "--gpu-memory-gib", "8",
                 "--seq-len", "64", "--law", "step", "--out", str(plan_path)]) == 0
    plan = json.loads(plan_path.read_text())
    assert plan["non_vocab_params"] > 1.3e6  # total N (every expert), the law's convention (docs/moe.md)
    run = tmp_path / "run"
    assert main(["train", "--plan", str(plan_path), "--data", str(tiny_text_dir), "--out", str(run),
                 "--eval-every", "1000", "--moe.balance", "micro"]) == 0
    got = records(run)
    assert got[-1]["step"] == plan["total_steps"] and "moe/lbl_micro" in got[-1]
    assert json.loads((run / "config.json").read_text())["moe"]["balance"] == "micro"


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointed_moe_blocks_train_as_uncheckpointed_ones(dataset, tmp_path, mode):
    """Activation checkpointing recomputes each MoE block in backward, which writes the block's routing slot a
    second time: the losses, the balance-loss metrics and (through the gradients) the later steps must not
    change."""
    plain = records(train(moe_run(tmp_path / "plain", dataset, max_steps=3)).run_dir)
    ckpt = records(train(moe_run(tmp_path / mode, dataset, max_steps=3, activation_checkpointing=mode)).run_dir)
    for key in ("loss", "moe/lbl_global", "moe/lbl_micro", "moe/z_loss"):
        assert [r[key] for r in ckpt] == pytest.approx([r[key] for r in plain], rel=1e-5, abs=1e-7), key
