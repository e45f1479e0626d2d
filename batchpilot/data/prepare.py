"""Tokenize documents once into flat binary shards that training memory-maps.

Design: every document becomes its token ids followed by EOS, appended to one token stream per
split and cut into raw ``uint16`` (vocab <= 65536) or ``uint32`` shard files, ``train_000.bin``,
``val_000.bin``, ...; ``meta.json`` describes them. Packing into rows happens at load time
(``packing.py``), so one prepared dataset serves every ``seq_len``. The trade-off is that all
preprocessing choices (tokenizer, split) are frozen here: changing them means preparing again.

The sources are read in three streaming passes (hash for the split, train the tokenizer on the
train documents, encode in chunks of a few MB written straight to disk), so memory stays flat
for large corpora at the cost of reading the input three times.

Validation documents are chosen by a seeded hash of their text, so the split does not depend on
document order and adding documents never moves others between splits (barring the fallback below). With two or
more (distinct) documents both splits are non-empty: the lowest/highest hash is moved over if needed.

Chat data (``format="chat"``, see ``chat.py``): each conversation is rendered with the chat template of the
tokenizer's model directory and its tokens are written with a parallel stream of per-token flags
(``{split}_mask_000.bin``, one ``uint8`` per token, shards aligned with the token shards): which tokens are loss
targets and which open a conversation. No EOS is appended: the template's own end-of-turn token ends each one.

``meta.json`` records the format and a fingerprint of the tokenizer (the sha256 of its vocabulary, merges and
added tokens) so that ``check_tokenizer_matches`` can refuse a model whose tokenizer is another one: the
vocabulary size alone does not tell two tokenizers apart.

The output is built in a hidden temporary directory beside ``out_dir`` and renamed at the end, so
an interrupted run never leaves a half-written dataset. A non-empty ``out_dir`` is reused if its
``meta.json`` records the same config (inputs are *not* re-hashed: delete the directory after
editing the source files) and refused otherwise.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import chain, compress
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from batchpilot.data.chat import LOSS, ChatConfig, encode_conversation, read_conversations
from batchpilot.data.chat_template import chat_template_of
from batchpilot.data.corpus import default_documents, read_documents
from batchpilot.io import make_temp_dir
from batchpilot.data.tokenizer import Tokenizer

SPLITS = ("train", "val")
FORMATS = ("text", "chat")
CHAT_FIELDS = ("messages_field", "prompt_field", "response_field", "loss_on")
CHUNK_CHARS = 1 << 22  # text per encode_batch call: ~4 MB keeps the Python id lists at tens of MB


@dataclass(kw_only=True, slots=True)
class PrepareConfig:
    sources: list[str]  # files, directories, or "default" for the embedded corpus
    out_dir: str
    tokenizer: str | None = None  # tokenizer.json or HF directory; None trains a byte-level BPE
    vocab_size: int = 4096  # only used when training a tokenizer
    text_field: str = "text"  # JSONL field / Parquet column
    val_fraction: float = 0.005
    shard_tokens: int = 2**26
    seed: int = 0
    format: str = "text"  # "text": documents separated by EOS; "chat": conversations with a loss mask
    messages_field: str = "messages"  # chat only: see chat.ChatConfig
    prompt_field: str = "prompt"
    response_field: str = "response"
    loss_on: str = "assistant"

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("no sources given (use 'default' for the embedded corpus)")
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.format == "chat" and self.tokenizer is None:
            raise ValueError("--format chat needs --tokenizer MODEL_DIR (its chat template renders the conversations)")
        if self.format == "chat" and "default" in self.sources:
            raise ValueError("the 'default' corpus is plain text; --format chat needs chat .jsonl files")
        self.chat_config()  # validates the chat fields
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {self.shard_tokens}")


    def chat_config(self) -> ChatConfig:
        return ChatConfig(**{f: getattr(self, f) for f in CHAT_FIELDS})


def prepare(cfg: PrepareConfig) -> Path:
    """Build (or reuse) the dataset in ``cfg.out_dir`` and return its path."""
    out = Path(cfg.out_dir)
    if out.exists() and any(out.iterdir()):
        return _reuse(out, cfg)
    is_val = _split_mask(cfg)
    tokenizer = _build_tokenizer(cfg, is_val)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, prefix=f".{out.name}.tmp-")
    try:
        writers = _write_chat_shards if cfg.format == "chat" else _write_shards
        stats = writers(cfg, tokenizer, is_val, tmp)
        tokenizer.save(tmp)
        meta = _meta(cfg, tokenizer, stats)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise ValueError(f"{data_dir}: not a prepared dataset (no meta.json); run `batchpilot prepare` first")
    return json.loads(path.read_text())


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary, merges and added tokens (what decides the ids of a text)."""
    spec = json.loads(tokenizer.inner.to_str())
    model = spec.get("model", {})
    added = sorted((t["id"], t["content"]) for t in spec.get("added_tokens", []))
    key = {"type": model.get("type"), "vocab": model.get("vocab"), "merges": model.get("merges"), "added": added}
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def check_tokenizer_matches(data_dir: str | Path, tokenizer: Tokenizer) -> None:
    """Raise ``ValueError`` unless ``data_dir`` was prepared with ``tokenizer`` (same vocabulary and merges).

    Datasets prepared before fingerprints were recorded are checked against the tokenizer.json they hold.
    """
    meta = load_meta(data_dir)
    recorded = meta.get("tokenizer_sha256") or tokenizer_fingerprint(Tokenizer.from_path(data_dir))
    expected = tokenizer_fingerprint(tokenizer)
    if recorded != expected:
        raise ValueError(f"{data_dir}: prepared with another tokenizer ({meta.get('tokenizer', '?')}, fingerprint "
                         f"{recorded[:12]}) than the model's ({expected[:12]}); prepare it again with "
                         "`batchpilot prepare --tokenizer MODEL_DIR`")


