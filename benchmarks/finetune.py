"""Fine-tuning throughput on chat data: batchpilot's data + model (+ LoRA) against Hugging Face's Trainer.

Cases, on the same packed chat rows (synthetic chat JSONL written here, rendered with a ChatML template,
prepared by ``prepare --format chat``, packed whole conversations per row by ``PackedLoader(pack=
"conversation")``, loss on assistant tokens only):
  full_ft     the qwen2-0.5b shape, every parameter trained
  lora        the llama-1b shape, LoRA rank 16 on all linear layers (PEFT on both sides)
  offload_8b  the llama-8b preset (random weights, all 8.0B parameters) fully fine-tuned on one GPU with
              ``--parallel.offload cpu``: the trainer's own ``train_step`` on the model ``run.build_run_model``
              builds (FSDP2 CPUOffloadPolicy on a one-rank mesh, full activation checkpointing, fused CPU
              AdamW). Host memory: fp32 masters + gradients + AdamW moments would be 16 B/param = 128 GB, more
              than the GPU machine's 128 GiB can pin, so it runs ``--parallel.master_dtype bfloat16`` (parameters,
              gradients and moments in bf16: 64 GB; pure-bf16 updates, see docs/finetune.md). Recorded: tokens/s,
              ``torch.cuda.max_memory_allocated`` over the steps, peak host RSS, and next to them the planner's
              predictions (``plan/sft.py: predicted_step_seconds`` and, where plan/memory.py has it,
              ``predict_offload_peak_bytes``; both assume fp32 shards, so they are upper-side for bf16 masters).
Systems:
  batchpilot  our ``Llama`` (fp32 master weights, bf16 autocast, fused chunked CE, document mask from the
              restarting positions: FlexAttention on CUDA), fused AdamW, blocks compiled; a plain loop, not
              the trainer (being restructured), so this measures the model/data/LoRA pieces
  hf_trainer  transformers ``Trainer`` on the same rows (``bf16=True``, fused AdamW, SDPA, the packed
              rows' ``position_ids`` passed so it masks per conversation too), with Liger kernels
              (``use_liger_kernel``) when ``liger_kernel`` is importable
Both see identical token ids, targets (HF's labels are our targets shifted right by one, as its loss
shifts them back) and positions. Weights are random (throughput does not depend on them); the tokenizer is
a small BPE, so ids stay below the shapes' vocabularies, whose LM-head cost is paid in full.

Per case: ``--warmup`` optimizer steps, then ``--steps`` timed ones (synchronize + perf_counter around
each optimizer step); tokens/s = rows x seq_len / median step time. Every (case, system) runs in its own
process under a wall cap (``--cap-s``, ``--offload-cap-s``): a part that reaches its cap is killed and keeps
the steps it finished (``capped: true``); the JSON is rewritten after every part, so it exists whatever stops.

Usage (one H200; about 11 minutes in all, so two commands under a 10-minute limit):
    BATCHPILOT_COMMIT=$(git rev-parse HEAD) python benchmarks/finetune.py --cases full_ft,lora
    BATCHPILOT_COMMIT=$(git rev-parse HEAD) python benchmarks/finetune.py --cases offload_8b
CPU smoke test:    python benchmarks/finetune.py --smoke   (tiny shapes; offload_8b uses the tiny preset)
Result: ``benchmarks/results/finetune_<date>.json``, summary keys ``full_ft_speedup_vs_hf_trainer``,
``lora_speedup_vs_hf_trainer``, ``offload_8b_tokens_per_s`` and ``offload_memory_prediction_error``
(predicted / measured peak GPU bytes - 1; None while the planner has no offload memory term).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402

from provenance import provenance  # noqa: E402

from batchpilot.data.packing import Batch, PackedLoader  # noqa: E402
from batchpilot.data.prepare import PrepareConfig, prepare  # noqa: E402
from batchpilot.data.tokenizer import Tokenizer  # noqa: E402
from batchpilot.model.attention import DocumentMask, document_ids_from_positions  # noqa: E402
from batchpilot.model.hf import config_to_hf  # noqa: E402
from batchpilot.model.llama import LlamaConfig, build_model, get_preset  # noqa: E402
from batchpilot.train.lora import LoraConfig, apply_lora  # noqa: E402
from batchpilot.train.optim import build_optimizer  # noqa: E402

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
WORDS = ("the model learns to answer questions about data batches tokens steps memory speed loss rate "
         "gradient norm optimizer schedule warmup epoch packing mask conversation assistant user").split()
LORA = LoraConfig(rank=16, alpha=32.0, seed=0)


# ----------------------------------------------------------------------------------- data
def synthetic_chat(path: Path, num: int, seed: int = 0) -> None:
    """Chat JSONL: a system prompt, 1-4 exchanges; answers longer than questions, as in instruction data."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    with open(path, "w") as f:
        for _ in range(num):
            messages = [{"role": "system", "content": "You are a helpful assistant."}]
            for _ in range(rng.randint(1, 4)):
                messages += [{"role": "user", "content": text(8, 60) + "?"},
                             {"role": "assistant", "content": text(40, 300) + "."}]
            f.write(json.dumps({"messages": messages}) + "\n")


