import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from batchpilot.model.llama import LlamaConfig  # noqa: E402


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs two CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and torch.cuda.device_count() < 2:
            item.add_marker(skip_multi)


@pytest.fixture
def tiny_config() -> LlamaConfig:
    """A ~100k-parameter Llama for unit tests."""
    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, tie_word_embeddings=True, max_position_embeddings=256)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory):
    """A directory of small .txt documents (a synthetic corpus the CLI can prepare in about a second)."""
    root = tmp_path_factory.mktemp("text")
    words = "and the lord said unto him that it was good in the beginning god created heaven earth".split()
    for i in range(60):
        n = 80 + (i * 53) % 200
        (root / f"doc_{i:03d}.txt").write_text(" ".join(words[(i * 5 + j * 7) % len(words)] for j in range(n)))
    return root
