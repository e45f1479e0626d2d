"""Long-sequence training on one GPU: the longest sequence that trains at micro-batch 1, and its tokens/s.

Systems, at the llama-1b shape (``--preset``), micro-batch 1, one training step = forward + backward +
fused AdamW step (written here with the model API and the apply functions, not the trainer):
  batchpilot_ckpt    fp32 master weights, bf16 autocast, full activation checkpointing (every block's input
                     kept, the block recomputed whole in backward), fused chunked CE (``model/loss.py``)
  batchpilot_stream  the same with streaming backprop (``train/stream.py``, ``--stream-chunk``) instead of
                     checkpointing: StreamBP (arXiv 2506.03077)
  hf_liger           transformers LlamaForCausalLM (SDPA, bf16 weights, fused AdamW) + Liger kernels
                     (``apply_liger_kernel_to_llama``: fused linear-CE, RMSNorm, RoPE, SwiGLU) with gradient
                     checkpointing; skipped with a note when liger-kernel does not import
  hf                 the same without Liger: only with ``--smoke`` (exercises the HF path on CPU)

Everything runs under one wall cap (``--wall-s``, default 150 s), shared out over the systems: each system
runs in its own process (killed with its helpers past its share), on one warm model whose AdamW states are
allocated up front (one step at LR 0), so a probe is one step at one length. First the ``--speed-seqs``
(32k, 64k) are timed (``--warmup`` + ``--steps``, median); then a bisection over a sqrt(2) ladder of lengths
(``--start-seq`` to ``--max-seq``, multiples of ``--granularity``) finds the longest length that fits. A probe
runs only when its estimated time (quadratic in the length from the last probe, on the high side) fits
the time left; the search records why it stopped (``memory``: the next length ran out of memory, ``wall cap``,
``max_seq``). The JSON is rewritten after every probe. Streaming's measured peak (``max_memory_allocated``,
optimizer states included) is compared with the memory model's prediction (``predict_stream_peak_bytes``).

Summary keys: ``max_seq_ratio_vs_liger`` (stream's longest / hf_liger's, with ``max_seq_ratio_kind``: exact
when both searches ended at an OOM, a lower bound when only hf_liger's did), ``stream_speed_ratio`` (stream's
tokens/s / checkpointing's at the longest length both ran), ``stream_memory_prediction_error`` (predicted /
measured - 1, at the longest length streaming ran), ``tokens_per_s`` at the speed lengths. At llama-1b on an
H200 a 256k step takes tens of seconds, so 150 s is likely to end at the wall cap past ~128k-192k for every
system: ``--wall-s 540`` (inside a 10-minute command) lets the searches reach their memory limits.

Usage (one H200):  BATCHPILOT_COMMIT=$(git rev-parse HEAD) python benchmarks/long_context.py [--bf16-params] [--wall-s 150]
                   [--stream-offload]  (streaming keeps its saved block inputs in pinned host memory)
                   (``--bf16-params``: bf16 block inputs, half of autocast's fp32 ones; what HF's bf16 model keeps)
CPU smoke test:    python benchmarks/long_context.py --smoke   (tiny preset, lengths 64-512, a 90 s cap)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from provenance import provenance  # noqa: E402

from batchpilot.model.counting import non_vocab_params, total_params  # noqa: E402
from batchpilot.model.llama import LlamaConfig, build_model, get_preset  # noqa: E402
from batchpilot.plan.memory import (CUDA_CONTEXT_BYTES, estimate_loss_bytes,  # noqa: E402
                                    estimate_model_state_bytes)
from batchpilot.train.stream import apply_streaming, stream_backward_working_bytes  # noqa: E402

SYSTEMS = ("batchpilot_ckpt", "batchpilot_stream", "hf_liger")


# ------------------------------------------------------------------------------------------- runners
class OursRunner:
    def __init__(self, config: LlamaConfig, device: torch.device, *, stream_chunk: int | None,
                 bf16_params: bool, stream_offload: bool = False) -> None:
        from torch.distributed._composable import checkpoint

        self.model = build_model(config, device=device, seed=0)
        if stream_chunk is None:
            for block in self.model.layers:  # full checkpointing, as ``--activation-checkpointing full``
                checkpoint(block)
        else:
            apply_streaming(self.model, stream_chunk, offload_inputs=stream_offload)
        if bf16_params:
            one_device_fsdp_bf16(self.model, device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda")
        self.device, self.autocast = device, device.type == "cuda" and not bf16_params

    def step(self, ids: torch.Tensor, targets: torch.Tensor) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(ids, targets=targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def one_device_fsdp_bf16(model: torch.nn.Module, device: torch.device) -> None:
    """FSDP2 on a one-rank mesh with bf16 compute over fp32 masters (the trainer's ``fsdp_one_device``):
    the residual stream and the saved block inputs are bf16, half the bytes of autocast's fp32 ones."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()) if cuda else None)
    mesh = init_device_mesh(device.type, (1,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for i, block in enumerate(model.layers):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(model.layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)


class HFRunner:
    def __init__(self, config: LlamaConfig, device: torch.device, *, liger: bool) -> None:
        import transformers

        from batchpilot.model.hf import config_to_hf

        if liger:
            from liger_kernel.transformers import apply_liger_kernel_to_llama

            apply_liger_kernel_to_llama()  # patches the classes: build the model after this
        hf = {k: v for k, v in config_to_hf(config).items() if k not in ("architectures", "model_type", "torch_dtype")}
        torch.manual_seed(0)
        with torch.device(device):
            self.model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf, attn_implementation="sdpa"))
        self.model = self.model.to(dtype=torch.bfloat16)
        self.model.config.use_cache = False
        self.model.gradient_checkpointing_enable()
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step(self, ids: torch.Tensor, targets: torch.Tensor) -> None:
        self.model(input_ids=ids, labels=ids).loss.backward()  # HF shifts the labels itself
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def build_runner(system: str, config: LlamaConfig, device: torch.device, args):
    if system == "batchpilot_ckpt":
        return OursRunner(config, device, stream_chunk=None, bf16_params=args.bf16_params)
    if system == "batchpilot_stream":
        return OursRunner(config, device, stream_chunk=args.stream_chunk, bf16_params=args.bf16_params,
                          stream_offload=args.stream_offload)
    return HFRunner(config, device, liger=system == "hf_liger")


# ------------------------------------------------------------------------------------------- memory model
def predict_stream_peak_bytes(config: LlamaConfig, *, seq_len: int, chunk_tokens: int,
                              offload: bool = False) -> float:
    """Predicted ``max_memory_allocated`` of a streamed step (one GPU, fp32 params + autocast, micro-batch 1).

    The moments of ``plan/memory.py``'s ``estimate_peak_bytes`` with checkpointing, the first block's
    recomputation replaced by the streamed block's working set (``stream_backward_working_bytes``, which
    includes its own cached weight casts: autocast's forward copies of all blocks live only until the
    forward's autocast region ends, so they count at the loss, not in backward). ``offload``
    (``--stream-offload``): the block inputs are in host memory but for the one in use.
    """
    d, v, tokens, layers = config.hidden_size, config.vocab_size, seq_len, config.num_layers
    state = estimate_model_state_bytes(total_params(config), optimizer="adamw")
    saved = 4 * d * tokens * (1 if offload else layers) + 8 * d * tokens  # block inputs + the final norm
    copies = 2 * non_vocab_params(config)  # autocast's bf16 weight copies
    loss = estimate_loss_bytes(config, tokens=tokens, fsdp=False)
    working = stream_backward_working_bytes(config, seq_len=seq_len, chunk_tokens=chunk_tokens)
    moments = {"loss forward": saved + copies + loss.forward_peak,
               "first block backward": saved + working + loss.saved + 4 * d * tokens,
               "backward end": 4 * v * d + state.grads}
    return state.params + state.optimizer + max(moments.values())


# ------------------------------------------------------------------------------------------- probes (child)
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocate_optimizer_states(runner) -> None:
    """One AdamW step at LR 0 over zero gradients: the moments exist (zeros) before any probe, so a one-step
    probe's peak includes them, and the parameters do not move."""
    params = [p for p in runner.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in runner.optimizer.param_groups]
    for g in runner.optimizer.param_groups:
        g["lr"] = 0.0
    runner.optimizer.step()
    for g, lr in zip(runner.optimizer.param_groups, lrs):
        g["lr"] = lr
    runner.optimizer.zero_grad(set_to_none=True)


def recover_after_oom(runner) -> None:
    """Free what a step that ran out of memory left: gradients, FSDP2's gathered state, the cache."""
    import gc

    runner.optimizer.zero_grad(set_to_none=True)
    from batchpilot.train.parallel import is_sharded, reshard_after_error

    if is_sharded(runner.model):
        reshard_after_error(runner.model)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_probe(runner, config: LlamaConfig, system: str, seq: int, timed: bool, args,
              device: torch.device) -> dict:
    """One length on the warm runner: a timed probe runs ``--warmup`` + ``--steps`` steps (median), a search
    probe one step (the optimizer states already exist); tokens/s, peak memory, or OOM."""
    row: dict = dict(system=system, seq=seq, timed=timed)
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=g).to(device)
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    steps = args.warmup + args.steps if timed else 1
    times = []
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            runner.step(ids, targets)
            _sync(device)
            times.append(time.perf_counter() - start)
        step_s = statistics.median(times[args.warmup:] if timed else times)
        row.update(fits=True, step_s=round(step_s, 4), tokens_per_s=round(seq / step_s, 1),
                   step_times=[round(t, 4) for t in times])
        if device.type == "cuda":
            row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    except torch.OutOfMemoryError:
        row.update(fits=False, oom=True)
        del ids, targets
        recover_after_oom(runner)
    if system == "batchpilot_stream" and not args.bf16_params:  # the prediction models the autocast path
        row["predicted_peak_allocated_bytes"] = predict_stream_peak_bytes(config, seq_len=seq,
                                                                          chunk_tokens=args.stream_chunk,
                                                                          offload=args.stream_offload)
    return row


