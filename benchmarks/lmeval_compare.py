"""lm-eval-harness with the batchpilot backend vs lm-eval's hf backend: wall clock and the same scores.

    python benchmarks/lmeval_compare.py             # llama-125m, random weights, one GPU, ~2k docs per task
    python benchmarks/lmeval_compare.py --smoke     # tiny model, a few docs, CPU

Writes a random-weight model of ``--preset`` (fp32 for the check, as both backends load it) and a BPE tokenizer
to a temporary directory, three local tasks (multiple choice: 4 loglikelihood requests per doc; generate_until;
rolling loglikelihood) with ``--docs`` documents each, and runs ``lm_eval.simple_evaluate`` on them with each
backend. Result ``<out>/lmeval_<date>.json`` with summary keys ``wall_speedup_vs_hf_backend``,
``max_abs_loglikelihood_diff`` (over every loglikelihood and rolling request) and ``metrics_equal`` (every metric
within 1e-4 relative, generations identical).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from provenance import provenance

WORDS = ("In the beginning God created the heaven and the earth And the earth was without form and void and "
         "darkness was upon the face of the deep Let there be light and there was light").split()


def export_model(preset: str, smoke: bool, directory: Path, dtype: torch.dtype) -> None:
    from batchpilot.data.tokenizer import Tokenizer
    from batchpilot.model.hf import save_model
    from batchpilot.model.llama import LlamaConfig, build_model, get_preset

    config = (LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, max_position_embeddings=512) if smoke else get_preset(preset))
    tok = Tokenizer.train_bpe([" ".join(WORDS)] * 50, 300)
    model = build_model(config, seed=0)
    save_model(model, directory, dtype=dtype, eos_token_id=tok.eos_id)
    tok.save(directory, model_max_length=config.max_position_embeddings)


def run(backend: str, model_dir: Path, tasks_dir: Path, names: list[str], args: argparse.Namespace) -> tuple:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if backend == "batchpilot":
        from batchpilot.eval.lm_eval_model import BatchpilotLM

        model = BatchpilotLM(pretrained=str(model_dir), dtype=args.dtype)
    else:
        from lm_eval.models.huggingface import HFLM

        model = HFLM(pretrained=str(model_dir), dtype=args.dtype, device=device, batch_size=args.hf_batch_size)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = simple_evaluate(model=model, tasks=names, task_manager=TaskManager(include_path=str(tasks_dir)),
                             log_samples=True, num_fewshot=0, random_seed=0, numpy_random_seed=0,
                             torch_random_seed=0, fewshot_random_seed=0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def compare(ours: dict, hf: dict, names: list[str]) -> tuple[float, bool, int]:
    """(max |loglikelihood difference|, every metric and generation equal, requests compared)."""
    max_diff, equal, n = 0.0, True, 0
    for name in names:
        for sa, sb in zip(ours["samples"][name], hf["samples"][name], strict=True):
            for ra, rb in zip(sa["resps"], sb["resps"], strict=True):
                ra, rb, n = ra[0], rb[0], n + 1
                if isinstance(ra, str):
                    equal &= ra == rb
                    continue
                a, b = (float(ra[0]), float(rb[0])) if isinstance(ra, tuple | list) else (float(ra), float(rb))
                max_diff = max(max_diff, abs(a - b))
        for metric, value in ours["results"][name].items():
            if isinstance(value, float) and "stderr" not in metric:
                equal &= math.isclose(value, hf["results"][name][metric], rel_tol=1e-4, abs_tol=1e-6)
    return max_diff, equal, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--preset", default="llama-125m")
    p.add_argument("--docs", type=int, default=None, help="documents per task (default 2000; smoke 6)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="float32 (default): the loglikelihoods can be compared to fp32 tolerance")
    p.add_argument("--hf-batch-size", default="auto")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()

    import batchpilot.eval.lm_eval_model  # noqa: F401 - registers the backend
    from batchpilot.eval.tasks import write_tasks

    docs = args.docs or (6 if args.smoke else 2000)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_model(args.preset, args.smoke, tmp / "model", getattr(torch, args.dtype))
        names = write_tasks(tmp / "tasks", WORDS, num_docs=docs)
        ours, ours_s = run("batchpilot", tmp / "model", tmp / "tasks", names, args)
        hf, hf_s = run("hf", tmp / "model", tmp / "tasks", names, args)
    max_diff, equal, n = compare(ours, hf, names)
    summary = {"wall_speedup_vs_hf_backend": round(hf_s / ours_s, 2), "max_abs_loglikelihood_diff": max_diff,
               "metrics_equal": bool(equal), "batchpilot_seconds": round(ours_s, 2), "hf_seconds": round(hf_s, 2),
               "requests": n, "docs_per_task": docs, "model": "smoke" if args.smoke else args.preset,
               "dtype": args.dtype, "tasks": names}
    result = {"benchmark": "lmeval_compare", **provenance(), "summary": summary,
              "metrics": {"batchpilot": ours["results"], "hf": hf["results"]}}
    now = datetime.datetime.now(datetime.timezone.utc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"lmeval_{now:%Y%m%d_%H%M%S}{'_smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(summary), "->", path)


if __name__ == "__main__":
    main()
