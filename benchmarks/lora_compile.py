"""Compile start-up of LoRA fine-tuning against full fine-tuning: graphs compiled, their size, seconds.

Each variant runs in a fresh process with empty Inductor/Triton caches, compiles every block as
``benchmarks/finetune.py`` and ``--parallel.compile`` do (``block.compile()``; a counting backend in front of
Inductor records each graph dynamo captures and its number of call nodes) and times AdamW steps:
``step_s`` is the median of the last half of the steps and ``startup_s`` what all steps took beyond
``step_s`` each (tracing, AOTAutograd, Inductor for forward and backward, and the first slow steps while
Inductor's worker processes finish their kernels); ``startup_cpu_s`` is the same in CPU seconds of the process and its
children (the C++ compiler), which a loaded machine inflates less: on CPU, Inductor compiles in-process
(``TORCHINDUCTOR_COMPILE_THREADS=1`` unless set) so that all its work is counted. On a GPU Inductor keeps its
worker processes (Triton compiles in parallel, as in training), so read ``startup_s`` there. Variants:
  full_ft     every parameter trains
  lora_peft   PEFT's injection alone: its ``lora.Linear.forward``, block 0's input not requiring grad (the
              LoRA path before issue 21's fix)
  lora_hook   ``apply_lora`` with PEFT's forward put back: the input hook alone
  lora        ``apply_lora`` as the trainer runs it: our compiled-path forward and block inputs that
              require grad (``batchpilot/train/lora.py``)
Usage:
    python benchmarks/lora_compile.py                       # CPU: the tiny preset and a 2-layer llama-1b width
    python benchmarks/lora_compile.py --shapes llama-1b --seq-len 4096 --batch 4 --steps 5   # one GPU (bf16 autocast)
Prints one JSON line per (shape, variant) and writes ``benchmarks/results/lora_compile_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("full_ft", "lora_peft", "lora_hook", "lora")


def shape_config(name: str):
    from batchpilot.model.llama import get_preset

    if name == "tiny":
        return get_preset("tiny")
    if name == "llama-1b-2l":  # the llama-1b block width on CPU: two blocks, a small vocabulary
        return get_preset("llama-1b").with_(num_layers=2, vocab_size=2048, rope_scaling=None)
    return get_preset(name)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the C++ compiler Inductor runs)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_variant(shape: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch._inductor.compile_fx import compile_fx

    from batchpilot.model.llama import build_model
    from batchpilot.train.lora import LoraConfig, apply_lora

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = args.autocast == "on" or (args.autocast == "auto" and device.type == "cuda")
    model = build_model(shape_config(shape), device=device, seed=0)
    lora = LoraConfig(rank=16, alpha=32.0, seed=0)
    if variant == "lora_peft":  # what apply_lora did before: PEFT's injection alone
        import peft

        torch.manual_seed(0)
        peft.inject_adapter_in_model(peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha,  # type: ignore[arg-type]
                                                     target_modules=list(lora.target_modules)), model)
    elif variant in ("lora_hook", "lora"):
        apply_lora(model, lora)
        if variant == "lora_hook":  # the input hook, PEFT's forward
            import peft

            for module in model.modules():
                if isinstance(module, peft.tuners.lora.Linear):
                    module.__class__ = peft.tuners.lora.Linear
    graphs: list[int] = []

    def counting_inductor(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        graphs.append(sum(n.op in ("call_function", "call_method", "call_module") for n in gm.graph.nodes))
        return compile_fx(gm, example_inputs)

    for layer in model.layers:
        layer.compile(backend=counting_inductor)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len + 1), generator=g).to(device)
    times, cpu_times = [], []
    for _ in range(1 + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), cpu_seconds()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(cpu_seconds() - c0)
    from torch._dynamo.utils import compile_times

    table = compile_times(repr="csv", aggregate=True)  # (phase names, seconds as strings), summed over graphs
    phases = {name: round(float(str(sec)), 2) for name, sec in zip(*table)} if isinstance(table, tuple) else {}
    step_s = statistics.median(times[-(len(times) // 2):])
    step_cpu_s = statistics.median(cpu_times[-(len(cpu_times) // 2):])
    return {"shape": shape, "variant": variant, "graphs_compiled": len(graphs), "graph_call_nodes": graphs,
            "startup_s": round(sum(times) - len(times) * step_s, 2), "first_step_s": round(times[0], 2),
            "startup_cpu_s": round(sum(cpu_times) - len(cpu_times) * step_cpu_s, 2),
            "step_s": round(step_s, 4),
            "trainable_params": sum(p.numel() for p in params), "device": device.type, "autocast": autocast,
            "torch": torch.__version__, "compile_phases_s": phases, "step_times": [round(t, 3) for t in times]}


def spawn(shape: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One variant in a fresh process whose Inductor and Triton caches start empty (a cold start)."""
    import torch

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton"),
               "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
        if not torch.cuda.is_available():  # CPU: compile in-process, so that startup_cpu_s counts all of it
            env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        cmd = [sys.executable, __file__, "--one", f"{shape}:{variant}", "--seq-len", str(args.seq_len),
               "--batch", str(args.batch), "--steps", str(args.steps),
               "--autocast", args.autocast]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    return rows[0] if rows else {"shape": shape, "variant": variant, "error": (proc.stderr or proc.stdout)[-1500:]}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="tiny,llama-1b-2l", help="comma-separated: tiny, llama-1b-2l or a preset")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="steps after the first")
    p.add_argument("--autocast", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast around the forward (auto: on CUDA only, as benchmarks/finetune.py)")
    p.add_argument("--out", default=None, help="directory for the JSON (default benchmarks/results)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        shape, variant = args.one.split(":")
        print("ROW " + json.dumps(run_variant(shape, variant, args)), flush=True)
        return
    from provenance import provenance

    rows = []
    for shape in args.shapes.split(","):
        for variant in args.variants.split(","):
            rows.append(spawn(shape, variant, args))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"lora_compile_{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps({"benchmark": "lora_compile", "environment": provenance(),
                                "settings": {k: v for k, v in vars(args).items() if k not in ("out", "one")},
                                "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
