import pytest
import torch

import batchpilot
from batchpilot.data.tokenizer import Tokenizer

from chat_fixture import CHAT_TEMPLATE, TEXTS  # noqa: F401 - CHAT_TEMPLATE: re-exported for old imports


def _hf_config(arch: str):
    from transformers import LlamaConfig, Qwen2Config

    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaConfig(**kw) if arch == "llama" else Qwen2Config(**kw)


def _pair(arch: str, tmp_path_factory):
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    torch.manual_seed(0)
    cls = LlamaForCausalLM if arch == "llama" else Qwen2ForCausalLM
    hf = cls(_hf_config(arch)).eval()
    path = tmp_path_factory.mktemp(arch)
    hf.save_pretrained(path)
    return hf, batchpilot.load_model(path), path


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def hf_pair(request, tmp_path_factory):
    """(transformers model, batchpilot model) with the same random fp32 weights, plus the model dir."""
    return _pair(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory):
    """The Llama one of ``hf_pair``, for tests where the architecture does not matter."""
    return _pair("llama", tmp_path_factory)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny Llama directory with a trained BPE tokenizer.json and a chat template."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny_tok")
    LlamaForCausalLM(_hf_config("llama")).save_pretrained(path)
    tok = Tokenizer.train_bpe(TEXTS, 300, special_tokens=("<|endoftext|>", "<|assistant|>"))
    tok.chat_template = CHAT_TEMPLATE
    tok.save(path)
    return path
