"""Local lm-eval tasks written from data: a multiple-choice, a generate_until and a rolling-loglikelihood task.

lm-eval reads a task from YAML; ``dataset_path: json`` with ``data_files`` makes it read a local JSONL file, so
the equality test and the benchmark need no download. Used by ``tests/eval/`` and ``benchmarks/lmeval_compare.py``.
"""

from __future__ import annotations

import json
import random
from typing import Any
from pathlib import Path

TASK_NAMES = ("bp_choice", "bp_until", "bp_rolling")


def _yaml(name: str, data: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            f"test_split: test\n{body}")


def write_tasks(directory: Path, words: list[str], *, num_docs: int, seed: int = 0) -> list[str]:
    """Write the three tasks (``num_docs`` documents each, from ``words``) into ``directory``; their names."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)

    def sentence(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    choice = [{"question": sentence(rng.randint(3, 12)), "choices": [sentence(rng.randint(1, 4)) for _ in range(4)],
               "label": rng.randrange(4)} for _ in range(num_docs)]
    until = [{"prompt": sentence(rng.randint(3, 12)), "answer": rng.choice(words)} for _ in range(num_docs)]
    rolling = [{"text": sentence(rng.randint(5, 40))} for _ in range(num_docs)]
    docs: tuple[list[dict[str, Any]], ...] = (choice, until, rolling)
    for name, rows in zip(TASK_NAMES, docs, strict=True):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "bp_choice.yaml").write_text(_yaml("bp_choice", directory / "bp_choice.jsonl", (
        "output_type: multiple_choice\ndoc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")))
    (directory / "bp_until.yaml").write_text(_yaml("bp_until", directory / "bp_until.jsonl", (
        "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")))
    (directory / "bp_rolling.yaml").write_text(_yaml("bp_rolling", directory / "bp_rolling.jsonl", (
        "output_type: loglikelihood_rolling\ndoc_to_text: \"{{text}}\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")))
    return list(TASK_NAMES)
