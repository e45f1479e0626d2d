"""``EngineStats``: what the engine counts while it runs (steps, tokens, time, the decode steps' bytes bound)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EngineStats:
    steps: int = 0  # model steps (a multi-step decode counts each of its steps)
    round_trips: int = 0  # host round trips: schedule, run, read tokens back
    prefill_tokens: int = 0  # prompt tokens computed (recompute after preemption included)
    output_tokens: int = 0
    preemptions: int = 0
    seconds: float = 0.0
    decode_steps: int = 0  # steps with decode tokens only
    decode_seconds: float = 0.0
    decode_bytes: float = 0.0  # bytes bound of those steps (weights + KV read)
    decode_batch_sum: int = 0
    graph_steps: int = 0  # decode steps replayed on a CUDA graph (the rest of decode_steps ran eagerly)

    def to_dict(self) -> dict[str, int | float]:
        return {k: getattr(self, k) for k in self.__slots__}
