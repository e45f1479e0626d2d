import math

import pytest

from batchpilot.train.schedule import Schedule, ScheduleConfig, exp_decay_multiplier, lr_at, power_curve

# Power Scheduler oracles (Shen et al. 2024, arXiv 2408.13359): beta=1024 seq, a=4, b=-0.51, eta_max=0.02.
# The formula gives 4096 * (2e12)^-0.51 = 0.0021819 (= eta(1e12) * 2^-0.51 = 0.003107 * 0.7022).
POWER = dict(name="power", peak_lr=0.02, power_a=4.0, power_b=-0.51, power_batch_sequences=1024,
             total_tokens=10**13, power_decay_fraction=0.0)
RESOLVED = {"peak_lr": "peak_lr", "total_tokens": "total_tokens", "warmup_tokens": "warmup_tokens",
            "power_batch_sequences": "batch_sequences"}


def make(**kw) -> Schedule:
    """A resolved schedule from the shape's fields and the run's (peak LR, total tokens, warmup, batch)."""
    resolved = {RESOLVED[k]: kw.pop(k) for k in list(kw) if k in RESOLVED}
    kw.setdefault("min_lr", 0.0)  # these shapes decay to 0 unless a test sets a floor
    return Schedule(config=ScheduleConfig(**kw), **resolved)


@pytest.mark.parametrize("tokens, expected", [(1e9, 0.02), (1e11, 0.01005), (1e12, 0.003107), (2e12, 0.002182)])
def test_power_oracles(tokens, expected):
    assert lr_at(int(tokens), make(**POWER)) == pytest.approx(expected, rel=5e-4)


def test_power_crossover_and_linear_in_batch():
    cfg = make(**POWER)
    crossover = (0.02 / (1024 * 4.0)) ** (1 / -0.51)
    assert crossover == pytest.approx(2.596e10, rel=1e-3)
    assert power_curve(crossover * 0.99, cfg) == 0.02
    assert power_curve(crossover * 1.01, cfg) < 0.02
    doubled = make(**{**POWER, "power_batch_sequences": 2048, "peak_lr": 1.0})
    assert power_curve(1e12, doubled) == pytest.approx(2 * power_curve(1e12, cfg))


def test_power_warmup_and_decay():
    cfg = make(**{**POWER, "warmup_tokens": 10**11, "total_tokens": 10**12,
                            "power_decay_fraction": 0.1, "min_lr": 1e-4})
    f_w = power_curve(10**11, cfg)
    assert lr_at(5 * 10**10, cfg) == pytest.approx(0.5 * f_w)
    assert lr_at(10**11, cfg) == pytest.approx(f_w)
    start = 9 * 10**11
    assert lr_at(start, cfg) == pytest.approx(power_curve(start, cfg))
    assert lr_at(10**12, cfg) == pytest.approx(1e-4)
    assert lr_at(2 * 10**12, cfg) == pytest.approx(1e-4)
    tail = [lr_at(start + i * 10**10, cfg) for i in range(11)]
    assert all(a > b for a, b in zip(tail, tail[1:]))


def test_exp_decay_endpoints():
    assert exp_decay_multiplier(0.0, 7.0, 0.1) == pytest.approx(1.0)
    assert exp_decay_multiplier(7.0, 7.0, 0.1) == pytest.approx(0.1)
    assert exp_decay_multiplier(7.0, 7.0, 0.0) == pytest.approx(0.0, abs=1e-12)


def test_cosine_shape():
    cfg = make(name="cosine", peak_lr=1e-3, min_lr=1e-5, warmup_tokens=100, total_tokens=1100)
    assert lr_at(0, cfg) == 0.0
    assert lr_at(50, cfg) == pytest.approx(5e-4)
    assert lr_at(100, cfg) == pytest.approx(1e-3)
    assert lr_at(600, cfg) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(1100, cfg) == pytest.approx(1e-5)
    assert lr_at(5000, cfg) == pytest.approx(1e-5)
    values = [lr_at(n, cfg) for n in range(100, 1101, 50)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("shape, mid", [("linear", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))])
def test_wsd_shape(shape, mid):
    cfg = make(name="wsd", peak_lr=1.0, warmup_tokens=10, total_tokens=100, decay_fraction=0.2,
                         decay_shape=shape)
    assert lr_at(5, cfg) == pytest.approx(0.5)
    assert lr_at(10, cfg) == lr_at(79, cfg) == lr_at(80, cfg) == 1.0
    assert lr_at(90, cfg) == pytest.approx(mid)
    assert lr_at(100, cfg) == pytest.approx(0.0)


def test_constant():
    cfg = make(name="constant", peak_lr=0.1, warmup_tokens=10, total_tokens=100)
    assert [lr_at(n, cfg) for n in (0, 5, 10, 1000)] == pytest.approx([0.0, 0.05, 0.1, 0.1])


@pytest.mark.parametrize("kwargs", [
    dict(name="step", peak_lr=1.0, total_tokens=10),
    dict(peak_lr=0.0, total_tokens=10),
    dict(peak_lr=1.0, min_lr=2.0, total_tokens=10),
    dict(peak_lr=1.0, total_tokens=10, warmup_tokens=11),
    dict(peak_lr=1.0, total_tokens=0),
    dict(name="wsd", peak_lr=1.0, total_tokens=10, warmup_tokens=9, decay_fraction=0.5),
    dict(name="wsd", peak_lr=1.0, total_tokens=10, decay_shape="cosine"),
    dict(name="power", peak_lr=1.0, total_tokens=10),
    dict(name="power", peak_lr=1.0, total_tokens=10, power_batch_sequences=4, power_b=0.5),
])
def test_validation(kwargs):
    with pytest.raises(ValueError):
        make(**kwargs)


def test_multistep_follows_deepseek_steps():
    cfg = make(name="multistep", peak_lr=1.0, total_tokens=100)
    assert [lr_at(n, cfg) for n in (50, 79, 80, 89, 90, 100)] == pytest.approx([1.0, 1.0, 0.316, 0.316, 0.1, 0.1])
