"""CUDA graphs for decode-only steps: one graph per padded batch size, captured on first use.

A decode step's shapes become static by padding: rows to a bucket (or, for a key's first uses, to a captured
graph of up to twice its rows and groups: ``REUSE_FIRST_USES``; padding rows attend to, and
write, one token of a reserved trash block), block tables to the job's longest request, cascade
groups to a power of two up to ``max_groups``. The graph runs the model and then a greedy argmax,
or, when some row samples, ``sampling.sample`` with the rows' temperature, top-k, top-p, seed and
step as static device tensors (a graph kind per greedy / sampled / filtered). The sampler's noise
is a counter-based hash of (seed, step, token), so a row's draws do not depend on its neighbours
or on the steps per round trip. Penalties, logit_bias and min_tokens run in the graph too (output
counts, seen tokens and bias as static (rows, V) buffers, advanced on the device between steps).
Steps with prefill chunks or logprobs, or beyond the static sizes, run eagerly. Every new graph is checked
once against the eager step; graphs switch off (with a warning) on an error, or on a greedy token
that differs where the top two logits were not a near tie (bf16 rounding differs between padded
and unpadded matmuls, and a random-weight model's logits tie often), or on sampled rows that
differ from the eager draws on more than a tenth of them. Cost: the padded rows' FLOPs, and graph memory (one
shared pool, a few hundred MB for a 1B model at 1024 rows).

Multi-step decode (``run(..., steps=n)``): the graph is replayed n times back to back and the inputs
are advanced on the device in between (token ids from the last draw, positions, sampling steps, lengths, cache
slots from the block tables), with one host sync at the end. The host work of a step (scheduling,
building arrays, reading tokens back) is then paid once per n tokens. The caller reserves KV blocks
for the n tokens and discards tokens after a request's end (EOS, stop string, max_tokens).
Only the Triton attention path is captured (its loops read lengths on the device).

Compiled decode (``compile=True``): the captured forward is first run through ``torch.compile``, so the
elementwise work between the matmuls (RMSNorm, RoPE, SwiGLU, residual adds, the final argmax) becomes a few
fused kernels instead of ~25 small ones per layer; at ~800 rows of a 1B model those small kernels took about
a fifth of a decode step. Paged attention and the KV-cache write stay eager (``StepAttention.attend`` is
opaque to dynamo), so dynamo splits each block around them. Shapes are dynamic in the rows, so every bucket
reuses one compilation; the compile happens in the warm-up before the first capture.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from batchpilot.generate.batch import decode_arrays, flatten
from batchpilot.generate.sampling import penalise, sample
from batchpilot.generate.scheduler import Chunk
from batchpilot.generate.step_attention import (DecodeMeta, KVCache, PagedAttention, StepAttention,
                                                 opaque_step_attention)
from batchpilot.model.llama import Llama

# padded batch sizes: fine steps above 256 rows, where a decode step's matmuls cost in proportion to rows
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, *range(256, 1024, 32), *range(1024, 2049, 128))


@dataclass(slots=True)
class _Graph:
    replay: Callable[[], None]
    inputs: dict[str, torch.Tensor]
    out: dict[str, torch.Tensor]  # "tokens": (rows,) greedy tokens, rewritten by every replay


@contextlib.contextmanager
def compile_settings(recompile_limit: int) -> Iterator[None]:
    """Dynamo and inductor settings of a compiled decode forward (imports them: only where something compiles)."""
    with (torch._dynamo.config.patch(recompile_limit=recompile_limit),
          torch._inductor.config.patch(emulate_precision_casts=True)):
        yield


def greedy_tokens(model: Llama, ids: torch.Tensor, pos: torch.Tensor, attn: StepAttention) -> torch.Tensor:
    """(rows,) token ids at (rows,) positions -> (rows,) greedy next tokens: the forward every graph captures."""
    hidden = model.hidden_states(ids[None], position_ids=pos[None], attn_meta=attn)  # (1, rows, D)
    return model.lm_head(hidden[0]).argmax(dim=-1)


def decode_logits(model: Llama, ids: torch.Tensor, pos: torch.Tensor, attn: StepAttention) -> torch.Tensor:
    """(rows,) token ids at (rows,) positions -> (rows, V) logits: the forward of sampling graphs."""
    hidden = model.hidden_states(ids[None], position_ids=pos[None], attn_meta=attn)  # (1, rows, D)
    return model.lm_head(hidden[0])


# A batch whose graph is not captured yet runs its key's first uses on a captured graph of its kind with at most
# twice its rows and groups (padding rows and empty group slots do no harm). A capture costs about four eager
# forwards (two warm-ups, the capture, the eager reference step: ~0.25 s at llama-1b on an H200), and a job that
# drains from 1,024 rows to none meets most (rows, groups, kind) keys once or twice: the fresh CLI process of the
# 8,000-line benchmark job spent ~15 s more in its engine than the warm engine did (generate_job_20261201_221233).
# A key still in use after that is captured: a steady batch runs unpadded.
REUSE_FIRST_USES = 2

# graph kinds: argmax; Gumbel sampling; + top-k / top-p; a flag: + penalties / logit_bias / min_tokens
GREEDY, SAMPLE, SAMPLE_FILTERED, PENALISED = 0, 1, 2, 4


def sampling_kind(dec: list[Chunk]) -> int:
    ps = [c.request.params for c in dec]
    flag = PENALISED if any(p.penalised for p in ps) else 0
    if all(p.temperature == 0 for p in ps):
        return GREEDY | flag
    return (SAMPLE_FILTERED if any(p.top_k > 0 or p.top_p < 1 for p in ps) else SAMPLE) | flag


class DecodeGraphs:
    """Static decode graphs over one KV cache; everything they read is passed in (the runner owns the cache)."""

    def __init__(self, model: Llama, kv: KVCache, paged_attention: PagedAttention, *, trash_block: int,
                 cascade: bool, max_rows: int, max_groups: int = 64, capture: bool = True,
                 compile: bool = False, reuse_first_uses: int = REUSE_FIRST_USES) -> None:
        self.model, self.kv, self.paged_attention = model, kv, paged_attention
        self.block_size, self.trash_block, self.cascade = kv.block_size, trash_block, cascade
        self.device = kv.k.device
        self.dtype = next(model.parameters()).dtype
        self.max_groups, self.capture = max_groups, capture
        self.tokens = torch.compile(greedy_tokens, dynamic=True) if compile else greedy_tokens
        self.logits = torch.compile(decode_logits, dynamic=True) if compile else decode_logits
        # dynamo compiles each layer's code after the attention break once per layer index (a guard on it)
        self.recompile_limit = 8 + 4 * model.config.num_layers
        self.compile_off_reason: str | None = None  # why compiled graphs fell back to eager ones
        self.compile_seconds = 0.0  # measured: warm-ups that compiled (first graph of each compiled function)
        self._compiled: set[int] = set()
        self.buckets = [b for b in BUCKETS if b < max_rows] + [max_rows]
        self.width = 0  # block-table columns of every graph
        self.graphs: dict[tuple[int, int, int], _Graph] = {}  # (rows, groups, sampling kind) -> graph
        self.reuse_first_uses = reuse_first_uses
        self.uses: dict[tuple[int, int, int], int] = {}  # uses of keys not captured yet
        self.captures = 0  # graphs built (each with its eager reference step)
        self.capture_seconds = 0.0  # host seconds of those builds and reference steps (the end line reports them)
        self.borrowed_steps = 0  # rounds run on a larger captured graph (``reuse_first_uses``)
        self.pool: Any = None  # the graphs' shared memory pool (torch.cuda.graph_pool_handle)
        self.enabled = True
        self.off_reason: str | None = None  # why graphs switched themselves off (reported by benchmarks)

    def begin_job(self, max_tokens: int) -> None:
        width = -(-max_tokens // self.block_size) + 1
        if width > self.width:
            self.width = width
            self._drop_graphs()

    def fits(self, dec: list[Chunk]) -> bool:
        """The batch fits the static sizes: rows, cascade groups, block-table width."""
        if len(dec) > self.buckets[-1]:
            return False
        groups = {id(c.request.group) for c in dec if c.request.prefix_len > 0}
        return (len(groups) <= self.max_groups and (self.cascade or not groups)
                and max(len(c.request.blocks) for c in dec) <= self.width)

    def run(self, dec: list[Chunk], eager: Callable[[], tuple[list[int], torch.Tensor]],
            steps: int = 1, eos_ids: frozenset[int] = frozenset(),
            stop: Callable[[], bool] | None = None) -> list[list[int]]:
        """Greedy tokens of each row for ``steps`` consecutive decode steps (one step on a graph's first use).

        ``eager`` runs the same step without the graph and returns its tokens and (rows, V) logits. ``stop``: asked
        before each step after the first, once the device has finished the step before it (the next step's inputs
        are advanced on the device meanwhile, so the device waits only for a replay's launch); True ends the round
        there, with fewer tokens per row.
        """
        rows = next(b for b in self.buckets if b >= len(dec))
        n = len({id(c.request.group) for c in dec if c.request.prefix_len > 0}) if self.cascade else 0
        groups = 1 << (n - 1).bit_length() if n else 0  # padded to a power of two: few graphs, little waste
        key = self._pick(rows, groups, sampling_kind(dec))
        self.borrowed_steps += key[:2] != (rows, groups)
        rows, groups = key[0], key[1]
        fresh = key not in self.graphs
        built = time.perf_counter()
        try:
            if fresh:
                self.graphs[key] = self._build(*key)
            g = self.graphs[key]
            for name, array in self._arrays(dec, rows, groups).items():
                g.inputs[name].copy_(torch.from_numpy(array))
            if key[2] & PENALISED:
                self._fill_penalties(g, dec, eos_ids)
            steps = 1 if fresh else steps
            history = torch.empty(steps, rows, dtype=torch.long, device=self.device)
            # with ``stop``, the host waits for each step before asking (the device meanwhile advances the inputs)
            step_done = torch.cuda.Event() if stop is not None and self.capture else None
            ran = 0
            for k in range(steps):
                if k:
                    self._advance(g)
                    if step_done is not None:
                        step_done.synchronize()
                    if stop is not None and stop():  # a request arrived: the round ends after step k - 1
                        break
                g.replay()
                history[k].copy_(g.out["tokens"])
                if step_done is not None:
                    step_done.record()
                ran = k + 1
            tokens = history[:ran, :len(dec)].T.tolist()  # the one host sync
        except Exception as e:  # capture/replay errors come in many types: any of them -> eager from now on
            self._switch_off(f"{type(e).__name__}: {e}")
            return [[t] for t in eager()[0]]
        if fresh:  # first use of this graph: the eager step is the reference (and rewrites the same KV)
            ref, logits = eager()
            self._check(ref, g.out["tokens"][:len(dec)], logits,
                        torch.tensor([c.request.params.temperature > 0 for c in dec], device=logits.device))
            self.captures += 1
            self.capture_seconds += time.perf_counter() - built
            return [[t] for t in ref]
        return tokens

    def _pick(self, rows: int, groups: int, kind: int) -> tuple[int, int, int]:
        """The graph key a batch runs on: its own once captured; for its first ``reuse_first_uses`` uses the
        smallest captured graph of its kind with ``rows`` to 2 x ``rows`` rows and ``groups`` to 2 x ``groups``
        groups, if any; else its own (captured now)."""
        key = (rows, groups, kind)
        if key in self.graphs:
            return key
        used = self.uses.get(key, 0)
        self.uses[key] = used + 1
        if used < self.reuse_first_uses:
            near = [k for k in self.graphs if k[2] == kind and rows <= k[0] <= 2 * rows and groups <= k[1] <= 2 * groups]
            if near:
                return min(near)
        return key

    def _check(self, ref: list[int], got: torch.Tensor, logits: torch.Tensor, sampled: torch.Tensor) -> None:
        """Switch off unless the graph's token is, under the eager logits, within rounding of the eager maximum
        on every greedy row (a different pick is then a near tie, not a bug), and equals the eager draw on at
        least 90% of the sampled rows (the same noise; rounding moves only near-tied draws)."""
        ref_t = torch.tensor(ref, device=logits.device)
        rows = torch.arange(len(ref), device=logits.device)
        logits = logits.float()
        margin = logits[rows, ref_t] - logits[rows, got]  # >= 0: the eager pick is the eager maximum
        tol = 4 * torch.finfo(self.dtype).eps * logits.abs().amax(dim=-1)  # a few roundings of a logit
        bad = int(((margin > tol) & ~sampled).sum())
        differ = int(((got != ref_t) & sampled).sum())
        if differ > 0.1 * int(sampled.sum()):
            bad += differ
        if not bad:
            return
        agree = float((got == ref_t).float().mean())
        reason = f"{len(ref)}-row graph differs from the eager step on {bad} tokens that are not near ties " \
                 f"({agree:.1%} agree)"
        if self.tokens is greedy_tokens:
            self._switch_off(reason)
            return
        # compiled: retry with eager graphs first (fused kernels round differently; a bug would fail again)
        warnings.warn(f"compiled decode graphs disabled, capturing eager ones: {reason}", stacklevel=3)
        self.tokens, self.logits, self.compile_off_reason = greedy_tokens, decode_logits, reason
        self._drop_graphs()

    def _advance(self, g: _Graph) -> None:
        """Inputs of the next decode step from this one's, on the device (rows past their blocks hit the trash).

        Tables hold own blocks only: graphs take no rows with their group prefix inline (``usable``)."""
        bs, i = self.block_size, g.inputs
        i["ids"].copy_(g.out["tokens"])
        i["pos"].add_(1)
        i["own_lens"].add_(1)
        if "steps" in i:  # sampling graphs: the next draw of each row's (seed, step) stream
            i["steps"].add_(1)
        if "counts" in i:  # penalised graphs: the new token joins each row's output counts and seen set
            new = g.out["tokens"][:, None]
            i["counts"].scatter_add_(1, new, torch.ones_like(new, dtype=i["counts"].dtype))
            i["seen"].scatter_(1, new, True)
            i["ban_left"].sub_(1)

        j = i["own_lens"] - 1  # own index of the new token
        block = i["tables"].gather(1, (j // bs).clamp_max(self.width - 1)[:, None])[:, 0]
        i["slots"].copy_(block * bs + j % bs)

    def _fill_penalties(self, g: _Graph, dec: list[Chunk], eos_ids: frozenset[int]) -> None:
        """(rows, V) output counts, seen tokens (prompt + output) and logit_bias of the batch, built on the device."""
        i, dev = g.inputs, self.device
        reqs = [c.request for c in dec]

        def index(per_row: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
            rows = [r for r, toks in enumerate(per_row) for _ in toks]
            return (torch.tensor(rows, dtype=torch.long, device=dev),
                    torch.tensor([t for toks in per_row for t in toks], dtype=torch.long, device=dev))

        i["counts"].zero_()
        i["counts"].index_put_(index([r.output_ids for r in reqs]),
                               torch.ones(sum(len(r.output_ids) for r in reqs), device=dev), accumulate=True)
        i["seen"].zero_()
        i["seen"][index([r.prompt_ids + r.output_ids if r.params.repetition_penalty != 1 else [] for r in reqs])] = True
        i["bias"].zero_()
        i["bias"][index([[t for t, _ in r.params.logit_bias] for r in reqs])] = torch.tensor(
            [b for r in reqs for _, b in r.params.logit_bias], dtype=torch.float32, device=dev)
        i["eos"].zero_()
        i["eos"][torch.tensor(sorted(eos_ids), dtype=torch.long, device=dev)] = True

    def _drop_graphs(self) -> None:
        """Forget every graph, and their pool with them: once its last graph is gone the caching allocator keeps a
        pool whose use count is 0 until its blocks are freed, and capturing into that handle again fails its
        internal assert (``use_count > 0``, CUDACachingAllocator); the next capture opens a fresh pool."""
        self.graphs.clear()
        self.uses.clear()
        self.pool = None

    def _switch_off(self, reason: str) -> None:
        warnings.warn(f"CUDA graphs disabled: {reason}", stacklevel=3)
        self.enabled, self.off_reason = False, reason

    def _arrays(self, dec: list[Chunk], rows: int, groups: int) -> dict[str, np.ndarray]:
        bs, pad = self.block_size, rows - len(dec)
        a = decode_arrays(dec, block_size=bs, cascade=self.cascade, trash_block=self.trash_block, rows=rows,
                          width=self.width, groups=groups)
        assert a.prefix_blocks == 0  # no inline prefixes in graphs (fits), as the captured DecodeMeta assumes
        flat = flatten(dec, bs)
        named = a.named()
        named["ids"] = np.asarray(flat.ids + [0] * pad, dtype=np.int64)
        named["pos"] = np.asarray(flat.pos + [0] * pad, dtype=np.int64)
        named["slots"] = np.asarray(flat.slots + [self.trash_block * bs] * pad, dtype=np.int64)
        if sampling_kind(dec) & ~PENALISED != GREEDY:  # padding rows: greedy
            ps = [c.request.params for c in dec]
            named["temperature"] = np.asarray([p.temperature for p in ps] + [0.0] * pad, dtype=np.float32)
            named["top_k"] = np.asarray([p.top_k for p in ps] + [0] * pad, dtype=np.int64)
            named["top_p"] = np.asarray([p.top_p for p in ps] + [1.0] * pad, dtype=np.float32)
            named["seeds"] = np.asarray([c.request.seed for c in dec] + [0] * pad, dtype=np.int64)
            named["steps"] = np.asarray([len(c.request.output_ids) for c in dec] + [0] * pad, dtype=np.int64)
        if sampling_kind(dec) & PENALISED:  # padding rows: neutral
            ps, rs = [c.request.params for c in dec], [c.request for c in dec]
            named["presence"] = np.asarray([p.presence_penalty for p in ps] + [0.0] * pad, dtype=np.float32)
            named["frequency"] = np.asarray([p.frequency_penalty for p in ps] + [0.0] * pad, dtype=np.float32)
            named["repetition"] = np.asarray([p.repetition_penalty for p in ps] + [1.0] * pad, dtype=np.float32)
            named["ban_left"] = np.asarray([0 if r.params.ignore_eos else r.params.min_tokens - len(r.output_ids)
                                            for r in rs] + [0] * pad, dtype=np.int64)
        return named

    def _build(self, rows: int, groups: int, kind: int) -> _Graph:
        dev, G, t = self.device, groups, self.trash_block
        inputs = {"ids": torch.zeros(rows, dtype=torch.long, device=dev),
                  "pos": torch.zeros(rows, dtype=torch.long, device=dev),
                  "slots": torch.full((rows,), t * self.block_size, dtype=torch.long, device=dev),
                  "tables": torch.full((rows, self.width), t, dtype=torch.long, device=dev),
                  "prefix_lens": torch.zeros(rows, dtype=torch.long, device=dev),
                  "own_lens": torch.ones(rows, dtype=torch.long, device=dev)}
        if groups:
            inputs |= {"group_tables": torch.full((G, self.width), t, dtype=torch.long, device=dev),
                       "group_lens": torch.zeros(G, dtype=torch.long, device=dev),
                       "group_rows": torch.full((G, rows), rows, dtype=torch.long, device=dev),
                       "group_sizes": torch.zeros(G, dtype=torch.long, device=dev)}
        group_inputs = {k: inputs[k] for k in ("group_tables", "group_lens", "group_rows", "group_sizes")
                        if k in inputs}
        meta = DecodeMeta(inputs["tables"], inputs["prefix_lens"], inputs["own_lens"], 0, **group_inputs)
        compiled = self.tokens is not greedy_tokens
        attn = (opaque_step_attention() if compiled else StepAttention)(self.kv, self.paged_attention, inputs["slots"],
                                                                        meta, None)
        if kind & ~PENALISED != GREEDY:  # per-request sampling parameters: static device tensors of the graph
            inputs |= {"temperature": torch.zeros(rows, dtype=torch.float32, device=dev),
                       "top_k": torch.zeros(rows, dtype=torch.long, device=dev),
                       "top_p": torch.ones(rows, dtype=torch.float32, device=dev),
                       "seeds": torch.zeros(rows, dtype=torch.long, device=dev),
                       "steps": torch.zeros(rows, dtype=torch.long, device=dev)}
        if kind & PENALISED:
            V = self.model.config.vocab_size
            inputs |= {"presence": torch.zeros(rows, device=dev), "frequency": torch.zeros(rows, device=dev),
                       "repetition": torch.ones(rows, device=dev),
                       "ban_left": torch.zeros(rows, dtype=torch.long, device=dev),
                       "counts": torch.zeros(rows, V, device=dev),
                       "seen": torch.zeros(rows, V, dtype=torch.bool, device=dev),
                       "bias": torch.zeros(rows, V, device=dev), "eos": torch.zeros(V, dtype=torch.bool, device=dev)}
        # the closure takes what it calls, not ``self``: a graph that referenced its DecodeGraphs would make a cycle
        # (graphs -> graph -> closure -> graphs) that keeps the KV cache alive after the engine is dropped
        model, tokens_fn, logits_fn, recompile_limit = self.model, self.tokens, self.logits, self.recompile_limit

        def forward() -> dict[str, torch.Tensor]:
            # emulate_precision_casts: round to bf16 where eager does, so the self-check compares like with like
            with compile_settings(recompile_limit) if compiled else contextlib.nullcontext():
                if kind == GREEDY:
                    return {"tokens": tokens_fn(model, inputs["ids"], inputs["pos"], attn)}  # (rows,)
                logits = logits_fn(model, inputs["ids"], inputs["pos"], attn)  # (rows, V)
            # logit processing runs eagerly inside the graph; on CUDA the sampler is sampling_triton's kernels
            if kind & PENALISED:
                logits = penalise(logits, output_counts=inputs["counts"], seen=inputs["seen"],
                                  presence=inputs["presence"], frequency=inputs["frequency"],
                                  repetition=inputs["repetition"], bias=inputs["bias"],
                                  banned=inputs["eos"][None] & (inputs["ban_left"] > 0)[:, None])
                if kind & ~PENALISED == GREEDY:
                    return {"tokens": logits.argmax(dim=-1)}
            return {"tokens": sample(logits, temperature=inputs["temperature"], top_k=inputs["top_k"],
                                     top_p=inputs["top_p"], seeds=inputs["seeds"], steps=inputs["steps"],
                                     any_random=True, any_filter=kind & ~PENALISED == SAMPLE_FILTERED)}

        if not self.capture:  # CPU tests: the same static buffers, run eagerly
            out = forward()
            return _Graph(lambda: out.update(forward()), inputs, out)
        fn = self.tokens if kind == GREEDY else self.logits
        compiles = fn not in (greedy_tokens, decode_logits) and id(fn) not in self._compiled
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (allocator, cuBLAS handles) outside the capture
            forward()
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        if compiles:  # this warm-up ran torch.compile (or loaded its artefacts from the inductor cache)
            torch.cuda.synchronize()
            self.compile_seconds += time.perf_counter() - start
            self._compiled.add(id(fn))
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = forward()
        return _Graph(graph.replay, inputs, out)
