"""Measured MFU per shape, for the planner's predicted step time and its micro-batch choice (``--mfu-from``).

MFU here is the trainer's (``model/counting.training_flops_per_token``: 6 x matmul params + 6 L (H E) T, causal
attention at half of 12 L H E T; Chowdhery et al., PaLM, arXiv 2204.02311, appendix B, with the causal halving)
over the GPU's dense bf16 peak. Three sources, in the order ``read_mfu_table`` tries them:

- a ``benchmarks/results/train_throughput_*.json``: its ``rows`` of the batchpilot systems (``batchpilot``:
  compiled blocks, autocast over fp32 params; ``batchpilot_bf16``: bf16 params; ``..._float8``: float8 matmuls,
  recipe from ``summary.float8_recipe``), each with ``seq``, ``mb``, ``ac`` and ``mfu_causal`` (the planner's
  convention; ``mfu`` there counts attention as non-causal, so it is not used);
- a table: ``{"mfu": [{"seq_len": 2048, "micro_batch_size": 16, "mfu": 0.53, "activation_checkpointing":
  "none", "float8": null, "bf16_params": false}, ...]}`` (the last three keys optional);
- a run's ``metrics.jsonl``: the mean of its ``mfu`` field, one value for every shape.

Lookup (``MfuTable.lookup``): the entries of the plan's precision (float8 recipe, bf16 params) if there are
any, else all; of those, the sequence length nearest in log2; among its micro-batches, linear interpolation in
log2(micro-batch), held constant outside the measured ones (no extrapolation of a trend). An entry measured
under another checkpointing mode is converted by the ratio of the recompute factors (MFU counts model FLOPs,
so recomputation lowers it by that factor at the same hardware utilisation).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# train_throughput.py systems -> (bf16 params, float8): the batchpilot trainer paths, all compiled
SYSTEMS = {"batchpilot": (False, False), "batchpilot_bf16": (True, False), "batchpilot_float8": (False, True),
           "batchpilot_bf16_float8": (True, True)}


@dataclass(frozen=True, slots=True)
class MfuEntry:
    seq_len: int
    micro_batch_size: int
    mfu: float
    activation_checkpointing: str = "none"
    float8: str | None = None
    bf16_params: bool = False


@dataclass(frozen=True, slots=True)
class MfuLookup:
    mfu: float  # at the plan's checkpointing mode (recompute folded in)
    source: str  # for Plan.explain


@dataclass(frozen=True, slots=True)
class MfuTable:
    entries: tuple[MfuEntry, ...]
    source: str
    assumed: bool = False  # one assumed MFU for every shape (``--mfu``): no seq / micro-batch in the source

    @classmethod
    def constant(cls, mfu: float, source: str) -> MfuTable:
        return cls(entries=(MfuEntry(seq_len=1, micro_batch_size=1, mfu=mfu),), source=source, assumed=True)

    def lookup(self, *, seq_len: int, micro_batch_size: int, mode: str, float8: str | None, bf16_params: bool,
               recompute: dict[str, float]) -> MfuLookup:
        """MFU at this shape (module docstring); ``recompute`` maps checkpointing modes to their FLOPs factor."""
        if self.assumed:
            factor = recompute.get(mode, 1.0)
            return MfuLookup(mfu=self.entries[0].mfu / factor,
                             source=self.source + ("" if factor == 1.0 else f", / {factor:.3g} for {mode} recompute"))
        same = [e for e in self.entries if e.float8 == float8 and e.bf16_params == bf16_params]
        pool = same or [e for e in self.entries if e.float8 == float8] or list(self.entries)
        seq = min({e.seq_len for e in pool}, key=lambda s: (abs(math.log2(s / seq_len)), -s))
        at_seq = [e for e in pool if e.seq_len == seq]
        modes = {e.activation_checkpointing for e in at_seq}
        row_mode = mode if mode in modes else ("none" if "none" in modes else sorted(modes)[0])
        points = sorted((e.micro_batch_size, e.mfu) for e in at_seq if e.activation_checkpointing == row_mode)
        mfu = interpolate_log2(points, micro_batch_size)
        mfu *= recompute.get(row_mode, 1.0) / recompute.get(mode, 1.0)
        where = (f"{self.source}: seq {seq}, micro-batch {'/'.join(str(p[0]) for p in points)}, "
                 f"checkpointing {row_mode}" + ("" if row_mode == mode else f" (x recompute {mode})")
                 + ("" if same else ", other precision"))
        return MfuLookup(mfu=mfu, source=where)


def interpolate_log2(points: list[tuple[int, float]], x: int) -> float:
    """Piecewise-linear in log2(x) between measured points, constant outside them."""
    if x <= points[0][0]:
        return points[0][1]
    if x >= points[-1][0]:
        return points[-1][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            t = (math.log2(x) - math.log2(x0)) / (math.log2(x1) - math.log2(x0)) if x1 > x0 else 0.0
            return y0 + t * (y1 - y0)
    return points[-1][1]


def _entries_from_throughput(d: dict[str, Any]) -> list[MfuEntry]:
    recipe = (d.get("summary") or {}).get("float8_recipe") or "tensorwise"
    out = []
    for r in d.get("rows", []):
        system = SYSTEMS.get(r.get("system"))
        if system is None or r.get("mfu_causal") is None or r.get("error") or r.get("oom"):
            continue
        out.append(MfuEntry(seq_len=int(r["seq"]), micro_batch_size=int(r["mb"]), mfu=float(r["mfu_causal"]),
                            activation_checkpointing=r.get("ac", "none"), float8=recipe if system[1] else None,
                            bf16_params=system[0]))
    return out


def _entries_from_table(rows: list[Any], source: str) -> list[MfuEntry]:
    out = []
    for r in rows:
        try:
            out.append(MfuEntry(seq_len=int(r["seq_len"]), micro_batch_size=int(r["micro_batch_size"]),
                                mfu=float(r["mfu"]), activation_checkpointing=r.get("activation_checkpointing", "none"),
                                float8=r.get("float8"), bf16_params=bool(r.get("bf16_params", False))))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"--mfu-from {source}: an entry needs seq_len, micro_batch_size and mfu ({e})") from None
    return out


def read_mfu_table(path: str | os.PathLike) -> MfuTable:
    """The table in ``path`` (a train_throughput JSON, an MFU table, or a metrics.jsonl; module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--mfu-from {path}: no such file")
    text = path.read_text()
    try:
        d = json.loads(text)
    except json.JSONDecodeError:
        d = None
    if isinstance(d, dict) and ("rows" in d or "mfu" in d):
        entries = _entries_from_throughput(d) if "rows" in d else _entries_from_table(d["mfu"], str(path))
        kind = "measured" if "rows" in d else "table"
    else:  # metrics.jsonl: one mean MFU for every shape
        try:
            values = [r["mfu"] for r in map(json.loads, text.splitlines()) if r.get("mfu") is not None]
        except (json.JSONDecodeError, AttributeError):
            values = []
        if not values:
            raise ValueError(f"--mfu-from {path}: no batchpilot rows, MFU table or 'mfu' values; pass --mfu instead")
        return MfuTable.constant(sum(values) / len(values), f"mean mfu {sum(values) / len(values):.3g} of "
                                                            f"{path.name} ({len(values)} steps)")
    if not entries:
        raise ValueError(f"--mfu-from {path}: no usable entries (batchpilot systems with mfu_causal)")
    if any(not 0 < e.mfu <= 1 for e in entries):
        raise ValueError(f"--mfu-from {path}: every mfu must be in (0, 1]")
    return MfuTable(entries=tuple(entries), source=f"{kind} {path.name}")
