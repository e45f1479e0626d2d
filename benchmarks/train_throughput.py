"""Training throughput of batchpilot against Hugging Face baselines on one GPU (or FSDP2 on several).

Systems, all on the same model shape (``--preset``, default llama-1b: 1.24B, tied, 128k vocab), the
same tokens per step and bf16 compute:
  hf          transformers LlamaForCausalLM, SDPA, bf16 weights, fused AdamW (the baseline recipe most users run)
  liger       hf + ``apply_liger_kernel_to_llama`` (fused linear-CE, RMSNorm, RoPE, SwiGLU)
  hf_compile  hf + ``torch.compile(model)``
  batchpilot  the trainer's ``train_step`` (fp32 master weights, bf16 autocast, fused AdamW, grad clipping,
              fused chunked CE) on a model from ``parallelize(compile=True)``: the trainer's one-GPU path
  batchpilot_bf16  the same with ``parallelize(..., param_dtype=bf16, fsdp_one_device=True)``: FSDP2's
              mixed precision on one GPU (bf16 compute copies, fp32 masters), so activations and the
              residual stream are bf16 as on several GPUs; a candidate default for the trainer
  torchtitan, torchtitan_float8  torchtitan's own Trainer on the same shape (benchmarks/torchtitan_runner.py):
              its compile (model and loss), no checkpointing, float8 through its converter
  batchpilot_float8, batchpilot_bf16_float8  the two batchpilot paths with ``--float8`` (torchao, recipe
              ``--float8-recipe``, default tensorwise): float8 matmuls in the blocks. Not the baselines'
              precision, so summarised apart (``float8_*`` keys), never in ``speedup_vs_hf_liger_*``
HF baselines use gradient checkpointing where the micro-batch needs it (as such users do) and do no
gradient clipping and accumulate when the micro-batch is smaller than the step.

Each system runs in its own subprocess (an OOM or compile state cannot leak into the next one).
Per case: ``--warmup`` steps, then ``--steps`` timed steps (synchronize + perf_counter); tokens/s from the
median step. MFU against ``--peak-tflops`` (989, H100/H200 dense bf16) with the PaLM convention
(Chowdhery et al. 2022, arXiv 2204.02311, appendix B): FLOPs/token = 6 N + 12 L d_q s, N = matmul parameters (blocks + LM head, the
embedding lookup is free), L layers, d_q = heads x head_dim, s = seq_len (attention counted as if
not causal). ``mfu_causal`` halves the attention term (what causal kernels execute; the trainer's
metrics use that one).

Usage (one H200, ~7 min):  python benchmarks/train_throughput.py
FSDP2 scaling (2 GPUs):    torchrun --standalone --nproc-per-node 2 benchmarks/train_throughput.py --fsdp \\
                               --single-gpu-tokens-per-s <batchpilot seq2048 tokens/s from the 1-GPU run>
CPU smoke test:            python benchmarks/train_throughput.py --smoke
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from provenance import provenance  # noqa: E402

from batchpilot.data.packing import Batch  # noqa: E402
from batchpilot.model.llama import LlamaConfig, build_model, get_preset  # noqa: E402
from batchpilot.train import parallel, trainer  # noqa: E402
from batchpilot.train.autofit import release_memory_after_oom  # noqa: E402
from batchpilot.train.optim import OptimConfig, build_optimizer  # noqa: E402


# ----------------------------------------------------------------------------------------- cases
def plan_cases(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Per system, the (seq, rows per step, micro-batch, checkpointing) cases; same rows per step everywhere."""
    if args.smoke:
        s1, s2, rows1, rows2 = 64, 128, 4, 2
        return {"hf": [dict(seq=s1, rows=rows1, mb=4, ac="none"), dict(seq=s2, rows=rows2, mb=1, ac="full")],
                "liger": [dict(seq=s1, rows=rows1, mb=4, ac="none")],
                "hf_compile": [],
                "batchpilot": [dict(seq=s1, rows=rows1, mb=4, ac="none"), dict(seq=s2, rows=rows2, mb=1, ac="full")],
                "batchpilot_bf16": [dict(seq=s1, rows=rows1, mb=4, ac="none")],
                "batchpilot_float8": [], "batchpilot_bf16_float8": [],  # CPU float8 matmuls: far too slow
                "torchtitan": [], "torchtitan_float8": []}  # torchtitan imports triton: GPU only
    r1, r2 = args.rows_seq2048, args.rows_seq8192
    return {  # micro-batches measured as the largest or fastest that fit an H200
        "hf": [dict(seq=2048, rows=r1, mb=16, ac="none"), dict(seq=8192, rows=r2, mb=8, ac="full")],
        "liger": [dict(seq=2048, rows=r1, mb=16, ac="none"), dict(seq=8192, rows=r2, mb=8, ac="full")],
        "hf_compile": [dict(seq=2048, rows=r1, mb=8, ac="none")],  # seq 8192 + checkpointing: compile is too slow there
        "batchpilot": [dict(seq=2048, rows=r1, mb=16, ac="none"), dict(seq=8192, rows=r2, mb=4, ac="none")],
        "batchpilot_bf16": [dict(seq=2048, rows=r1, mb=16, ac="none"), dict(seq=8192, rows=r2, mb=4, ac="none"),
                            dict(seq=8192, rows=r2, mb=8, ac="selective")],
        "batchpilot_float8": [dict(seq=2048, rows=r1, mb=16, ac="none"), dict(seq=8192, rows=r2, mb=4, ac="none")],
        "batchpilot_bf16_float8": [dict(seq=2048, rows=r1, mb=16, ac="none"),
                                   dict(seq=8192, rows=r2, mb=4, ac="none")],
        # torchtitan's own trainer (benchmarks/torchtitan_runner.py): compile of model and loss, no checkpointing
        "torchtitan": [dict(seq=2048, rows=r1, mb=16, ac="none"), dict(seq=8192, rows=r2, mb=4, ac="none")],
        "torchtitan_float8": [dict(seq=2048, rows=r1, mb=16, ac="none"), dict(seq=8192, rows=r2, mb=4, ac="none")],
    }