def search_grid(args) -> list[int]:
    """Lengths the search may probe: ``--speed-seqs`` and a sqrt(2) ladder from ``--start-seq`` to
    ``--max-seq``, each a multiple of ``--granularity``."""
    grid, seq = set(args.speed_seqs), float(args.start_seq)
    while seq <= args.max_seq * (1 + 1e-9):
        grid.add(max(args.granularity, int(seq) // args.granularity * args.granularity))
        seq *= 2 ** 0.5
    return sorted(n for n in grid if n <= args.max_seq)


class SystemSearch:
    """One system in one process: the speed lengths first, then bisection over ``search_grid`` for the longest
    length that fits, each probe only if its estimated time fits the time left (quadratic in the length from
    the last probe: attention dominates long steps, so the estimate is on the high side)."""

    def __init__(self, system: str, args, deadline_unix: float) -> None:
        self.system, self.args = system, args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.config = get_preset(args.preset)
        self.deadline = deadline_unix  # wall clock: the parent's cap includes this process's start
        self.last: tuple[int, float] | None = None  # (seq, seconds of its probe)
        self.runner = build_runner(system, self.config, self.device, args)
        allocate_optimizer_states(self.runner)

    def estimate_s(self, seq: int, timed: bool) -> float:
        if self.last is None:
            return 0.0
        steps = self.args.warmup + self.args.steps if timed else 1
        return self.last[1] * (seq / self.last[0]) ** 2 * steps

    def left_s(self) -> float:
        return self.deadline - time.time()

    def probe(self, seq: int, timed: bool) -> dict:
        estimate = self.estimate_s(seq, timed)
        if estimate > self.left_s():
            row = dict(system=self.system, seq=seq, timed=timed, fits=None,
                       skipped=f"estimated {estimate:.0f} s > {self.left_s():.0f} s left of the wall cap")
        else:
            start = time.perf_counter()
            row = run_probe(self.runner, self.config, self.system, seq, timed, self.args, self.device)
            if row["fits"]:
                self.last = (seq, row["step_s"])
            row["probe_s"] = round(time.perf_counter() - start, 2)
        print("ROW " + json.dumps(row), flush=True)
        return row

    def run(self) -> None:
        grid = search_grid(self.args)
        lo, hi = -1, len(grid)  # grid[lo] fits, grid[hi] does not (or is past the grid)
        for seq in sorted(self.args.speed_seqs):
            row = self.probe(seq, True)
            if row["fits"] is False:
                hi = grid.index(seq)
                break
            if row["fits"]:
                lo = grid.index(seq)
        bound = "memory"
        while hi - lo > 1:
            mid = (lo + hi) // 2
            affordable = [i for i in range(lo + 1, mid + 1) if self.estimate_s(grid[i], False) <= self.left_s()]
            if not affordable:
                bound = "wall cap"
                break
            i = affordable[-1]
            if self.probe(grid[i], False)["fits"]:
                lo = i
            else:
                hi = i
        if hi == len(grid) and lo == len(grid) - 1:
            bound = "max_seq"
        longest = dict(system=self.system, longest_seq=grid[lo] if lo >= 0 else None, bound=bound,
                       next_seq=grid[hi] if hi < len(grid) else None)
        print("LONGEST " + json.dumps(longest), flush=True)


# ------------------------------------------------------------------------------------------- parent
def run_system(system: str, budget_s: float, passthrough: list[str], on_row, grace_s: float = 30.0) -> dict:
    """The child for one system, killed (with its process group) ``grace_s`` past its budget; ``on_row`` gets
    every probe row as it arrives. Returns its LONGEST record (or one saying why there is none)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--run-system", system,
           "--deadline-unix", f"{time.time() + budget_s:.3f}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    killer = threading.Timer(budget_s + grace_s, lambda: os.killpg(proc.pid, signal.SIGKILL))
    killer.start()
    longest = None
    try:
        for line in proc.stdout:
            if line.startswith("ROW "):
                on_row(json.loads(line[4:]))
            elif line.startswith("LONGEST "):
                longest = json.loads(line[8:])
        proc.wait()
    finally:
        killer.cancel()
    if longest is None:
        tail = proc.stderr.read()[-1500:]
        oom = "out of memory" in tail.lower()
        longest = dict(system=system, longest_seq=None, bound="killed at the wall cap" if proc.returncode == -9
                       else "crashed", error=None if oom else tail)
    return longest


def liger_missing() -> str | None:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as e:  # noqa: BLE001  (missing, or broken against this torch/transformers: noted)
        return f"liger-kernel does not import ({type(e).__name__}: {e})"
    return None


def summarize(longest: dict, probes: list[dict], speed_seqs: list[int]) -> dict:
    seqs = {name: rec.get("longest_seq") for name, rec in longest.items()}
    bounds = {name: rec.get("bound") for name, rec in longest.items()}
    stream, ckpt, liger = (seqs.get(s) for s in SYSTEMS)
    ratio, kind = (round(stream / liger, 3), None) if stream and liger else (None, None)
    if ratio is not None:  # exact only when both searches ended at a length that ran out of memory
        kind = "exact" if bounds["batchpilot_stream"] == bounds["hf_liger"] == "memory" else (
            "lower bound" if bounds["hf_liger"] == "memory" else f"unknown (hf_liger stopped by {bounds['hf_liger']})")
        if bounds["hf_liger"] != "memory":  # a search cut by the wall cap or --max-seq found no limit: no ratio
            ratio = None

    def fit(system: str) -> dict[int, dict]:
        return {r["seq"]: r for r in probes if r["system"] == system and r.get("fits")}

    s_rows, c_rows = fit("batchpilot_stream"), fit("batchpilot_ckpt")
    common = max(set(s_rows) & set(c_rows), default=None)
    measured = [r for r in s_rows.values() if "peak_allocated_bytes" in r and "predicted_peak_allocated_bytes" in r]
    error = None
    if measured:
        row = max(measured, key=lambda r: r["seq"])
        error = round(row["predicted_peak_allocated_bytes"] / row["peak_allocated_bytes"] - 1, 4)
    return {"longest_seq": seqs, "longest_seq_bound": bounds,
            "max_seq_ratio_vs_liger": ratio, "max_seq_ratio_kind": kind,
            "max_seq_ratio_ckpt_vs_liger": round(ckpt / liger, 3) if ckpt and liger else None,
            "stream_speed_ratio": round(s_rows[common]["tokens_per_s"] / c_rows[common]["tokens_per_s"], 3)
            if common else None, "stream_speed_ratio_seq": common,
            "stream_memory_prediction_error": error,
            "tokens_per_s": {f"{r['system']}_{r['seq']}": r["tokens_per_s"] for r in probes
                             if r.get("fits") and r["seq"] in speed_seqs and r.get("timed")}}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama-1b")
    p.add_argument("--stream-chunk", type=int, default=4096)
    p.add_argument("--start-seq", type=int, default=16384)
    p.add_argument("--max-seq", type=int, default=1 << 20)
    p.add_argument("--granularity", type=int, default=2048)
    p.add_argument("--speed-seqs", type=int, nargs="*", default=[32768, 65536])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--wall-s", type=float, default=150.0, help="wall cap of the whole run (seconds), shared "
                   "out over the systems; the JSON is rewritten after every probe")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--bf16-params", action="store_true",
                   help="batchpilot systems: bf16 compute over fp32 masters via one-device FSDP2 (no autocast)")
    p.add_argument("--stream-offload", action="store_true",
                   help="batchpilot_stream keeps its saved block inputs in pinned host memory "
                        "(--parallel.stream_offload): the GPU holds one of them")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny preset, tiny lengths, a 90 s cap")
    p.add_argument("--run-system", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline-unix", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.stream_chunk, args.start_seq, args.max_seq = "tiny", 24, 64, 512
        args.granularity, args.speed_seqs, args.steps = 32, [64, 128], 1
        args.wall_s = min(args.wall_s, 90.0)
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.run_system:
        SystemSearch(args.run_system, args, args.deadline_unix).run()
        return
    start = time.monotonic()
    systems, skipped = list(SYSTEMS), {}
    if reason := liger_missing():
        systems.remove("hf_liger")
        skipped["hf_liger"] = reason
    if args.smoke:
        systems.append("hf")
    out = Path(args.out_dir) if args.out_dir else REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    suffix = ("_smoke" if args.smoke else "") + ("_bf16" if args.bf16_params else "") + (
        "_offload" if args.stream_offload else "")
    path = out / f"long_context{suffix}_{dt.date.today().isoformat()}.json"
    result = {"benchmark": "long_context", **provenance(), "preset": args.preset, "micro_batch_size": 1,
              "batchpilot_precision": "bf16 params (FSDP2, fp32 masters)" if args.bf16_params else
              "fp32 params + bf16 autocast", "stream_chunk": args.stream_chunk,
              "stream_offload": args.stream_offload, "wall_s": args.wall_s,
              "predicted_cuda_context_bytes": CUDA_CONTEXT_BYTES, "skipped": skipped, "probes": [], "longest": {}}

    def write() -> None:
        result["summary"] = summarize(result["longest"], result["probes"], args.speed_seqs)
        path.write_text(json.dumps(result, indent=1))

    def on_row(row: dict) -> None:
        print(json.dumps({k: v for k, v in row.items() if k != "step_times"}), flush=True)
        result["probes"].append(row)
        write()

    passthrough = [a for a in argv]
    for i, system in enumerate(systems):
        budget = (args.wall_s - (time.monotonic() - start)) / (len(systems) - i)
        result["longest"][system] = run_system(system, max(budget, 1.0), passthrough, on_row,
                                               grace_s=min(15.0, max(5.0, budget / 4)))
        write()
    result["wall_seconds"] = round(time.monotonic() - start, 1)
    write()
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
