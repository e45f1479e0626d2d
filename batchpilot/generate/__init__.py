"""Offline batched generation: plan the whole job (shared-prefix groups), then run it on a paged KV cache."""

from batchpilot.generate.engine import Engine, EngineConfig
from batchpilot.generate.request import Completion, SamplingParams

__all__ = ["Completion", "Engine", "EngineConfig", "SamplingParams"]
