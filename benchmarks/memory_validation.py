"""Check ``plan/memory.py`` against ``torch.cuda.max_memory_allocated`` on real training steps.

Each configuration runs 3 steps of forward + backward + fused AdamW under bf16 autocast (fp32 params, as
the trainer does on one GPU), resets the peak statistics after the first step (so optimizer states exist),
and compares the peak of steps 2-3 with the prediction's ``allocated_bytes``. Activation checkpointing is
applied here per block with ``torch.utils.checkpoint`` (non-reentrant), like ``train/parallel.py``'s ``full``.

    python benchmarks/memory_validation.py            # GPU, ~2 minutes on an H100/H200
    python benchmarks/memory_validation.py --smoke    # CPU, tiny preset: checks the code path only

Writes ``benchmarks/results/mem_validation_<date>.json`` (or ``--out DIR``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from batchpilot.model.llama import Llama, build_model, get_preset
from batchpilot.plan.memory import estimate_peak_bytes

# (preset, micro_batch_size, activation checkpointing)
GPU_CONFIGS = [("llama-125m", 1, False), ("llama-125m", 4, False), ("llama-125m", 16, False),
               ("llama-125m", 16, True), ("llama-1b", 1, False), ("llama-1b", 4, False),
               ("llama-1b", 4, True), ("llama-1b", 16, True)]
SMOKE_CONFIGS = [("tiny", 1, False), ("tiny", 2, True)]
STEPS = 3


def apply_checkpointing(model: Llama) -> None:
    for block in model.layers:
        block.forward = lambda *args, _f=block.forward: checkpoint(_f, *args, use_reentrant=False)


def measure(preset: str, micro_batch_size: int, seq_len: int, checkpointing: bool, device: str) -> int | None:
    """Peak allocated bytes over steps 2..STEPS (None on CPU)."""
    cuda = device == "cuda"
    model = build_model(get_preset(preset), device=device, seed=0)
    if checkpointing:
        apply_checkpointing(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=cuda)
    vocab = model.config.vocab_size
    for step in range(STEPS):
        x = torch.randint(0, vocab, (micro_batch_size, seq_len), device=device)
        y = torch.randint(0, vocab, (micro_batch_size, seq_len), device=device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(x, targets=y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda and step == 0:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
    measured = torch.cuda.max_memory_allocated() if cuda else None
    del model, opt, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return measured


def context_bytes() -> int:
    """Device memory in use outside PyTorch's allocator (CUDA context, library workspaces)."""
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def row(preset: str, micro_batch_size: int, seq_len: int, checkpointing: bool, device: str) -> dict:
    est = estimate_peak_bytes(get_preset(preset), micro_batch_size=micro_batch_size, seq_len=seq_len,
                              checkpointing=checkpointing)
    start = time.perf_counter()
    measured = measure(preset, micro_batch_size, seq_len, checkpointing, device)
    config = {"preset": preset, "micro_batch_size": micro_batch_size, "seq_len": seq_len,
              "activation_checkpointing": checkpointing}
    out = {"config": config, "predicted_bytes": int(est.allocated_bytes), "measured_bytes": measured,
           "ratio": None if measured is None else measured / est.allocated_bytes, "peak_moment": est.peak_moment,
           "predicted_breakdown": {k: int(getattr(est, k)) for k in
                                   ("params", "grads", "optimizer", "activations", "compute_copies", "loss")},
           "seconds": round(time.perf_counter() - start, 2)}
    ratio = "-" if measured is None else f"{out['ratio']:.3f}"
    print(f"{preset:12s} mb {micro_batch_size:3d} ckpt {checkpointing!s:5s} predicted {est.allocated_bytes / 2**30:7.2f}"
          f" GiB measured {'-' if measured is None else f'{measured / 2**30:7.2f}'} GiB ratio {ratio}", flush=True)
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset, no measurement")
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048 (64 with --smoke)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU; use --smoke to check the code path on CPU")
    seq_len = args.seq_len or (64 if args.smoke else 2048)
    rows = [row(p, mb, seq_len, ckpt, device) for p, mb, ckpt in (SMOKE_CONFIGS if args.smoke else GPU_CONFIGS)]
    now = dt.datetime.now(dt.timezone.utc)
    result = {"date": now.isoformat(timespec="seconds"), "command": shlex.join([sys.executable, *sys.argv]),
              "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "torch": torch.__version__,
              "git_commit": git_commit(), "context_bytes": context_bytes() if device == "cuda" else None,
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"mem_validation_{now:%Y%m%d_%H%M%S}{'_smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
