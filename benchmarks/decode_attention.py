"""The paged decode-attention kernel alone: bandwidth per launch configuration and key split, on the shapes of
the generation issue's workloads, against the measured copy bandwidth and torch SDPA over contiguous keys.

    python benchmarks/decode_attention.py                    # one GPU, ~1 min
    python benchmarks/decode_attention.py --shapes long,mid  # a subset

Shapes (llama-1b's attention: 8 kv heads x 4 query heads, head dim 64, bf16, 16-token blocks scattered at random
over the cache as a long-running engine leaves them):
  c      875 rows, context 256-1152 tokens (workload (c) of ``generate_throughput.py`` at its mean decode batch)
  mid    64 rows x 8,192 tokens
  long   16 rows x 32,768 tokens (``generate_job.py``'s long-output row at its end)
  serve  128 rows x 2,048 tokens
Each configuration is captured in a CUDA graph of ``--reps`` launches and replayed; its time is the replay's over
the launches. Bytes per launch: the keys and values read (2 x context x kv heads x head dim x 2 bytes) plus the
queries and outputs. ``share`` is bytes / time over the device-to-device copy bandwidth measured in the same
process (``roofline.measure_copy_bandwidth``). ``sdpa_contiguous`` (uniform shapes only): torch's
``scaled_dot_product_attention`` on the same queries over keys laid out contiguously (B, K, L, E), ``enable_gqa``,
what a dense (non-paged) engine would run.
Writes ``<out>/decode_attention_<date>.json`` (summary: the default configuration's share per shape and the best
configuration's).
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
from pathlib import Path

import torch
from provenance import provenance

from batchpilot.generate import kernels
from batchpilot.generate.roofline import measure_copy_bandwidth

K, G, E, BS = 8, 4, 64, 16
SHAPES = {"c": (875, None), "mid": (64, 8192), "long": (16, 32768), "serve": (128, 2048)}
# (block_n, num_warps, num_stages): the kernel's default for decode rows first
CONFIGS = [(128, 4, 3), (128, 4, 2), (128, 8, 3), (128, 2, 3), (64, 4, 3), (64, 4, 2), (64, 2, 3), (32, 4, 3)]


def make_case(rows: int, length: int | None, device: torch.device, rng: random.Random) -> dict:
    lens = [length or rng.randint(256, 1152) for _ in range(rows)]
    blocks_per = [-(-n // BS) for n in lens]
    total = sum(blocks_per) + 1
    perm = torch.randperm(total, device="cpu")
    width = max(blocks_per)
    tables = torch.zeros(rows, width, dtype=torch.int32)
    at = 0
    for b, nb in enumerate(blocks_per):
        tables[b, :nb] = perm[at:at + nb].to(torch.int32)
        at += nb
    kc = torch.randn(K, total * BS, E, device=device, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(rows, K, G, E, device=device, dtype=torch.bfloat16)
    return {"q": q, "kc": kc, "vc": vc, "tables": tables.to(device), "lens": torch.tensor(lens, device=device),
            "bytes": 2 * sum(lens) * K * E * 2 + 2 * q.numel() * 2, "uniform": length is not None}


def graph_time_s(fn, reps: int) -> float:
    fn()  # compile / first launch outside the graph
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def sdpa_fn(case: dict):
    """Contiguous (B, H, L, E) keys and values for SDPA, the same numbers as the paged cache."""
    q, kc, vc, tables = case["q"], case["kc"], case["vc"], case["tables"]
    B = q.shape[0]
    k = kernels.gather_blocks(kc, tables.long(), BS).transpose(0, 1).contiguous()  # (B, K, L, E)
    v = kernels.gather_blocks(vc, tables.long(), BS).transpose(0, 1).contiguous()
    qd = q.reshape(B, K * G, 1, E)  # query head h uses kv head h // G, as in the paged layout
    return lambda: torch.nn.functional.scaled_dot_product_attention(qd, k, v, enable_gqa=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--splits", default="1,2,4,8,16")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    device = torch.device("cuda")
    bandwidth = measure_copy_bandwidth(device)
    rng = random.Random(0)
    rows, summary = [], {"copy_bandwidth_gb_s": round(bandwidth / 1e9)}
    for name in args.shapes.split(","):
        case = make_case(*SHAPES[name], device, rng)
        auto = kernels.decode_splits(case["q"].shape[0] * K, device)
        for config in CONFIGS:
            for splits in sorted({auto, *(int(s) for s in args.splits.split(","))}):
                if config != CONFIGS[0] and splits not in (1, auto):
                    continue  # other configurations at one split and the automatic one
                bn, warps, stages = config

                def fn(bn=bn, warps=warps, stages=stages, splits=splits, case=case):
                    return kernels.paged_attention_triton(case["q"], case["kc"], case["vc"], case["tables"],
                                                          case["lens"], BS, block_n=bn, num_warps=warps,
                                                          num_stages=stages, splits=splits)

                try:
                    seconds = graph_time_s(fn, args.reps)
                except Exception as e:  # noqa: BLE001 - a configuration that does not compile is a row, not a crash
                    rows.append({"shape": name, "config": config, "splits": splits, "error": str(e)[:200]})
                    continue
                row = {"shape": name, "config": config, "splits": splits, "auto_splits": splits == auto,
                       "ms": round(seconds * 1e3, 4), "gb_s": round(case["bytes"] / seconds / 1e9, 1),
                       "share": round(case["bytes"] / seconds / bandwidth, 3)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        if case["uniform"]:
            seconds = graph_time_s(sdpa_fn(case), args.reps)
            row = {"shape": name, "system": "sdpa_contiguous", "ms": round(seconds * 1e3, 4),
                   "share": round(case["bytes"] / seconds / bandwidth, 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        ours = [r for r in rows if r["shape"] == name and "share" in r and "config" in r]
        default = next((r for r in ours if r["config"] == CONFIGS[0] and r["auto_splits"]), None)
        best = max(ours, key=lambda r: r["share"], default=None)
        summary[name] = {"default_share": default and default["share"], "best": best}
        del case
        torch.cuda.empty_cache()
    now = datetime.datetime.now(datetime.timezone.utc)
    path = Path(args.out) / f"decode_attention_{now:%Y%m%d_%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "decode_attention", **provenance(), "summary": summary, "rows": rows},
                               indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
