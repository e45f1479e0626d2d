"""Check ``plan/memory.py`` against ``torch.cuda.max_memory_allocated`` on real training steps.

Each configuration runs 3 steps of forward + backward + fused AdamW under bf16 autocast (fp32 params, as
the trainer does on one GPU), resets the peak statistics after the first step (so optimizer states exist),
and compares the peak of steps 2-3 with the prediction's ``allocated_bytes``. Activation checkpointing is
applied here per block with ``torch.utils.checkpoint`` (non-reentrant), like ``train/parallel.py``'s ``full``.

    python benchmarks/memory_validation.py            # GPU, ~2 minutes on an H100/H200
    python benchmarks/memory_validation.py --smoke    # CPU, tiny preset: checks the code path only
    torchrun --nproc-per-node 2 benchmarks/memory_validation.py   # FSDP2 via train/parallel.py (bf16 params)
    python benchmarks/memory_validation.py --compile [--float8 tensorwise]   # compiled / float8 blocks, one GPU:
        validates plan/memory.py's derived compiled and float8 terms (issue 17)

Writes ``benchmarks/results/mem_validation_<date>.json`` (or ``--out DIR``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import time
from pathlib import Path

import torch
from provenance import provenance
from torch.utils.checkpoint import checkpoint

from batchpilot.model.llama import Llama, build_model, get_preset, rope_cos_sin
from batchpilot.plan.memory import activation_bytes_per_token, estimate_peak_bytes

# (preset, micro_batch_size, activation checkpointing)
GPU_CONFIGS = [("llama-125m", 1, False), ("llama-125m", 4, False), ("llama-125m", 16, False),
               ("llama-125m", 16, True), ("llama-1b", 1, False), ("llama-1b", 4, False),
               ("llama-1b", 4, True), ("llama-1b", 16, True)]
SMOKE_CONFIGS = [("tiny", 1, False), ("tiny", 2, True)]
FSDP_CONFIGS = [("llama-125m", 4, False), ("llama-1b", 1, False), ("llama-1b", 4, False), ("llama-1b", 4, True),
                ("llama-1b", 16, True)]
STEPS = 3


def apply_checkpointing(model: Llama) -> None:
    for block in model.layers:
        block.forward = lambda *args, _f=block.forward: checkpoint(_f, *args, use_reentrant=False)


def prepare(model: Llama, checkpointing: bool, dims, compile: bool = False, float8: str | None = None) -> Llama:
    """One GPU: float8, checkpointing, compile here (the trainer's order). Several: the trainer's own
    ``parallelize`` (AC, then FSDP2, bf16 params)."""
    if dims is None:
        from batchpilot.train import parallel
        parallel.apply_float8(model, float8, next(model.parameters()).device)
        if checkpointing:
            apply_checkpointing(model)
        if compile:
            parallel.apply_compile(model)
        return model
    from batchpilot.train import parallel
    return parallel.parallelize(model, dims, activation_checkpointing="full" if checkpointing else "none",
                                param_dtype=torch.bfloat16)


def measure(preset: str, micro_batch_size: int, seq_len: int, checkpointing: bool,
            device: str, dims=None, compile: bool = False, float8: str | None = None) -> tuple[int | None, int | None]:
    """(peak allocated bytes over steps 2..STEPS, bytes allocated right after the last forward); None on CPU."""
    cuda = device.startswith("cuda")
    model = prepare(build_model(get_preset(preset), device=device, seed=0), checkpointing, dims, compile, float8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=cuda)
    vocab = model.config.vocab_size
    for step in range(STEPS):
        x = torch.randint(0, vocab, (micro_batch_size, seq_len), device=device)
        y = torch.randint(0, vocab, (micro_batch_size, seq_len), device=device)
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            loss = model(x, targets=y)
        after_forward = torch.cuda.memory_allocated() if cuda else None
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
    return measured, after_forward


def is_weight_copy(t: torch.Tensor) -> bool:
    """A parameter's autocast bf16 copy or a view of it (counted apart, as ``compute_copies``): a chain of
    single-input ops (cast, transpose) that ends at a parameter's AccumulateGrad."""
    fn = t.grad_fn
    for _ in range(4):
        inputs = [n for n, _ in fn.next_functions if n is not None] if fn is not None else []
        if len(inputs) != 1:
            return False
        if type(inputs[0]).__name__ == "AccumulateGrad":
            return True
        fn = inputs[0]
    return False


def block_saved_bytes_per_token(preset: str, seq_len: int, device: str) -> dict:
    """Bytes one block saves for backward per token (unique storages, via saved-tensor hooks) vs the formula.

    Parameters, their autocast copies and the cos/sin tables (shared by all layers) are left out.
    """
    model = build_model(get_preset(preset).with_(num_layers=1), device=device, seed=0)
    x = torch.randn(1, seq_len, model.config.hidden_size, device=device, requires_grad=True)
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(seq_len, device=device)[None], x.dtype)
    block = model.layers[0]
    skip = {t.untyped_storage().data_ptr() for t in (cos, sin, *block.parameters())}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and not is_weight_copy(t):
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            block(x, cos, sin, None)
    return {"measured": sum(storages.values()) / seq_len,
            "predicted": activation_bytes_per_token(model.config, param_bytes=4)}