def _config_key(cfg: PrepareConfig) -> dict[str, Any]:
    key = {k: v for k, v in asdict(cfg).items() if k != "out_dir"}
    if cfg.format == "text":  # the keys of datasets prepared before chat data existed: they stay reusable
        for k in ("format", *CHAT_FIELDS):
            key.pop(k)
    return key


def _reuse(out: Path, cfg: PrepareConfig) -> Path:
    if not (out / "meta.json").is_file():
        raise ValueError(f"{out}: exists and is not empty; choose another --out or remove it")
    if load_meta(out).get("config") != _config_key(cfg):
        raise ValueError(f"{out}: holds a dataset prepared with a different config; choose another --out or remove it")
    print(f"reusing prepared dataset at {out} (same config)")
    return out


def _conversations(cfg: PrepareConfig) -> Iterator[list[dict[str, str]]]:
    return chain.from_iterable(read_conversations(s, cfg.chat_config()) for s in cfg.sources)


def _split_keys(cfg: PrepareConfig) -> Iterator[str]:
    """The text the split hash reads: each document, or each conversation as canonical JSON."""
    if cfg.format == "chat":
        return (json.dumps(c, sort_keys=True, ensure_ascii=False) for c in _conversations(cfg))
    return _documents(cfg)


def _documents(cfg: PrepareConfig) -> Iterator[str]:
    streams = (iter(default_documents()) if s == "default" else read_documents(s, text_field=cfg.text_field)
               for s in cfg.sources)
    return (doc for doc in chain.from_iterable(streams) if doc.strip())


def _split_mask(cfg: PrepareConfig) -> np.ndarray:
    """True for validation documents: a seeded hash of the text, mapped to [0, 1), below val_fraction."""
    key = str(cfg.seed).encode()
    scores = np.fromiter((int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8, key=key).digest())
                          for doc in _split_keys(cfg)), dtype=np.uint64)
    if len(scores) == 0:
        raise ValueError(f"no documents found in {', '.join(cfg.sources)}")
    is_val = scores < np.uint64(cfg.val_fraction * 2.0**64)
    # No-ops unless a split came out empty. A single document goes to train. Duplicate documents
    # share a hash, hence a split: a corpus of identical documents gets no validation split.
    is_val[scores.argmin()] = True
    is_val[scores.argmax()] = False
    return is_val


def _build_tokenizer(cfg: PrepareConfig, is_val: np.ndarray) -> Tokenizer:
    if cfg.tokenizer is not None:
        tokenizer = Tokenizer.from_path(cfg.tokenizer)
        if tokenizer.chat_template is None:  # keep the model's template with the data (and its exported copy)
            tokenizer.chat_template = chat_template_of(_model_dir(cfg.tokenizer))[0]
        return tokenizer
    return Tokenizer.train_bpe(compress(_documents(cfg), ~is_val), cfg.vocab_size)


