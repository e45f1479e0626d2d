import os
import socket

import pytest
import torch
from test_parallel import exit_now
from torch import nn

from batchpilot.plan import laws
from batchpilot.train.optim import Lamb, Lars, OptimConfig, build_optimizer, full_norm, full_sq_norms, param_groups


# ---- naive per-tensor references (the "two ways, same answer" side) -------------------------------------------

def naive_lamb(params, grads, states, *, lr, betas, eps, wd, trust):
    """One LAMB step written per tensor, straight from TF-addons' lamb.py (You et al. 2019, arXiv 1904.00962)."""
    for x, g, s, decay, use_trust in zip(params, grads, states, wd, trust):
        s["t"] = s.get("t", 0) + 1
        s["m"] = betas[0] * s.get("m", torch.zeros_like(x)) + (1 - betas[0]) * g
        s["v"] = betas[1] * s.get("v", torch.zeros_like(x)) + (1 - betas[1]) * g * g
        mhat, vhat = s["m"] / (1 - betas[0] ** s["t"]), s["v"] / (1 - betas[1] ** s["t"])
        u = mhat / (vhat.sqrt() + eps) + decay * x
        w_norm, u_norm = x.norm().item(), u.norm().item()
        phi = w_norm / u_norm if use_trust and w_norm > 0 and u_norm > 0 else 1.0
        x -= lr * phi * u


def naive_lars(params, grads, states, *, lr, momentum, eta, wd, trust):
    """One LARS step per tensor: local_lr = eta ||w|| / (||g|| + wd ||w||); v = m v + lr local_lr (g + wd w)."""
    for w, g, s, decay, use_trust in zip(params, grads, states, wd, trust):
        w_norm, g_norm = w.norm().item(), g.norm().item()
        local_lr = eta * w_norm / (g_norm + decay * w_norm) if use_trust and w_norm > 0 and g_norm > 0 else 1.0
        s["v"] = momentum * s.get("v", torch.zeros_like(w)) + lr * local_lr * (g + decay * w)
        w -= s["v"]


def tiny_model() -> nn.Module:
    torch.manual_seed(0)  # odd row counts make FSDP2 shards uneven
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def loss_fn(model, data):
    x, y = data
    return ((model(x) - y) ** 2).mean()


# ---- oracles -------------------------------------------------------------------------------------------------

def test_lamb_first_step_oracle():
    x = nn.Parameter(torch.tensor([3.0, 4.0]))
    x.grad = torch.tensor([1.0, 0.0])
    Lamb([x], lr=0.1, eps=1.0, weight_decay=0.0).step()
    torch.testing.assert_close(x.detach(), torch.tensor([2.5, 4.0]))


def test_lamb_pure_decay_cancels_in_ratio():
    x = nn.Parameter(torch.tensor([3.0, 4.0]))
    x.grad = torch.zeros(2)
    Lamb([x], lr=0.1, eps=1.0, weight_decay=0.25).step()
    torch.testing.assert_close(x.detach(), torch.tensor([2.7, 3.6]))


def test_lars_local_lr_oracle():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    w.grad = torch.tensor([0.3, 0.4])
    Lars([w], lr=1.0, momentum=0.0, trust_coefficient=0.001).step()  # local_lr = 0.001 * 5 / 0.5 = 0.01
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) - 0.01 * torch.tensor([0.3, 0.4]))


# ---- against the naive loops ---------------------------------------------------------------------------------

def run_ours(name: str, steps: int = 3, **overrides) -> list[torch.Tensor]:
    model = tiny_model()
    cfg = OptimConfig(name=name, lr=0.05, weight_decay=0.1, beta2=0.999, eps=1e-6, trust_coefficient=0.02,
                      **overrides)
    opt = build_optimizer(model, cfg)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model, batch()).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def run_naive(name: str, steps: int = 3) -> list[torch.Tensor]:
    model = tiny_model()
    params = list(model.parameters())
    states = [{} for _ in params]
    wd = [0.1 if p.dim() >= 2 else 0.0 for p in params]
    trust = [p.dim() >= 2 for p in params]
    for _ in range(steps):
        model.zero_grad()
        loss_fn(model, batch()).backward()
        with torch.no_grad():
            grads = [p.grad.clone() for p in params]
            if name == "lamb":
                naive_lamb(params, grads, states, lr=0.05, betas=(0.9, 0.999), eps=1e-6, wd=wd, trust=trust)
            else:
                naive_lars(params, grads, states, lr=0.05, momentum=0.9, eta=0.02, wd=wd, trust=trust)
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_matches_naive_loop(name):
    for ours, ref in zip(run_ours(name), run_naive(name), strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def test_param_groups_exclude_1d():
    groups = param_groups(tiny_model(), 0.1)
    matrices, vectors = groups
    assert all(p.dim() == 2 for p in matrices["params"]) and all(p.dim() == 1 for p in vectors["params"])
    assert (matrices["weight_decay"], matrices["trust_ratio"]) == (0.1, True)
    assert (vectors["weight_decay"], vectors["trust_ratio"]) == (0.0, False)


def test_build_optimizer_names_and_errors():
    for name, cls in [("adamw", torch.optim.AdamW), ("lamb", Lamb), ("lars", Lars), ("sgd", torch.optim.SGD)]:
        assert isinstance(build_optimizer(tiny_model(), OptimConfig(name=name)), cls)
    assert {name for name, _ in [("adamw", 0), ("lamb", 0), ("lars", 0), ("sgd", 0)]} == set(laws.OPTIMIZERS)
    with pytest.raises(ValueError):
        OptimConfig(name="adam")
    with pytest.raises(ValueError, match="grad_clip"):
        OptimConfig(grad_clip=-1.0)
    with pytest.raises(ValueError):
        OptimConfig(beta1=1.0)


def test_full_norm_plain():
    t = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    assert full_norm(t).item() == pytest.approx(5.0)
    assert full_sq_norms([t, torch.ones(3)]).tolist() == pytest.approx([25.0, 3.0])


# ---- FSDP2 (gloo, 2 ranks on CPU): sharded LAMB/LARS equal the single-process result --------------------------

def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", rank=rank, world_size=2)
    from batchpilot.train.adaptive import grad_sq_norm

    mesh = init_device_mesh("cpu", (2,))
    results = {}
    for name in ("lamb", "lars"):
        model = tiny_model()
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        loss_fn(model, batch()).backward()
        results["grad_sq"] = grad_sq_norm(model.parameters())  # DTensor grads: full norm across shards
        opt = build_optimizer(model, OptimConfig(name=name, lr=0.05, weight_decay=0.1, beta2=0.999, eps=1e-6,
                                                 trust_coefficient=0.02))
        for _ in range(3):
            opt.zero_grad()
            loss_fn(model, batch()).backward()  # same batch on both ranks: the averaged grad is the full one
            opt.step()
        results[name] = [p.full_tensor().clone() for p in model.parameters()]
        results[name + "_norm"] = full_norm(next(model.parameters())).item()
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "fsdp.pt"))
    dist.destroy_process_group()
    exit_now()


def test_fsdp2_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_fsdp_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    got = torch.load(tmp_path / "fsdp.pt")
    for name in ("lamb", "lars"):
        ref = run_ours(name)
        for ours, expected in zip(got[name], ref, strict=True):
            torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
        assert got[name + "_norm"] == pytest.approx(ref[0].norm().item(), rel=1e-6)
    model = tiny_model()
    loss_fn(model, batch()).backward()
    assert got["grad_sq"] == pytest.approx(sum(p.grad.square().sum().item() for p in model.parameters()), rel=1e-6)
