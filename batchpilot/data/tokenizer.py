"""A thin wrapper over Hugging Face ``tokenizers``: train a byte-level BPE, or load an HF one.

Design: the wrapper only adds what the rest of batchpilot needs on top of ``tokenizers.Tokenizer``,
namely which ids are EOS/BOS and the chat template, because ``tokenizer.json`` alone does not say.
They are resolved from ``tokenizer_config.json``, then ``config.json``, then well-known token
names; the chat template from ``chat_template.jinja`` or ``tokenizer_config.json``. ``encode`` never adds special tokens (no BOS from a post-processor): data preparation
appends EOS itself and callers that want BOS prepend ``bos_id``. The cost: special-token strings
that appear *inside* text (say a literal ``<|endoftext|>``) are still matched as special tokens,
as in HF; this keeps chat-template prompts working but lets such text end a document early.

The trained BPE is byte level (GPT-2 style pre-tokenizer regex, no prefix space, all 256 bytes in
the initial alphabet), so ``decode(encode(text)) == text`` for any string.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from batchpilot.data.chat_template import TEMPLATE_FILE, read_chat_template, read_tokenizer_config
from batchpilot.io import write_text_atomic

EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>")
BOS_NAMES = ("<|begin_of_text|>", "<s>")


class Tokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer, *, eos_id: int, bos_id: int | None = None,
                 pad_id: int | None = None, chat_template: str | None = None,
                 model_max_length: int | None = None) -> None:
        self.inner = tokenizer
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.pad_id = pad_id
        self.chat_template = chat_template
        self.model_max_length = model_max_length

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, *,
                  special_tokens: tuple[str, ...] = ("<|endoftext|>",)) -> Tokenizer:
        """Byte-level BPE trained on ``texts``; the first special token is EOS."""
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if not special_tokens:
            raise ValueError("train_bpe needs at least one special token (the first one is EOS)")
        if vocab_size < len(alphabet) + len(special_tokens):
            raise ValueError(f"vocab_size {vocab_size} is below the {len(alphabet)} bytes + special tokens")
        tk = tokenizers.Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(special_tokens),
                                      initial_alphabet=alphabet, show_progress=False)
        tk.train_from_iterator(texts, trainer)
        eos_id = tk.token_to_id(special_tokens[0])
        if eos_id is None:
            raise ValueError(f"the trained BPE lost its special token {special_tokens[0]!r}")
        return cls(tk, eos_id=eos_id)

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """A ``tokenizer.json`` file, or a directory holding one (an HF model or a prepared dataset)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"{path}: no tokenizer.json (only fast HF tokenizers are supported)")
        try:
            tk = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own untyped errors
            raise ValueError(f"{file}: not a valid tokenizer.json ({str(e)[:200]})") from None
        tokenizer_config = read_tokenizer_config(file.parent)
        model_config = _read_json(file.parent / "config.json")
        eos_id = _special_id(tk, "eos", tokenizer_config, model_config, EOS_NAMES)
        if eos_id is None:
            raise ValueError(f"{path}: cannot tell the EOS token (set eos_token in tokenizer_config.json)")
        bos_id = _special_id(tk, "bos", tokenizer_config, model_config, BOS_NAMES)
        pad_id = _special_id(tk, "pad", tokenizer_config, model_config, ())
        max_len = tokenizer_config.get("model_max_length")
        return cls(tk, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id,
                   chat_template=read_chat_template(file.parent, tokenizer_config),
                   model_max_length=max_len if type(max_len) is int and max_len < 2**62 else None)

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt as the model expects it: with the special tokens the tokenizer's post-processor adds (the BOS
        of Llama 3 / Mistral tokenizers). The one owner of the BOS policy for prompts; training data uses
        ``encode`` (documents separated by EOS, no BOS)."""
        return self.inner.encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.inner.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids, skip_special_tokens=False)

    def save(self, path: str | Path, *, model_max_length: int | None = None) -> None:
        """Write ``tokenizer.json`` (or ``path`` itself if it ends in .json), a complete ``tokenizer_config.json``
        (tokenizer class, special tokens, ``model_max_length``) and ``chat_template.jinja`` beside it, as
        transformers 5 writes them, so that ``from_path`` and ``AutoTokenizer`` both recover them."""
        file = Path(path) if Path(path).suffix == ".json" else Path(path) / "tokenizer.json"
        file.parent.mkdir(parents=True, exist_ok=True)
        self.inner.save(str(file))
        max_len = model_max_length or self.model_max_length
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                                  "eos_token": self.inner.id_to_token(self.eos_id)}
        for kind, token_id in (("bos", self.bos_id), ("pad", self.pad_id)):
            if token_id is not None:
                config[f"{kind}_token"] = self.inner.id_to_token(token_id)
        if max_len is not None:
            config["model_max_length"] = max_len
        write_text_atomic(file.parent / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        template = file.parent / TEMPLATE_FILE
        if self.chat_template is not None:
            write_text_atomic(template, self.chat_template)
        else:
            template.unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _special_id(tk: tokenizers.Tokenizer, kind: str, tokenizer_config: dict[str, Any],
                model_config: dict[str, Any], names: tuple[str, ...]) -> int | None:
    token = tokenizer_config.get(f"{kind}_token")
    if isinstance(token, dict):  # serialized AddedToken: {"content": "</s>", ...}
        token = token.get("content")
    if isinstance(token, str) and tk.token_to_id(token) is not None:
        return tk.token_to_id(token)
    token_id = model_config.get(f"{kind}_token_id")
    if isinstance(token_id, list):  # Llama 3.1 lists several EOS ids; the first ends plain text
        token_id = token_id[0] if token_id else None
    if isinstance(token_id, int):
        return token_id
    return next((i for name in names if (i := tk.token_to_id(name)) is not None), None)
