"""What the fine-tuning tests share: the ChatML template and a tiny HF model directory with a chat tokenizer."""

import json
from pathlib import Path

from batchpilot.data.tokenizer import Tokenizer
from batchpilot.model.hf import save_model
from batchpilot.model.llama import LlamaConfig, build_model

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
WORDS = "the quick brown fox jumps over lazy dog and then runs far away into deep green wood".split()


def tiny_chat_model(root: Path, conversations: list[dict], **shape: int) -> Path:
    """``root`` as an HF model directory: random Llama weights of ``shape`` (hidden_size 32, intermediate 64 and
    tied embeddings unless given), a BPE trained on ``conversations`` with ChatML special tokens, the template."""
    texts = [" ".join(WORDS)] * 5 + [json.dumps(r) for r in conversations]
    trained = Tokenizer.train_bpe(texts, 300, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tokenizer = Tokenizer(trained.inner, eos_id=trained.inner.token_to_id("<|im_end|>"), chat_template=CHATML)
    config = LlamaConfig(**{"vocab_size": tokenizer.vocab_size, "hidden_size": 32, "intermediate_size": 64,
                            "tie_word_embeddings": True, **shape})
    save_model(build_model(config, seed=0), root)
    tokenizer.save(root)
    return root
