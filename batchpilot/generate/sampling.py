"""Batched sampling on the device: greedy, temperature, top-k, top-p, per-request seeds, no host sync.

Randomness is a counter-based hash of (seed, step, token id) turned into Gumbel noise: sampling is
``argmax over the kept tokens of (logits / T + Gumbel)`` (the Gumbel-max trick; Maddison et al., "A* Sampling",
arXiv 1411.0030, section 2). The same request therefore draws the same token at the same step whatever batch it
runs in, after a preemption, with prefix sharing on or off, and whatever the number of decode steps per host round
trip; no ``torch.Generator`` state is carried.

The hash (this stream replaced splitmix64 on int64 tensors in issue 15; seeded outputs changed once):
- row key, on (R,): the int64 seed folded into 32 bits (low word, then high word, each through the finaliser),
  then the step: ``key = h(h(h(seed_lo ^ 0x9E3779B9) ^ seed_hi) ^ step_lo)``;
- per token, on (R, V) int32: ``x = h(key + token * 0x9E3779B9)`` (Weyl increment: the golden ratio in 32 bits);
- ``h`` is Chris Wellons' "lowbias32" finaliser (``x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15;
  x *= 0x846ca68b; x ^= x >> 16``, from his hash-prospector search, 2018: the murmur3 ``fmix32`` shape with
  better constants), computed on int32 tensors: multiplies wrap modulo 2^32 (two's complement, what torch's
  int32 ``mul`` does on CPU and CUDA; ``tests/generate/test_sampling.py`` checks it against an exact Python
  reference), and ``>>`` is arithmetic in torch, so every shift is masked into a logical one;
- uniform: the top 24 bits ``k``, ``u = (k + 0.5) / 2^24`` in fp32, kept below 1 (``k = 2^24 - 1`` rounds to 1.0 in
  fp32, whose Gumbel is +inf: the splitmix64 stream had that bug, one row step in ~130 at V = 128,256 drew a token
  uniformly); Gumbel ``g = -log(-log(u))``.

Top-k / top-p without a sort (issue 15: the full-vocabulary sort was most of a sampled step). The kept set of a row
is ``{j : count(s > s_j) < top_k and mass(s > s_j) < top_p}`` with ``s = logits / T``: the smallest set of
highest-probability tokens whose mass reaches ``top_p`` (the token that crosses it included), intersected with the
``top_k`` largest; the top token is always kept. Ties are kept or dropped together (a sort keeps an arbitrary
subset of a tied group at the boundary; HF's top-k warper also keeps every token tied with the k-th). ``top_p >= 1``
and ``top_k <= 0`` switch a filter off. Both conditions are monotone in ``s_j``, so the set is ``{j : s_j >= t}``;
the threshold ``t`` is found by a radix select over the totally ordered integer keys of the float values
(IEEE-754 bits, negatives flipped; -0 folded into +0), most significant 16-bit digit first: per row, histograms of
fp64 mass and int32 count over the digit, a cumsum over the bins, the bin that holds ``t``; two digits for fp32
logits, one for bf16/fp16 logits (dividing distinct 16-bit values by T keeps them distinct and ordered in fp32, so
their keys decide). Fixed work, no data-dependent loop, no host sync: capturable in a CUDA graph. Probabilities
are ``exp(s - max)`` in fp32, their masses summed in fp64 against ``top_p * sum`` (the fp32 cumsum of a sort loses
~1e-5 over 128k terms, more than one token's share of a near-uniform row; on CUDA the fp64 atomics add in any
order, which could only move a cut decided within ~1e-16 of ``top_p``). Equality with a tie-exact sort
reference: ``tests/generate/test_sampling.py``. On CUDA ``sample`` runs ``sampling_triton``'s kernels instead
(the same tokens: ``tests/generate/test_sampling_triton.py``); ``sample_torch`` is this torch path. Cost:
all-greedy batches take a plain argmax; rows are only ever as many as the caller passes (the eager runner passes
the sampled rows only); ``any_filter`` False skips the threshold.
"""

