"""Micro-benchmark of the sampler: the sort + splitmix64 sampler before issue 15, the sort-free torch one
(``sampling.sample_torch``) and the fused Triton kernel (``sampling_triton.sample_triton``, what ``sample`` runs on
CUDA).

    python benchmarks/sampler_micro.py            # CUDA if available (median of 20), else CPU (median of 3)
    python benchmarks/sampler_micro.py --rows 64 256 --reps 5 --out results/
    python benchmarks/sampler_micro.py --compile  # + torch.compile(sample_torch): ms and agreement with eager
    python benchmarks/sampler_micro.py --triton-config 4,1024,8 --triton-config 8,512,8  # row-kernel variants
    python benchmarks/sampler_micro.py --split-config default --split-config passes=3  # split-row variants

Shapes: R rows in {64, 256, 768} x V = 128,256 (llama-3's vocabulary), logits ``randn`` (a random-weight model's
near-uniform rows: the top-p nucleus is most of the vocabulary, the worst case of a threshold search), fp32 and
bf16 (what the decode graph's lm_head produces). Cases: greedy (``argmax``: the floor), temperature 0.8 only,
temperature 0.8 + top_p 0.95 (issue 15's measurement), temperature 0.8 + top_k 50. Times are per call, with
``torch.cuda.synchronize`` around each on CUDA. Prints one JSON object (also written to ``--out`` if given): per
shape and case the old and new (torch) ms and ``old_over_new``; ``sampler_over_greedy`` compares the torch sampler
with the argmax of the same logits. With triton on CUDA, per kernel config ``C,BLOCK,WARPS[,COMPACT]`` (candidate
thresholds per pass, tokens per step, warps per row, bracket size that gets packed; default 4,1024,8,16384): ``triton_ms``, ``triton_over_greedy``
(issue 15's target: a sampled step within 1/0.9 of greedy's, i.e. the sampler <~0.1x of a 7.8 ms step),
``torch_over_triton`` and ``triton_agree`` (the share of tokens equal to the torch path's), and in ``greedy_rows``
the kernel with every row at temperature 0 (the pass a mixed batch's greedy rows pay). ``--split-config SPEC``
(repeatable; ``default`` or ``field=value,...`` of ``sampling_triton.SplitConfig``) adds the split-row path under
the name ``split[SPEC]`` with the same columns; without any ``--triton-config``/``--split-config`` on CUDA both
the row kernel's default and ``split[default]`` run. The JSON's ``"triton"`` lists every config name; on CUDA
``triton_graph_ms`` is the same call replayed from a CUDA graph (the decode graphs' cost, without host launch
overhead: the split path launches 5 kernels). CPU numbers
are only a proxy (the sort and the hash scale differently there).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402
from batchpilot.generate.sampling import sample_torch as sample  # noqa: E402

V = 128_256
_K_SEED, _K_STEP, _K_TOKEN = (c - (1 << 64) if c >= 1 << 63 else c
                              for c in (0x9E3779B97F4A7C15, 0xD1B54A32D192ED03, 0x8CB92BA72F3D8DD7))
_M1, _M2 = (c - (1 << 64) if c >= 1 << 63 else c for c in (0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    return (x >> n) & ((1 << (64 - n)) - 1)


def old_sample(logits: torch.Tensor, *, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               seeds: torch.Tensor, steps: torch.Tensor, any_random: bool, any_filter: bool) -> torch.Tensor:
    """The sampler before issue 15 (splitmix64 noise on int64, full-vocabulary sort for top-k / top-p)."""
    greedy = logits.argmax(dim=-1)
    if not any_random:
        return greedy
    scaled = logits.float() / temperature.clamp_min(1e-6)[:, None]
    tokens = torch.arange(logits.shape[-1], device=seeds.device, dtype=torch.int64)
    x = seeds[:, None] * _K_SEED + steps[:, None] * _K_STEP + tokens[None] * _K_TOKEN
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    x = x ^ _shr(x, 31)
    gumbel = -torch.log(-torch.log((_shr(x, 40).float() + 0.5) / float(1 << 24)))
    if any_filter:
        vals, idx = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(vals.shape[-1], device=vals.device)[None]
        keep = (ranks < top_k[:, None]) | (top_k[:, None] <= 0)
        probs = vals.softmax(dim=-1)
        keep &= (probs.cumsum(dim=-1) - probs) < top_p[:, None]
        keep[:, 0] = True
        choice = torch.where(keep, vals + gumbel.gather(1, idx), float("-inf")).argmax(dim=-1)
        drawn = idx.gather(1, choice[:, None])[:, 0]
    else:
        drawn = (scaled + gumbel).argmax(dim=-1)
    return torch.where(temperature > 0, drawn, greedy)


CASES = {"temperature": (0.8, 0, 1.0), "top_p": (0.8, 0, 0.95), "top_k": (0.8, 50, 1.0)}


def _time(fn, reps: int, cuda: bool) -> float:
    """Median ms of ``reps`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _graph_ms(fn, reps: int) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (what the decode graphs run: no host launch overhead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _time(graph.replay, reps, True)


def _triton_configs(specs: list[str], cuda: bool, split_specs: list[str] | None = None) -> dict[str, dict]:
    """``C,BLOCK,WARPS[,COMPACT]`` strings (the row kernel) and split-path specs (``default`` or
    ``field=value,...``) -> sample_triton keyword arguments by name; none without CUDA or triton."""
    if not cuda or importlib.util.find_spec("triton") is None:
        return {}
    from batchpilot.generate.sampling_triton import SplitConfig

    split_specs = split_specs or []
    if not specs and not split_specs:
        specs, split_specs = ["4,1024,8"], ["default"]
    out = {}
    for spec in specs:
        c, block, warps, *compact = (int(v) for v in spec.split(","))
        out[spec] = dict(path="row", candidates=c, block=block, num_warps=warps) | (
            dict(compact=compact[0]) if compact else {})
    for spec in split_specs:
        cfg = SplitConfig() if spec == "default" else SplitConfig.parse(spec)
        out[f"split[{spec}]"] = dict(path="split", config=cfg)
    return out


def _shape(logits: torch.Tensor, reps: int, cuda: bool, compiled=None, triton: dict | None = None) -> dict:
    """Greedy, then old and new ms of every case, on one (R, V) logits tensor (and the compiled new one's ms and
    its share of tokens equal to the eager one's, with ``compiled``; each Triton config's, with ``triton``)."""
    R, dev = logits.shape[0], logits.device
    greedy_ms = _time(lambda: logits.argmax(dim=-1), reps, cuda)
    shape: dict = {"greedy_ms": round(greedy_ms, 4)}
    if triton:
        from batchpilot.generate.sampling_triton import sample_triton

        kw = dict(temperature=torch.zeros(R, device=dev), top_k=torch.zeros(R, dtype=torch.long, device=dev),
                  top_p=torch.ones(R, device=dev), seeds=torch.arange(R, device=dev),
                  steps=torch.zeros(R, dtype=torch.long, device=dev), any_random=True, any_filter=False)
        shape["greedy_rows"] = {}
        for name, cfg in triton.items():
            ms = _time(lambda: sample_triton(logits, **kw, **cfg), reps, cuda)  # noqa: B023
            shape["greedy_rows"][f"triton_ms[{name}]"] = round(ms, 4)
    for case, (t, k, p) in CASES.items():
        kw = dict(temperature=torch.full((R,), t, device=dev), top_k=torch.full((R,), k, device=dev),
                  top_p=torch.full((R,), p, device=dev), seeds=torch.arange(R, device=dev) * 7919,
                  steps=torch.full((R,), 5, device=dev), any_random=True, any_filter=k > 0 or p < 1)
        old = _time(lambda: old_sample(logits, **kw), reps, cuda)  # noqa: B023
        new = _time(lambda: sample(logits, **kw), reps, cuda)  # noqa: B023
        shape[case] = {"old_ms": round(old, 3), "new_ms": round(new, 3), "old_over_new": round(old / new, 2),
                       "sampler_over_greedy": round(new / greedy_ms, 1)}
        if compiled is not None:
            fused = _time(lambda: compiled(logits, **kw), reps, cuda)  # noqa: B023
            agree = (compiled(logits, **kw) == sample(logits, **kw)).float().mean().item()
            shape[case] |= {"compiled_ms": round(fused, 3), "compiled_over_greedy": round(fused / greedy_ms, 2),
                            "compiled_agree": round(agree, 4)}
        for name, cfg in (triton or {}).items():
            ms = _time(lambda: sample_triton(logits, **kw, **cfg), reps, cuda)  # noqa: B023
            agree = (sample_triton(logits, **kw, **cfg) == sample(logits, **kw)).float().mean().item()
            if cuda:
                shape[case][f"triton_graph_ms[{name}]"] = round(
                    _graph_ms(lambda: sample_triton(logits, **kw, **cfg), reps), 3)  # noqa: B023
            shape[case] |= {f"triton_ms[{name}]": round(ms, 3),
                            f"triton_over_greedy[{name}]": round(ms / greedy_ms, 2),
                            f"torch_over_triton[{name}]": round(new / ms, 1), f"triton_agree[{name}]": round(agree, 4)}
    return shape


def run(rows: list[int], reps: int, vocab: int, dtypes: list[str], device: str, compile: bool = False,
        triton_configs: list[str] | None = None, split_configs: list[str] | None = None) -> dict:
    cuda = device == "cuda"
    compiled = torch.compile(sample, dynamic=False) if compile else None
    triton = _triton_configs(triton_configs or [], cuda, split_configs)
    out: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "vocab": vocab, "reps": reps,
                 "torch": torch.__version__, "threads": torch.get_num_threads(), "triton": sorted(triton),
                 "shapes": {}}
    g = torch.Generator(device=device).manual_seed(0)
    for R in rows:
        for dt in dtypes:
            logits = torch.randn(R, vocab, generator=g, device=device).to(getattr(torch, dt))
            out["shapes"][f"R{R}_{dt}"] = _shape(logits, reps, cuda, compiled, triton)
            if cuda:
                torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 256, 768, 1024])
    ap.add_argument("--reps", type=int, default=None, help="timed calls per case (default 20 on CUDA, 3 on CPU)")
    ap.add_argument("--vocab", type=int, default=V)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile(sample_torch)")
    ap.add_argument("--triton-config", action="append", default=[], metavar="C,BLOCK,WARPS[,COMPACT]",
                    help="a row-kernel config to time (repeatable); CUDA with triton only")
    ap.add_argument("--split-config", action="append", default=[], metavar="default|FIELD=VALUE,...",
                    help="a split-path config (sampling_triton.SplitConfig) to time (repeatable); CUDA only")
    ap.add_argument("--out", type=Path, default=None, help="directory for sampler_micro.json")
    a = ap.parse_args(argv)
    result = run(a.rows, a.reps or (20 if a.device == "cuda" else 3), a.vocab, a.dtypes, a.device, a.compile,
                 a.triton_config, a.split_config)
    result = {"benchmark": "sampler_micro", **provenance(), **result}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "sampler_micro.json").write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
