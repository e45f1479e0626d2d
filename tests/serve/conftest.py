import socket
import threading
import time

import pytest
import torch

TEXTS = ["In the beginning God created the heaven and the earth.", "And the earth was without form, and void.",
         "And God said, Let there be light: and there was light."] * 20
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="session")
def serve_model_dir(tmp_path_factory):
    """A tiny random Llama with a trained BPE tokenizer and a chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from batchpilot.data.tokenizer import Tokenizer

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("serve_model")
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 tie_word_embeddings=True)).save_pretrained(path)
    tok = Tokenizer.train_bpe(TEXTS, 300, special_tokens=("<|endoftext|>", "<|assistant|>"))
    tok.chat_template = CHAT_TEMPLATE
    tok.save(path)
    return path


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


@pytest.fixture
def live_server(serve_model_dir):
    with LiveServer(serve_model_dir, "--max-queue", "64") as server:
        yield server
