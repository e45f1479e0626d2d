import random

import pytest

from batchpilot.data.tokenizer import Tokenizer

WORDS = "the quick brown fox jumps over lazy dog and then runs far away into deep green wood".split()


def synthetic_documents(num_docs: int = 60, seed: int = 0) -> list[str]:
    """Small in-process corpus: sentences of common words, varied lengths, some non-ASCII."""
    rng = random.Random(seed)
    docs = []
    for i in range(num_docs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 60))]
        docs.append(f"Doc {i}: " + " ".join(words) + (" café ünïcode." if i % 7 == 0 else "."))
    return docs


@pytest.fixture(scope="session")
def make_documents():
    return synthetic_documents


@pytest.fixture(scope="session")
def small_tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe(synthetic_documents(200), 300)
