"""``ServeConfig``: what a deployment of ``batchpilot serve`` promises and limits (SLOs, admission, queue)."""

from __future__ import annotations

from dataclasses import dataclass

from batchpilot.generate.scheduler import ADMISSIONS


@dataclass(kw_only=True, slots=True)
class ServeConfig:
    served_model_name: str = "batchpilot"
    admission: str = "past_future"  # past_future | aggressive | conservative (generate/scheduler.py)
    ttft_slo_s: float | None = None  # time to first token SLO: reported and counted in /metrics' goodput
    tpot_slo_s: float | None = None  # time per output token SLO: sizes each step's token budget (Sarathi-Serve)
    max_queue: int = 512  # requests in flight (waiting + running) before 429
    retry_after_s: int = 1
    shutdown_timeout_s: float = 30.0
    max_tokens: int = 256  # default when a request gives none
    chat_template: str | None = None
    special_tokens: dict[str, str] | None = None
    warm_up_graphs: bool = True  # capture every decode graph before taking requests (serve/loop.py warm_up_graphs)

    def __post_init__(self) -> None:
        if self.admission not in ADMISSIONS:
            raise ValueError(f"--admission {self.admission!r}: choose one of {', '.join(ADMISSIONS)}")
        for name in ("ttft_slo_s", "tpot_slo_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.removesuffix('_s').replace('_', '-')} must be > 0 seconds, got {value}")
        if self.max_queue < 1:
            raise ValueError(f"--max-queue must be >= 1, got {self.max_queue}")
