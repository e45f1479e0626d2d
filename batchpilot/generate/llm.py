"""``LLM``: load a model once, then ``generate(prompts, params)`` and ``score(contexts, continuations)``.

The Python API the CLI and the evaluation backend share (shaped like vLLM's offline ``LLM``)::

    llm = LLM("path/to/hf_dir", dtype="bfloat16")
    outs = llm.generate(["Once upon a time"], SamplingParams(max_tokens=32, n=2, logprobs=1))
    outs[0].outputs[1].text, outs[0].outputs[1].logprobs
    llm.score([ctx_ids], [cont_ids])[0].logprobs

It owns an ``Engine`` (``llm.engine``) and keeps it warm between calls: weights, KV cache, Triton
kernels and CUDA graphs are built once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from batchpilot.data.tokenizer import Tokenizer
from batchpilot.generate.engine import Engine, EngineConfig
from batchpilot.generate.request import Completion, SamplingParams, Score
from batchpilot.model.hf import load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class RequestOutput:
    index: int  # the prompt's position in the call
    prompt_ids: list[int]
    outputs: list[Completion]  # its n samples, in sample order


class LLM:
    def __init__(self, model: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                 dtype: str | None = None, device: str | None = None, config: EngineConfig | None = None,
                 seed: int = 0) -> None:
        """``model``: an HF / batchpilot directory or a preset name (random weights); ``tokenizer``: a path
        (default: the model directory's tokenizer, if any); ``dtype``: float32, bfloat16 or float16
        (default bf16 on CUDA, fp32 elsewhere); ``device``: default cuda when available."""
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = DTYPES[dtype] if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        model_dir = Path(model)
        tok = tokenizer or (model_dir if (model_dir / "tokenizer.json").is_file() else None)
        self.model = load_model(model, device=dev, dtype=torch_dtype, seed=seed)
        self.tokenizer = Tokenizer.from_path(Path(tok)) if tok is not None else None
        self.engine = Engine(self.model, self.tokenizer, config)

    def generate(self, prompts: Sequence[str | list[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """One ``RequestOutput`` per prompt, in input order (text prompts need a tokenizer)."""
        completions = self.engine.generate(prompts, params)
        outputs: list[RequestOutput] = []
        for c in completions:
            if c.sample_index == 0:
                outputs.append(RequestOutput(c.index, c.prompt_ids, []))
            outputs[-1].outputs.append(c)
        return outputs

    def score(self, contexts: Sequence[str | list[int]], continuations: Sequence[str | list[int]]) -> list[Score]:
        """Per-token log p(continuation | context) from prefill. Text is encoded without a BOS on the
        continuation (the context gets the tokenizer's prompt policy), as lm-eval splits requests."""
        ctx = [self.engine.encode(c) if c != "" else [] for c in contexts]
        cont = [self._encode_plain(c) for c in continuations]
        return self.engine.score(ctx, cont)

    def _encode_plain(self, text: str | list[int]) -> list[int]:
        if isinstance(text, str):
            if self.tokenizer is None:
                raise ValueError("text continuations need a tokenizer (pass token ids)")
            return self.tokenizer.encode(text)
        return list(text)