from __future__ import annotations

import torch

from batchpilot.generate import sampling_triton


def _i32(c: int) -> int:
    """A 32-bit constant as the signed int32 value with the same bits."""
    c &= 0xFFFFFFFF
    return c - (1 << 32) if c >= 1 << 31 else c


_GOLDEN = _i32(0x9E3779B9)  # 2^32 / golden ratio, odd
_M1, _M2 = _i32(0x7FEB352D), _i32(0x846CA68B)  # lowbias32 multipliers
_TOP_U = 1.0 - 2.0 ** -24  # the largest fp32 below 1


def _xorshift(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x ^ (x >>> n)`` on int32 (logical shift: torch's ``>>`` is arithmetic), in place."""
    return x.bitwise_xor_((x >> n).bitwise_and_((1 << (32 - n)) - 1))


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 finaliser of an int32 tensor (a bijection of the 32-bit words), in place."""
    return _xorshift(_xorshift(_xorshift(x, 16).mul_(_M1), 15).mul_(_M2), 16)


def _low32(x: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of an int64 tensor as int32 (exact int64 arithmetic, no narrowing-cast overflow)."""
    lo = x & 0xFFFFFFFF
    return torch.where(lo >= 1 << 31, lo - (1 << 32), lo).to(torch.int32)


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """(R,) int32 key of each row's draw: the int64 seed folded into 32 bits, then the step."""
    hi = _low32((seeds >> 32) & 0xFFFFFFFF)
    k = lowbias32(_low32(seeds).bitwise_xor_(_GOLDEN))
    k = lowbias32(k.bitwise_xor_(hi))
    return lowbias32(k.bitwise_xor_(_low32(steps)))


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(R, V) float32 in (0, 1), a pure function of (seed, step, token id)."""
    tokens = torch.arange(vocab_size, device=seeds.device, dtype=torch.int32).mul_(_GOLDEN)
    return uniform_from_bits(lowbias32(tokens[None] + row_keys(seeds, steps)[:, None]))  # adds wrap mod 2^32


def uniform_from_bits(x: torch.Tensor) -> torch.Tensor:
    """int32 hash words -> float32 ``(k + 0.5) / 2^24`` of their top 24 bits ``k``, kept below 1."""
    u = ((x >> 8).bitwise_and_(0xFFFFFF)).float()
    return u.add_(0.5).mul_(2.0 ** -24).clamp_max_(_TOP_U)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(R, V) float32 standard Gumbel noise ``-log(-log(u))``, finite."""
    return uniform_noise(seeds, steps, vocab_size).log_().neg_().log_().neg_()


def _order_keys(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Integer keys ordered like the float values of ``x`` (-0 == +0), and their bit width (16 or 32)."""
    bits = {torch.float32: (torch.int32, 32), torch.bfloat16: (torch.int16, 16), torch.float16: (torch.int16, 16)}
    if x.dtype not in bits:
        x = x.float()
    itype, width = bits[x.dtype]
    b = (x + 0.0).view(itype)  # IEEE: -0 + 0 = +0
    return torch.where(b >= 0, b, b ^ ((1 << (width - 1)) - 1)), width


def _digit_search(digit: torch.Tensor, bins: int, e: torch.Tensor, ones: torch.Tensor, mass: torch.Tensor,
                  count: torch.Tensor, limit: torch.Tensor,
                  top_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One radix digit of the threshold, in complemented keys (bin 0 = the largest values): per-row histograms of
    fp64 mass and int32 count over the (R, V) ``digit`` in [0, bins) (tokens outside the prefix chosen so far
    carry 0), ``mass``/``count`` above that prefix -> each row's digit ``j`` (the bin holding the threshold: the
    number of bins whose lower edge still passes ``ok``) and the mass/count above that bin."""
    R = digit.shape[0]
    hm = torch.zeros(R, bins, dtype=torch.float64, device=e.device).scatter_add_(1, digit, e)
    hc = torch.zeros(R, bins, dtype=torch.int32, device=e.device).scatter_add_(1, digit, ones)
    fm, fc = hm.cumsum(dim=-1), hc.cumsum(dim=-1, dtype=torch.int32)  # mass / count of bins <= j: monotone in j
    no_k = top_k <= 0
    room_k = torch.where(no_k, torch.iinfo(torch.int32).max, top_k - count).clamp(-1, torch.iinfo(torch.int32).max)
    ok = (fc[:, :-1] < room_k[:, None]) & (fm[:, :-1] < (limit - mass)[:, None])  # ok below bin j + 1's top edge
    j = ok.sum(dim=-1)
    at = (j - 1).clamp_min(0)[:, None]
    above = j > 0
    return (j, mass + torch.where(above, fm.gather(1, at)[:, 0], 0.0),
            count + torch.where(above, fc.gather(1, at)[:, 0], 0))


def digit_bits(vocab_size: int) -> int:
    """Radix digit width: 16 bits (2 passes over fp32 keys, 1 over 16-bit ones) for real vocabularies, where wide
    digits spread a near-uniform row's tokens over many bins (fewer atomics on one address); 8 for small ones,
    whose (R, 2^bits) histograms would dwarf the logits."""
    return 16 if vocab_size >= 1 << 14 else 8


def keep_threshold(logits: torch.Tensor, scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   bits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of ``logits`` (R, V) and each row's (R,) threshold key: token j is kept iff ``keys[j] >= threshold``.

    ``scaled`` = logits / T in fp32 (the probabilities); keys come from ``logits`` when they are 16-bit, else from
    ``scaled``. The threshold is the least key ``t`` with ``ok(t)`` = count(keys > t) < top_k and mass(keys > t) <
    top_p * total: a most-significant-digit-first radix select on mass and count (``bits`` per digit, default
    ``digit_bits(V)``), as in radix top-k selection (Alabi et al., "Fast k-selection algorithms for graphics
    processing units", ACM JEA 17, 2012, section 3), with fp64 mass histograms beside the counts. Every digit
    width gives the same threshold.
    """
    keys, width = _order_keys(logits if logits.element_size() == 2 else scaled)
    e = (scaled - scaled.amax(dim=-1, keepdim=True)).exp_()  # (R, V) fp32, unnormalised probabilities
    limit = torch.where(top_p >= 1, torch.inf, top_p.double() * e.sum(dim=-1, dtype=torch.float64))
    e = e.double()
    bits = bits or digit_bits(e.shape[-1])
    assert width % bits == 0, (width, bits)
    ckey = (1 << (width - 1)) - 1 - keys.long()  # [0, 2^width), 0 = the largest key: digits count from the top
    mass = torch.zeros(e.shape[0], dtype=torch.float64, device=e.device)
    count, prefix = torch.zeros_like(mass, dtype=torch.int32), torch.zeros_like(mass, dtype=torch.int64)
    ones = torch.ones(1, 1, dtype=torch.int32, device=e.device).expand_as(e)
    for shift in range(width - bits, -1, -bits):
        if shift + bits < width:  # only the tokens under the prefix chosen so far count at this digit
            inside = (ckey >> (shift + bits)) == prefix[:, None]
            digit = (ckey >> shift) & ((1 << bits) - 1)
            j, mass, count = _digit_search(digit, 1 << bits, e * inside, inside.int(), mass, count, limit, top_k)
        else:
            j, mass, count = _digit_search(ckey >> shift, 1 << bits, e, ones, mass, count, limit, top_k)
        prefix = prefix * (1 << bits) + j
    return keys, (1 << (width - 1)) - 1 - prefix  # kept: ckey <= prefix, i.e. key >= this


def sample(logits: torch.Tensor, *, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, steps: torch.Tensor, any_random: bool, any_filter: bool) -> torch.Tensor:
    """Next token per row of ``logits`` (R, V). Rows with temperature 0 are greedy.

    ``any_random``/``any_filter`` are known on the host from the requests' parameters; they only
    skip work, never change the result. CUDA logits (fp32/bf16/fp16, fp32 temperatures) go to the Triton
    kernels (``sampling_triton``: the same tokens) when triton imports; everything else to
    ``sample_torch``, the reference.
    """
    if any_random and logits.is_cuda and sampling_triton.supported(logits, temperature):
        return sampling_triton.sample_triton(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                             seeds=seeds, steps=steps, any_random=True, any_filter=any_filter)
    return sample_torch(logits, temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds, steps=steps,
                        any_random=any_random, any_filter=any_filter)


def peak_vocab_floats(device: torch.device) -> int:
    """fp32-sized (rows, V) tensors a decode batch's sampling holds at its peak, for the engine's memory headroom:
    about 14 on the torch path (logits, scaled logits, the threshold search's keys, masses and digits, the noise),
    4 with the Triton kernel (logits, processed logits, a gathered copy, and the kernel's scratch of
    min(16,384, V) x 8 bytes per row)."""
    return 4 if device.type == "cuda" and sampling_triton.HAVE_TRITON else 14


def sample_torch(logits: torch.Tensor, *, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 seeds: torch.Tensor, steps: torch.Tensor, any_random: bool, any_filter: bool) -> torch.Tensor:
    """``sample`` in torch ops (CPU, and the reference the Triton kernel is tested against)."""
    greedy = logits.argmax(dim=-1)
    if not any_random:
        return greedy
    scaled = logits.float() / temperature.clamp_min(1e-6)[:, None]
    dropped = None
    if any_filter:  # first: its temporaries are gone before the noise's (a lower peak)
        keys, threshold = keep_threshold(logits, scaled, top_k, top_p)
        dropped = keys < threshold[:, None]
        del keys
    noisy = gumbel_noise(seeds, steps, logits.shape[-1]).add_(scaled)
    if dropped is not None:
        noisy = noisy.masked_fill_(dropped, float("-inf"))
    return torch.where(temperature > 0, noisy.argmax(dim=-1), greedy)


def penalise(logits: torch.Tensor, *, output_counts: torch.Tensor | None, seen: torch.Tensor | None,
             presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor,
             bias: torch.Tensor | None, banned: torch.Tensor | None) -> torch.Tensor:
    """Processed (R, V) fp32 logits: repetition, then presence/frequency, then logit_bias, then bans.

    - repetition (CTRL, Keskar et al. 2019, arXiv 1909.05858, section 4.1; HF's
      ``RepetitionPenaltyLogitsProcessor``): over tokens ``seen`` in prompt + output,
      logit / p where logit > 0, logit * p otherwise;
    - OpenAI's presence/frequency penalties over the output tokens so far:
      logit - presence * (count > 0) - frequency * count;
    - ``bias`` (R, V) added (OpenAI's logit_bias); ``banned`` (R, V) set to -inf (EOS before min_tokens).
    A ``None`` tensor skips its stage; the (R,) parameter tensors are neutral (1, 0, 0) for rows without it.
    """
    x = logits.float()
    if seen is not None:
        p = repetition[:, None]
        x = torch.where(seen, torch.where(x > 0, x / p, x * p), x)
    if output_counts is not None:
        x = x - presence[:, None] * (output_counts > 0) - frequency[:, None] * output_counts
    if bias is not None:
        x = x + bias
    if banned is not None:
        x = x.masked_fill(banned, float("-inf"))
    return x


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """log-softmax of (R, V) logits at temperature 1: (R,) logprob of ``tokens``, (R, k) top-k values and ids."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(1, tokens[:, None])[:, 0]
    top = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], tokens[:, None][:, :0])
    return chosen, top[0], top[1]
