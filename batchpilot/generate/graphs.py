"""CUDA graphs for decode-only steps: one graph per padded batch size, captured on first use.

A decode step's shapes become static by padding: rows to a bucket (padding rows attend to, and
write, one token of a reserved trash block), block tables to the job's longest request, cascade
groups to a power of two up to ``max_groups``. The graph runs the model and a greedy argmax; steps that sample, contain
prefill chunks, or exceed the static sizes run eagerly. Every new graph is checked once against
the eager step, and graphs switch off (with a warning) on an error or a mismatch. Cost: the padded
rows' FLOPs, and graph memory (one shared pool, a few hundred MB for a 1B model at 1024 rows).
Only the Triton attention path is captured (its loops read lengths on the device).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from batchpilot.generate.scheduler import Chunk

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1536, 2048)


@dataclass(slots=True)
class _Graph:
    replay: Callable[[], None]
    inputs: dict[str, torch.Tensor]
    tokens: torch.Tensor  # (rows,) greedy tokens, rewritten by every replay


class DecodeGraphs:
    def __init__(self, runner, *, max_rows: int, max_groups: int = 16, capture: bool = True) -> None:
        self.runner, self.max_groups, self.capture = runner, max_groups, capture
        self.buckets = [b for b in BUCKETS if b < max_rows] + [max_rows]
        self.width = 0  # block-table columns of every graph
        self.graphs: dict[tuple[int, int], _Graph] = {}  # (rows, groups) -> graph
        self.pool = None
        self.enabled = True
        self.off_reason: str | None = None  # why graphs switched themselves off (reported by benchmarks)

    def begin_job(self, max_tokens: int) -> None:
        width = -(-max_tokens // self.runner.block_size) + 1
        if width > self.width:
            self.width = width
            self.graphs.clear()

    def usable(self, dec: list[Chunk]) -> bool:
        r = self.runner
        if not (self.enabled and (r.triton_verified or not self.capture)) or len(dec) > self.buckets[-1]:
            return False
        groups = {id(c.request.group) for c in dec if c.request.prefix_len > 0}
        return (all(c.request.params.temperature == 0 for c in dec) and len(groups) <= self.max_groups
                and (r.cascade or not groups) and max(len(c.request.blocks) for c in dec) <= self.width)

    def run(self, dec: list[Chunk], eager: Callable[[], list[int]]) -> list[int]:
        rows = next(b for b in self.buckets if b >= len(dec))
        n = len({id(c.request.group) for c in dec if c.request.prefix_len > 0}) if self.runner.cascade else 0
        groups = 1 << (n - 1).bit_length() if n else 0  # padded to a power of two: few graphs, little waste
        key = (rows, groups)
        fresh = key not in self.graphs
        try:
            if fresh:
                self.graphs[key] = self._build(rows, groups)
            g = self.graphs[key]
            for name, array in self._arrays(dec, rows, groups).items():
                g.inputs[name].copy_(torch.from_numpy(array))
            g.replay()
            tokens = g.tokens[:len(dec)].tolist()
        except Exception as e:  # capture/replay errors come in many types: any of them -> eager from now on
            self._switch_off(f"{type(e).__name__}: {e}")
            return eager()
        if fresh:  # first use of this graph: the eager step is the reference (and rewrites the same KV)
            ref = eager()
            agree = float(np.mean(np.array(ref) == np.array(tokens)))
            if agree < 0.95:  # exact ties may flip, real bugs do not
                self._switch_off(f"{rows}-row graph agrees with the eager step on {agree:.1%} of tokens")
            return ref
        return tokens

    def _switch_off(self, reason: str) -> None:
        warnings.warn(f"CUDA graphs disabled: {reason}", stacklevel=3)
        self.enabled, self.off_reason = False, reason

    def _arrays(self, dec: list[Chunk], rows: int, groups: int) -> dict[str, np.ndarray]:
        r = self.runner
        a = r.decode_arrays(dec, rows=rows, width=self.width, groups=groups)
        ids, pos, slots, _ = r._flatten(dec)
        pad = rows - len(dec)
        a["ids"] = np.asarray(ids + [0] * pad, dtype=np.int64)
        a["pos"] = np.asarray(pos + [0] * pad, dtype=np.int64)
        a["slots"] = np.asarray(slots + [r.trash_block * r.block_size] * pad, dtype=np.int64)
        del a["prefix_blocks"]
        return a

    def _build(self, rows: int, groups: int) -> _Graph:
        from batchpilot.generate.runner import DecodeMeta, StepAttention

        r, dev, G = self.runner, self.runner.device, groups
        t = r.trash_block
        inputs = {"ids": torch.zeros(rows, dtype=torch.long, device=dev),
                  "pos": torch.zeros(rows, dtype=torch.long, device=dev),
                  "slots": torch.full((rows,), t * r.block_size, dtype=torch.long, device=dev),
                  "tables": torch.full((rows, self.width), t, dtype=torch.long, device=dev),
                  "prefix_lens": torch.zeros(rows, dtype=torch.long, device=dev),
                  "own_lens": torch.ones(rows, dtype=torch.long, device=dev)}
        if groups:
            inputs |= {"group_tables": torch.full((G, self.width), t, dtype=torch.long, device=dev),
                       "group_lens": torch.zeros(G, dtype=torch.long, device=dev),
                       "group_rows": torch.full((G, rows), rows, dtype=torch.long, device=dev),
                       "row_pos": torch.full((rows,), G * rows, dtype=torch.long, device=dev)}
        groups = {k: inputs[k] for k in ("group_tables", "group_lens", "group_rows", "row_pos") if k in inputs}
        meta = DecodeMeta(inputs["tables"], inputs["prefix_lens"], inputs["own_lens"], 0, **groups)
        attn = StepAttention(r, inputs["slots"], meta, None)

        def forward() -> torch.Tensor:
            hidden = r.model.hidden_states(inputs["ids"][None], position_ids=inputs["pos"][None], attn_meta=attn)
            return r.model.lm_head(hidden[0]).argmax(dim=-1)  # (rows,)

        if not self.capture:  # CPU tests: the same static buffers, run eagerly
            out = {"tokens": forward()}
            return _Graph(lambda: out.__setitem__("tokens", forward()), inputs, _Live(out))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (allocator, cuBLAS handles) outside the capture
            forward()
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            tokens = forward()
        return _Graph(graph.replay, inputs, tokens)


class _Live:
    """Stands in for the captured output tensor when nothing is captured (CPU tests)."""

    def __init__(self, out: dict) -> None:
        self.out = out

    def __getitem__(self, index):
        return self.out["tokens"][index]
