"""batchpilot as an lm-eval-harness model type: ``lm_eval --model batchpilot --model_args pretrained=DIR,...``.

Registered with lm-eval's registry on import (``register_model("batchpilot")``); ``python -m batchpilot.eval``
runs lm-eval's CLI with it registered. Requests are tokenized exactly as lm-eval's ``hf`` backend does
(``HFLM._encode_pair``: trailing spaces of the context move to the continuation; no special tokens unless
``add_bos_token``; an empty context is the prefix token: BOS, else EOS), so both backends score the same tokens:

- ``loglikelihood`` / ``loglikelihood_rolling``: from prefill only, through ``batchpilot.eval.scoring.score``
  (the engine's ``score`` with shared-prefix prefill; lm-eval's rolling windows for the rolling one);
- ``generate_until``: the engine, greedy (or sampled when the task asks), stop strings = ``until``, then cut at
  the first ``until`` string as lm-eval does.

model_args: ``pretrained`` (model directory), ``tokenizer`` (default: the model's), ``dtype`` (float32 |
bfloat16 | float16; default float32 on CPU, bfloat16 on GPU), ``max_length`` (default: the model's positions),
``add_bos_token`` (false), ``prefix_token_id`` (default: BOS, else EOS), ``seed`` (0), ``max_gen_toks`` (256), ``batch_size`` (accepted; the engine batches the
whole request list itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from batchpilot.data.chat_template import read_tokenizer_config
from batchpilot.data.tokenizer import Tokenizer
from batchpilot.eval.scoring import score
from batchpilot.generate.engine import Engine, EngineConfig
from batchpilot.generate.request import SamplingParams

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _bool_arg(v: Any, name: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise ValueError(f"model_args {name} must be true or false, got {v!r}")


@register_model("batchpilot")
class BatchpilotLM(LM):
    def __init__(self, pretrained: str, tokenizer: str | None = None, dtype: str | None = None,
                 max_length: int | None = None, add_bos_token: bool | str = False, seed: int = 0,
                 max_gen_toks: int = 256, batch_size: int | str = 1, device: str | None = None,
                 prefix_token_id: int | None = None,
                 **engine_kwargs: Any) -> None:
        super().__init__()
        from batchpilot.model.hf import load_model

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"model_args dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        torch_dtype = _DTYPES[dtype] if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        model = load_model(pretrained, device=dev, dtype=torch_dtype)
        self.tokenizer = Tokenizer.from_path(tokenizer or pretrained)
        tok_dir = Path(tokenizer or pretrained)
        tok_dir = tok_dir if tok_dir.is_dir() else tok_dir.parent
        self.declares_bos = self.tokenizer.bos_id is not None and "bos_token" in read_tokenizer_config(tok_dir)
        self.prefix_override = None if prefix_token_id is None else int(prefix_token_id)
        self.max_length = int(max_length or model.config.max_position_embeddings)
        self.add_bos_token = _bool_arg(add_bos_token, "add_bos_token")
        self.max_gen_toks = int(max_gen_toks)
        config = EngineConfig(seed=int(seed), min_prefix_len=1, **engine_kwargs)
        self.engine = Engine(model, self.tokenizer, config)
        self.name = Path(pretrained).name

    # --- tokenization, as lm-eval's hf backend ---

    @property
    def prefix_token_id(self) -> int:
        """lm-eval's rule: the tokenizer's BOS, else its EOS. The tokenizer's: declared in tokenizer_config.json
        (our ``Tokenizer`` also takes a BOS from config.json, which HF tokenizers do not)."""
        if self.prefix_override is not None:
            return self.prefix_override
        bos = self.tokenizer.bos_id
        return bos if self.declares_bos and bos is not None else self.tokenizer.eos_id

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode_prompt(text) if self.add_bos_token else self.tokenizer.encode(text)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        n_context = len(self.tok_encode(context))
        return whole[:n_context], whole[n_context:]

    def _truncate(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate to ``max_length`` + 1 tokens (the last one is only predicted), as the hf backend."""
        whole = (context + continuation)[-(self.max_length + 1):]
        return whole[:len(whole) - len(continuation)], continuation[-len(whole):]

    # --- lm-eval's request types ---

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args
            if context == "":
                pairs.append(([self.prefix_token_id], self.tok_encode(continuation)))
            else:
                pairs.append(self._encode_pair(context, continuation))
        scores = self._score([self._truncate(c, x) for c, x in pairs])
        return [(sum(s.logprobs), s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args[:1]
            for context, target in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((list(context), list(target)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, s in zip(owner, self._score(windows), strict=True):
            totals[i] += sum(s.logprobs)
        return totals

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[Any]:
        return score(self.engine, [c for c, _ in pairs], [x for _, x in pairs])

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        prompts, params, untils = [], [], []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs)
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-(self.max_length - max_gen):] or [self.prefix_token_id]
            stops = tuple(s for s in until if s)
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=max_gen, temperature=temperature, stop=stops))
            untils.append(stops)
        results = self.engine.generate(prompts, params)
        out = []
        for c, stops in zip(results, untils, strict=True):
            text = c.text
            for s in stops:  # the engine cut at the first stop string already; lm-eval's rule, to be exact
                text = text.split(s)[0]
            out.append(text)
        return out
