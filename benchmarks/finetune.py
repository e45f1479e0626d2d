"""Fine-tuning throughput on chat data: batchpilot's data + model (+ LoRA) against Hugging Face's Trainer.

Cases, on the same packed chat rows (synthetic chat JSONL written here, rendered with a ChatML template,
prepared by ``prepare --format chat``, packed whole conversations per row by ``PackedLoader(pack=
"conversation")``, loss on assistant tokens only):
  full_ft  the qwen2-0.5b shape, every parameter trained
  lora     the llama-1b shape, LoRA rank 16 on all linear layers (PEFT on both sides)
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
each optimizer step); tokens/s = rows x seq_len / median step time.

Usage (one H200):  python benchmarks/finetune.py
CPU smoke test:    python benchmarks/finetune.py --smoke
Result: ``benchmarks/results/finetune_<date>.json``, summary keys ``full_ft_speedup_vs_hf_trainer`` and
``lora_speedup_vs_hf_trainer``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import random
import statistics
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
        times.append(time.perf_counter() - t0)
    return times


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
        self.times.append(time.perf_counter() - self._t0)


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


def time_case(system: str, config: LlamaConfig, lora: bool, data: list[Batch], args, device: torch.device,
              tmp: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"system": system}
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if system == "batchpilot":
            times = run_batchpilot(config, lora, data, args, device)
        else:
            times, liger = run_hf_trainer(config, lora, data, args, device, tmp / system)
            row["liger"] = liger
        timed = times[args.warmup:]
        step_s = statistics.median(timed)
        row.update(step_s=round(step_s, 4), tokens_per_s=round(args.rows * args.seq_len / step_s, 1),
                   step_times=[round(t, 4) for t in times])
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    except torch.OutOfMemoryError:
        row["oom"] = True
    except Exception as e:  # a failing system is recorded, not fatal
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
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
    p.add_argument("--cases", default="full_ft,lora")
    p.add_argument("--out", default=None, help="directory for the JSON (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_len, args.rows, args.micro_batch, args.warmup, args.steps = 256, 4, 2, 1, 2
        args.conversations, args.compile = 200, False
    if args.rows % args.micro_batch:
        raise SystemExit("--rows must be a multiple of --micro-batch")
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    result: dict[str, Any] = {"benchmark": "finetune", "environment": provenance(),
                              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data_dir = prepare_chat(tmp, args.conversations)
        data = batches(data_dir, seq_len=args.seq_len, rows=args.rows, count=args.warmup + args.steps)
        result["settings"]["loss_token_fraction"] = round(
            float(sum(int((b.targets != -100).sum()) for b in data)) / (len(data) * args.rows * args.seq_len), 4)
        configs = case_configs(args.smoke)
        for name in args.cases.split(","):
            config, lora = configs[name]
            rows = [time_case(system, config, lora, data, args, device, tmp) for system in ("batchpilot", "hf_trainer")]
            result["cases"][name] = {"lora": lora, "architecture": config.architecture, "rows": rows}
            print(name, json.dumps([{k: v for k, v in r.items() if k != "step_times"} for r in rows]))
    result["summary"] = {"full_ft_speedup_vs_hf_trainer": speedup(result["cases"].get("full_ft", {}).get("rows", [])),
                         "lora_speedup_vs_hf_trainer": speedup(result["cases"].get("lora", {}).get("rows", []))}
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"finetune{'_smoke' if args.smoke else ''}_{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