def prepare_chat(root: Path, num_conversations: int) -> Path:
    synthetic_chat(root / "chat.jsonl", num_conversations)
    corpus = [" ".join(WORDS)] * 20 + [(root / "chat.jsonl").read_text()[:200_000]]
    bpe = Tokenizer.train_bpe(corpus, 2048, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    Tokenizer(bpe.inner, eos_id=bpe.inner.token_to_id("<|im_end|>"), chat_template=CHATML).save(root / "model")
    return prepare(PrepareConfig(sources=[str(root / "chat.jsonl")], out_dir=str(root / "data"),
                                 tokenizer=str(root / "model"), format="chat", val_fraction=0.01))


def batches(data_dir: Path, *, seq_len: int, rows: int, count: int) -> list[Batch]:
    loader = PackedLoader(data_dir, "train", seq_len, pack="conversation")
    return [loader.take(rows) for _ in range(count)]


# ----------------------------------------------------------------------------------- systems
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_batchpilot(config: LlamaConfig, lora: bool, data: list[Batch], args, device: torch.device) -> list[float]:
    model = build_model(config, device=device, seed=0)
    if lora:
        apply_lora(model, LORA)
    if args.compile:
        for layer in model.layers:
            layer.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    times = []
    for batch in data:
        _sync(device)
        t0 = time.perf_counter()
        for lo in range(0, len(batch.input_ids), args.micro_batch):
            mb = Batch(*(t[lo:lo + args.micro_batch] for t in (batch.input_ids, batch.targets, batch.position_ids)))
            mb = mb.to(device)
            meta = DocumentMask(document_ids=document_ids_from_positions(mb.position_ids))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(mb.input_ids, targets=mb.targets, position_ids=mb.position_ids, attn_meta=meta)
            (loss * len(mb.input_ids) / len(batch.input_ids)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(report_step(time.perf_counter() - t0))
    return times


def report_step(seconds: float) -> float:
    """Print one finished step for the parent (which keeps it if the part reaches its wall cap)."""
    print(f"STEP {seconds:.6f}", flush=True)
    return seconds


# the offload case's masters: bf16, since fp32 masters + AdamW of 8B parameters exceed what the host can pin
OFFLOAD_MASTER_DTYPE, OFFLOAD_MASTER_BYTES = "bfloat16", 2


def offload_config(args, data_dir: Path):
    """The run configuration of the offload case: the trainer's own components, as ``batchpilot train
    --model.name llama-8b --parallel.offload cpu --parallel.master_dtype bfloat16`` would build them."""
    from batchpilot.train.config import DataConfig, ModelConfig, TrainConfig
    from batchpilot.train.adaptive import BatchConfig
    from batchpilot.train.optim import OptimConfig
    from batchpilot.train.parallel import ParallelConfig
    from batchpilot.train.schedule import ScheduleConfig

    return TrainConfig(out_dir="unused", model=ModelConfig(name=args.offload_preset),
                       data=DataConfig(path=str(data_dir), seq_len=args.seq_len, pack="conversation"),
                       optim=OptimConfig(lr=1e-5),
                       schedule=ScheduleConfig(max_steps=args.offload_warmup + args.offload_steps, min_lr=1e-6),
                       batch=BatchConfig(global_batch_tokens=args.offload_rows * args.seq_len, micro_batch_size=args.offload_micro_batch),
                       parallel=ParallelConfig(offload="cpu", master_dtype=OFFLOAD_MASTER_DTYPE,
                                               activation_checkpointing="full"))


def run_offload(args, data_dir: Path, device: torch.device, row: dict[str, Any]) -> list[float]:
    """The trainer's ``train_step`` on the offloaded model: each step prints its time; peaks go into ``row``."""
    from batchpilot.train import parallel, run
    from batchpilot.train.trainer import optimizer_config, train_step

    cfg = offload_config(args, data_dir)
    dims = parallel.init_distributed(device.type, offload="cpu")
    config = run.model_config(cfg.model)
    model = run.build_run_model(cfg.model, config, cfg.parallel, dims)
    optimizer = build_optimizer(model, optimizer_config(cfg))
    loader = PackedLoader(data_dir, "train", args.seq_len, pack="conversation")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the steps' peak, not the one-off fp32 build on the GPU
    row.update(preset=args.offload_preset, master_dtype=OFFLOAD_MASTER_DTYPE, activation_checkpointing="full",
               params_on_gpu=any(p.device.type == "cuda" for p in model.parameters()))
    times = []
    for _ in range(args.offload_warmup + args.offload_steps):
        _sync(device)
        t0 = time.perf_counter()
        train_step(model, optimizer, loader, global_batch_tokens=cfg.batch.global_batch_tokens,
                   seq_len=args.seq_len, micro_batch_size=args.offload_micro_batch, dims=dims, grad_clip=cfg.optim.grad_clip,
                   sync_every_micro_batch=True)
        _sync(device)
        times.append(report_step(time.perf_counter() - t0))
        if device.type == "cuda":
            print(f"PEAK {torch.cuda.max_memory_allocated(device)}", flush=True)
    parallel.shutdown_distributed()
    return times


def offload_predictions(args) -> dict[str, Any]:
    """The planner's numbers for the offload case: step seconds (plan/sft.py) and, when plan/memory.py has
    the offload term, the peak GPU bytes comparable with ``max_memory_allocated``."""
    from batchpilot.plan.sft import SftBudget, predicted_step_seconds

    config = get_preset(args.offload_preset)
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 80.0
    budget = SftBudget(config=config, examples=1000, tokens_per_example=args.seq_len // 2, gpu_memory_gib=gpu_gib,
                       seq_len=args.seq_len)
    out: dict[str, Any] = {"predicted_step_s": round(predicted_step_seconds(budget, args.offload_rows,
                                                                            offload="cpu",
                                                                            micro=args.offload_micro_batch), 3)}
    try:  # the planner's offload memory term (another area adds it to plan/memory.py)
        from batchpilot.plan.memory import predict_offload_peak_bytes
    except ImportError:
        out["predicted_peak_bytes"] = None
        out["predicted_peak_note"] = "plan.memory.predict_offload_peak_bytes is not in this tree"
    else:
        out["predicted_peak_bytes"] = int(predict_offload_peak_bytes(config, args.seq_len,
                                                                     micro_batch_size=args.offload_micro_batch,
                                                                     checkpointing=True,
                                                                     master_bytes=OFFLOAD_MASTER_BYTES))
    return out


def run_hf_trainer(config: LlamaConfig, lora: bool, data: list[Batch], args, device: torch.device,
                   out_dir: Path) -> tuple[list[float], bool]:
    hf_cfg = {k: v for k, v in config_to_hf(config).items() if k not in ("architectures", "torch_dtype")}
    cls = transformers.Qwen2ForCausalLM if config.architecture == "qwen2" else transformers.LlamaForCausalLM
    cfg_cls = transformers.Qwen2Config if config.architecture == "qwen2" else transformers.LlamaConfig
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(cfg_cls(**hf_cfg, attn_implementation="sdpa"))
    model.config.use_cache = False
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=0.0,
                                                           target_modules=list(LORA.target_modules)))
    rows = [{"input_ids": b.input_ids[i], "labels": torch.cat([torch.tensor([-100]), b.targets[i, :-1]]),
             "position_ids": b.position_ids[i]} for b in data for i in range(len(b.input_ids))]
    liger = _importable("liger_kernel") and device.type == "cuda"
    training_args = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.rows // args.micro_batch, max_steps=len(data), learning_rate=1e-5,
        lr_scheduler_type="constant", bf16=device.type == "cuda", use_cpu=device.type != "cuda",
        optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch", use_liger_kernel=liger,
        report_to="none", save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True, torch_compile=False)
    timer = _StepTimer(device)
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=_Rows(rows),
                                   data_collator=_stack, callbacks=[timer])
    trainer.train()
    return timer.times, liger


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, torch.Tensor]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def _stack(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class _StepTimer(transformers.TrainerCallback):
    """Wall time of each optimizer step of HF's Trainer (synchronized at both ends)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self._t0 = device, [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        _sync(self.device)
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync(self.device)
        self.times.append(report_step(time.perf_counter() - self._t0))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ----------------------------------------------------------------------------------- cases
def case_configs(smoke: bool) -> dict[str, tuple[LlamaConfig, bool]]:
    if smoke:
        small = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     vocab_size=4096, head_dim=0)
        return {"full_ft": (get_preset("qwen2-0.5b").with_(**small), False),
                "lora": (get_preset("llama-1b").with_(**small, rope_scaling=None), True)}
    return {"full_ft": (get_preset("qwen2-0.5b"), False), "lora": (get_preset("llama-1b"), True)}


DEFAULT_CASES = "full_ft,lora,offload_8b"
SYSTEMS = {"full_ft": ("batchpilot", "hf_trainer"), "lora": ("batchpilot", "hf_trainer"),
           "offload_8b": ("batchpilot_offload",)}


def run_one(spec: dict[str, Any], args) -> dict[str, Any]:
    """Child process: one (case, system); prints STEP lines as it goes and a final ROW line."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    case, system, data_dir = spec["case"], spec["system"], Path(spec["data_dir"])
    row: dict[str, Any] = {"system": system}
    data = batches(data_dir, seq_len=args.seq_len, rows=args.rows, count=args.warmup + args.steps) \
        if case != "offload_8b" else []
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if case == "offload_8b":
            run_offload(args, data_dir, device, row)
        elif system == "batchpilot":
            config, lora = case_configs(args.smoke)[case]
            run_batchpilot(config, lora, data, args, device)
        else:
            config, lora = case_configs(args.smoke)[case]
            with tempfile.TemporaryDirectory() as tmp:
                row["liger"] = run_hf_trainer(config, lora, data, args, device, Path(tmp))[1]
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    except torch.OutOfMemoryError:
        row["oom"] = True
    except Exception as e:  # a failing system is recorded, not fatal
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    row["peak_host_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return row


def time_case(case: str, system: str, data_dir: Path, args, passthrough: list[str]) -> dict[str, Any]:
    """Run one (case, system) in a child under its wall cap; tokens/s from the steps it finished."""
    cap = args.offload_cap_s if case == "offload_8b" else args.cap_s
    spec = json.dumps({"case": case, "system": system, "data_dir": str(data_dir)})
    cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--run-one", spec]
    # its own process group: at the cap the child and its helpers (inductor's compile workers hold the pipes)
    # are killed together
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=cap)
        capped = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        capped = True
    lines = out.splitlines()
    times = [float(line.split()[1]) for line in lines if line.startswith("STEP ")]
    peaks = [int(line.split()[1]) for line in lines if line.startswith("PEAK ")]
    rows = [json.loads(line[4:]) for line in lines if line.startswith("ROW ")]
    row = rows[0] if rows else {"system": system}
    if capped:
        row.update(capped=True, cap_s=cap)
    elif not rows:
        row["error"] = (err or out)[-1500:]
    if peaks and "peak_gib" not in row:
        row["peak_gib"] = round(max(peaks) / 2**30, 2)
    warmup = args.offload_warmup if case == "offload_8b" else args.warmup
    timed = times[warmup:] or times[1:]  # a capped part keeps what it timed (the first step is warmup)
    rows_per_step = args.offload_rows if case == "offload_8b" else args.rows
    if timed:
        step_s = statistics.median(timed)
        row.update(step_s=round(step_s, 4), tokens_per_s=round(rows_per_step * args.seq_len / step_s, 1),
                   timed_steps=len(timed))
    row["step_times"] = [round(t, 4) for t in times]
    if peaks:
        row["peak_allocated_bytes"] = max(peaks)
    return row


def speedup(rows: list[dict[str, Any]]) -> float | None:
    ours = next((r for r in rows if r["system"] == "batchpilot" and "tokens_per_s" in r), None)
    theirs = next((r for r in rows if r["system"] == "hf_trainer" and "tokens_per_s" in r), None)
    return round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3) if ours and theirs else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, 2+1 steps: checks the code path")
    p.add_argument("--seq-len", type=int, default=4096, help="packed row length (tokens)")
    p.add_argument("--rows", type=int, default=16, help="rows per optimizer step")
    p.add_argument("--micro-batch", type=int, default=4, help="rows per forward/backward")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--conversations", type=int, default=1500, help="synthetic chat examples written")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="do not compile batchpilot's blocks")
    p.add_argument("--cases", default=DEFAULT_CASES)
    p.add_argument("--cap-s", type=float, default=90.0, help="wall cap of each full_ft / lora system (seconds)")
    p.add_argument("--offload-cap-s", type=float, default=300.0, help="wall cap of the offload_8b part (seconds)")
    p.add_argument("--offload-preset", default="llama-8b")
    p.add_argument("--offload-rows", type=int, default=4, help="offload_8b: rows per step")
    # plan/sft.py's _fit_offload takes the largest micro-batch whose predicted peak fits: all 4 rows at once on an
    # H200 (one backward per step, so the parameters cross the host link once per step instead of once per row)
    p.add_argument("--offload-micro-batch", type=int, default=None,
                   help="offload_8b: rows per forward/backward (default: --offload-rows, what the planner picks)")
    p.add_argument("--offload-warmup", type=int, default=1, help="offload_8b: untimed steps")
    p.add_argument("--offload-steps", type=int, default=3, help="offload_8b: timed steps")
    p.add_argument("--out", default=None, help="directory for the JSON (default benchmarks/results)")
    p.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_len, args.rows, args.micro_batch, args.warmup = 256, 4, 2, 1
        args.steps = args.steps if "--steps" in (argv or sys.argv) else 2
        args.conversations, args.compile, args.offload_preset = 200, False, "tiny"
    if args.rows % args.micro_batch:
        raise SystemExit("--rows must be a multiple of --micro-batch")
    args.offload_micro_batch = args.offload_micro_batch or args.offload_rows
    if args.offload_rows % args.offload_micro_batch:
        raise SystemExit("--offload-rows must be a multiple of --offload-micro-batch")
    return args


