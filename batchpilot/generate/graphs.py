"""CUDA graphs for decode-only steps: one graph per padded batch size, captured on first use.

A decode step's shapes become static by padding: rows to a bucket (padding rows attend to, and
write, one token of a reserved trash block), block tables to the job's longest request, cascade
groups to a power of two up to ``max_groups``. The graph runs the model and a greedy argmax; steps that sample, contain
prefill chunks, or exceed the static sizes run eagerly. Every new graph is checked once against
the eager step; graphs switch off (with a warning) on an error, or on a token that differs where
the top two logits were not a near tie (bf16 rounding differs between padded and unpadded matmuls,
and a random-weight model's logits tie often). Cost: the padded rows' FLOPs, and graph memory (one
shared pool, a few hundred MB for a 1B model at 1024 rows).

Multi-step decode (``run(..., steps=n)``): the graph is replayed n times back to back and the inputs
are advanced on the device in between (token ids from the last argmax, positions, lengths, cache
slots from the block tables), with one host sync at the end. The host work of a step (scheduling,
building arrays, reading tokens back) is then paid once per n tokens. The caller reserves KV blocks
for the n tokens and discards tokens after a request's end (EOS, stop string, max_tokens).
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
    out: dict[str, torch.Tensor]  # (rows,) each: greedy "tokens", top-2 logit "gap", max |logit| "scale"


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

    def run(self, dec: list[Chunk], eager: Callable[[], list[int]], steps: int = 1) -> list[list[int]]:
        """Greedy tokens of each row for ``steps`` consecutive decode steps (one step on a graph's first use)."""
        rows = next(b for b in self.buckets if b >= len(dec))
        n = len({id(c.request.group) for c in dec if c.request.prefix_len > 0}) if self.runner.cascade else 0
        groups = 1 << (n - 1).bit_length() if n else 0  # padded to a power of two: few graphs, little waste
        key = (rows, groups)
        fresh = key not in self.graphs
        try:
            if fresh:
                self.graphs[key] = self._build(rows, groups)
            g = self.graphs[key]
            arrays = self._arrays(dec, rows, groups)
            prefix_blocks = arrays.pop("prefix_blocks")
            for name, array in arrays.items():
                g.inputs[name].copy_(torch.from_numpy(array))
            steps = 1 if fresh else steps
            history = torch.empty(steps, rows, dtype=torch.long, device=self.runner.device)
            for k in range(steps):
                if k:
                    self._advance(g, prefix_blocks)
                g.replay()
                history[k].copy_(g.out["tokens"])
            tokens = history[:, :len(dec)].T.tolist()  # the one host sync
        except Exception as e:  # capture/replay errors come in many types: any of them -> eager from now on
            self._switch_off(f"{type(e).__name__}: {e}")
            return [[t] for t in eager()]
        if fresh:  # first use of this graph: the eager step is the reference (and rewrites the same KV)
            ref = eager()
            self._check(np.array(ref), g, len(dec))
            return [[t] for t in ref]
        return tokens

    def _check(self, ref: np.ndarray, g: _Graph, num_rows: int) -> None:
        """Switch off unless every token that differs from the eager step is a near tie of the top two logits."""
        got = g.out["tokens"][:num_rows].cpu().numpy()
        gap, scale = (g.out[k][:num_rows].float().cpu().numpy() for k in ("gap", "scale"))
        tol = 4 * torch.finfo(self.runner.dtype).eps * scale  # a few roundings of the logit, in its own units
        bad = (got != ref) & (gap > tol)
        if bad.any():
            self._switch_off(f"{len(ref)}-row graph differs from the eager step on {int(bad.sum())} tokens "
                             f"that are not near ties ({float(np.mean(got == ref)):.1%} agree)")

    def _advance(self, g: _Graph, prefix_blocks: int) -> None:
        """Inputs of the next decode step from this one's, on the device (rows past their blocks hit the trash)."""
        bs, i = self.runner.block_size, g.inputs
        i["ids"].copy_(g.out["tokens"])
        i["pos"].add_(1)
        i["own_lens"].add_(1)
        j = i["own_lens"] - 1  # own index of the new token
        block = i["tables"].gather(1, (prefix_blocks + j // bs).clamp_max(self.width - 1)[:, None])[:, 0]
        i["slots"].copy_(block * bs + j % bs)

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

        def forward() -> dict[str, torch.Tensor]:
            hidden = r.model.hidden_states(inputs["ids"][None], position_ids=inputs["pos"][None], attn_meta=attn)
            logits = r.model.lm_head(hidden[0])  # (rows, V)
            top2 = logits.topk(2, dim=-1).values.float()  # for the first-use check only: cheap next to the head
            return {"tokens": logits.argmax(dim=-1), "gap": top2[:, 0] - top2[:, 1],
                    "scale": logits.abs().amax(dim=-1)}

        if not self.capture:  # CPU tests: the same static buffers, run eagerly
            out = forward()
            return _Graph(lambda: out.update(forward()), inputs, out)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (allocator, cuBLAS handles) outside the capture
            forward()
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = forward()
        return _Graph(graph.replay, inputs, out)
