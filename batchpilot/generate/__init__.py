"""Offline batched generation: plan the whole job (shared-prefix groups), then run it on a paged KV cache."""

from batchpilot.generate.engine import Engine, EngineConfig
from batchpilot.generate.llm import LLM, RequestOutput
from batchpilot.generate.request import Completion, SamplingParams, Score, TokenLogprob, request_seed

__all__ = ["LLM", "Completion", "Engine", "EngineConfig", "RequestOutput", "SamplingParams", "Score", "TokenLogprob",
           "request_seed"]
