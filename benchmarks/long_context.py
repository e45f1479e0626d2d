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

Longest sequence: doubling from ``--start-seq`` until a step runs out of memory (or ``--max-seq``), then
the midpoint between the last fit and the first failure. Each probe runs in its own subprocess (an OOM
cannot leak). Tokens/s: median of ``--steps`` timed steps after ``--warmup``, at ``--speed-seqs``
(32k, 64k) and at the longest length both batchpilot systems fit. Streaming's measured peak
(``max_memory_allocated`` over the timed steps, after the optimizer states exist) is compared with the
memory model's prediction (``predict_stream_peak_bytes``).

Summary keys: ``max_seq_ratio_vs_liger`` (stream's longest / hf_liger's), ``stream_speed_ratio`` (stream's
tokens/s / checkpointing's at the longest length both fit), ``stream_memory_prediction_error``
(predicted / measured - 1, at the largest length timed for streaming).

Usage (one H200):  BATCHPILOT_COMMIT=$(git rev-parse HEAD) python benchmarks/long_context.py [--bf16-params]
                   (``--bf16-params``: bf16 block inputs, half of autocast's fp32 ones; what HF's bf16 model keeps)
CPU smoke test:    python benchmarks/long_context.py --smoke
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

from batchpilot.model.counting import non_vocab_params, total_params  # noqa: E402
from batchpilot.model.llama import LlamaConfig, build_model, get_preset  # noqa: E402
from batchpilot.plan.memory import (CUDA_CONTEXT_BYTES, estimate_loss_bytes,  # noqa: E402
                                    estimate_model_state_bytes)
from batchpilot.train.stream import apply_streaming, stream_backward_working_bytes  # noqa: E402

SYSTEMS = ("batchpilot_ckpt", "batchpilot_stream", "hf_liger")


# ------------------------------------------------------------------------------------------- runners
class OursRunner:
    def __init__(self, config: LlamaConfig, device: torch.device, *, stream_chunk: int | None,
                 bf16_params: bool) -> None:
        from torch.distributed._composable import checkpoint

        self.model = build_model(config, device=device, seed=0)
        if stream_chunk is None:
            for block in self.model.layers:  # full checkpointing, as ``--activation-checkpointing full``
                checkpoint(block)
        else:
            apply_streaming(self.model, stream_chunk)
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
        return OursRunner(config, device, stream_chunk=args.stream_chunk, bf16_params=args.bf16_params)
    return HFRunner(config, device, liger=system == "hf_liger")


# ------------------------------------------------------------------------------------------- memory model
def predict_stream_peak_bytes(config: LlamaConfig, *, seq_len: int, chunk_tokens: int) -> float:
    """Predicted ``max_memory_allocated`` of a streamed step (one GPU, fp32 params + autocast, micro-batch 1).

    The moments of ``plan/memory.py``'s ``estimate_peak_bytes`` with checkpointing, the first block's
    recomputation replaced by the streamed block's working set (``stream_backward_working_bytes``, which
    includes its own cached weight casts: autocast's forward copies of all blocks live only until the
    forward's autocast region ends, so they count at the loss, not in backward).
    """
    d, v, tokens, layers = config.hidden_size, config.vocab_size, seq_len, config.num_layers
    state = estimate_model_state_bytes(total_params(config), optimizer="adamw")
    saved = 4 * d * tokens * layers + 8 * d * tokens  # block inputs + the final norm
    copies = 2 * non_vocab_params(config)  # autocast's bf16 weight copies
    loss = estimate_loss_bytes(config, tokens=tokens, fsdp=False)
    working = stream_backward_working_bytes(config, seq_len=seq_len, chunk_tokens=chunk_tokens)
    moments = {"loss forward": saved + copies + loss.forward_peak,
               "first block backward": saved + working + loss.saved + 4 * d * tokens,
               "backward end": 4 * v * d + state.grads}
    return state.params + state.optimizer + max(moments.values())


# ------------------------------------------------------------------------------------------- one probe
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_probe(spec: dict, args) -> dict:
    """Child: build the system, run warmup + timed steps at one length; tokens/s, peak memory, or OOM."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = get_preset(args.preset)
    system, seq = spec["system"], spec["seq"]
    row = dict(system=system, seq=seq, timed=spec["timed"])
    try:
        runner = build_runner(system, config, device, args)
        g = torch.Generator().manual_seed(seq)
        ids = torch.randint(0, config.vocab_size, (1, seq), generator=g).to(device)
        targets = ids.roll(-1, dims=1)
        targets[:, -1] = -100
        steps = args.warmup + (args.steps if spec["timed"] else 1)
        times = []
        for i in range(steps):
            if i == args.warmup and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)  # after the optimizer states exist
            _sync(device)
            start = time.perf_counter()
            runner.step(ids, targets)
            _sync(device)
            times.append(time.perf_counter() - start)
        step_s = statistics.median(times[args.warmup:])
        row.update(fits=True, step_s=step_s, tokens_per_s=seq / step_s)
        if device.type == "cuda":
            row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    except torch.OutOfMemoryError:
        row.update(fits=False)
    if system == "batchpilot_stream" and not args.bf16_params:  # the prediction models the autocast path
        row["predicted_peak_allocated_bytes"] = predict_stream_peak_bytes(config, seq_len=seq,
                                                                          chunk_tokens=args.stream_chunk)
    return row


def probe(system: str, seq: int, timed: bool, passthrough: list[str], timeout: float) -> dict:
    spec = json.dumps(dict(system=system, seq=seq, timed=timed))
    cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--run-one", spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return dict(system=system, seq=seq, timed=timed, fits=False, error=f"timeout after {timeout:.0f} s")
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if rows:
        print(json.dumps(rows[0]), flush=True)
        return rows[0]
    tail = (proc.stderr or proc.stdout)[-2000:]
    oom = "out of memory" in tail.lower()  # an OOM the child could not catch (e.g. inside the CUDA context)
    row = dict(system=system, seq=seq, timed=timed, fits=False, error=None if oom else tail)
    print(json.dumps(row), flush=True)
    return row


def longest(system: str, args, passthrough: list[str]) -> tuple[int | None, list[dict]]:
    """Doubling search from ``--start-seq`` up to ``--max-seq``, then one midpoint (multiple of 2048)."""
    rows, fit, seq = [], None, args.start_seq
    while seq <= args.max_seq:
        rows.append(probe(system, seq, False, passthrough, args.child_timeout))
        if not rows[-1]["fits"]:
            break
        fit, seq = seq, seq * 2
    if fit is not None and seq <= args.max_seq:
        mid = (fit + seq) // 2 // args.granularity * args.granularity
        if fit < mid < seq:
            rows.append(probe(system, mid, False, passthrough, args.child_timeout))
            fit = mid if rows[-1]["fits"] else fit
    return fit, rows


def liger_missing() -> str | None:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as e:  # noqa: BLE001  (missing, or broken against this torch/transformers: noted)
        return f"liger-kernel does not import ({type(e).__name__}: {e})"
    return None


# ------------------------------------------------------------------------------------------- main
def summarize(longest_seq: dict, timed: list[dict]) -> dict:
    def tps(system: str, seq: int) -> float | None:
        row = next((r for r in timed if r["system"] == system and r["seq"] == seq and r["fits"]), None)
        return row["tokens_per_s"] if row else None

    stream, ckpt, liger = (longest_seq.get(s) for s in SYSTEMS)
    both = min(stream, ckpt) if stream and ckpt else None
    s_tps, c_tps = (tps("batchpilot_stream", both), tps("batchpilot_ckpt", both)) if both else (None, None)
    measured = [r for r in timed if r["system"] == "batchpilot_stream" and r["fits"] and "peak_allocated_bytes" in r]
    error = None
    if measured:
        row = max(measured, key=lambda r: r["seq"])
        error = round(row["predicted_peak_allocated_bytes"] / row["peak_allocated_bytes"] - 1, 4)
    return {"longest_seq": longest_seq,
            "max_seq_ratio_vs_liger": round(stream / liger, 3) if stream and liger else None,
            "max_seq_ratio_ckpt_vs_liger": round(ckpt / liger, 3) if ckpt and liger else None,
            "longest_seq_both_batchpilot": both,
            "stream_speed_ratio": round(s_tps / c_tps, 3) if s_tps and c_tps else None,
            "stream_memory_prediction_error": error,
            "tokens_per_s": {f"{r['system']}_{r['seq']}": round(r["tokens_per_s"], 1) for r in timed if r["fits"]}}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama-1b")
    p.add_argument("--stream-chunk", type=int, default=4096)
    p.add_argument("--start-seq", type=int, default=16384)
    p.add_argument("--max-seq", type=int, default=1 << 20)
    p.add_argument("--granularity", type=int, default=2048)
    p.add_argument("--speed-seqs", type=int, nargs="*", default=[32768, 65536])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child-timeout", type=float, default=900.0)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--bf16-params", action="store_true",
                   help="batchpilot systems: bf16 compute over fp32 masters via one-device FSDP2 (no autocast)")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny preset, short sequences")
    p.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.stream_chunk, args.start_seq, args.max_seq = "tiny", 24, 64, 128
        args.granularity, args.speed_seqs, args.steps = 32, [64], 1
    if args.run_one:
        print("ROW " + json.dumps(run_probe(json.loads(args.run_one), args)), flush=True)
        return
    passthrough = [a for a in argv if a != "--run-one"]
    systems, skipped = list(SYSTEMS), {}
    if reason := liger_missing():
        systems.remove("hf_liger")
        skipped["hf_liger"] = reason
    if args.smoke:
        systems.append("hf")
    longest_seq, search = {}, []
    for system in systems:
        longest_seq[system], rows = longest(system, args, passthrough)
        search += rows
    both = min((longest_seq.get("batchpilot_stream") or 0), (longest_seq.get("batchpilot_ckpt") or 0))
    timed = []
    for seq in sorted({*args.speed_seqs, *([both] if both else [])}):
        for system in systems:
            if longest_seq.get(system) and seq <= longest_seq[system]:
                timed.append(probe(system, seq, True, passthrough, args.child_timeout))
    result = {"benchmark": "long_context", **provenance(), "preset": args.preset, "micro_batch_size": 1,
              "batchpilot_precision": "bf16 params (FSDP2, fp32 masters)" if args.bf16_params else
              "fp32 params + bf16 autocast",
              "stream_chunk": args.stream_chunk, "predicted_cuda_context_bytes": CUDA_CONTEXT_BYTES,
              "skipped": skipped, "search": search, "timed": timed, "summary": summarize(longest_seq, timed)}
    out = Path(args.out_dir) if args.out_dir else REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_smoke" if args.smoke else ""
    suffix += "_bf16" if args.bf16_params else ""
    path = out / f"long_context{suffix}_{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
