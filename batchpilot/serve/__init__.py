"""``batchpilot serve``: an OpenAI-compatible HTTP server over the generation engine, scheduled for latency SLOs."""

from batchpilot.serve.app import ServeConfig, build_app

__all__ = ["ServeConfig", "build_app"]
