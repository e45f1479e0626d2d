"""``sampling.sample`` in Triton: the same tokens from the same random stream as the torch path (issue 15).

Two paths (``sample_triton(path=...)``, ``choose_path``): the split-row path (``_launch_split``, the default for
real vocabularies: (row, chunk) programs, 4 full reads of a top-p row in a fixed number of launches, approximate
passes with an error bound that only narrow the bracket, one exact pass that draws and packs it, one finishing
program per row; its docstrings and docs/generate.md give the details) and the row kernel below (one program per
row, ~7 full reads of a random top-p row where the torch path makes ~30 (R, V) passes in fp32/fp64/int64).

The row kernel: one program per row (grid = R), the row re-read from L2 by each pass, no atomics, no host sync (capturable in a
CUDA graph; the number of search passes depends on the row's values, never on the host):

1. greedy argmax of the logits (the first index among equal maxima, what ``torch.argmax`` documents), their max
   and min; the max of ``s = x / T`` is ``x_max / T`` (IEEE division by ``T > 0`` is monotone). Rows with
   temperature <= 0 stop here (``sample`` returns their greedy token).
2. rows with a filter: the threshold key over the same totally ordered integer keys as ``sampling.keep_threshold``
   (16-bit logits' own bits for bf16/fp16, ``s``'s fp32 bits otherwise; -0 folded into +0). ``ok(t)`` =
   ``count(keys > t) < top_k and mass(keys > t) < top_p * Z`` is monotone in ``t``; torch's radix select returns the
   least passing key, and every threshold below the row's least key keeps the whole row, so the search runs on the
   bracket ``(key(min) - 1, key(max)]`` (``ok(key(max))``: nothing is above it). Each pass reduces ``count`` and
   ``mass`` of ``e = exp(s - s_max)`` (fp32, as torch computes it) for ``NC`` candidates splitting the bracket into
   ``NC + 1`` parts (evenly in value while that narrows it at least as fast as even spacing in key, then in
   key) and keeps the part where ``ok`` flips: a (NC+1)-ary search, the bisection of a radix select
   (Alabi et al., "Fast k-selection algorithms for graphics processing units", ACM JEA 17, 2012, section 3) with
   the bins reduced per candidate instead of histogrammed. NC = 4, key spacing: 7 passes for a bf16 row of random
   logits (key span ~33k), 14 for fp32. ``Z = sum(e)`` comes with the first pass; top-k-only rows count without
   ``e``. Once the bracket holds at most ``CAP`` tokens with >= 3 passes to go, one pass packs their (key, e) into
   a scratch row and the later passes read only those (the tokens above the bracket enter as count and mass
   offsets).
3. the Gumbel-max draw: ``argmax over kept tokens of (s + g)``, ``g = -log(-log(u))`` from the same lowbias32 hash
   of (row key, token) as ``sampling.uniform_noise``, the row key folded in the kernel like ``sampling.row_keys``
   (uint32 arithmetic: Triton's uint32 multiplies wrap mod 2^32 and its uint32 shifts are logical, so the torch
   path's int32 masking is not needed).

Masses: fp64 lane sums on GPUs with half-rate fp64 (``default_sums``); elsewhere fp32 Kahan-compensated lane sums
(Kahan, "Further remarks on reducing truncation errors", CACM 8(1), 1965), combined in fp64 as ``sum -
compensation``, which costs 4 fp32 adds per token and candidate where fp64 there runs at 1/32-1/64 rate. Both are
as exact as the torch path's fp64 sums (within ~1e-14 relative of the true sum), so a cut can only differ where
``top_p * Z`` lies that close to a cumulative mass (the torch path's fp64 atomics add in any order anyway).

Numerics against the torch path: ``x / T`` is ``div_rn`` (IEEE, like torch's ``/``); on CUDA, ``exp``/``log`` are
libdevice's ``expf``/``logf``, the CUDA math library functions torch's CUDA ``exp``/``log`` call, so the values
are the same but for FTZ of subnormal ``e`` (< 1e-38: no mass); FMA contraction is off. Under
``TRITON_INTERPRET=1`` (CPU tests) they are numpy's, within an ulp of torch CPU's. NaN logits are not supported
(torch's argmax returns the first NaN).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU installs and CI: sampling.sample keeps the torch path
    triton = None

HAVE_TRITON = triton is not None
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # KIND: fp32 keys of s, bf16 / fp16 own bits
_INT32_MAX = 2**31 - 1
_FINISH_REGISTERS = 168  # the finishing program (4 warps): no spill in its packed-search loop (ptxas, sm_90), 3 per SM
_MAX_REGISTERS = 128  # per thread: two 8-warp programs (rows) per SM on sm_80/sm_90 (65,536 registers); the
# default 4,1024,8 kernel needs ~146 unconstrained and spills nothing in its loops at 128 (ptxas, sm_90)


def supported(logits: torch.Tensor, temperature: torch.Tensor) -> bool:
    """Whether the kernel computes exactly ``sampling.sample``'s result for these inputs: 2-D fp32/bf16/fp16
    logits with fp32 temperatures (fp64 temperatures make torch's ``s`` fp64)."""
    return (HAVE_TRITON and logits.dim() == 2 and logits.dtype in _KINDS and temperature.dtype == torch.float32
            and logits.shape[-1] > 0)


def default_sums(device: torch.device) -> str:
    """"fp64" on GPUs with half-rate fp64 (compute capability x.0 from 6.0: P100, V100, A100, H100/H200, B200),
    where an fp64 add per token and candidate is cheaper than Kahan's four fp32 ones; "kahan" elsewhere (consumer
    and L-series parts run fp64 at 1/32-1/64 of fp32) and on CPU."""
    if device.type != "cuda":
        return "kahan"
    major, minor = torch.cuda.get_device_capability(device)
    return "fp64" if major >= 6 and minor == 0 else "kahan"


def interpreted() -> bool:
    """``TRITON_INTERPRET=1``: the kernel runs on CPU tensors through numpy (no libdevice there)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")



@dataclass(frozen=True)
class SplitConfig:
    """The split-row path's knobs (``sample_triton(..., path="split", config=...)``).

    ``chunk`` tokens per (row, chunk) program and ``block`` tokens per step of its loop (``draw_block`` in the
    exact pass, whose per-token state is larger; ``num_warps`` warps);
    ``passes`` approximate passes with ``candidates`` thresholds each before the exact pass (their fp32 masses
    only narrow the bracket, with an error bound: the threshold stays exact); ``compact`` tokens of a row's
    bracket that get packed (key, index: 8 bytes each) for the finishing program, which searches them with
    ``finish_candidates`` thresholds per pass (``finish_block`` tokens per step, ``finish_warps`` warps);
    ``split`` "value" or "key" (``sample_triton``)."""

    chunk: int = 8192
    block: int = 1024
    draw_block: int = 512
    num_warps: int = 4
    candidates: int = 8
    passes: int = 2
    compact: int = 16384
    finish_candidates: int = 8
    finish_block: int = 512
    finish_warps: int = 4
    split: str = "value"

    def __post_init__(self) -> None:
        for name in ("chunk", "block", "draw_block", "finish_block"):
            v = getattr(self, name)
            if v < 64 or v & (v - 1):
                raise ValueError(f"SplitConfig: {name} must be a power of two >= 64, got {v}")
        for name in ("block", "draw_block"):
            if self.chunk % getattr(self, name):
                raise ValueError(f"SplitConfig: chunk ({self.chunk}) must be a multiple of {name} "
                                 f"({getattr(self, name)})")
        for name in ("candidates", "finish_candidates"):
            if getattr(self, name) not in (2, 4, 8, 16):
                raise ValueError(f"SplitConfig: {name} must be 2, 4, 8 or 16, got {getattr(self, name)}")
        if not 1 <= self.passes <= 4:
            raise ValueError(f"SplitConfig: passes must be 1..4, got {self.passes}")
        if self.compact < 0:
            raise ValueError(f"SplitConfig: compact must be >= 0, got {self.compact}")
        for name in ("num_warps", "finish_warps"):
            if getattr(self, name) not in (1, 2, 4, 8, 16):
                raise ValueError(f"SplitConfig: {name} must be 1, 2, 4, 8 or 16, got {getattr(self, name)}")
        if self.split not in ("value", "key"):
            raise ValueError(f"SplitConfig: split must be 'value' or 'key', got {self.split!r}")

    @classmethod
    def parse(cls, spec: str) -> SplitConfig:
        """``"chunk=4096,passes=3"`` -> a config (the benchmark's ``--split-config``)."""
        kw: dict = {}
        for part in filter(None, spec.split(",")):
            name, _, value = part.partition("=")
            if name not in cls.__dataclass_fields__:
                raise ValueError(f"SplitConfig: unknown field {name!r} in {spec!r}")
            kw[name] = value if name == "split" else int(value)
        return cls(**kw)


def choose_path(R: int, V: int, config: SplitConfig | None = None) -> str:
    """"split" when a row spans more than one chunk (every real vocabulary), else "row" (one program per row,
    one launch): the split path's programs are R x ceil(V / chunk), so small batches fill the GPU too."""
    return "split" if V > (config or SplitConfig()).chunk else "row"


if HAVE_TRITON:

    @triton.jit
    def _load_row(base, offs, valid, KIND: tl.constexpr):
        """fp32 values (-inf outside the row) and the raw int32 words (16-bit bits sign-extended, or 0)."""
        if KIND == 0:
            x = tl.load(base + offs, mask=valid, other=float("-inf"))
            raw = tl.zeros_like(offs)
        else:
            raw = tl.load(base + offs, mask=valid, other=0).to(tl.int32)  # int16 view of the 16-bit logits
            if KIND == 1:  # bf16: its bits are the top half of the fp32 bits
                x = (raw << 16).to(tl.float32, bitcast=True)
            else:
                x = raw.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            x = tl.where(valid, x, float("-inf"))
        return x, raw

    @triton.jit
    def _fold(b, KIND: tl.constexpr):
        """``sampling._order_keys`` of IEEE bits ``b`` (int32; 16-bit ones sign-extended): negatives with all but
        the sign bit flipped, -0 as +0."""
        if KIND == 0:
            b = tl.where(b == -2147483648, 0, b)
            k = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
        else:
            b = tl.where(b == -32768, 0, b)
            k = tl.where(b >= 0, b, b ^ 0x7FFF)
        return k

    @triton.jit
    def _keys(raw, s, valid, KIND: tl.constexpr):
        """Keys of a block (of ``s`` for fp32 logits, of the 16-bit words otherwise); -2^31, below every candidate
        threshold, outside the row."""
        if KIND == 0:
            k = _fold(s.to(tl.int32, bitcast=True), KIND)
        else:
            k = _fold(raw, KIND)
        return tl.where(valid, k, -2147483648)

    @triton.jit
    def _key_of(x, tk, KIND: tl.constexpr):
        """The key of one logit value ``x`` (fp32 holding the logit exactly) at temperature ``tk``."""
        if KIND == 0:
            b = tl.math.div_rn(x, tk).to(tl.int32, bitcast=True)
        elif KIND == 1:
            b = x.to(tl.int32, bitcast=True) >> 16  # arithmetic: the bf16 word sign-extended
        else:
            b = x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        return _fold(b, KIND).to(tl.int64)

    @triton.jit
    def _exp(x, ACCURATE: tl.constexpr):
        if ACCURATE:
            return libdevice.exp(x)
        return tl.exp(x)

    @triton.jit
    def _log(x, ACCURATE: tl.constexpr):
        if ACCURATE:
            return libdevice.log(x)
        return tl.log(x)

    @triton.jit
    def _lowbias32(x):
        """Wellons' lowbias32 on uint32 (wrapping multiplies, logical shifts): ``sampling.lowbias32``."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _row_key(seed_ptr, step_ptr, row):
        """``sampling.row_keys`` of one row (uint32): the int64 seed's low then high word folded in, then the step's
        low word, each through lowbias32."""
        seed = tl.load(seed_ptr + row)
        k = _lowbias32((seed & 0xFFFFFFFF).to(tl.uint32) ^ 0x9E3779B9)
        k = _lowbias32(k ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
        return _lowbias32(k ^ (tl.load(step_ptr + row) & 0xFFFFFFFF).to(tl.uint32))

    @triton.jit
    def _uniform(offs, rkey):
        """``sampling.uniform_noise`` of tokens ``offs`` (int32) under the uint32 row key: ``(k + 0.5) / 2^24`` of
        the top 24 bits ``k`` of ``lowbias32(key + token * 0x9E3779B9)``, kept below 1."""
        h = _lowbias32(offs.to(tl.uint32) * 0x9E3779B9 + rkey)
        u = ((h >> 8) & 0xFFFFFF).to(tl.float32)
        return tl.minimum((u + 0.5) * (2.0**-24), 1.0 - 2.0**-24)

    @triton.jit
    def _gumbel(offs, rkey, ACCURATE: tl.constexpr):
        """``sampling.gumbel_noise``: ``-log(-log(u))``."""
        return -_log(-_log(_uniform(offs, rkey), ACCURATE), ACCURATE)

    @triton.jit
    def _noise_kernel(seed_ptr, step_ptr, out_ptr, V, GUMBEL: tl.constexpr, BLOCK: tl.constexpr,
                      ACCURATE: tl.constexpr):
        """(R, V) uniform or Gumbel noise of the sampler's stream (tests compare it with the torch path's)."""
        row = tl.program_id(0)
        rkey = _row_key(seed_ptr, step_ptr, row)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            if GUMBEL:
                x = _gumbel(offs, rkey, ACCURATE)
            else:
                x = _uniform(offs, rkey)
            tl.store(out_ptr + row.to(tl.int64) * V + offs, x, mask=offs < V)

    @triton.jit
    def _kahan(acc, comp, v):
        """One Kahan step per lane: ``acc - comp`` tracks the exact running sum to ~fp32 epsilon squared."""
        y = v - comp
        t = acc + y
        comp = (t - acc) - y
        return t, comp

    @triton.jit
    def _reduce(base, V, cand, tk, m, use_p, WITH_Z: tl.constexpr, NC: tl.constexpr, KIND: tl.constexpr,
                FP64: tl.constexpr, BLOCK: tl.constexpr, ACCURATE: tl.constexpr, COMPACT: tl.constexpr, lo, hi,
                sk, se):
        """One pass over the row: per candidate threshold (NC,) ``count(keys > t)`` and (with ``use_p``)
        ``mass(keys > t)`` of ``e = exp(s - s_max)``; ``Z = sum(e)`` too with ``WITH_Z``. Masses are summed in fp64
        lanes (``FP64``) or fp32 Kahan lanes, either way combined in fp64. With ``COMPACT``, the (key, e) of the
        tokens inside the bracket (lo, hi] are also written, in token order, to the row's scratch ``sk``/``se``;
        their number is returned."""
        cnt = tl.zeros([NC, BLOCK], dtype=tl.int32)
        if FP64:
            acc = tl.zeros([NC, BLOCK], dtype=tl.float64)
            comp = tl.zeros([NC, BLOCK], dtype=tl.float64)  # unused
            z_acc = tl.zeros([BLOCK], dtype=tl.float64)
            z_comp = tl.zeros([BLOCK], dtype=tl.float64)  # unused
        else:
            acc = tl.zeros([NC, BLOCK], dtype=tl.float32)
            comp = tl.zeros([NC, BLOCK], dtype=tl.float32)
            z_acc = tl.zeros([BLOCK], dtype=tl.float32)
            z_comp = tl.zeros([BLOCK], dtype=tl.float32)
        n = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
        if use_p:  # count and mass
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                valid = offs < V
                x, raw = _load_row(base, offs, valid, KIND)
                s = tl.math.div_rn(x, tk)
                e = _exp(s - m, ACCURATE)  # 0 outside the row (x = -inf)
                key = _keys(raw, s, valid, KIND)
                above = key[None, :] > cand[:, None]
                cnt += above.to(tl.int32)
                if FP64:
                    e64 = e.to(tl.float64)
                    acc += tl.where(above, e64[None, :], 0.0)
                    if WITH_Z:
                        z_acc += e64
                else:
                    acc, comp = _kahan(acc, comp, tl.where(above, e[None, :], 0.0))
                    if WITH_Z:
                        z_acc, z_comp = _kahan(z_acc, z_comp, e)
                if COMPACT:
                    n = _pack(sk, se, n, key, e, lo, hi)
        else:  # top-k only: no probabilities
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                valid = offs < V
                x, raw = _load_row(base, offs, valid, KIND)
                if KIND == 0:
                    x = tl.math.div_rn(x, tk)
                key = _keys(raw, x, valid, KIND)
                cnt += (key[None, :] > cand[:, None]).to(tl.int32)
                if COMPACT:
                    n = _pack(sk, se, n, key, tl.zeros([BLOCK], dtype=tl.float32), lo, hi)
        count = tl.sum(cnt, axis=1)
        if FP64:
            return count, tl.sum(acc, axis=1), tl.sum(z_acc, axis=0), n
        mass = tl.sum(acc.to(tl.float64) - comp.to(tl.float64), axis=1)
        return count, mass, tl.sum(z_acc.to(tl.float64) - z_comp.to(tl.float64), axis=0), n

    @triton.jit
    def _pack(sk, se, n, key, e, lo, hi):
        """Append the block's tokens with lo < key <= hi, in order, after the ``n`` already in the scratch row."""
        inside = (key > lo) & (key <= hi)
        at = n + tl.cumsum(inside.to(tl.int32), axis=0) - 1
        tl.store(sk + at, key, mask=inside)
        tl.store(se + at, e, mask=inside)
        return n + tl.sum(inside.to(tl.int32), axis=0)

    @triton.jit
    def _reduce_packed(sk, se, n, cand, NC: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
        """``_reduce`` over the ``n`` compacted (key, e) of the bracket: counts and masses above each candidate."""
        cnt = tl.zeros([NC, BLOCK], dtype=tl.int32)
        if FP64:
            acc = tl.zeros([NC, BLOCK], dtype=tl.float64)
            comp = tl.zeros([NC, BLOCK], dtype=tl.float64)  # unused
        else:
            acc = tl.zeros([NC, BLOCK], dtype=tl.float32)
            comp = tl.zeros([NC, BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < n
            key = tl.load(sk + offs, mask=valid, other=-2147483648)
            e = tl.load(se + offs, mask=valid, other=0.0)
            above = key[None, :] > cand[:, None]
            cnt += above.to(tl.int32)
            if FP64:
                acc += tl.where(above, e.to(tl.float64)[None, :], 0.0)
            else:
                acc, comp = _kahan(acc, comp, tl.where(above, e[None, :], 0.0))
        count = tl.sum(cnt, axis=1)
        if FP64:
            return count, tl.sum(acc, axis=1)
        return count, tl.sum(acc.to(tl.float64) - comp.to(tl.float64), axis=1)

    @triton.jit
    def _value_of(k, KIND: tl.constexpr):
        """The fp32 value (``s`` for fp32 logits, the logit otherwise) whose key is ``k`` (int64): ``_fold``'s
        inverse."""
        k32 = k.to(tl.int32)
        if KIND == 0:
            return tl.where(k32 >= 0, k32, k32 ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
        b = tl.where(k32 >= 0, k32, k32 ^ 0x7FFF)
        if KIND == 1:
            return (b << 16).to(tl.float32, bitcast=True)
        return b.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _key_near(v, KIND: tl.constexpr):
        """A key near the fp32 value ``v`` (rounded to the key's format): any integer key is a valid threshold."""
        if KIND == 0:
            b = v.to(tl.int32, bitcast=True)
        elif KIND == 1:
            b = v.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32)
        else:
            b = v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        return _fold(b, KIND).to(tl.int64)

    @triton.jit
    def _split(lo, hi, by_value, NC: tl.constexpr, KIND: tl.constexpr):
        """NC candidate thresholds in (lo, hi] (int64 (NC,), non-decreasing) and whether they split the bracket
        evenly in value (while ``by_value``, both ends finite and the bracket > 64 keys: a row's tokens are spread
        far more evenly in value than in key, which is logarithmic, so fewer are left in the bracket) or else in
        key (NC + 1 near-equal parts, distinct while they fit)."""
        c = tl.arange(1, NC + 1)
        by_key = lo + ((hi - lo) * c.to(tl.int64) + NC) // (NC + 1)
        v_lo = _value_of(lo + 1, KIND)
        width = _value_of(hi, KIND) - v_lo
        use = by_value & (tl.abs(width) < float("inf")) & (hi - lo > 64)
        at = tl.where(use, v_lo, 0.0) + tl.where(use, width, 0.0) * (c.to(tl.float32) / (NC + 1))
        by_val = tl.minimum(tl.maximum(_key_near(at, KIND), lo + 1), hi)
        return tl.where(use, by_val, by_key), use

    @triton.jit
    def _narrow(lo, hi, cnt_lo, cnt_hi, mass_hi, cand, count, mass, k_lim, limit):
        """The bracket after one pass: ``hi`` the least candidate passing ``ok`` (count < top_k and mass <
        top_p * Z), ``lo`` the greatest failing one (``ok`` is monotone in the threshold), with the count above
        each end and the mass above ``hi``."""
        ok = (count < k_lim) & (mass < limit)
        return (tl.max(tl.where(ok, lo, cand), axis=0), tl.min(tl.where(ok, cand, hi), axis=0),
                tl.min(tl.where(ok, cnt_lo, count), axis=0), tl.max(tl.where(ok, count, cnt_hi), axis=0),
                tl.max(tl.where(ok, mass, mass_hi), axis=0))

    @triton.jit
    def _argmax_update(best_v, best_i, x, offs):
        """Lane-wise running argmax: a lane keeps its first maximum (its tokens come in increasing order)."""
        take = x > best_v
        return tl.where(take, x, best_v), tl.where(take, offs, best_i)

    @triton.jit
    def _argmax_final(best_v, best_i):
        """The first index among the lanes' maxima (``torch.argmax``'s rule: the lowest index of the maximum)."""
        top = tl.max(best_v, axis=0)
        return tl.min(tl.where(best_v == top, best_i, 2147483647), axis=0)

    @triton.jit
    def _sample_kernel(x_ptr, stride, V, temp_ptr, klim_ptr, topp_ptr, seed_ptr, step_ptr, out_ptr, thr_ptr,
                       sk_ptr, se_ptr, CAP,
                       KIND: tl.constexpr, WRITE_THR: tl.constexpr, FILTER: tl.constexpr, NC: tl.constexpr,
                       FP64: tl.constexpr, VALUE_SPLIT: tl.constexpr, BLOCK: tl.constexpr,
                       ACCURATE: tl.constexpr):
        row = tl.program_id(0)
        base = x_ptr + row.to(tl.int64) * stride
        lane_v = tl.full([BLOCK], float("-inf"), tl.float32)
        lane_i = tl.arange(0, BLOCK)
        lane_lo = tl.full([BLOCK], float("inf"), tl.float32)
        for start in range(0, V, BLOCK):  # pass 1: greedy, and the row's range
            offs = start + tl.arange(0, BLOCK)
            valid = offs < V
            x, raw = _load_row(base, offs, valid, KIND)
            lane_v, lane_i = _argmax_update(lane_v, lane_i, x, offs)
            if FILTER:
                lane_lo = tl.minimum(lane_lo, tl.where(valid, x, float("inf")))
        best_v = tl.max(lane_v, axis=0)
        result = _argmax_final(lane_v, lane_i)
        W: tl.constexpr = 32 if KIND == 0 else 16
        thr = tl.full([], -(2**(W - 1)), tl.int64)  # keep key >= thr: everything
        temp = tl.load(temp_ptr + row)
        if temp > 0:
            tk = tl.maximum(temp, 1e-6)
            m = tl.math.div_rn(best_v, tk)  # max(s): division by tk > 0 is monotone
            if FILTER:
                k_lim = tl.load(klim_ptr + row)
                top_p = tl.load(topp_ptr + row)
                use_p = top_p < 1.0
                if (k_lim < 2147483647) | use_p:
                    # bracket (lo, hi]: ok(hi) (nothing is above the largest key), and below the least key every
                    # threshold keeps the whole row, so the least passing threshold in it keeps what torch's does
                    lo = _key_of(tl.min(lane_lo, axis=0), tk, KIND) - 1
                    hi = _key_of(best_v, tk, KIND)
                    cnt_lo = V + tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)  # every token is above lo
                    cnt_hi = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)  # none above hi
                    mass_hi = tl.sum(tl.zeros([BLOCK], dtype=tl.float64), axis=0)
                    sk = sk_ptr + row.to(tl.int64) * CAP
                    se = se_ptr + row.to(tl.int64) * CAP
                    by_value = VALUE_SPLIT
                    cand, used = _split(lo, hi, by_value, NC, KIND)
                    count, mass, z, n = _reduce(base, V, cand.to(tl.int32), tk, m, use_p, True, NC, KIND, FP64,
                                                BLOCK, ACCURATE, False, 0, 0, sk, se)
                    limit = tl.where(use_p, top_p * z, float("inf"))
                    width = hi - lo
                    lo, hi, cnt_lo, cnt_hi, mass_hi = _narrow(lo, hi, cnt_lo, cnt_hi, mass_hi, cand, count, mass,
                                                              k_lim, limit)
                    # a value split that shrank the bracket less than a key split would have ends value splits
                    by_value = by_value & ((~used) | ((hi - lo) * (NC + 1) <= width))
                    packed = n * 0  # 1 once the bracket's tokens sit in the scratch row
                    c0 = cnt_hi * 0
                    m0 = mass_hi * 0.0
                    while hi - lo > 1:
                        cand, used = _split(lo, hi, by_value, NC, KIND)
                        width = hi - lo
                        if packed == 1:  # only the compacted tokens: the ones above their bracket are offsets
                            count, mass = _reduce_packed(sk, se, n, cand.to(tl.int32), NC, FP64, BLOCK)
                            count += c0
                            mass += m0
                        elif (cnt_lo - cnt_hi <= CAP) & (hi - lo > (NC + 1) * (NC + 1)):
                            # few tokens in the bracket, and >= 3 passes to go (packing costs ~1 pass): pack them
                            count, mass, z, n = _reduce(base, V, cand.to(tl.int32), tk, m, use_p, False, NC, KIND,
                                                        FP64, BLOCK, ACCURATE, True, lo.to(tl.int32),
                                                        hi.to(tl.int32), sk, se)
                            packed = n * 0 + 1
                            c0 = cnt_hi
                            m0 = mass_hi
                        else:
                            count, mass, z, n = _reduce(base, V, cand.to(tl.int32), tk, m, use_p, False, NC, KIND,
                                                        FP64, BLOCK, ACCURATE, False, 0, 0, sk, se)
                        lo, hi, cnt_lo, cnt_hi, mass_hi = _narrow(lo, hi, cnt_lo, cnt_hi, mass_hi, cand, count, mass,
                                                                  k_lim, limit)
                        by_value = by_value & ((~used) | ((hi - lo) * (NC + 1) <= width))
                    thr = tl.where(limit > 0, hi, 2**(W - 1) - 1)  # top_p = 0: no threshold passes, torch keeps
                    # only keys above the largest finite one, i.e. nothing
            thr32 = thr.to(tl.int32)
            rkey = _row_key(seed_ptr, step_ptr, row)
            lane_v = tl.full([BLOCK], float("-inf"), tl.float32)
            lane_i = tl.arange(0, BLOCK)
            for start in range(0, V, BLOCK):  # the Gumbel-max draw over the kept tokens
                offs = start + tl.arange(0, BLOCK)
                valid = offs < V
                x, raw = _load_row(base, offs, valid, KIND)
                s = tl.math.div_rn(x, tk)
                noisy = _gumbel(offs, rkey, ACCURATE) + s  # -inf outside the row (x = -inf there)
                if FILTER:
                    noisy = tl.where(_keys(raw, s, valid, KIND) >= thr32, noisy, float("-inf"))
                lane_v, lane_i = _argmax_update(lane_v, lane_i, noisy, offs)
            result = _argmax_final(lane_v, lane_i)
        tl.store(out_ptr + row, result.to(tl.int64))
        if WRITE_THR:  # tests: the threshold key itself
            tl.store(thr_ptr + row, thr)

    # ---- the split-row path: (row, chunk) programs, a fixed number of launches (see ``_launch_split``) ----

    @triton.jit
    def _load_vals(base, offs, valid, KIND: tl.constexpr):
        """fp32 logit values of a tile, NaN outside the row (every compare is false there)."""
        if KIND == 0:
            x = tl.load(base + offs, mask=valid, other=float("nan"))
        else:
            raw = tl.load(base + offs, mask=valid, other=0).to(tl.int32)
            if KIND == 1:
                x = (raw << 16).to(tl.float32, bitcast=True)
            else:
                x = raw.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            x = tl.where(valid, x, float("nan"))
        return x

    @triton.jit
    def _lg2_fast(x, ACCURATE: tl.constexpr):
        """log2 by the SFU (PTX ``lg2.approx.f32``: absolute error <= 2^-22.6 on [0.5, 2], 2 ulp elsewhere);
        numpy's log2 under the interpreter."""
        if ACCURATE:
            return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        return tl.log2(x)

    @triton.jit
    def _gumbel_fast(offs, rkey, ACCURATE: tl.constexpr):
        """``_gumbel`` within 2^-15 (absolute) in a few SFU ops: ``w = -ln(u)`` by its series for ``1 - u < 2^-6``
        (relative error < 2^-21; the SFU's absolute error would swamp it there), else ``-lg2(u) ln 2`` (relative
        error < 8e-6 as ``|log2 u| > 0.0225``); then ``g = -lg2(w) ln 2`` (+ 24 x 2^-22 ln 2 for ``|log2 w| <= 24``).
        The draw ranks tokens by it and checks the winner exactly (``_verified_best``)."""
        u = _uniform(offs, rkey)
        d = 1.0 - u  # exact (Sterbenz) where the series is used
        series = d * (1.0 + d * (0.5 + d * (0.3333333333333333 + d * 0.25)))
        w = tl.where(d < 0.015625, series, _lg2_fast(u, ACCURATE) * -0.6931471805599453)
        return _lg2_fast(w, ACCURATE) * -0.6931471805599453

    @triton.jit
    def _top2_update(a1, i1, a2, a, offs):
        """Lane-wise best (value, first index) and second-best value of the approximate scores."""
        take = a > a1
        a2 = tl.where(take, a1, tl.maximum(a2, a))
        return tl.where(take, a, a1), tl.where(take, offs, i1), a2

    @triton.jit
    def _clear_winner(a1, i1, a2, delta, BLOCK: tl.constexpr):
        """From the lanes' top two approximate scores: the best token, and whether every other token scores at
        least ``2 delta`` below it (then it is the exact argmax whatever each score's error below ``delta``)."""
        best = tl.max(a1, axis=0)
        lane = tl.argmax(a1, axis=0, tie_break_left=True)
        others = tl.where(tl.arange(0, BLOCK) == lane, a2, a1)
        winner = tl.min(tl.where(a1 == best, i1, 2147483647), axis=0)
        return best, winner, tl.max(others, axis=0) < best - 2.0 * delta

    @triton.jit
    def _stats_kernel(x_ptr, stride, V, smax_ptr, sidx_ptr, smin_ptr, sminf_ptr, sninf_ptr, NCH,
                      CHUNK: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr):
        """Per (row, chunk): the max logit and its first index, the min, the min finite logit and the number of
        -inf logits (one read of the chunk)."""
        row = tl.program_id(0)
        c = tl.program_id(1)
        base = x_ptr + row.to(tl.int64) * stride
        c0 = c * CHUNK
        lane_v = tl.full([BLOCK], float("-inf"), tl.float32)
        lane_i = c0 + tl.arange(0, BLOCK)
        lane_lof = tl.full([BLOCK], float("inf"), tl.float32)
        ninf = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, tl.minimum(V - c0, CHUNK), BLOCK):
            offs = c0 + start + tl.arange(0, BLOCK)
            valid = offs < V
            x, raw = _load_row(base, offs, valid, KIND)  # -inf outside the row
            lane_v, lane_i = _argmax_update(lane_v, lane_i, x, offs)
            neg_inf = x == float("-inf")
            lane_lof = tl.minimum(lane_lof, tl.where(neg_inf, float("inf"), x))
            ninf += (valid & neg_inf).to(tl.int32)
        at = row.to(tl.int64) * NCH + c
        n_inf = tl.sum(ninf, axis=0)
        lof = tl.min(lane_lof, axis=0)
        tl.store(smax_ptr + at, tl.max(lane_v, axis=0))
        tl.store(sidx_ptr + at, _argmax_final(lane_v, lane_i))
        tl.store(smin_ptr + at, tl.where(n_inf > 0, float("-inf"), lof))
        tl.store(sminf_ptr + at, lof)
        tl.store(sninf_ptr + at, n_inf)

    @triton.jit
    def _row_best(v_ptr, i_ptr, row, NCH, NCHP: tl.constexpr):
        """The best of a row's per-chunk (value, first index): the max, and the least index holding it
        (``torch.argmax``'s rule; the chunks cover increasing token ranges)."""
        ch = tl.arange(0, NCHP)
        at = row.to(tl.int64) * NCH + ch
        v = tl.load(v_ptr + at, mask=ch < NCH, other=float("-inf"))
        i = tl.load(i_ptr + at, mask=ch < NCH, other=2147483647)
        top = tl.max(v, axis=0)
        return top, tl.min(tl.where((v == top) & (ch < NCH), i, 2147483647), axis=0)

    @triton.jit
    def _bracket0(smax_ptr, smin_ptr, sminf_ptr, sninf_ptr, row, NCH, V, tk, k_lim, top_p, use_p,
                  NCHP: tl.constexpr, KIND: tl.constexpr):
        """The first threshold bracket (lo, hi] of a filtered row, ``m = max(s)`` and the approximate passes'
        error bounds (relative, absolute).

        ``hi = key(max)`` passes (nothing is above it). ``lo`` fails: below the least key every token is above it
        (count V >= top_k, or mass Z >= top_p * Z); -inf logits (bans) are below every finite cut that fails at the
        least finite key (top-p rows, or top-k rows with top_k <= the finite count), so lo starts there and the
        value splits see a finite range; on top-p rows, every key whose ``s <= m - d`` with
        ``d = ln(V / (1 - top_p)) + 2`` fails too (the tokens at or below it hold < e^-2 (1 - top_p) of Z), which
        cuts off far outliers (a -100 logit bias)."""
        ch = tl.arange(0, NCHP)
        cm = ch < NCH
        at = row.to(tl.int64) * NCH + ch
        xmax = tl.max(tl.load(smax_ptr + at, mask=cm, other=float("-inf")), axis=0)
        xmin = tl.min(tl.load(smin_ptr + at, mask=cm, other=float("inf")), axis=0)
        xminf = tl.min(tl.load(sminf_ptr + at, mask=cm, other=float("inf")), axis=0)
        ninf = tl.sum(tl.load(sninf_ptr + at, mask=cm, other=0), axis=0)
        m = tl.math.div_rn(xmax, tk)
        hi = _key_of(xmax, tk, KIND)
        lo = _key_of(xmin, tk, KIND) - 1
        fin = (xminf < float("inf")) & (use_p | (V - ninf >= k_lim))
        lo = tl.where(fin, tl.maximum(lo, _key_of(tl.where(fin, xminf, xmax), tk, KIND) - 1), lo)
        if use_p:
            d = tl.log((V * 1.0 / (1.0 - top_p)).to(tl.float32)) + 2.0
            s_f = m - d - 1.0
            if KIND == 0:
                k_f = _key_near(s_f, KIND)
                s_k = _value_of(k_f, KIND)
            else:
                k_f = _key_near(s_f * tk, KIND)
                s_k = tl.math.div_rn(_value_of(k_f, KIND), tk)
            good = (s_k <= m - d) & (tl.abs(m) < 1e6)  # checked on the key itself: rounding cannot break it
            lo = tl.where(good, tl.maximum(lo, k_f), lo)
        # approximate masses (``_approx_chunk``): exp2 of a product instead of expf of a quotient, fp32 sums of
        # VEC terms; per token |e~ - e| <= rel * e where e > 2^-40 (|s - m| < 28), and <= 2^-39 below: bounds x4
        rel = tl.where(tl.abs(m) < 1e5, 4.0 * (2.0**-20 * (2.0 * tl.abs(m) + 28.0) + 2.0**-19 + 2.0**-20),
                       float("inf"))
        return lo, hi, m, rel.to(tl.float64), V * 2.0**-37

    @triton.jit
    def _narrow_approx(lo, hi, by_value, pc_ptr, pm_ptr, pz_ptr, at0, NCH, k_lim, use_p, top_p, rel, absl,
                       NC: tl.constexpr, NCHP: tl.constexpr, KIND: tl.constexpr):
        """The bracket after one approximate pass, from its per-chunk counts and masses: a candidate is certainly
        ok (count < top_k, mass < top_p * Z beyond the error bound of both sides) or certainly failing, else
        uncertain (kept inside the new bracket: it stays exact, only wider). Counts exist on top-k rows only,
        masses on top-p rows only."""
        cand, used = _split(lo, hi, by_value, NC, KIND)
        ch = tl.arange(0, NCHP)
        j = tl.arange(0, NC)
        idx = (at0 + ch)[:, None] * NC + j[None, :]
        no_k = k_lim == 2147483647
        cnt = tl.sum(tl.load(pc_ptr + idx, mask=(ch < NCH)[:, None], other=0), axis=0)  # unwritten: no_k
        cnt_ok = no_k | (cnt < k_lim)
        ok = cnt_ok
        fail = ~cnt_ok
        if use_p:
            mass = tl.sum(tl.load(pm_ptr + idx, mask=(ch < NCH)[:, None], other=0.0), axis=0)
            z = tl.sum(tl.load(pz_ptr + at0 + ch, mask=ch < NCH, other=0.0), axis=0)
            band = 2.0 * (rel * (z * (1.0 + rel) + absl) + absl)  # mass error + limit error
            limit = top_p * z
            ok = cnt_ok & (mass < limit - band)
            fail = fail | (mass >= limit + band)
        closed = hi - lo <= 1
        nlo = tl.max(tl.where(fail, cand, lo), axis=0)
        nhi = tl.min(tl.where(ok, cand, hi), axis=0)
        # value splits stay on (the exact search's switch to key splits when they narrow the key range slower
        # would fire on every cut near 0, where a value bin spans most keys: the tokens, not keys, count here)
        return tl.where(closed, lo, nlo), tl.where(closed, hi, nhi), by_value

    @triton.jit
    def _bracket(smax_ptr, smin_ptr, sminf_ptr, sninf_ptr, pc_ptr, pm_ptr, pz_ptr, row, NCH, R, V, tk, k_lim,
                 top_p, use_p, PASSES: tl.constexpr, NC: tl.constexpr, NCHP: tl.constexpr, KIND: tl.constexpr,
                 VALUE_SPLIT: tl.constexpr):
        """The bracket after the first ``PASSES`` approximate passes (every program of a row computes the same)."""
        lo, hi, m, rel, absl = _bracket0(smax_ptr, smin_ptr, sminf_ptr, sninf_ptr, row, NCH, V, tk, k_lim, top_p,
                                         use_p, NCHP, KIND)
        by_value = hi > lo
        if not VALUE_SPLIT:
            by_value = hi < lo
        at0 = row.to(tl.int64) * NCH
        for q in tl.static_range(PASSES):
            off = q * R * NCH
            lo, hi, by_value = _narrow_approx(lo, hi, by_value, pc_ptr + off * NC, pm_ptr + off * NC, pz_ptr + off,
                                              at0, NCH, k_lim, use_p, top_p, rel, absl, NC, NCHP, KIND)
        return lo, hi, by_value, m

    @triton.jit
    def _approx_chunk(base, V, c0, tk, m, v, NC: tl.constexpr, CHUNK: tl.constexpr, BR: tl.constexpr,
                      VEC: tl.constexpr, KIND: tl.constexpr, WITH_COUNT: tl.constexpr, WITH_MASS: tl.constexpr):
        """``_approx_kernel``'s loop over one chunk (no branch inside: each compare feeds its count and its mass
        right away). Tiles are (1, BR, VEC): a thread's VEC tokens are summed first, so the accumulators are
        (NC, BR) and the tile keeps the vector load's layout."""
        cnt = tl.zeros([NC, BR], dtype=tl.int32)
        mass = tl.zeros([NC, BR], dtype=tl.float64)
        z = tl.zeros([1, BR], dtype=tl.float64)
        tile = (tl.arange(0, BR)[:, None] * VEC + tl.arange(0, VEC)[None, :])[None, :, :]
        v3 = v[:, None, None]
        a = 1.4426950408889634 / tk
        b = m * 1.4426950408889634
        for start in range(0, tl.minimum(V - c0, CHUNK), BR * VEC):
            offs = c0 + start + tile
            valid = offs < V
            x = _load_vals(base, offs, valid, KIND)
            if KIND == 0:
                y = tl.math.div_rn(x, tk)  # fp32 logits: keys of s itself
            else:
                y = x
            above = y >= v3  # (NC, BR, VEC)
            if WITH_COUNT:
                cnt += tl.sum(above.to(tl.int32), axis=2)
            if WITH_MASS:
                if KIND == 0:
                    e = tl.exp2((y - m) * 1.4426950408889634)
                else:
                    e = tl.exp2(x * a - b)
                e = tl.where(valid, e, 0.0)
                z += tl.sum(e, axis=2).to(tl.float64)
                mass += tl.sum(tl.where(above, e, 0.0), axis=2).to(tl.float64)
        return cnt, mass, z

    @triton.jit(do_not_specialize=["R"])  # the batch's rows: one compile for every batch size
    def _approx_kernel(x_ptr, stride, V, temp_ptr, klim_ptr, topp_ptr, smax_ptr, smin_ptr, sminf_ptr, sninf_ptr,
                       pc_ptr, pm_ptr, pz_ptr, NCH, R, PASS: tl.constexpr, NC: tl.constexpr, NCHP: tl.constexpr,
                       CHUNK: tl.constexpr, BR: tl.constexpr, VEC: tl.constexpr, KIND: tl.constexpr,
                       VALUE_SPLIT: tl.constexpr):
        """Approximate pass ``PASS`` of a filtered row over one chunk: per candidate threshold of the bracket the
        exact count above it (top-k rows) and an approximate mass (top-p rows: ``exp2`` of a product, fp32 sums of
        VEC terms added in fp64), and the approximate Z."""
        row = tl.program_id(0)
        c = tl.program_id(1)
        temp = tl.load(temp_ptr + row)
        k_lim = tl.load(klim_ptr + row)
        top_p = tl.load(topp_ptr + row)
        use_p = top_p < 1.0
        use_k = k_lim < 2147483647
        if (temp > 0) & (use_k | use_p):
            tk = tl.maximum(temp, 1e-6)
            lo, hi, by_value, m = _bracket(smax_ptr, smin_ptr, sminf_ptr, sninf_ptr, pc_ptr, pm_ptr, pz_ptr, row,
                                           NCH, R, V, tk, k_lim, top_p, use_p, PASS, NC, NCHP, KIND, VALUE_SPLIT)
            if hi - lo > 1:
                cand, used = _split(lo, hi, by_value, NC, KIND)
                v = _value_of(cand + 1, KIND)  # key > cand  <=>  value >= v (-0 folded: see _value_of)
                base = x_ptr + row.to(tl.int64) * stride
                c0 = c * CHUNK
                if use_p & use_k:
                    cnt, mass, z = _approx_chunk(base, V, c0, tk, m, v, NC, CHUNK, BR, VEC, KIND, True, True)
                elif use_p:
                    cnt, mass, z = _approx_chunk(base, V, c0, tk, m, v, NC, CHUNK, BR, VEC, KIND, False, True)
                else:
                    cnt, mass, z = _approx_chunk(base, V, c0, tk, m, v, NC, CHUNK, BR, VEC, KIND, True, False)
                at = PASS * R * NCH + row.to(tl.int64) * NCH + c
                j = tl.arange(0, NC)
                tl.store(pc_ptr + at * NC + j, tl.sum(cnt, axis=1))
                tl.store(pm_ptr + at * NC + j, tl.sum(mass, axis=1))
                tl.store(pz_ptr + at, tl.sum(tl.sum(z, axis=1), axis=0))

    @triton.jit
    def _pack_chunk(base, V, c0, n_end, tk, lo, hi, cin, sk, si, CAPC, BLOCK: tl.constexpr, PB: tl.constexpr,
                    KIND: tl.constexpr):
        """Write the chunk's tokens with lo < key <= hi (key, token index) to its scratch segment, lane-major (lane
        j's tokens from the exclusive prefix sum of the lanes' counts ``cin`` on): one scan per chunk instead of
        one per block, still deterministic; the finishing program is order-free (it sums and takes the least
        index of the best). Tokens past the segment's capacity are not stored (the row then takes full-row
        passes)."""
        lanes = tl.sum(tl.reshape(cin, [BLOCK // PB, PB]), axis=0)  # lanes of PB tokens: one token per thread,
        pos = tl.cumsum(lanes, axis=0) - lanes  # so the scattered stores need no layout change
        for start in range(0, n_end, PB):
            offs = c0 + start + tl.arange(0, PB)
            valid = offs < V
            x, raw = _load_row(base, offs, valid, KIND)
            if KIND == 0:
                x = tl.math.div_rn(x, tk)
            key = _keys(raw, x, valid, KIND)
            inside = (key > lo) & (key <= hi)
            tl.store(sk + pos, key, mask=inside & (pos < CAPC))
            tl.store(si + pos, offs, mask=inside & (pos < CAPC))
            pos += inside.to(tl.int32)

    @triton.jit
    def _row_absmax(smax_ptr, sminf_ptr, row, NCH, NCHP: tl.constexpr):
        """max(|max logit|, |min finite logit|) of the row, from the chunk stats."""
        ch = tl.arange(0, NCHP)
        at = row.to(tl.int64) * NCH + ch
        hi = tl.max(tl.load(smax_ptr + at, mask=ch < NCH, other=0.0), axis=0)
        lo = tl.min(tl.load(sminf_ptr + at, mask=ch < NCH, other=0.0), axis=0)
        return tl.maximum(tl.where(hi > float("-inf"), tl.abs(hi), 0.0), tl.where(lo < float("inf"), tl.abs(lo), 0.0))

    @triton.jit
    def _exact_best(base, V, c0, n_end, tk, rkey, top, FILTER: tl.constexpr, BLOCK: tl.constexpr,
                    KIND: tl.constexpr, ACCURATE: tl.constexpr):
        """The chunk's exact draw (libdevice logs): the argmax of ``s + g`` over its tokens with key > top (all
        tokens without FILTER), first index. The fallback of a chunk whose approximate winner is not clear."""
        lane_v = tl.full([BLOCK], float("-inf"), tl.float32)
        lane_i = c0 + tl.arange(0, BLOCK)
        for start in range(0, n_end, BLOCK):
            offs = c0 + start + tl.arange(0, BLOCK)
            valid = offs < V
            x, raw = _load_row(base, offs, valid, KIND)
            s = tl.math.div_rn(x, tk)
            noisy = _gumbel(offs, rkey, ACCURATE) + s
            if FILTER:
                noisy = tl.where(_keys(raw, s, valid, KIND) > top, noisy, float("-inf"))
            lane_v, lane_i = _argmax_update(lane_v, lane_i, noisy, offs)
        return tl.max(lane_v, axis=0), _argmax_final(lane_v, lane_i)

    @triton.jit
    def _verified_best(base, V, c0, n_end, tk, rkey, top, a1, i1, a2, delta, FILTER: tl.constexpr,
                       BLOCK: tl.constexpr, KIND: tl.constexpr, ACCURATE: tl.constexpr):
        """The chunk's exact (value, first index) of the draw from its approximate top two: the clear winner's
        exact score (one token), else the exact pass over the chunk."""
        best, winner, clear = _clear_winner(a1, i1, a2, delta, BLOCK)
        v = best
        i = winner
        if best == float("-inf"):  # nothing kept in this chunk
            i = c0
        elif clear:
            x, raw = _load_row(base, winner, winner < V, KIND)
            v = _gumbel(winner, rkey, ACCURATE) + tl.math.div_rn(x, tk)
        else:
            v, i = _exact_best(base, V, c0, n_end, tk, rkey, top, FILTER, BLOCK, KIND, ACCURATE)
        return v, i

    @triton.jit(do_not_specialize=["R"])  # the batch's rows: one compile for every batch size
    def _draw_kernel(x_ptr, stride, V, temp_ptr, klim_ptr, topp_ptr, seed_ptr, step_ptr, smax_ptr, sidx_ptr,
                     smin_ptr, sminf_ptr, sninf_ptr, pc_ptr, pm_ptr, pz_ptr, sk_ptr, si_ptr, CAPC,
                     dz_ptr, dm_ptr, dc_ptr, dn_ptr, dbv_ptr, dbi_ptr, NCH, R, PASSES: tl.constexpr,
                     NC: tl.constexpr, NCHP: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                     KIND: tl.constexpr, VALUE_SPLIT: tl.constexpr, FILTER: tl.constexpr, ACCURATE: tl.constexpr,
                     PB: tl.constexpr):
        """The exact pass over one chunk: the Gumbel-max draw over the tokens certainly kept (above the final
        bracket, or all of an unfiltered row), ranked by ``_gumbel_fast`` and the winner checked exactly; fp64 Z,
        mass and count above the bracket; the bracket's tokens packed (key, index) into the chunk's segment of the
        row's scratch. Without FILTER (no row filters) it also writes the chunk's (max, first index) for the
        greedy rows: one read in all."""
        row = tl.program_id(0)
        c = tl.program_id(1)
        c0 = c * CHUNK
        base = x_ptr + row.to(tl.int64) * stride
        at = row.to(tl.int64) * NCH + c
        temp = tl.load(temp_ptr + row)
        tk = tl.maximum(temp, 1e-6)
        rkey = _row_key(seed_ptr, step_ptr, row)
        a1 = tl.full([BLOCK], float("-inf"), tl.float32)
        a2 = tl.full([BLOCK], float("-inf"), tl.float32)
        i1 = c0 + tl.arange(0, BLOCK)
        n_end = tl.minimum(V - c0, CHUNK)
        best_v = tl.max(a1, axis=0)
        best_i = c0
        if not FILTER:  # greedy (the chunk's max and first index) and the draw over every token
            g_v = tl.full([BLOCK], float("-inf"), tl.float32)
            g_i = c0 + tl.arange(0, BLOCK)
            r = 1.0 / tk
            big = tl.zeros([BLOCK], dtype=tl.float32)
            sampled = temp > 0
            for start in range(0, n_end, BLOCK):
                offs = c0 + start + tl.arange(0, BLOCK)
                valid = offs < V
                x, raw = _load_row(base, offs, valid, KIND)
                g_v, g_i = _argmax_update(g_v, g_i, x, offs)
                if sampled:
                    big = tl.maximum(big, tl.where(x > float("-inf"), tl.abs(x), 0.0))
                    a1, i1, a2 = _top2_update(a1, i1, a2, _gumbel_fast(offs, rkey, ACCURATE) + x * r, offs)
            tl.store(smax_ptr + at, tl.max(g_v, axis=0))
            tl.store(sidx_ptr + at, _argmax_final(g_v, g_i))
            if sampled:  # |x r - x / T| <= |s| 2^-22, the gumbel's 2^-15, two roundings of |s + g| <= |s| + 20
                delta = 2.0**-14 + (tl.max(big, axis=0) * r + 20.0) * 2.0**-20
                best_v, best_i = _verified_best(base, V, c0, n_end, tk, rkey, 0, a1, i1, a2, delta, False, BLOCK,
                                                KIND, ACCURATE)
        elif temp > 0:
            k_lim = tl.load(klim_ptr + row)
            top_p = tl.load(topp_ptr + row)
            use_p = top_p < 1.0
            filt = (k_lim < 2147483647) | use_p
            z = tl.zeros([BLOCK], dtype=tl.float64)
            mhi = tl.zeros([BLOCK], dtype=tl.float64)
            chi = tl.zeros([BLOCK], dtype=tl.int32)
            top = tl.full([], -2147483648, tl.int32)  # unfiltered rows: every valid key is above it
            n = c0 * 0
            if filt:
                lo, hi, by_value, m = _bracket(smax_ptr, smin_ptr, sminf_ptr, sninf_ptr, pc_ptr, pm_ptr, pz_ptr, row,
                                               NCH, R, V, tk, k_lim, top_p, use_p, PASSES, NC, NCHP, KIND,
                                               VALUE_SPLIT)
                closed = hi - lo <= 1
                wide = hi - lo > 1
                lo32 = lo.to(tl.int32)
                hi32 = hi.to(tl.int32)
                top = tl.where(closed, hi32 - 1, hi32)  # drawn here: key > top (a closed bracket: thr = hi)
                cin = tl.zeros([BLOCK], dtype=tl.int32)
                for start in range(0, n_end, BLOCK):
                    offs = c0 + start + tl.arange(0, BLOCK)
                    valid = offs < V
                    x, raw = _load_row(base, offs, valid, KIND)
                    s = tl.math.div_rn(x, tk)
                    key = _keys(raw, s, valid, KIND)
                    above = key > hi32
                    if use_p:
                        e = _exp(s - m, ACCURATE).to(tl.float64)  # 0 outside the row (x = -inf)
                        z += e
                        mhi += tl.where(above, e, 0.0)
                    chi += above.to(tl.int32)
                    cin += ((key > lo32) & (key <= hi32)).to(tl.int32)
                    kept = key > top
                    a1, i1, a2 = _top2_update(a1, i1, a2,
                                              tl.where(kept, _gumbel_fast(offs, rkey, ACCURATE) + s, float("-inf")),
                                              offs)
                n = tl.where(wide, tl.sum(cin, axis=0), 0)
                if n > 0:  # second read (from L2) of the chunk: its bracket tokens at per-lane offsets
                    _pack_chunk(base, V, c0, n_end, tk, lo32, hi32, cin, sk_ptr + at * CAPC, si_ptr + at * CAPC,
                                CAPC, BLOCK, PB, KIND)
            else:  # a sampled row without filters: every token
                for start in range(0, n_end, BLOCK):
                    offs = c0 + start + tl.arange(0, BLOCK)
                    valid = offs < V
                    x, raw = _load_row(base, offs, valid, KIND)
                    s = tl.math.div_rn(x, tk)
                    a1, i1, a2 = _top2_update(a1, i1, a2, _gumbel_fast(offs, rkey, ACCURATE) + s, offs)
            big = _row_absmax(smax_ptr, sminf_ptr, row, NCH, NCHP) / tk  # >= every finite |s| of the row
            delta = 2.0**-14 + (big + 20.0) * 2.0**-20  # the gumbel's error, two roundings of |s + g|
            best_v, best_i = _verified_best(base, V, c0, n_end, tk, rkey, top, a1, i1, a2, delta, True, BLOCK,
                                            KIND, ACCURATE)
            tl.store(dz_ptr + at, tl.sum(z, axis=0))
            tl.store(dm_ptr + at, tl.sum(mhi, axis=0))
            tl.store(dc_ptr + at, tl.sum(chi, axis=0))
            tl.store(dn_ptr + at, n)
        tl.store(dbv_ptr + at, best_v)
        tl.store(dbi_ptr + at, best_i)

    @triton.jit
    def _reduce_keys(sk_row, dn_ptr, at0, NCH, CAPC, cand, lo, hi, tk, m, WITH_MASS: tl.constexpr, NC: tl.constexpr,
                     FP64: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr, ACCURATE: tl.constexpr):
        """Counts and exact masses above each candidate over the row's packed keys (chunk segments in order),
        ``e`` recomputed from the key (the key gives the logit of 16-bit rows and ``s`` of fp32 rows: the same
        ``e`` as the full pass); and the least and greatest key inside the bracket (lo, hi]."""
        cnt = tl.zeros([NC, BLOCK], dtype=tl.int32)
        if FP64:
            acc = tl.zeros([NC, BLOCK], dtype=tl.float64)
            comp = tl.zeros([NC, BLOCK], dtype=tl.float64)  # unused
        else:
            acc = tl.zeros([NC, BLOCK], dtype=tl.float32)
            comp = tl.zeros([NC, BLOCK], dtype=tl.float32)
        kmin = tl.full([BLOCK], 2147483647, tl.int32)
        kmax = tl.full([BLOCK], -2147483648, tl.int32)
        for ch in range(0, NCH):
            n = tl.load(dn_ptr + at0 + ch)
            seg = sk_row + ch * CAPC
            for start in range(0, n, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                valid = offs < n
                key = tl.load(seg + offs, mask=valid, other=-2147483648)
                inside = (key > lo) & (key <= hi)
                kmin = tl.minimum(kmin, tl.where(inside, key, 2147483647))
                kmax = tl.maximum(kmax, tl.where(inside, key, -2147483648))
                above = key[None, :] > cand[:, None]
                cnt += above.to(tl.int32)
                if WITH_MASS:  # constexpr: no branch between a compare and its two uses
                    val = _value_of(key.to(tl.int64), KIND)
                    if KIND != 0:
                        val = tl.math.div_rn(val, tk)
                    e = tl.where(valid, _exp(val - m, ACCURATE), 0.0)
                    if FP64:
                        acc += tl.where(above, e.to(tl.float64)[None, :], 0.0)
                    else:
                        acc, comp = _kahan(acc, comp, tl.where(above, e[None, :], 0.0))
        count = tl.sum(cnt, axis=1)
        if FP64:
            return count, tl.sum(acc, axis=1), tl.min(kmin, axis=0), tl.max(kmax, axis=0)
        return (count, tl.sum(acc.to(tl.float64) - comp.to(tl.float64), axis=1), tl.min(kmin, axis=0),
                tl.max(kmax, axis=0))

    @triton.jit(do_not_specialize=["R"])  # the batch's rows: one compile for every batch size
    def _finish_kernel(x_ptr, stride, V, temp_ptr, klim_ptr, topp_ptr, seed_ptr, step_ptr, smax_ptr, sidx_ptr,
                       smin_ptr, sminf_ptr, sninf_ptr, pc_ptr, pm_ptr, pz_ptr, sk_ptr, si_ptr, CAPC,
                       dz_ptr, dm_ptr, dc_ptr, dn_ptr, dbv_ptr, dbi_ptr, out_ptr, thr_ptr, NCH, R,
                       PASSES: tl.constexpr, NC: tl.constexpr, NCHP: tl.constexpr, NCF: tl.constexpr,
                       BLOCK: tl.constexpr, KIND: tl.constexpr, VALUE_SPLIT: tl.constexpr, FILTER: tl.constexpr,
                       FP64: tl.constexpr, WRITE_THR: tl.constexpr, ACCURATE: tl.constexpr):
        """One program per row: greedy rows take the argmax; filtered rows finish the threshold search on the
        packed bracket (exact masses, ``NCF`` candidates per pass; a bracket too full to pack: full-row passes)
        and draw over its kept tokens; the chunks' draws combine with ``torch.argmax``'s first-index rule."""
        row = tl.program_id(0)
        g_max, result = _row_best(smax_ptr, sidx_ptr, row, NCH, NCHP)
        W: tl.constexpr = 32 if KIND == 0 else 16
        thr = tl.full([], -(2**(W - 1)), tl.int64)
        route = thr * 0  # ROUTES: greedy or unfiltered
        temp = tl.load(temp_ptr + row)
        if temp > 0:
            ch = tl.arange(0, NCHP)
            at = row.to(tl.int64) * NCH + ch
            best, result = _row_best(dbv_ptr, dbi_ptr, row, NCH, NCHP)
            if FILTER:
                tk = tl.maximum(temp, 1e-6)
                k_lim = tl.load(klim_ptr + row)
                top_p = tl.load(topp_ptr + row)
                use_p = top_p < 1.0
                if (k_lim < 2147483647) | use_p:
                    lo, hi, by_value, m = _bracket(smax_ptr, smin_ptr, sminf_ptr, sninf_ptr, pc_ptr, pm_ptr, pz_ptr,
                                                   row, NCH, R, V, tk, k_lim, top_p, use_p, PASSES, NC, NCHP, KIND,
                                                   VALUE_SPLIT)
                    z = tl.sum(tl.load(dz_ptr + at, mask=ch < NCH, other=0.0), axis=0)
                    mass_hi = tl.sum(tl.load(dm_ptr + at, mask=ch < NCH, other=0.0), axis=0)
                    cnt_hi = tl.sum(tl.load(dc_ptr + at, mask=ch < NCH, other=0), axis=0)
                    seg_n = tl.load(dn_ptr + at, mask=ch < NCH, other=0)
                    limit = tl.where(use_p, top_p * z, float("inf"))
                    closed = hi - lo <= 1
                    wide = hi - lo > 1
                    packed = wide & (tl.max(seg_n, axis=0) <= CAPC)
                    route = tl.where(closed, 1, tl.where(packed, 2, 3)).to(tl.int64)
                    cnt_lo = cnt_hi + tl.sum(seg_n, axis=0)  # (bookkeeping only: _narrow carries it)
                    c0 = cnt_hi
                    m0 = mass_hi
                    top32 = hi.to(tl.int32)  # the chunks drew the tokens above it
                    sk_row = sk_ptr + row.to(tl.int64) * NCH * CAPC
                    base = x_ptr + row.to(tl.int64) * stride
                    at0 = row.to(tl.int64) * NCH
                    while hi - lo > 1:
                        cand, used = _split(lo, hi, by_value, NCF, KIND)
                        width = hi - lo
                        kmin = lo.to(tl.int32) + 1
                        kmax = hi.to(tl.int32)
                        if packed & use_p:
                            count, mass, kmin, kmax = _reduce_keys(sk_row, dn_ptr, at0, NCH, CAPC, cand.to(tl.int32),
                                                                   lo.to(tl.int32), hi.to(tl.int32), tk, m, True,
                                                                   NCF, FP64, BLOCK, KIND, ACCURATE)
                            count += c0
                            mass += m0
                        elif packed:
                            count, mass, kmin, kmax = _reduce_keys(sk_row, dn_ptr, at0, NCH, CAPC, cand.to(tl.int32),
                                                                   lo.to(tl.int32), hi.to(tl.int32), tk, m, False,
                                                                   NCF, FP64, BLOCK, KIND, ACCURATE)
                            count += c0
                            mass += m0
                        else:
                            count, mass, z2, n2 = _reduce(base, V, cand.to(tl.int32), tk, m, use_p, False, NCF,
                                                          KIND, FP64, BLOCK, ACCURATE, False, 0, 0, sk_ptr, si_ptr)
                        lo, hi, cnt_lo, cnt_hi, mass_hi = _narrow(lo, hi, cnt_lo, cnt_hi, mass_hi, cand, count, mass,
                                                                  k_lim, limit)
                        by_value = by_value & ((~used) | ((hi - lo) * (NCF + 1) <= width))
                        # no token lies in (lo, kmin - 1] or (kmax, hi]: ok is the same at both ends of each, so the
                        # bracket shrinks to its occupied keys (a bracket with none: any key in it keeps the same set)
                        t_lo = tl.maximum(lo, kmin.to(tl.int64) - 1)
                        t_hi = tl.minimum(hi, kmax.to(tl.int64))
                        empty = t_hi <= t_lo
                        lo = tl.where(empty, hi - 1, t_lo)
                        hi = tl.where(empty, hi, t_hi)
                    thr = tl.where(limit > 0, hi, 2**(W - 1) - 1)
                    if limit <= 0:  # top_p = 0: nothing passes, every token is dropped (torch: argmax of -inf)
                        result = result * 0
                        route = route * 0 + 4
                    elif wide:  # the bracket's kept tokens (thr <= key <= its top), then the chunks' draws
                        rkey = _row_key(seed_ptr, step_ptr, row)
                        thr32 = thr.to(tl.int32)
                        lane_v = tl.full([BLOCK], float("-inf"), tl.float32)
                        lane_i = tl.full([BLOCK], 2147483647, tl.int32)
                        if packed:
                            si_row = si_ptr + row.to(tl.int64) * NCH * CAPC
                            for c in range(0, NCH):
                                n = tl.load(dn_ptr + at0 + c)
                                for start in range(0, n, BLOCK):
                                    offs = start + tl.arange(0, BLOCK)
                                    valid = offs < n
                                    key = tl.load(sk_row + c * CAPC + offs, mask=valid, other=-2147483648)
                                    tok = tl.load(si_row + c * CAPC + offs, mask=valid, other=0)
                                    val = _value_of(key.to(tl.int64), KIND)
                                    if KIND != 0:
                                        val = tl.math.div_rn(val, tk)
                                    noisy = tl.where(valid & (key >= thr32), _gumbel(tok, rkey, ACCURATE) + val,
                                                     float("-inf"))
                                    take = (noisy > lane_v) | ((noisy == lane_v) & (tok < lane_i) & valid)  # any order
                                    lane_v = tl.where(take, noisy, lane_v)
                                    lane_i = tl.where(take, tok, lane_i)
                        else:
                            for start in range(0, V, BLOCK):
                                offs = start + tl.arange(0, BLOCK)
                                valid = offs < V
                                x, raw = _load_row(base, offs, valid, KIND)
                                s = tl.math.div_rn(x, tk)
                                key = _keys(raw, s, valid, KIND)
                                noisy = tl.where((key >= thr32) & (key <= top32),
                                                 _gumbel(offs, rkey, ACCURATE) + s, float("-inf"))
                                lane_v, lane_i = _argmax_update(lane_v, lane_i, noisy, offs)
                        pv = tl.max(lane_v, axis=0)
                        pi = tl.min(tl.where(lane_v == pv, lane_i, 2147483647), axis=0)
                        take = (pv > best) | ((pv == best) & (pi < result))
                        result = tl.where(take, pi, result)
        tl.store(out_ptr + row, result.to(tl.int64))
        if WRITE_THR:  # tests: the threshold key, and how the row was finished (ROUTES)
            tl.store(thr_ptr + row, thr)
            tl.store(thr_ptr + R + row, route)

def sample_triton(logits: torch.Tensor, *, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  seeds: torch.Tensor, steps: torch.Tensor, any_random: bool, any_filter: bool,
                  path: str = "auto", config: SplitConfig | None = None, candidates: int = 4, block: int = 1024,
                  num_warps: int = 8, sums: str | None = None, compact: int = 16384,
                  split: str = "value") -> torch.Tensor:
    """``sampling.sample`` (same arguments, same tokens) through the kernels; logits on CUDA, or on CPU under
    ``TRITON_INTERPRET=1``. ``path``: "split" (``_launch_split``: (row, chunk) programs, knobs in ``config``),
    "row" (``_sample_kernel``: one program per row) or "auto" (``choose_path``). The row kernel's knobs:
    ``candidates`` (2, 4 or 8) thresholds tried per pass over the row; ``block`` tokens per program step and
    ``num_warps`` per program (a row); ``compact``: once at most this many tokens lie in a row's threshold
    bracket, the next pass copies them (key and probability, 8 bytes each) to a scratch row and the remaining
    passes read only those (0: never; scratch R x min(compact, V) x 8 bytes); ``split`` "value" (candidates evenly
    spaced in value while that narrows the bracket at least as fast as "key", evenly spaced in key). ``sums``
    "fp64" or "kahan" (default: ``default_sums``) for the exact masses of both paths."""
    if not any_random:
        return logits.argmax(dim=-1)
    return _launch(logits, temperature, top_k, top_p, seeds, steps, any_filter, path, config, candidates, block,
                   num_warps, sums, compact, split, False)[0]


def sample_and_threshold_triton(logits: torch.Tensor, *, temperature: torch.Tensor, top_k: torch.Tensor,
                                top_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, any_filter: bool,
                                path: str = "auto", config: SplitConfig | None = None, candidates: int = 4,
                                block: int = 1024, num_warps: int = 8, sums: str | None = None,
                                compact: int = 16384, split: str = "value") -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_triton`` (``any_random`` True) and each row's (R,) int64 threshold key (kept:
    ``sampling._order_keys`` >= it; the least key on greedy and unfiltered rows), for tests."""
    return _launch(logits, temperature, top_k, top_p, seeds, steps, any_filter, path, config, candidates, block,
                   num_warps, sums, compact, split, True)


def _launch(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
            seeds: torch.Tensor, steps: torch.Tensor, any_filter: bool, path: str, config: SplitConfig | None,
            candidates: int, block: int, num_warps: int, sums: str | None, compact: int, split: str,
            write_threshold: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not supported(logits, temperature):
        raise ValueError(f"sample_triton: needs triton and 2-D fp32/bf16/fp16 logits with fp32 temperatures, got "
                         f"{tuple(logits.shape)} {logits.dtype} / {temperature.dtype}")
    if candidates not in (2, 4, 8):
        raise ValueError(f"sample_triton: candidates must be 2, 4 or 8, got {candidates}")
    sums = sums or default_sums(logits.device)
    if sums not in ("fp64", "kahan"):
        raise ValueError(f"sample_triton: sums must be 'fp64' or 'kahan', got {sums!r}")
    if split not in ("value", "key"):
        raise ValueError(f"sample_triton: split must be 'value' or 'key', got {split!r}")
    if path not in ("auto", "split", "row"):
        raise ValueError(f"sample_triton: path must be 'auto', 'split' or 'row', got {path!r}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if path == "auto":
        path = choose_path(logits.shape[0], logits.shape[1], config)
    if path == "split":
        return _launch_split(logits, temperature, top_k, top_p, seeds, steps, any_filter, config or SplitConfig(),
                             sums, write_threshold)
    R, V = logits.shape
    kind = _KINDS[logits.dtype]
    x = logits if kind == 0 else logits.view(torch.int16)
    k_lim = torch.where(top_k > 0, top_k.clamp_max(_INT32_MAX), _INT32_MAX).to(torch.int32)
    out = torch.empty(R, dtype=torch.int64, device=logits.device)
    thr = torch.empty(R if write_threshold else 1, dtype=torch.int64, device=logits.device)
    cap = min(compact, V) if any_filter and compact > 0 else 0
    sk = torch.empty(R if cap else 1, max(cap, 1), dtype=torch.int32, device=logits.device)
    se = torch.empty(R if cap else 1, max(cap, 1), dtype=torch.float32, device=logits.device)
    _sample_kernel[(R,)](x, x.stride(0), V, temperature.contiguous(), k_lim.contiguous(),
                         top_p.double().contiguous(), seeds.long().contiguous(), steps.long().contiguous(), out, thr,
                         sk, se, cap, KIND=kind, WRITE_THR=write_threshold, FILTER=any_filter, NC=candidates, FP64=sums == "fp64",
                         VALUE_SPLIT=split == "value",
                         BLOCK=block, ACCURATE=not interpreted(), num_warps=num_warps, enable_fp_fusion=False,
                         maxnreg=_MAX_REGISTERS)
    return out, thr


def noise_triton(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int, *, gumbel: bool) -> torch.Tensor:
    """(R, V) fp32 noise the kernel draws with: ``sampling.uniform_noise`` or ``sampling.gumbel_noise``."""
    if not HAVE_TRITON:
        raise ValueError("noise_triton: needs triton")
    out = torch.empty(seeds.shape[0], vocab_size, dtype=torch.float32, device=seeds.device)
    _noise_kernel[(seeds.shape[0],)](seeds.long().contiguous(), steps.long().contiguous(), out, vocab_size,
                                     GUMBEL=gumbel, BLOCK=1024, ACCURATE=not interpreted())
    return out


ROUTES = ("greedy or unfiltered", "closed bracket", "packed", "full-row passes", "nothing kept")
LAST_ROUTES: list[int] = []  # tests: each row's route (an index into ROUTES) in the last split call with thresholds
LAST_PACKED: list[int] = []  # ... and the number of its bracket's tokens the exact pass counted (packed if they fit)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _launch_split(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  seeds: torch.Tensor, steps: torch.Tensor, any_filter: bool, cfg: SplitConfig, sums: str,
                  write_threshold: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-row path: grid (R, chunks) for the full reads, a fixed number of launches, no host sync.

    Filtered batches: ``_stats_kernel`` (max / first index / min per chunk), ``passes`` x ``_approx_kernel``,
    ``_draw_kernel`` (exact pass: draw above the bracket, packing), ``_finish_kernel`` (one program per row).
    Unfiltered batches: ``_draw_kernel`` (greedy and the draw in one read) and ``_finish_kernel``."""
    R, V = logits.shape
    kind = _KINDS[logits.dtype]
    x = logits if kind == 0 else logits.view(torch.int16)
    dev = logits.device
    nch = triton.cdiv(V, cfg.chunk)
    nchp = _pow2(nch)
    nc, passes = cfg.candidates, cfg.passes
    capc = min(cfg.chunk, max(min(cfg.compact, V) // nch, 1)) if any_filter else 1  # per chunk segment
    rc = R * nch
    np_ = passes * rc if any_filter else 0
    ws64 = torch.empty(np_ * (nc + 1) + 2 * rc, dtype=torch.float64, device=dev)
    ws32 = torch.empty(9 * rc + np_ * nc + 2 * rc * capc, dtype=torch.int32, device=dev)
    pm, pz, dz, dm = _carve(ws64, [np_ * nc, np_, rc, rc])
    smax, sidx, smin, sminf, sninf, dc, dn, dbv, dbi, pc, sk, si = _carve(ws32, [rc] * 9 + [np_ * nc] + [rc * capc] * 2)
    smax, smin, sminf, dbv = (t.view(torch.float32) for t in (smax, smin, sminf, dbv))
    temp = temperature.contiguous()
    k_lim = torch.where(top_k > 0, top_k.clamp_max(_INT32_MAX), _INT32_MAX).to(torch.int32).contiguous()
    p64 = top_p.double().contiguous()
    seeds, steps = seeds.long().contiguous(), steps.long().contiguous()
    out = torch.empty(R, dtype=torch.int64, device=dev)
    thr = torch.empty(2 * R if write_threshold else 1, dtype=torch.int64, device=dev)  # thresholds, ROUTES
    acc = not interpreted()
    vs = cfg.split == "value"
    common = dict(enable_fp_fusion=False)
    grid = (R, nch)
    if any_filter:
        _stats_kernel[grid](x, x.stride(0), V, smax, sidx, smin, sminf, sninf, nch, CHUNK=cfg.chunk, BLOCK=cfg.block,
                            KIND=kind, num_warps=cfg.num_warps, **common)
        vec = 4 if kind == 0 else 8  # 16-byte loads
        for p in range(passes):
            _approx_kernel[grid](x, x.stride(0), V, temp, k_lim, p64, smax, smin, sminf, sninf, pc, pm, pz, nch, R,
                                 PASS=p, NC=nc, NCHP=nchp, CHUNK=cfg.chunk, BR=cfg.block // vec, VEC=vec, KIND=kind,
                                 VALUE_SPLIT=vs, num_warps=cfg.num_warps, **common)
    _draw_kernel[grid](x, x.stride(0), V, temp, k_lim, p64, seeds, steps, smax, sidx, smin, sminf, sninf, pc, pm, pz,
                       sk, si, capc, dz, dm, dc, dn, dbv, dbi, nch, R, PASSES=passes, NC=nc, NCHP=nchp,
                       CHUNK=cfg.chunk, BLOCK=cfg.draw_block, KIND=kind, VALUE_SPLIT=vs, FILTER=any_filter,
                       ACCURATE=acc, PB=min(32 * cfg.num_warps, cfg.draw_block), num_warps=cfg.num_warps, **common)
    _finish_kernel[(R,)](x, x.stride(0), V, temp, k_lim, p64, seeds, steps, smax, sidx, smin, sminf, sninf, pc, pm,
                         pz, sk, si, capc, dz, dm, dc, dn, dbv, dbi, out, thr, nch, R, PASSES=passes, NC=nc,
                         NCHP=nchp, NCF=cfg.finish_candidates, BLOCK=cfg.finish_block, KIND=kind, VALUE_SPLIT=vs,
                         FILTER=any_filter, FP64=sums == "fp64", WRITE_THR=write_threshold, ACCURATE=acc,
                         num_warps=cfg.finish_warps, maxnreg=_FINISH_REGISTERS, **common)
    if write_threshold:
        LAST_ROUTES[:] = thr[R:].tolist()
        LAST_PACKED[:] = dn.view(R, nch).sum(dim=1).tolist() if any_filter else [0] * R
        thr = thr[:R]
    return out, thr


def _carve(ws: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Consecutive views of one workspace (one allocation per dtype instead of one per buffer)."""
    out, at = [], 0
    for n in sizes:
        out.append(ws[at:at + max(n, 1)] if n else ws[:1])
        at += n
    return out