def _chunks(docs: Iterator[str], max_chars: int) -> Iterator[list[str]]:
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _ShardWriter:
    """Appends tokens to ``{stem}_000.bin``, ``{stem}_001.bin``, ... of at most shard_tokens each (stem: the split)."""

    def __init__(self, directory: Path, split: str, shard_tokens: int, *, stem: str | None = None) -> None:
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.stem = stem or split
        self.files: list[str] = []
        self.tokens = self.documents = self.chars = 0
        self.mask_files: list[str] = []  # chat data: the flag shards written beside these token shards
        self.loss_tokens = 0  # chat data: tokens that are loss targets
        self._file: BinaryIO | None = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.tokens % self.shard_tokens == 0:
                self._open_next()
            room = self.shard_tokens - self.tokens % self.shard_tokens
            assert self._file is not None  # _open_next opened it
            ids[:room].tofile(self._file)
            self.tokens += len(ids[:room])
            ids = ids[room:]

    def _open_next(self) -> None:
        self.close()
        self.files.append(f"{self.stem}_{len(self.files):03d}.bin")
        self._file = open(self.directory / self.files[-1], "wb")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _write_shards(cfg: PrepareConfig, tokenizer: Tokenizer, is_val: np.ndarray, out: Path) -> dict[str, _ShardWriter]:
    dtype = _dtype(tokenizer.vocab_size)
    writers = {split: _ShardWriter(out, split, cfg.shard_tokens) for split in SPLITS}
    flags = iter(is_val)
    for docs in _chunks(_documents(cfg), CHUNK_CHARS):
        streams: dict[str, list[int]] = {split: [] for split in SPLITS}
        for doc, ids in zip(docs, tokenizer.encode_batch(docs)):
            writer = writers["val" if next(flags) else "train"]
            streams[writer.split] += ids
            streams[writer.split].append(tokenizer.eos_id)
            writer.documents += 1
            writer.chars += len(doc)
        for split, ids in streams.items():
            writers[split].write(np.array(ids, dtype=dtype))
    for writer in writers.values():
        writer.close()
    return writers


def _model_dir(tokenizer_path: str) -> Path:
    path = Path(tokenizer_path)
    return path if path.is_dir() else path.parent


def _write_chat_shards(cfg: PrepareConfig, tokenizer: Tokenizer, is_val: np.ndarray,
                       out: Path) -> dict[str, _ShardWriter]:
    """Token shards plus flag shards (``{split}_mask_*.bin``, aligned): see ``chat.py`` for the flags."""
    template, special_tokens = chat_template_of(_model_dir(cfg.tokenizer) if cfg.tokenizer else None)
    template = template or tokenizer.chat_template
    if template is None:
        raise ValueError(f"{cfg.tokenizer}: no chat_template in tokenizer_config.json; --format chat needs one")
    dtype = _dtype(tokenizer.vocab_size)
    writers = {split: _ShardWriter(out, split, cfg.shard_tokens) for split in SPLITS}
    masks = {split: _ShardWriter(out, split, cfg.shard_tokens, stem=f"{split}_mask") for split in SPLITS}
    for conversation, val in zip(_conversations(cfg), is_val):
        split = "val" if val else "train"
        ids, flags = encode_conversation(conversation, tokenizer, template, special_tokens, cfg.loss_on)
        writers[split].write(ids.astype(dtype))
        masks[split].write(flags)
        writers[split].documents += 1
        writers[split].chars += sum(len(m["content"]) for m in conversation)
        writers[split].loss_tokens += int(np.count_nonzero(flags & LOSS))
    for writer in (*writers.values(), *masks.values()):
        writer.close()
    for split, writer in writers.items():
        writer.mask_files = masks[split].files
    return writers


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _meta(cfg: PrepareConfig, tokenizer: Tokenizer, writers: dict[str, _ShardWriter]) -> dict[str, Any]:
    meta = {
        "dtype": _dtype(tokenizer.vocab_size).name,
        "eos_id": tokenizer.eos_id,
        "bos_id": tokenizer.bos_id,
        "vocab_size": tokenizer.vocab_size,
        "tokens": {s: w.tokens for s, w in writers.items()},
        "documents": {s: w.documents for s, w in writers.items()},
        "chars": {s: w.chars for s, w in writers.items()},
        "shards": {s: w.files for s, w in writers.items()},
        "num_documents": sum(w.documents for w in writers.values()),
        "sources": cfg.sources,
        "tokenizer": cfg.tokenizer or f"trained byte-level BPE (vocab {cfg.vocab_size})",
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "format": cfg.format,
        "config": _config_key(cfg),
    }
    if cfg.format == "chat":
        meta["mask_shards"] = {s: w.mask_files for s, w in writers.items()}
        meta["loss_tokens"] = {s: w.loss_tokens for s, w in writers.items()}
        meta["loss_on"] = cfg.loss_on
    return meta
