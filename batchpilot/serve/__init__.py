"""``batchpilot serve``: an OpenAI-compatible HTTP server over the generation engine, scheduled for latency SLOs."""

from batchpilot.serve.app import build_app
from batchpilot.serve.config import ServeConfig

__all__ = ["ServeConfig", "build_app"]
