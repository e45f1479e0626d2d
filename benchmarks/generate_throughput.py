"""Generation throughput: batchpilot's engine vs HF ``generate`` on the generate issue's workloads.

    python benchmarks/generate_throughput.py                 # llama-1b, random bf16 weights, one GPU (~6 min)
    python benchmarks/generate_throughput.py --quick         # only (a) vs HF and (c), no ablations (~2 min)
    python benchmarks/generate_throughput.py --smoke         # toy sizes, runs on CPU

Workloads (fixed output lengths, EOS ignored): (a) N prompts of 512 tokens sharing a 480-token prefix,
128 new; (b) N prompts over 8 distinct 1k-token prefixes + 64-token suffixes, 256 new; (c) no
sharing, prompt lengths 128-1024, 256 new. HF ``generate`` (batched, left-padded, same weights) runs
on (a) only. Every row reports output tokens/s and the share of the bytes/FLOPs roofline
(Pope et al. 2022, arXiv 2211.05102, section 2). Each engine row runs its job twice and reports the warm run (``cold_seconds``:
the first, with Triton compiles and CUDA-graph captures). Writes ``<out>/generate_throughput_<date>.json``, again
after every row (a run cut short keeps the rows it finished).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from provenance import provenance

import batchpilot
from batchpilot.generate.engine import Engine, EngineConfig
from batchpilot.generate.graphs import greedy_tokens
from batchpilot.generate.roofline import measure_copy_bandwidth, roofline_share
from batchpilot.generate.request import SamplingParams


def workloads(args: argparse.Namespace, vocab: int) -> dict[str, tuple[list[list[int]], int]]:
    rng = random.Random(0)
    s = 16 if args.smoke else 1  # smoke: lengths divided by 16

    def toks(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(max(1, n // s))]

    prefix_a = toks(480)
    a = [prefix_a + toks(32) for _ in range(args.a_requests)]
    prefixes_b = [toks(1024) for _ in range(8)]
    b = [prefixes_b[i % 8] + toks(64) for i in range(args.b_requests)]
    c = [toks(rng.randint(128, 1024)) for _ in range(args.c_requests)]
    return {"a": (a, 128 // s), "b": (b, 256 // s), "c": (c, 256 // s)}


def run_engine(model: torch.nn.Module, prompts: list[list[int]], new: int, cfg: EngineConfig) -> dict:
    """The job twice on one engine: cold (Triton compiles, CUDA graph captures) and warm (reported)."""
    engine = Engine(model, None, cfg)
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    cold = _timed(engine, prompts, params)[0]
    engine.stats = type(engine.stats)()
    seconds, results = _timed(engine, prompts, params)
    lengths = [(len(r.prompt_ids), len(r.output_ids)) for r in results]
    out = sum(o for _, o in lengths)
    row = {"requests": len(prompts), "prompt_tokens": sum(i for i, _ in lengths), "output_tokens": out,
           "seconds": round(seconds, 3), "out_tok_s": round(out / seconds, 1), "cold_seconds": round(cold, 3),
           "triton": engine.runner.use_triton,
           "cuda_graphs": bool(engine.runner.graphs and engine.runner.graphs.enabled),
           "cuda_graphs_off_reason": engine.runner.graphs and engine.runner.graphs.off_reason,
           "compiled_graphs": bool(engine.runner.graphs and engine.runner.graphs.tokens is not greedy_tokens),
           "compile_off_reason": engine.runner.graphs and engine.runner.graphs.compile_off_reason,
           **engine.stats.to_dict()}
    row["roofline"] = roofline_share(model, engine.stats, lengths, seconds, bandwidth=_bandwidth(engine.runner.device))
    row["roofline_datasheet"] = roofline_share(model, engine.stats, lengths, seconds)
    del engine
    _free()
    return row


@functools.cache
def _bandwidth(device: torch.device) -> float | None:
    """Measured HBM bandwidth (device-to-device copy): the issue's roofline is bytes / measured bandwidth."""
    return measure_copy_bandwidth(device) if device.type == "cuda" else None


def _timed(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list]:
    _sync()
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    _sync()
    return time.perf_counter() - start, results


