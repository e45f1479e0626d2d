"""Laws reproduce the papers' oracles (Step Law arXiv 2503.04715, DeepSeek LLM arXiv 2401.02954, Power
Scheduler arXiv 2408.13359); N counts exactly what the real model holds in attention + MLP."""

import json

import pytest

from batchpilot.model.llama import LlamaConfig, build_model, count_params, get_preset
from batchpilot.model import counting
from batchpilot.plan import laws


@pytest.mark.parametrize("n, d, lr, batch", [
    (1_073_741_824, 1e11, 1.552e-3, 1.108e6),
    (2.147e8, 4e9, 1.820e-3, 1.763e5),
    (7e9, 2e12, 1.023e-3, 6.128e6),
])
def test_step_law_oracles(n, d, lr, batch):
    assert laws.step_law_peak_lr(n, d) == pytest.approx(lr, rel=1e-3)
    assert laws.step_law_batch_tokens(d) == pytest.approx(batch, rel=1e-3)


def test_deepseek_flops_per_token_table3():
    assert laws.deepseek_flops_per_token(24, 2048, 4096) == pytest.approx(9.66e9, rel=1e-3)


@pytest.mark.parametrize("c, lr, batch", [(1e17, 2.338e-3, 1.062e5), (1e19, 1.315e-3, 4.789e5),
                                          (1e21, 7.394e-4, 2.160e6), (1e22, 5.545e-4, 4.588e6)])
def test_deepseek_law_table(c, lr, batch):
    assert laws.deepseek_peak_lr(c) == pytest.approx(lr, rel=1e-3)
    assert laws.deepseek_batch_tokens(c) == pytest.approx(batch, rel=1e-3)


def test_lr_rescaling_rules():
    adam = laws.lr_scaling_rule("adamw")
    sgd = laws.lr_scaling_rule("sgd")
    assert (adam, sgd) == ("sqrt", "linear")
    assert (laws.lr_scaling_rule("lamb"), laws.lr_scaling_rule("lars")) == ("sqrt", "linear")
    assert laws.rescale_lr(3e-4, from_batch=256, to_batch=1024, rule=adam) == pytest.approx(6e-4)
    assert laws.rescale_lr(0.1, from_batch=256, to_batch=1024, rule=sgd) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="adamw"):
        laws.lr_scaling_rule("adagrad")


def test_power_scheduler_oracles():
    lr = lambda n: laws.power_scheduler_lr(n, batch_sequences=1024)  # noqa: E731
    assert lr(1e9) == 0.02
    assert lr(1e11) == pytest.approx(0.01005, rel=1e-3)
    assert lr(1e12) == pytest.approx(0.003107, rel=1e-3)
    assert lr(2e12) == pytest.approx(0.002182, rel=1e-3)
    assert lr(2e12) == pytest.approx(lr(1e12) * 2**-0.51)
    assert laws.power_scheduler_lr(1e12, batch_sequences=2048) == pytest.approx(2 * lr(1e12))


SHAPES = {
    "mha": dict(num_heads=4, num_kv_heads=4),
    "gqa": dict(num_heads=8, num_kv_heads=2),
    "mqa-bias": dict(num_heads=4, num_kv_heads=1, attention_bias=True, architecture="qwen2"),
    "head-dim": dict(num_heads=4, num_kv_heads=2, head_dim=32),
    "untied": dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", SHAPES)
def test_non_vocab_params_match_the_model(name):
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=176, num_layers=3,
                         **{"tie_word_embeddings": True, **SHAPES[name]})
    model = build_model(config, device="meta")
    attn_mlp = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n or ".mlp." in n)
    assert counting.non_vocab_params(config) == attn_mlp
    assert counting.total_params(config) == count_params(model)


def test_step_law_grid_shape_and_presets():
    # the smallest Step Law grid model: h=960, ffnh=9368, numl=7 (MHA) -> N = 214,663,680
    config = LlamaConfig(vocab_size=65536, hidden_size=960, intermediate_size=9368, num_layers=7, num_heads=15,
                         num_kv_heads=15)
    assert counting.non_vocab_params(config) == 214_663_680
    for preset in ("llama-1b", "qwen2-0.5b"):
        assert counting.total_params(get_preset(preset)) == count_params(build_model(get_preset(preset), device="meta"))


def test_extrapolation_ranges():
    assert laws.STEP_LAW.fitted_range.extrapolations(params=1e9, tokens=1e11, compute_flops=1e30) == []
    out = laws.DEEPSEEK_LAW.fitted_range.extrapolations(params=1, tokens=1, compute_flops=1e20)
    assert len(out) == 1 and "C (FLOPs)" in out[0]


def test_fitted_law_from_json(tmp_path):
    law = {"name": "ours", "form": "steplaw", "lr": {"coef": 1.79, "exp_params": -0.713, "exp_tokens": 0.307},
           "batch": {"coef": 0.58, "exp_params": 0.0, "exp_tokens": 0.571},
           "fitted_range": {"params": [1e7, 1e8], "tokens": [1e8, 1e9]}, "schedule": "cosine", "seq_len": 2048}
    path = tmp_path / "law.json"
    path.write_text(json.dumps(law))
    loaded = laws.get_law(str(path))
    assert loaded.name == "ours" and loaded.fitted_range.params == (1e7, 1e8)
    lr, batch = loaded.recommend(non_vocab_params=1_073_741_824, tokens=1e11, compute_flops=0)
    assert (lr, batch) == pytest.approx((1.552e-3, 1.108e6), rel=1e-3)
    path.write_text(json.dumps({"name": "bad", "lr": {"coef": 1.0}}))
    with pytest.raises(ValueError, match="lr and batch"):
        laws.get_law(str(path))
    with pytest.raises(ValueError, match="step, deepseek"):
        laws.get_law("kaplan")
