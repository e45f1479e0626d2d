import json
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


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def synthetic_conversations(num: int = 30, seed: int = 0) -> list[dict]:
    """Chat JSONL records: a system turn sometimes, 1-3 user/assistant exchanges of random words."""
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    records = []
    for i in range(num):
        messages = [{"role": "system", "content": f"be brief {i}"}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": words(2, 12) + "?"},
                         {"role": "assistant", "content": words(1, 15) + "."}]
        records.append({"messages": messages})
    return records


@pytest.fixture(scope="session")
def make_conversations():
    return synthetic_conversations


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    """A model directory's tokenizer files: a small BPE with ChatML special tokens, EOS <|im_end|>, a template."""
    texts = synthetic_documents(200) + [json.dumps(r) for r in synthetic_conversations(50, seed=1)]
    trained = Tokenizer.train_bpe(texts, 320, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tokenizer = Tokenizer(trained.inner, eos_id=trained.inner.token_to_id("<|im_end|>"), chat_template=CHATML)
    root = tmp_path_factory.mktemp("chat_model")
    tokenizer.save(root)
    return root