def context_bytes() -> int:
    """Device memory in use outside PyTorch's allocator (CUDA context, library workspaces)."""
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def row(preset: str, micro_batch_size: int, seq_len: int, checkpointing: bool, device: str, dims=None,
        compile: bool = False, float8: str | None = None) -> dict:
    num_gpus = 1 if dims is None else dims.world_size
    est = estimate_peak_bytes(get_preset(preset), micro_batch_size=micro_batch_size, seq_len=seq_len,
                              checkpointing=checkpointing, num_gpus=num_gpus,
                              sharding="none" if dims is None else "fsdp", compile=compile, float8=float8)
    start = time.perf_counter()
    measured, after_forward = measure(preset, micro_batch_size, seq_len, checkpointing, device, dims, compile, float8)
    config = {"preset": preset, "micro_batch_size": micro_batch_size, "seq_len": seq_len,
              "activation_checkpointing": checkpointing, "num_gpus": num_gpus,
              "sharding": "none" if dims is None else "fsdp", "compile": compile, "float8": float8}
    out = {"config": config, "predicted_bytes": int(est.allocated_bytes), "measured_bytes": measured,
           "ratio": None if measured is None else measured / est.allocated_bytes,
           "measured_after_forward_bytes": after_forward, "peak_moment": est.peak_moment,
           "predicted_breakdown": {k: int(getattr(est, k)) for k in
                                   ("params", "grads", "optimizer", "activations", "compute_copies", "loss")},
           "seconds": round(time.perf_counter() - start, 2)}
    ratio = "-" if measured is None else f"{out['ratio']:.3f}"
    if dims is not None and dims.rank != 0:
        return out
    gib = 2**30
    print(f"{preset:12s} mb {micro_batch_size:3d} ckpt {checkpointing!s:5s} predicted {est.allocated_bytes / gib:6.2f}"
          f" GiB measured {'-' if measured is None else f'{measured / 2**30:7.2f}'} GiB ratio {ratio}", flush=True)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset, no measurement")
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048 (64 with --smoke)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (one GPU)")
    parser.add_argument("--float8", choices=("tensorwise", "rowwise"), default=None,
                        help="torchao float8 matmuls in the blocks (one GPU; needs compute capability 8.9+)")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU; use --smoke to check the code path on CPU")
    seq_len = args.seq_len or (64 if args.smoke else 2048)
    dims = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from batchpilot.train import parallel
        dims = parallel.init_distributed(device)
        device = str(dims.device)
    configs = SMOKE_CONFIGS if args.smoke else GPU_CONFIGS if dims is None else FSDP_CONFIGS
    if dims is not None and (args.compile or args.float8):
        parser.error("--compile / --float8 are one-GPU cases (the derived terms are for autocast over fp32 params)")
    rows = [row(p, mb, seq_len, ckpt, device, dims, args.compile, args.float8) for p, mb, ckpt in configs]
    if dims is not None and dims.rank != 0:
        parallel.shutdown_distributed()
        return args.out
    now = dt.datetime.now(dt.timezone.utc)
    result = {**provenance(), "context_bytes": context_bytes() if device != "cpu" else None,
              "block_saved_bytes_per_token": {p: block_saved_bytes_per_token(p, seq_len, device)
                                              for p in sorted({c[0] for c in configs})} if dims is None else None,
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_smoke" if args.smoke else "" if dims is None else f"_fsdp{dims.world_size}"
    suffix += ("_compile" if args.compile else "") + (f"_float8-{args.float8}" if args.float8 else "")
    path = args.out / f"mem_validation_{now:%Y%m%d_%H%M%S}{suffix}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    if dims is not None:
        parallel.shutdown_distributed()
    return path


if __name__ == "__main__":
    main()
