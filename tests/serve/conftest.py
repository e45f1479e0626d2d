import pytest
import torch
from live_server import LiveServer

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


@pytest.fixture
def live_server(serve_model_dir):
    with LiveServer(serve_model_dir, "--max-queue", "64") as server:
        yield server
