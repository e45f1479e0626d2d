"""Fixed-length training rows from a prepared token stream, with a seeded, resumable sampler.

Design: a split is one token stream (its shards memory-mapped back to back). Row ``r`` is the
window ``[r*T, r*T + T + 1)``: inputs are its first ``T`` tokens, targets the last ``T``. Rows are
cut blindly, without regard to document boundaries ("concatenate and chunk"): no token is padded
or dropped (except the stream's tail), and a document may be split across two rows. The model
never attends across documents because ``position_ids`` restart at 0 after every EOS (and at the
start of each row); the attention mask is built from them. The cost of cutting blindly: the
start of a row may be the middle of a document, seen without its beginning, and the EOS token's
target is the first token of the next document, which is not predictable from its context.

Chat data (prepared with ``--format chat``) carries one flag byte per token (``chat.py``): targets whose
token is not a loss target become -100 (the model's loss ignores them) and positions restart at each
conversation start instead of after EOS (end-of-turn tokens inside a conversation may be the EOS).
``pack="chunk"`` cuts such a stream blindly as above; ``pack="conversation"`` never splits a conversation:
rows are filled greedily with whole conversations in data order (one longer than ``seq_len`` is truncated
and fills a row alone) and the rest of a row is padding (EOS inputs, -100 targets, its own positions).
Either way a row is a contiguous range of the stream, so the sampler below is the same for both.

Sampling: each epoch is a permutation of all rows from ``numpy.random.default_rng((seed, epoch))``.
The state is just ``(epoch, position)`` in that permutation, so resuming is exact and cheap.
``take`` advances the *global* position by the whole global batch and returns one rank's slice, so
the sequence of global batches does not depend on the number of ranks.

Shape legend: B rows in a batch, T seq_len.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from batchpilot.data.chat import LOSS, START
from batchpilot.data.prepare import load_meta
from batchpilot.data.tokenizer import Tokenizer


# Targets the loss skips: PyTorch's cross_entropy ignore_index default, which model/loss.py uses too (data sits
# below model in the layering, so it names the convention rather than importing it).
IGNORE_INDEX = -100
SPLIT_NAMES = {"train": "training", "val": "validation"}
PACK_MODES = ("chunk", "conversation")


@dataclass(slots=True)
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, input_ids shifted left by one
    position_ids: torch.Tensor  # (B, T) int64, 0 at each document start

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.targets, self.position_ids)))


class PackedLoader:
    def __init__(self, data_dir: str | Path, split: str, seq_len: int, *, seed: int = 0, pack: str = "chunk") -> None:
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {', '.join(SPLIT_NAMES)}, got {split!r}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if pack not in PACK_MODES:
            raise ValueError(f"pack must be one of {', '.join(PACK_MODES)}, got {pack!r}")
        self.data_dir, self.split, self.seq_len, self.seed, self.pack = Path(data_dir), split, seq_len, seed, pack
        meta = load_meta(data_dir)
        self.eos_id: int = meta["eos_id"]
        self.format: str = meta.get("format", "text")
        if pack == "conversation" and self.format != "chat":
            raise ValueError(f"{data_dir}: pack='conversation' needs a dataset prepared with --format chat")
        self._shards = [np.memmap(self.data_dir / f, dtype=meta["dtype"], mode="r") for f in meta["shards"][split]]
        self._offsets = np.cumsum([0] + [len(s) for s in self._shards])  # shard i covers [offsets[i], offsets[i+1])
        self._flags = ([np.memmap(self.data_dir / f, dtype=np.uint8, mode="r") for f in meta["mask_shards"][split]]
                       if self.format == "chat" else None)
        num_tokens = int(self._offsets[-1])
        if num_tokens < seq_len + 1:
            raise ValueError(f"{SPLIT_NAMES[split]} split has {num_tokens} tokens, needs at least seq_len+1 = "
                             f"{seq_len + 1}; lower --seq-len or add data")
        if pack == "conversation":
            self._row_starts, self._row_lengths = self._pack_conversations(num_tokens)
            self.num_rows = len(self._row_starts)
        else:
            self.num_rows = (num_tokens - 1) // seq_len
        self.epoch = self.position = 0
        self._order = self._permutation(0)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_path(self.data_dir)

    def take(self, num_rows: int, *, rank: int = 0, world_size: int = 1) -> Batch:
        """Advance by ``num_rows`` global rows; return this rank's contiguous share of them."""
        if num_rows % world_size:
            raise ValueError(f"num_rows {num_rows} is not divisible by world_size {world_size}")
        rows = self._advance(num_rows)
        per_rank = num_rows // world_size
        return self._batch(rows[rank * per_rank:(rank + 1) * per_rank])

    def peek_target_counts(self, num_rows: int) -> np.ndarray:
        """Loss targets (``targets != -100``) in each of the next ``num_rows`` global rows, without advancing:
        what token-weighted accumulation divides by, counted on the CPU before any transfer (no device sync)."""
        saved = self.epoch, self.position, self._order
        try:
            rows = self._advance(num_rows)
        finally:
            self.epoch, self.position, self._order = saved
        if self._flags is None:  # plain text: every target is one
            return np.full(len(rows), self.seq_len, dtype=np.int64)
        return self._row_target_counts[rows]

    @cached_property
    def _row_target_counts(self) -> np.ndarray:
        """Loss targets per row: LOSS flags of the tokens after the row's first (``_chat_batch``'s targets)."""
        num_tokens = int(self._offsets[-1])
        loss = np.concatenate([[0], np.cumsum(self._read(0, num_tokens, self._flags) & LOSS, dtype=np.int64)])
        if self.pack == "conversation":
            starts, lengths = self._row_starts, self._row_lengths
        else:
            starts = np.arange(self.num_rows, dtype=np.int64) * self.seq_len
            lengths = np.full(self.num_rows, self.seq_len, dtype=np.int64)
        stops = np.minimum(starts + lengths + 1, num_tokens)  # the row's tokens and the one after
        return loss[stops] - loss[starts + 1]

    def eval_batches(self, num_rows_per_batch: int, max_batches: int | None = None) -> Iterator[Batch]:
        """Rows 0, 1, 2, ... in order (the sampler state is untouched); the last batch may be short."""
        stop = self.num_rows if max_batches is None else min(self.num_rows, num_rows_per_batch * max_batches)
        for start in range(0, stop, num_rows_per_batch):
            yield self._batch(np.arange(start, min(start + num_rows_per_batch, stop)))

    def state_dict(self) -> dict[str, int | str]:
        state: dict[str, int | str] = {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                                       "seq_len": self.seq_len}
        if self.pack != "chunk":  # chunk states keep their original keys (checkpoints written before packing modes)
            state["pack"] = self.pack
        return state

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        theirs = (state["seed"], state["seq_len"], state.get("pack", "chunk"))
        if theirs != (self.seed, self.seq_len, self.pack):
            raise ValueError(f"loader state is for seed={theirs[0]}, seq_len={theirs[1]}, pack={theirs[2]}; "
                             f"this loader has seed={self.seed}, seq_len={self.seq_len}, pack={self.pack}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_rows)

    def _advance(self, num_rows: int) -> np.ndarray:
        parts = []
        while num_rows:
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            n = min(num_rows, self.num_rows - self.position)
            parts.append(self._order[self.position:self.position + n])
            self.position += n
            num_rows -= n
        return np.concatenate(parts)

    def _pack_conversations(self, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) in the stream of each row: whole conversations, greedily, in data order."""
        starts = np.flatnonzero(self._read(0, num_tokens, self._flags) & START)
        lengths = np.diff(np.append(starts, num_tokens))
        row_starts: list[int] = []
        row_lengths: list[int] = []
        for start, length in zip(starts.tolist(), lengths.tolist()):
            if row_lengths and row_lengths[-1] + length <= self.seq_len:
                row_lengths[-1] += length
            else:
                row_starts.append(start)
                row_lengths.append(min(length, self.seq_len))  # a conversation longer than a row is truncated
        return np.array(row_starts, dtype=np.int64), np.array(row_lengths, dtype=np.int64)

    def _batch(self, rows: np.ndarray) -> Batch:
        if self._flags is not None:
            return self._chat_batch(rows)
        stacked = np.stack([self._read(int(r) * self.seq_len, self.seq_len + 1) for r in rows])  # (B, T+1)
        windows = torch.from_numpy(stacked.astype(np.int64))
        input_ids, targets = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        return Batch(input_ids, targets, _position_ids(input_ids, self.eos_id))

    def _chat_batch(self, rows: np.ndarray) -> Batch:
        """Rows of chat data: targets -100 where the target token is no loss target, positions per conversation."""
        T, num_tokens = self.seq_len, int(self._offsets[-1])
        input_ids = torch.full((len(rows), T), self.eos_id, dtype=torch.int64)
        targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.int64)
        is_start = torch.zeros((len(rows), T), dtype=torch.bool)
        for b, r in enumerate(rows.tolist()):
            start, length = ((int(self._row_starts[r]), int(self._row_lengths[r])) if self.pack == "conversation"
                             else (r * T, T))
            span = min(length + 1, num_tokens - start)  # the row's tokens and the one after (the last target)
            tokens = torch.from_numpy(self._read(start, span).astype(np.int64))
            flags = torch.from_numpy(self._read(start, span, self._flags).astype(np.int64))
            input_ids[b, :length] = tokens[:length]
            is_start[b, :length] = (flags[:length] & int(START)) > 0
            is_start[b, length:length + 1] = True  # padding is its own document
            next_tokens, next_flags = tokens[1:], flags[1:]
            targets[b, :len(next_tokens)] = torch.where((next_flags & int(LOSS)) > 0, next_tokens, IGNORE_INDEX)
        idx = torch.arange(T).expand_as(input_ids)
        is_start[:, 0] = True
        return Batch(input_ids, targets, idx - torch.where(is_start, idx, 0).cummax(dim=1).values)

    def _read(self, start: int, length: int, shards: list[np.memmap] | None = None) -> np.ndarray:
        """Tokens (or, given the flag shards, flags) [start, start+length) of the split, across shard boundaries."""
        shards = self._shards if shards is None else shards
        parts, stop = [], start + length
        shard = int(np.searchsorted(self._offsets, start, side="right")) - 1
        while start < stop:
            begin = start - int(self._offsets[shard])
            piece = shards[shard][begin:begin + stop - start]
            parts.append(piece)
            start += len(piece)
            shard += 1
        return np.concatenate(parts)


def _position_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) positions counting from the row start or from the token after the latest EOS."""
    idx = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    is_start = torch.zeros_like(input_ids, dtype=torch.bool)
    is_start[:, 1:] = input_ids[:, :-1] == eos_id
    start = torch.where(is_start, idx, 0).cummax(dim=1).values
    return idx - start
