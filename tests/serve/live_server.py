"""A batchpilot server on 127.0.0.1 in a background thread, for the tests (fixtures: conftest.py)."""

import socket
import threading
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a thread on 127.0.0.1 (loopback only), stopped at the end of the test."""

    def __init__(self, model_dir, *extra: str) -> None:
        import uvicorn

        from batchpilot.cli import build_parser
        from batchpilot.cli.serve import build_server_app

        self.port = _free_port()
        args = build_parser().parse_args(["serve", "--model", str(model_dir), "--port", str(self.port), *extra])
        self.app, self.cfg = build_server_app(args)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    @property
    def loop(self):
        return self.app.state.server.loop
