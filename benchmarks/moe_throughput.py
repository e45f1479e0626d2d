"""MoE training throughput: batchpilot's MoE step against transformers' Qwen2MoeForCausalLM on one GPU.

Same shape (``--preset``, default moe-1b: 1.06B total / 0.26B activated non-vocabulary parameters), same
tokens per step (``--rows`` sequences of ``--seq``), same micro-batch (``--mb``, accumulation when smaller),
bf16 compute, fused AdamW, the load-balancing loss on in every system (coefficient ``--lbl-coef``):
  hf_qwen2moe          transformers Qwen2MoeForCausalLM, not compiled, SDPA attention, bf16 weights, its
                       default experts implementation (grouped_mm where it dispatches), output_router_logits
  hf_qwen2moe_loop     the same with ``experts_implementation="eager"`` (transformers' per-expert loop)
  batchpilot           our model, fp32 master weights under bf16 autocast (the trainer's one-GPU precision),
                       grouped-GEMM experts, fused chunked CE, global-batch LBL (``moe.BalanceAccumulator``)
  batchpilot_compile   the same with every block compiled (``nn.Module.compile``)
  batchpilot_trainer   the product path: ``trainer.train_step`` on a model built as ``batchpilot train
                       --parallel.compile`` builds it (``parallel.parallelize``, ``optim.build_optimizer``), the
                       trainer's MoE objective (global LBL, routing metrics), gradient clipping at 1.0, random rows
The first four call the model's forward/backward directly (the HF rows through transformers). Each system runs in
its own subprocess (an OOM or compile failure is recorded, not fatal). ``--warmup`` steps, then ``--steps``
timed steps (synchronize + perf_counter); tokens/s from the median step. MFU = tokens/s x activated training
FLOPs per token (``counting.training_flops_per_token``: 6 x activated matmul parameters + causal attention) /
``--peak-tflops`` (989: H100/H200 dense bf16).

Result: ``benchmarks/results/moe_throughput_<date>.json`` with ``summary.speedup_vs_hf_qwen2moe`` (fastest
batchpilot system over hf_qwen2moe) and ``speedup_vs_hf_qwen2moe_loop``; with the trainer row,
``trainer_vs_harness`` (over batchpilot_compile) and ``trainer_speedup_vs_hf_qwen2moe``. The trainer's random
rows are the harness's batches (same generator seed and shape), so its losses match batchpilot's.

Usage (one H200, ~5 min):  python benchmarks/moe_throughput.py
CPU smoke test:            python benchmarks/moe_throughput.py --smoke
Where the step's GPU time goes (each row gains a ``profile``):  python benchmarks/moe_throughput.py --profile
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from provenance import provenance  # noqa: E402

from batchpilot.model import counting  # noqa: E402
from batchpilot.model.hf import config_to_hf  # noqa: E402
from batchpilot.model.llama import LlamaConfig, build_model, get_preset  # noqa: E402
from batchpilot.model.moe import BalanceAccumulator, RoutingRecord  # noqa: E402

SYSTEMS = ("hf_qwen2moe", "hf_qwen2moe_loop", "batchpilot", "batchpilot_compile", "batchpilot_trainer")


def model_config(args: argparse.Namespace) -> LlamaConfig:
    config = get_preset(args.preset)
    if args.smoke:  # a CPU-sized model of the same family
        config = get_preset("tiny-moe").with_(vocab_size=1024, num_layers=2)
    return config.with_(router_aux_loss_coef=args.lbl_coef)


def batches(config: LlamaConfig, args: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, config.vocab_size, (args.rows, args.seq + 1), generator=g).to(device)
            for _ in range(args.warmup + args.steps)]


def ours_step_fn(config: LlamaConfig, args: argparse.Namespace, device: torch.device, compiled: bool):
    model = build_model(config, device=device, seed=0)
    if compiled:
        for layer in model.layers:
            layer.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    balance = BalanceAccumulator("global", config.num_experts)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(batch: torch.Tensor) -> float:
        micro = batch.split(args.mb)
        total = 0.0
        for rows in micro:
            record = RoutingRecord()
            with autocast:
                lm_loss = model(rows[:, :-1], targets=rows[:, 1:], routing=record)
                loss = lm_loss + config.router_aux_loss_coef * balance.loss(record)
            (loss / len(micro)).backward()
            total += lm_loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        balance.step()
        return float(total / len(micro))

    return step


def trainer_step_fn(config: LlamaConfig, args: argparse.Namespace, device: torch.device):
    """``batchpilot train``'s step on random rows (the loader draws them; the benchmark's batch is not used)."""
    from train_throughput import RandomRows

    from batchpilot.train import parallel, trainer
    from batchpilot.train.config import MoeConfig
    from batchpilot.train.optim import OptimConfig, build_optimizer

    dims = parallel.init_distributed(device.type)
    model = parallel.parallelize(build_model(config, device=dims.device, seed=0), dims,
                                 activation_checkpointing="none", compile=device.type == "cuda")
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4))
    moe = trainer.moe_objective(MoeConfig(balance_coef=config.router_aux_loss_coef), config, dims)
    loader = RandomRows(config.vocab_size, args.seq)

    def step(batch: torch.Tensor) -> float:
        del batch
        loss, _, _ = trainer.train_step(model, optimizer, loader, global_batch_tokens=args.rows * args.seq,
                                        seq_len=args.seq, micro_batch_size=args.mb, dims=dims, grad_clip=1.0,
                                        moe=moe)
        return loss

    return step


def hf_step_fn(config: LlamaConfig, args: argparse.Namespace, device: torch.device, experts: str | None):
    import transformers

    hf_config = transformers.Qwen2MoeConfig(**{k: v for k, v in config_to_hf(config).items()
                                               if k not in ("architectures", "model_type", "torch_dtype")})
    hf_config.output_router_logits = True  # the aux loss is part of the step, as in ours
    kwargs = {"attn_implementation": "sdpa", "dtype": torch.bfloat16 if device.type == "cuda" else torch.float32}
    if experts is not None:
        kwargs["experts_implementation"] = experts
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM._from_config(hf_config, **kwargs).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step(batch: torch.Tensor) -> float:
        micro = batch.split(args.mb)
        total = 0.0
        for rows in micro:
            out = model(input_ids=rows[:, :-1], labels=rows[:, :-1].clone())  # HF shifts labels itself
            (out.loss / len(micro)).backward()
            total += out.loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(total / len(micro))

    return step


def run_one(system: str, args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = model_config(args)
    if system.startswith("hf"):
        step = hf_step_fn(config, args, device, "eager" if system.endswith("loop") else None)
    elif system == "batchpilot_trainer":
        step = trainer_step_fn(config, args, device)
    else:
        step = ours_step_fn(config, args, device, compiled=system.endswith("compile"))
    times, losses = [], []
    for i, batch in enumerate(batches(config, args, device)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses.append(step(batch))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    profiled = {}
    if args.profile and device.type == "cuda":
        from train_profile import profile_step

        from torch._dynamo.utils import counters

        _, profiled["profile"] = profile_step(lambda: step(batch))
        profiled["profile"]["dynamo_graphs"] = counters["stats"]["unique_graphs"]
    tokens_per_s = args.rows * args.seq / step_s
    flops_per_token = counting.training_flops_per_token(config, args.seq)
    return {"system": system, "tokens_per_s": tokens_per_s, "step_s": step_s, "step_times": times,
            "mfu_activated": tokens_per_s * flops_per_token / (args.peak_tflops * 1e12),
            "first_loss": losses[0], "last_loss": losses[-1],
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            **profiled}


def run_in_subprocess(system: str, argv: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--run-one", system]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"system": system, "error": f"timed out after {timeout:.0f} s"}
    rows = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode or not rows:
        return {"system": system, "error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    return json.loads(rows[-1])


def summarise(rows: dict[str, dict]) -> dict:
    ok = {s: r["tokens_per_s"] for s, r in rows.items() if "tokens_per_s" in r}
    ours = max((ok[s] for s in ("batchpilot", "batchpilot_compile", "batchpilot_trainer") if s in ok), default=None)
    summary: dict = {f"tokens_per_s_{s}": v for s, v in ok.items()}
    for base in ("hf_qwen2moe", "hf_qwen2moe_loop"):
        summary[f"speedup_vs_{base}"] = ours / ok[base] if ours and base in ok else None
    if "batchpilot_trainer" in ok:  # the product path against the harness and against HF
        summary["trainer_vs_harness"] = (ok["batchpilot_trainer"] / ok["batchpilot_compile"]
                                         if "batchpilot_compile" in ok else None)
        summary["trainer_speedup_vs_hf_qwen2moe"] = (ok["batchpilot_trainer"] / ok["hf_qwen2moe"]
                                                     if "hf_qwen2moe" in ok else None)
    summary.update({f"mfu_activated_{s}": r["mfu_activated"] for s, r in rows.items() if "mfu_activated" in r})
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="moe-1b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rows", type=int, default=16, help="sequences per optimizer step (same for every system)")
    p.add_argument("--mb", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lbl-coef", type=float, default=0.001)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per system")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    p.add_argument("--profile", action="store_true",
                   help="after timing, one more step under the CUDA profiler: kernel time by category, top kernels, "
                        "dynamo graphs (GPU only)")
    p.add_argument("--run-one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke and "--seq" not in sys.argv:
        args.seq, args.rows, args.mb, args.steps, args.warmup = 64, 4, 2, 2, 1
    if args.rows % args.mb:
        p.error(f"--rows ({args.rows}) must be a multiple of --mb ({args.mb})")
    return args


def main() -> None:
    args = parse_args()
    if args.run_one:
        print("ROW " + json.dumps(run_one(args.run_one, args)), flush=True)
        return
    argv = [a for a in sys.argv[1:]]
    systems = [s for s in args.systems.split(",") if s]
    if args.smoke:
        systems = [s for s in systems if s != "batchpilot_compile"]  # CPU inductor compile: minutes
    rows = {}
    for system in systems:
        rows[system] = run_in_subprocess(system, argv, args.timeout)
        print(json.dumps({k: v for k, v in rows[system].items() if k != "step_times"}), flush=True)
    config = model_config(args)
    result = {"benchmark": "moe_throughput", "summary": summarise(rows), "systems": rows,
              "shape": {"preset": "tiny-moe (smoke)" if args.smoke else args.preset, "seq": args.seq,
                        "rows_per_step": args.rows, "micro_batch": args.mb,
                        "total_non_vocab_params": counting.non_vocab_params(config),
                        "activated_non_vocab_params": counting.activated_non_vocab_params(config),
                        "training_flops_per_token": counting.training_flops_per_token(config, args.seq)},
              "provenance": provenance()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d_%H%M%S")
    path = out / f"moe_throughput_{'smoke_' if args.smoke else ''}{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