def flops_per_token(config: LlamaConfig, seq: int, *, causal: bool = False) -> float:
    d, L = config.hidden_size, config.num_layers
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    matmul_params = L * (d * q + 2 * d * kv + q * d + 3 * d * config.intermediate_size) + d * config.vocab_size
    return 6 * matmul_params + (6 if causal else 12) * L * q * seq


# ------------------------------------------------------------------------------------- systems
class RandomRows:
    """A stand-in for PackedLoader: random tokens, one document per row (positions 0..T-1)."""

    def __init__(self, vocab_size: int, seq: int, seed: int = 0) -> None:
        self.vocab_size, self.seq = vocab_size, seq
        self.gen = torch.Generator().manual_seed(seed)

    def take(self, num_rows: int, *, rank: int = 0, world_size: int = 1) -> Batch:
        rows = num_rows // world_size
        tokens = torch.randint(0, self.vocab_size, (rows, self.seq + 1), generator=self.gen)
        positions = torch.arange(self.seq).expand(rows, -1).contiguous()
        return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), positions)


class BatchpilotRunner:
    def __init__(self, config: LlamaConfig, dims: parallel.ParallelDims, *, ac: str, compile: bool,
                 bf16_params: bool = False, float8: str | None = None) -> None:
        self.config, self.dims = config, dims
        model = build_model(config, device=dims.device, seed=0)
        # as the trainer: bf16 compute copies under FSDP2 on CUDA (and on one device when asked)
        param_dtype = torch.bfloat16 if bf16_params or (dims.is_distributed and dims.device.type == "cuda") else None
        self.model = parallel.parallelize(model, dims, activation_checkpointing=ac, compile=compile,
                                          param_dtype=param_dtype, fsdp_one_device=bf16_params, float8=float8)
        self.optimizer = build_optimizer(self.model, OptimConfig(lr=1e-4))

    def step(self, loader: RandomRows, *, rows: int, seq: int, mb: int) -> None:
        trainer.train_step(self.model, self.optimizer, loader, global_batch_tokens=rows * seq * self.dims.world_size,
                           seq_len=seq, micro_batch_size=mb, dims=self.dims, grad_clip=1.0)

    def close(self) -> None:
        self.model = self.optimizer = None