def offload_summary(case: dict[str, Any]) -> dict[str, Any]:
    row = next(iter(case.get("rows", [])), {})
    predicted, measured = case.get("predicted_peak_bytes"), row.get("peak_allocated_bytes")
    return {"offload_8b_tokens_per_s": row.get("tokens_per_s"),
            "offload_8b_step_s": row.get("step_s"), "offload_8b_predicted_step_s": case.get("predicted_step_s"),
            "offload_8b_peak_gpu_bytes": measured, "offload_8b_predicted_peak_gpu_bytes": predicted,
            "offload_memory_prediction_error": round(predicted / measured - 1, 4) if predicted and measured else None}


def summarize(cases: dict[str, Any]) -> dict[str, Any]:
    return {"full_ft_speedup_vs_hf_trainer": speedup(cases.get("full_ft", {}).get("rows", [])),
            "lora_speedup_vs_hf_trainer": speedup(cases.get("lora", {}).get("rows", [])),
            **offload_summary(cases.get("offload_8b", {}))}


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.run_one:
        print("ROW " + json.dumps(run_one(json.loads(args.run_one), args)), flush=True)
        return
    passthrough = [a for a in argv]
    result: dict[str, Any] = {"benchmark": "finetune", "environment": provenance(),
                              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "run_one")},
                              "cases": {}}
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    subset = "" if args.cases == DEFAULT_CASES else "_" + args.cases.replace(",", "_")  # parts run apart
    path = out / f"finetune{'_smoke' if args.smoke else ''}{subset}_{dt.date.today().isoformat()}.json"

    def write() -> None:
        result["summary"] = summarize(result["cases"])
        path.write_text(json.dumps(result, indent=1))

    with tempfile.TemporaryDirectory() as tmp_name:
        data_dir = prepare_chat(Path(tmp_name), args.conversations)
        data = batches(data_dir, seq_len=args.seq_len, rows=args.rows, count=args.warmup + args.steps)
        result["settings"]["loss_token_fraction"] = round(
            float(sum(int((b.targets != -100).sum()) for b in data)) / (len(data) * args.rows * args.seq_len), 4)
        for name in args.cases.split(","):
            if name == "offload_8b":
                case: dict[str, Any] = {"preset": args.offload_preset, "rows_per_step": args.offload_rows,
                                        "micro_batch": args.offload_micro_batch,
                                        **offload_predictions(args), "rows": []}
            else:
                config, lora = case_configs(args.smoke)[name]
                case = {"lora": lora, "architecture": config.architecture, "rows": []}
            result["cases"][name] = case
            for system in SYSTEMS[name]:
                case["rows"].append(time_case(name, system, data_dir, args, passthrough))
                print(name, json.dumps({k: v for k, v in case["rows"][-1].items() if k != "step_times"}), flush=True)
                write()
    write()
    print(json.dumps(result["summary"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