def run_hf(model: torch.nn.Module, prompts: list[list[int]], new: int, batch: int) -> dict:
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        batchpilot.save_model(model, tmp)
        dtype = next(model.parameters()).dtype
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(next(model.parameters()).device).eval()
    ids = torch.tensor(prompts[:batch], device=next(model.parameters()).device)  # (a): equal lengths, no padding
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        hf.generate(ids[:4], attention_mask=torch.ones_like(ids[:4]), max_new_tokens=4, min_new_tokens=4, **kw)
        _sync()
        start = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, **kw)
        _sync()
    seconds = time.perf_counter() - start
    del hf
    _free()
    return {"requests": len(ids), "output_tokens": len(ids) * new, "seconds": round(seconds, 3),
            "out_tok_s": round(len(ids) * new / seconds, 1)}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="toy sizes (tiny preset, lengths / 16); runs on CPU")
    p.add_argument("--model", default=None, help="preset or model dir (default llama-1b, tiny with --smoke)")
    p.add_argument("--workloads", default="a,b,c")
    p.add_argument("--a-requests", type=int, default=None)
    p.add_argument("--b-requests", type=int, default=None)
    p.add_argument("--c-requests", type=int, default=None)
    p.add_argument("--hf-batch", type=int, default=None, help="HF generate batch on (a); 0 skips HF")
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--no-cascade", action="store_true", help="disable shared-prefix decode attention")
    p.add_argument("--no-triton", action="store_true", help="torch paged attention instead of the Triton kernel")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly")
    p.add_argument("--no-compile", action="store_true", help="capture the eager decode forward")
    p.add_argument("--decode-steps", type=int, default=EngineConfig().decode_steps,
                   help="graph decode steps per host round trip")
    p.add_argument("--quick", action="store_true",
                   help="workloads a and c only, without the ablation rows: speedup_vs_hf_a, prefix_sharing_gain_a "
                        "and roofline_share_c in about two minutes")
    p.add_argument("--no-ablations", action="store_true", help="skip (c)'s one-step and no-compile rows")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if args.quick:
        args.workloads, args.no_ablations = "a,c", True
    args.started = datetime.datetime.now(datetime.timezone.utc)
    n = 16 if args.smoke else 1024
    for w in "abc":
        if getattr(args, f"{w}_requests") is None:
            setattr(args, f"{w}_requests", n)
    args.hf_batch = n if args.hf_batch is None else args.hf_batch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = batchpilot.load_model(args.model or ("tiny" if args.smoke else "llama-1b"), device=device, dtype=dtype)
    base = dict(max_batch_tokens=args.max_batch_tokens, max_num_seqs=args.max_num_seqs, cascade=not args.no_cascade,
                triton=not args.no_triton, cuda_graphs=not args.no_cuda_graphs, compile=not args.no_compile,
                decode_steps=args.decode_steps)
    rows = []
    for name, (prompts, new) in workloads(args, model.config.vocab_size).items():
        if name not in args.workloads.split(","):
            continue
        modes = {"shared": EngineConfig(**base)}
        if name == "a":
            modes["no_sharing"] = EngineConfig(**base, prefix_sharing=False)
        if name == "c" and args.decode_steps > 1 and not args.no_ablations:  # ablation: one host round trip per decode step
            modes["one_step_per_round_trip"] = EngineConfig(**{**base, "decode_steps": 1})
        if name == "c" and not args.no_compile and not args.no_cuda_graphs and not args.no_ablations:  # ablation: unfused decode graphs
            modes["no_compile"] = EngineConfig(**{**base, "compile": False})
        for mode, cfg in modes.items():
            row = _guarded(run_engine, model, prompts, new, cfg)
            rows.append({"workload": name, "system": "batchpilot", "mode": mode, **row})
            print(json.dumps(rows[-1]), flush=True)
            write(args, rows)
        if name == "a" and args.hf_batch > 0:
            row = _guarded(run_hf, model, prompts, new, args.hf_batch)
            rows.append({"workload": "a", "system": "hf_generate", "mode": f"batch{args.hf_batch}", **row})
            print(json.dumps(rows[-1]), flush=True)
            write(args, rows)
    write(args, rows, final=True)


def _guarded(fn, *args) -> dict:
    """One failing row (OOM, a transformers version mismatch) is recorded, and the other rows still run."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 -- a benchmark reports failures instead of losing the run
        _free()
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def _find(rows: list[dict], workload: str, system: str, mode: str | None = None) -> dict | None:
    return next((r for r in rows if r["workload"] == workload and r["system"] == system and "error" not in r
                 and (mode is None or r["mode"] == mode)), None)


def write(args: argparse.Namespace, rows: list[dict], final: bool = False) -> None:
    ours_a, plain_a = _find(rows, "a", "batchpilot", "shared"), _find(rows, "a", "batchpilot", "no_sharing")
    hf_a, ours_c = _find(rows, "a", "hf_generate"), _find(rows, "c", "batchpilot")
    summary = {
        "speedup_vs_hf_a": ours_a and hf_a and round(ours_a["out_tok_s"] / hf_a["out_tok_s"], 2),
        "prefix_sharing_gain_a": ours_a and plain_a and round(ours_a["out_tok_s"] / plain_a["out_tok_s"], 2),
        "roofline_share_c": ours_c and ours_c["roofline"] and round(ours_c["roofline"].get("decode_share", 0), 3),
        "roofline_share_c_datasheet_bandwidth": ours_c and ours_c["roofline_datasheet"]
        and round(ours_c["roofline_datasheet"].get("decode_share", 0), 3),
        "hbm_bandwidth_measured_gb_s": torch.cuda.is_available() and round(_bandwidth(torch.device("cuda")) / 1e9),
    }
    now = args.started
    result = {"benchmark": "generate_throughput", **provenance(), "complete": final, "summary": summary,
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"generate_throughput_{now:%Y%m%d_%H%M%S}{'_smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    if final:
        print(json.dumps(summary), "->", path)


if __name__ == "__main__":
    main()