class HFRunner:
    def __init__(self, config: LlamaConfig, device: torch.device, *, ac: str, compile: bool, liger: bool) -> None:
        import transformers

        from batchpilot.model.hf import config_to_hf

        if liger:
            from liger_kernel.transformers import apply_liger_kernel_to_llama

            apply_liger_kernel_to_llama()  # patches the classes: build the model after this
        hf = {k: v for k, v in config_to_hf(config).items() if k not in ("architectures", "model_type", "torch_dtype")}
        hf_config = transformers.LlamaConfig(**hf, attn_implementation="sdpa")
        torch.manual_seed(0)
        with torch.device(device):  # initialise on the GPU: a 1.24B fp32 init on the host takes many seconds
            self.model = transformers.LlamaForCausalLM(hf_config).to(dtype=torch.bfloat16)
        self.model.config.use_cache = False
        if ac != "none":
            self.model.gradient_checkpointing_enable()
        self.forward = torch.compile(self.model) if compile else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda")
        self.device = device

    def step(self, loader: RandomRows, *, rows: int, seq: int, mb: int) -> None:
        sizes = trainer.micro_batch_sizes(rows, mb)
        for n in sizes:
            x = loader.take(n).input_ids.to(self.device)
            (self.forward(input_ids=x, labels=x).loss * (n / rows)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.model = self.forward = self.optimizer = None


def build_runner(system: str, config: LlamaConfig, dims: parallel.ParallelDims, ac: str, args):
    compile_ok = not args.smoke  # compiling on CPU takes minutes: the smoke test checks the code path only
    if system.startswith("batchpilot"):
        return BatchpilotRunner(config, dims, ac=ac, compile=compile_ok, bf16_params=system.startswith("batchpilot_bf16"),
                                float8=args.float8_recipe if system.endswith("_float8") else None)
    return HFRunner(config, dims.device, ac=ac, compile=system == "hf_compile" and compile_ok,
                    liger=system == "liger")


# ----------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(system: str, config: LlamaConfig, dims: parallel.ParallelDims, case: dict, args) -> dict:
    row: dict[str, Any] = dict(system=system, **case)
    runner = None
    try:
        runner = build_runner(system, config, dims, case["ac"], args)
        loader = RandomRows(config.vocab_size, case["seq"], seed=dims.rank)
        if dims.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dims.device)
        times = []
        for i in range(args.warmup + args.steps):
            _sync(dims.device)
            t0 = time.perf_counter()
            runner.step(loader, rows=case["rows"], seq=case["seq"], mb=case["mb"])
            _sync(dims.device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        tokens_per_s = case["rows"] * case["seq"] * dims.world_size / step_s
        per_gpu = tokens_per_s / dims.world_size
        row.update(step_s=round(step_s, 4), tokens_per_s=round(tokens_per_s, 1), tokens_per_s_per_gpu=round(per_gpu, 1),
                   mfu=round(per_gpu * flops_per_token(config, case["seq"]) / (args.peak_tflops * 1e12), 4),
                   mfu_causal=round(per_gpu * flops_per_token(config, case["seq"], causal=True)
                                    / (args.peak_tflops * 1e12), 4),
                   step_times=[round(t, 4) for t in times])
        if dims.device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(dims.device) / 2**30, 2)
    except torch.OutOfMemoryError:
        row["oom"] = True
    except Exception as e:  # a baseline that fails (e.g. compile) is recorded, not fatal
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        if runner is not None:
            runner.close()
        gc.collect()
        if dims.device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def largest_micro_batch(system: str, config: LlamaConfig, dims: parallel.ParallelDims, args) -> dict:
    """Largest micro-batch at seq ``args.fit_seq`` with full checkpointing: double until an OOM, then bisect.
    One step (forward, backward, optimizer) per probe. Each system runs as it trains: batchpilot's blocks
    compiled (the second size recompiles once with a dynamic batch; the fused graphs also save fewer
    activations for the recompute), HF + Liger eager (compiling it was measured slower)."""
    seq, cap = (128, 16) if args.smoke else (args.fit_seq, args.fit_max)
    compile = system.startswith("batchpilot") and not args.smoke
    if system.startswith("batchpilot"):
        runner = BatchpilotRunner(config, dims, ac="full", compile=compile, bf16_params=system == "batchpilot_bf16")
    else:
        runner = HFRunner(config, dims.device, ac="full", compile=False, liger=system == "liger")
    loader = RandomRows(config.vocab_size, seq)
    probes: list[dict] = []

    def fits(mb: int) -> bool:
        ok = True
        if dims.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dims.device)
        try:
            runner.step(loader, rows=mb, seq=seq, mb=mb)
            _sync(dims.device)
        except torch.OutOfMemoryError:
            ok = False
        if not ok:
            release_memory_after_oom(runner.model, runner.optimizer, dims)
        peak = torch.cuda.max_memory_allocated(dims.device) / 2**30 if dims.device.type == "cuda" else None
        probes.append(dict(micro_batch=mb, fits=ok, peak_gib=peak and round(peak, 2)))
        print("PROBE " + json.dumps(probes[-1]), flush=True)  # the parent keeps these if the search times out
        return ok

    lo, hi, mb = 0, None, args.fit_start
    while mb <= cap and fits(mb):
        lo, mb = mb, mb * 2
    hi = mb if mb <= cap else None
    while hi is not None and hi - lo > max(1, lo // 4):  # bisect to within 1/4
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    runner.close()
    fit_peak = max((p["peak_gib"] or 0 for p in probes if p["fits"] and p["micro_batch"] == lo), default=None)
    return dict(system=system, seq=seq, ac="full", compile=compile, largest_micro_batch=lo,
                first_oom=hi, capped=hi is None, probes=probes, peak_gib_at_largest=fit_peak)


def run_one(spec: dict, args) -> None:
    """Child process: run the cases of one system and print one ``ROW {json}`` line per case."""
    dims = parallel.ParallelDims(device=torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    if dims.device.type == "cuda":
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = True
    config = get_preset(args.preset)
    if spec.get("fit"):
        print("ROW " + json.dumps(largest_micro_batch(spec["system"], config, dims, args)), flush=True)
        return
    for case in spec["cases"]:
        run = time_torchtitan_case if spec["system"].startswith("torchtitan") else time_case
        print("ROW " + json.dumps(run(spec["system"], config, dims, case, args)), flush=True)


def time_torchtitan_case(system: str, config: LlamaConfig, dims: parallel.ParallelDims, case: dict, args) -> dict:
    """torchtitan's Trainer on the same shape, tokens per step and micro-batch (one case per child process)."""
    from torchtitan_runner import time_torchtitan

    row: dict[str, Any] = dict(system=system, **case)
    try:
        row |= time_torchtitan(case, config, warmup=args.warmup, steps=args.steps, compile=not args.smoke,
                               float8=args.float8_recipe if system.endswith("_float8") else None,
                               peak_tflops=args.peak_tflops, flops_per_token=flops_per_token(config, case["seq"]))
        row["mfu_causal"] = round(row["tokens_per_s"] * flops_per_token(config, case["seq"], causal=True)
                                  / (args.peak_tflops * 1e12), 4)
    except torch.OutOfMemoryError:
        row["oom"] = True
    except Exception as e:  # recorded, not fatal: the other systems still run; where it failed in torchtitan
        row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        row["traceback_tail"] = traceback.format_exc()[-1500:]
    return row


# ------------------------------------------------------------------------------------ driving
def run_child(spec: dict, argv: list[str], timeout: float) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--run-one", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        probes = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("PROBE ")]
        row = dict(system=spec["system"], error=f"timed out after {timeout} s")
        if probes:  # a partial search still bounds the largest micro-batch from below
            row |= dict(probes=probes, largest_fitting_so_far=max((p["micro_batch"] for p in probes if p["fits"]),
                                                                  default=0))
        print(json.dumps(row), flush=True)
        return [row]
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode != 0 or not rows:
        rows.append(dict(system=spec["system"], error=f"exit {proc.returncode}: {proc.stderr[-1500:]}"))
    for r in rows:
        r["process_seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({k: v for k, v in r.items() if k not in ("step_times", "probes")}), flush=True)
    return rows


def best(rows: list[dict], system: str, seq: int) -> dict | None:
    ok = [r for r in rows if r.get("system") == system and r.get("seq") == seq and "tokens_per_s" in r]
    return max(ok, key=lambda r: r["tokens_per_s"], default=None)


def summarize(rows: list[dict], seqs: tuple[int, int], float8_recipe: str) -> dict:
    """Speedups at the baselines' precision (bf16 matmuls); the float8 systems under their own keys."""
    summary: dict[str, Any] = {"float8_recipe": float8_recipe}
    for seq in seqs:
        key = f"seq{seq}" if seq in (2048, 8192) else f"seq{seq}_smoke"
        trainer_path, bf16 = best(rows, "batchpilot", seq), best(rows, "batchpilot_bf16", seq)
        ours = max((r for r in (trainer_path, bf16) if r), key=lambda r: r["tokens_per_s"], default=None)
        liger = best(rows, "liger", seq)
        summary[f"batchpilot_tokens_per_s_{key}"] = ours and ours["tokens_per_s"]
        summary[f"batchpilot_best_config_{key}"] = ours and {k: ours[k] for k in ("system", "mb", "ac")}
        summary[f"batchpilot_autocast_tokens_per_s_{key}"] = trainer_path and trainer_path["tokens_per_s"]
        summary[f"batchpilot_bf16_tokens_per_s_{key}"] = bf16 and bf16["tokens_per_s"]
        summary[f"mfu_{key}"] = ours and ours["mfu"]
        summary[f"speedup_vs_hf_liger_{key}"] = round(ours["tokens_per_s"] / liger["tokens_per_s"], 3) \
            if ours and liger else None
        for other in ("hf", "hf_compile"):
            base = best(rows, other, seq)
            summary[f"speedup_vs_{other}_{key}"] = round(ours["tokens_per_s"] / base["tokens_per_s"], 3) \
                if ours and base else None
        float8 = max((r for r in (best(rows, "batchpilot_float8", seq), best(rows, "batchpilot_bf16_float8", seq))
                      if r), key=lambda r: r["tokens_per_s"], default=None)
        summary[f"float8_tokens_per_s_{key}"] = float8 and float8["tokens_per_s"]
        summary[f"float8_best_config_{key}"] = float8 and {k: float8[k] for k in ("system", "mb", "ac")}
        summary[f"float8_mfu_against_bf16_peak_{key}"] = float8 and float8["mfu"]
        summary[f"float8_speedup_vs_hf_liger_{key}"] = round(float8["tokens_per_s"] / liger["tokens_per_s"], 3) \
            if float8 and liger else None
        summary[f"float8_speedup_vs_batchpilot_bf16_matmuls_{key}"] = \
            round(float8["tokens_per_s"] / ours["tokens_per_s"], 3) if float8 and ours else None
        titan, titan8 = best(rows, "torchtitan", seq), best(rows, "torchtitan_float8", seq)
        summary[f"torchtitan_tokens_per_s_{key}"] = titan and titan["tokens_per_s"]
        summary[f"torchtitan_float8_tokens_per_s_{key}"] = titan8 and titan8["tokens_per_s"]
        summary[f"speedup_vs_torchtitan_{key}"] = round(ours["tokens_per_s"] / titan["tokens_per_s"], 3) \
            if ours and titan else None
        summary[f"float8_speedup_vs_torchtitan_{key}"] = round(float8["tokens_per_s"] / titan8["tokens_per_s"], 3) \
            if float8 and titan8 else None
    fit = {r["system"]: r for r in rows if "largest_micro_batch" in r}
    if fit:
        summary["largest_micro_batch_fit_seq"] = {k: v["largest_micro_batch"] for k, v in fit.items()}
    return summary


def environment() -> dict:
    versions = {}
    for name in ("transformers", "liger_kernel", "triton", "torchao", "torchtitan"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001  (missing or broken: recorded)
            versions[name] = f"unavailable ({type(e).__name__})"
    return {**provenance(), **versions, "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}


def write_result(result: dict, out_dir: str | None, name: str) -> Path:
    out = Path(out_dir) if out_dir else REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}_{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return path


def main_single(args, passthrough: list[str]) -> None:
    cases = {system: [c for c in system_cases if args.only_seq is None or c["seq"] == args.only_seq]
             for system, system_cases in plan_cases(args).items()}
    skip = {"hf": args.skip_hf, "liger": args.skip_liger, "hf_compile": args.skip_hf_compile,
            "batchpilot": args.skip_batchpilot, "batchpilot_bf16": args.skip_batchpilot_bf16,
            "batchpilot_float8": args.skip_float8, "batchpilot_bf16_float8": args.skip_float8,
            "torchtitan": args.skip_torchtitan, "torchtitan_float8": args.skip_torchtitan or args.skip_float8}
    rows, skipped = [], {}
    for system, system_cases in cases.items():
        if args.only_fit_search:
            break
        if skip[system] or not system_cases:
            skipped[system] = "skipped by flag" if skip[system] else "no cases in this mode"
            continue
        if system == "liger" and (reason := _liger_missing()):
            skipped[system] = reason
            continue
        if system.endswith("_float8") and (reason := _float8_missing()):
            skipped[system] = reason
            continue
        if system.startswith("torchtitan") and (reason := _torchtitan_missing()):
            skipped[system] = reason
            continue
        if system.startswith("torchtitan"):  # one child per case: torchtitan's process group is set up per trainer
            for case in system_cases:
                rows += run_child(dict(system=system, cases=[case]), passthrough, args.child_timeout)
            continue
        rows += run_child(dict(system=system, cases=system_cases), passthrough, args.child_timeout)
    if not args.skip_fit_search:
        for system in ("batchpilot", "batchpilot_bf16", "liger"):
            if skip[system] or (system == "liger" and _liger_missing()):
                continue
            rows += run_child(dict(system=system, fit=True), passthrough, args.child_timeout)
    seqs = (64, 128) if args.smoke else (2048, 8192)
    result = dict(benchmark="train_throughput", preset=args.preset, peak_tflops=args.peak_tflops,
                  attention="trainer.forward_loss: rows are single documents, so causal SDPA (flash)",
                  flops_formula="6*N_matmul + 12*L*d_q*seq (PaLM/anchors); "
                  "mfu_causal: 6*N_matmul + 6*L*d_q*seq", **environment(), skipped=skipped,
                  rows=rows, summary=summarize(rows, seqs, args.float8_recipe))
    print(json.dumps(result["summary"], indent=1))
    write_result(result, args.out, "train_throughput")


def main_fsdp(args) -> None:
    """Under torchrun: batchpilot only, FSDP2 over all ranks, per-GPU tokens/s vs the 1-GPU figure."""
    dims = parallel.init_distributed("auto")
    config = get_preset("tiny" if args.smoke else args.preset)
    case = dict(seq=64, rows=2, mb=2, ac="none") if args.smoke else dict(seq=2048, rows=args.rows_seq2048, mb=16,
                                                                          ac="none")
    row = time_case("batchpilot", config, dims, case, args)  # rows are per rank: the global batch grows with ranks
    row["world_size"] = dims.world_size
    rows = [None] * dims.world_size if dims.rank == 0 else None
    import torch.distributed as dist  # only to gather the per-rank rows for the report

    dist.gather_object(row, rows, dst=0)
    if dims.rank == 0:
        per_gpu = statistics.mean(r.get("tokens_per_s_per_gpu", 0.0) for r in rows)
        eff = per_gpu / args.single_gpu_tokens_per_s if args.single_gpu_tokens_per_s else None
        key = f"fsdp2_scaling_efficiency_{dims.world_size}gpu"
        result = dict(benchmark="train_throughput_fsdp", preset=args.preset, **environment(), rows=rows,
                      summary={key: eff and round(eff, 3), "tokens_per_s_per_gpu": round(per_gpu, 1),
                               "single_gpu_tokens_per_s": args.single_gpu_tokens_per_s})
        print(json.dumps(result["summary"], indent=1))
        write_result(result, args.out, "train_throughput_fsdp")
    parallel.shutdown_distributed()


def _float8_missing() -> str | None:
    try:
        import torchao.float8  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"torchao.float8 not importable ({type(e).__name__}: {str(e)[:120]})"
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        return "float8 matmuls need a GPU of compute capability 8.9+"
    return None


def _torchtitan_missing() -> str | None:
    try:
        import torchtitan.train  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"torchtitan not importable ({type(e).__name__}: {str(e)[:160]})"
    if not torch.cuda.is_available():
        return "torchtitan's trainer needs CUDA here"
    return None


def _liger_missing() -> str | None:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"liger_kernel not importable ({type(e).__name__}: {str(e)[:120]})"
    if not torch.cuda.is_available():
        return "liger_kernel needs CUDA"
    return None


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="toy sizes on CPU (tiny preset)")
    p.add_argument("--preset", default=None, help="model preset (default llama-1b; tiny with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 5; 2 with --smoke)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps per case (default 3; 1 with --smoke)")
    p.add_argument("--rows-seq2048", type=int, default=16, help="rows per step at seq 2048 (32k tokens)")
    p.add_argument("--rows-seq8192", type=int, default=8, help="rows per step at seq 8192 (64k tokens)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--only-seq", type=int, default=None, help="run only the cases at this sequence length")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-liger", action="store_true")
    p.add_argument("--skip-hf-compile", action="store_true")
    p.add_argument("--skip-batchpilot", action="store_true", help="the trainer's one-GPU path (autocast)")
    p.add_argument("--skip-batchpilot-bf16", action="store_true", help="one-GPU FSDP2 mixed precision")
    p.add_argument("--skip-float8", action="store_true", help="the float8 systems (batchpilot and torchtitan)")
    p.add_argument("--skip-torchtitan", action="store_true", help="torchtitan's trainer (bf16 and float8)")
    p.add_argument("--float8-recipe", default="tensorwise", choices=parallel.FLOAT8_RECIPES)
    p.add_argument("--skip-fit-search", action="store_true", help="skip the largest-micro-batch search")
    p.add_argument("--only-fit-search", action="store_true", help="run only the largest-micro-batch search")
    p.add_argument("--fit-seq", type=int, default=8192)
    p.add_argument("--fit-start", type=int, default=16)
    p.add_argument("--fit-max", type=int, default=256)
    p.add_argument("--child-timeout", type=float, default=600.0)
    p.add_argument("--fsdp", action="store_true", help="under torchrun: batchpilot FSDP2 only")
    p.add_argument("--single-gpu-tokens-per-s", type=float, default=None)
    p.add_argument("--out", default=None, help="directory for the JSON (default benchmarks/results)")
    p.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.smoke else "llama-1b")
    args.steps = args.steps or (2 if args.smoke else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    if args.smoke:
        args.fit_start = 2
    raw = list(sys.argv[1:] if argv is None else argv)
    passthrough = [a for i, a in enumerate(raw) if a != "--run-one" and (i == 0 or raw[i - 1] != "--run-one")]
    return args, passthrough


def main() -> None:
    args, passthrough = parse_args()
    # every system's process (children inherit it) gets the allocator setting `batchpilot train` uses
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.run_one is not None:
        run_one(json.loads(args.run_one), args)
    elif args.fsdp:
        main_fsdp(args)
    else:
        main_single(args, passthrough)


if __name__ == "__main__":
    main()
