"""Sparse Mixture-of-Experts for the Llama family, and the load-balancing loss at three granularities.

Read top to bottom: ``Router`` (softmax over experts, top-k, optional renormalisation of the top-k weights),
``Experts`` (SwiGLU experts stored as two 3-D tensors, the layout transformers 5 keeps in memory), ``SparseMoE``
(router + routed experts + optional shared expert), then the routing statistics a forward pass reports and the
losses formed from them (``balance_loss``, ``z_loss``, ``BalanceAccumulator``).

Two expert paths compute the same function. ``loop`` walks the experts one by one (the CPU path and the
reference the tests compare with). ``grouped`` sorts the token slots by expert and runs two grouped matrix
products (``torch._grouped_mm``, CUTLASS grouped GEMM on Hopper for bf16); the permutation uses argsort and a
scatter-add histogram, so no host synchronisation is needed (no ``nonzero``, no ``.item()``).

Routing statistics leave the model through an object the caller passes in (``RoutingRecord``): the model's
layer loop hands each MoE layer its slot (``RoutingSlot``), so activation checkpointing's recomputation
overwrites an entry instead of appending a second one, one compiled graph serves every block, and there is no
module-level state. model/ stays free of torch.distributed: the data-parallel all-reduce of the
expert counts is a callable handed to ``BalanceAccumulator``.

Shape legend: N tokens (B*T flattened), D hidden, E experts, K experts per token, I expert intermediate size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

EXPERT_IMPLS = ("auto", "loop", "grouped")
GRANULARITIES = ("micro", "global", "sequence")


@dataclass(kw_only=True, slots=True)
class LayerRouting:
    """What one MoE layer's router decided in one forward pass, per sequence.

    ``counts`` (B, E): routed token slots per expert (no gradient; K slots per token, dropped slots included:
    they are the router's choice). ``prob_sums`` (B, E): router probabilities summed over the sequence's tokens
    (differentiable: the balance loss's gradient flows through them). ``z_sum``: sum over tokens of
    logsumexp(router logits)^2 (differentiable). ``dropped``: slots over capacity (0 without a capacity factor).
    """

    counts: torch.Tensor
    prob_sums: torch.Tensor
    tokens_per_seq: int
    z_sum: torch.Tensor
    dropped: torch.Tensor


class RoutingSlot:
    """Where one MoE layer writes its ``LayerRouting`` in one forward pass (``value``; activation checkpointing's
    recomputation overwrites it instead of adding a second entry).

    The model's layer loop, outside any compiled block, hands each MoE layer its own slot, so a compiled block
    sees one argument of one type and sets one attribute: it reads no layer index and mutates no dict. Keying a
    dict by the layer's index inside the block made dynamo specialise every layer (guards on the index and on
    the dict's length): past torch's recompile limit of 8 the remaining blocks ran eagerly, which the profile of
    moe-1b's compiled step showed (half its blocks' kernels eager; with one graph and the gather-only
    permutations below the step became 1.4x faster).
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: LayerRouting | None = None


class RoutingRecord:
    """Passed into ``Llama.forward(..., routing=record)``; each MoE layer writes its ``LayerRouting`` into the
    slot the layer loop hands it (``slot(layer_idx)``).

    Deliberately not a dataclass (nor a dict), and neither are the slots: FSDP2's pre-forward hooks map over a
    module's inputs and rebuild dataclasses and containers (``torch.distributed.utils._apply_to_tensors``), so
    each sharded block would write into its own copy and the caller's record would stay empty. A plain object
    passes through untouched.
    """

    __slots__ = ("slots",)

    def __init__(self, *, by_layer: dict[int, LayerRouting] | None = None) -> None:
        self.slots: dict[int, RoutingSlot] = {}
        for layer_idx, routing in (by_layer or {}).items():
            self.slot(layer_idx).value = routing

    def slot(self, layer_idx: int) -> RoutingSlot:
        return self.slots.setdefault(layer_idx, RoutingSlot())

    @property
    def by_layer(self) -> dict[int, LayerRouting]:
        """Layer index -> what it routed, in layer order (layers that have not run are absent)."""
        return {i: s.value for i, s in sorted(self.slots.items()) if s.value is not None}

    def layers(self) -> list[LayerRouting]:
        return list(self.by_layer.values())


class Router(nn.Module):
    """Softmax top-k router; probabilities in fp32 as in Mixtral / Qwen2-MoE (transformers)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> logits (N, E), top-k weights (N, K) in x's dtype, top-k expert ids (N, K)."""
        logits = F.linear(x, self.weight)  # (N, E)
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_idx = torch.topk(probs, self.top_k, dim=-1)  # (N, K)
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return logits, top_w.to(x.dtype), top_idx


class Experts(nn.Module):
    """E SwiGLU experts: ``gate_up_proj`` (E, 2I, D) holds gate then up rows, ``down_proj`` (E, D, I)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, impl: str) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.num_experts, self.impl = num_experts, impl

    def forward(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        """x (N, D), expert ids (N, K), weights (N, K) -> sum_k w_k expert_k(x), (N, D)."""
        if self.use_grouped(x):
            return self.forward_grouped(x, top_idx, top_w)
        return self.forward_loop(x, top_idx, top_w)

    def use_grouped(self, x: torch.Tensor) -> bool:
        if self.impl != "auto":
            return self.impl == "grouped"
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        return x.is_cuda and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")

    def forward_loop(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        """The reference: one expert at a time over the tokens that chose it (host syncs; CPU and tests).

        Gathers use ``index_select``: its backward is an index_add, far cheaper on CPU than the accumulating
        index_put that ``x[token]`` backpropagates through.
        """
        out = torch.zeros_like(x)
        flat_w = top_w.reshape(-1)  # (N*K,)
        for e in range(self.num_experts):
            token, slot = torch.where(top_idx == e)
            if token.numel() == 0:
                continue
            gate, up = F.linear(x.index_select(0, token), self.gate_up_proj[e]).chunk(2, dim=-1)  # (n_e, I)
            y = F.linear(F.silu(gate) * up, self.down_proj[e])  # (n_e, D)
            weight = flat_w.index_select(0, token * top_idx.shape[1] + slot)  # (n_e,)
            out.index_add_(0, token, (y * weight[:, None]).to(out.dtype))
        return out

    def forward_grouped(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        """Sort the N*K slots by expert, two grouped GEMMs, combine the K slots of each token. No host sync."""
        num_tokens, top_k = top_idx.shape
        flat_expert = top_idx.reshape(-1)  # (N*K,)
        order = torch.argsort(flat_expert, stable=True)  # sorted row j holds slot order[j]
        sorted_pos = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        sorted_pos = sorted_pos.view(num_tokens, top_k)  # the inverse: slot (n, k) sits at sorted row pos[n, k]
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat_expert.to(torch.int32), torch.ones_like(flat_expert, dtype=torch.int32))
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # (E,) end of each expert's rows
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):  # _grouped_mm has no autocast rule: cast here
            xs = DispatchRows.apply(x.to(dtype), order // top_k, sorted_pos)  # (N*K, D) in expert order
            gate_up = torch._grouped_mm(xs, self.gate_up_proj.to(dtype).transpose(-2, -1), offs=offsets)
            gate, up = gate_up.chunk(2, dim=-1)  # (N*K, I) each
            y = torch._grouped_mm(F.silu(gate) * up, self.down_proj.to(dtype).transpose(-2, -1), offs=offsets)
            return CombineRows.apply(y, top_w.to(dtype), sorted_pos, order)  # (N, D)


class DispatchRows(torch.autograd.Function):
    """x (N, D) -> xs (N*K, D), xs[j] = x[token[j]]: each token copied to its K slots, in expert order.

    The backward gathers instead of scattering: dx[n] = sum_k dxs[pos[n, k]] with pos the inverse permutation
    (N, K). Autograd's own backward of the gather is an index_add with K-way atomic contention: in the profile
    of moe-1b's step on an H200 this index_add and the old forward's bf16 one took 0.5 ms each per layer and
    micro-batch of 16,384 tokens, about a tenth of the step.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pos)
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (pos,) = ctx.saved_tensors
        per_slot = grad.index_select(0, pos.reshape(-1)).view(*pos.shape, -1)  # (N, K, D)
        return per_slot.sum(1, dtype=accumulation_dtype(grad)).to(grad.dtype), None, None


class CombineRows(torch.autograd.Function):
    """y (N*K, D) in expert order, weights w (N, K) -> out (N, D), out[n] = sum_k w[n, k] y[pos[n, k]].

    Summed in fp32 by gathering each token's K rows (an index_add of the rows into (N, D) would add in y's
    dtype, with atomics); the backward is gathers too: dy[j] = w[slot j] dout[token of j], dw[n, k] =
    <dout[n], y[pos[n, k]]>, with ``order`` (sorted row -> slot) as the forward permutation. It saves the
    gathered rows rather than y (the same bytes; y is then free), so the backward does not gather them again.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, w: torch.Tensor, pos: torch.Tensor,
                order: torch.Tensor) -> torch.Tensor:
        per_slot = y.index_select(0, pos.reshape(-1)).view(*pos.shape, -1)  # (N, K, D)
        ctx.save_for_backward(per_slot, w, order)
        acc = accumulation_dtype(y)
        return (per_slot.to(acc) * w.to(acc).unsqueeze(-1)).sum(1).to(y.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        per_slot, w, order = ctx.saved_tensors
        top_k = per_slot.shape[1]
        acc = accumulation_dtype(per_slot)
        grad_w = (per_slot.to(acc) * grad.to(acc).unsqueeze(1)).sum(-1)  # (N, K)
        slot_w = w.reshape(-1).index_select(0, order).unsqueeze(-1)  # (N*K, 1) in sorted order
        grad_y = grad.index_select(0, order // top_k) * slot_w.to(grad.dtype)  # (N*K, D)
        return grad_y.to(per_slot.dtype), grad_w.to(w.dtype), None, None


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16 sums, the tensor's own dtype when wider (float64 in the gradient checks)."""
    return torch.promote_types(t.dtype, torch.float32)


class SharedExpert(nn.Module):
    """A dense SwiGLU every token goes through; with a sigmoid gate (Qwen2-MoE) or without (DeepSeekMoE)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Router + routed experts (+ shared expert): the MLP of an MoE layer. Names follow Qwen2-MoE's."""

    def __init__(self, *, hidden_size: int, num_experts: int, top_k: int, expert_intermediate_size: int,
                 norm_topk_prob: bool, shared_intermediate_size: int, shared_expert_gate: bool,
                 capacity_factor: float, impl: str) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor = capacity_factor
        self.gate = Router(hidden_size, num_experts, top_k, norm_topk_prob)
        self.experts = Experts(hidden_size, expert_intermediate_size, num_experts, impl)
        self.shared_expert = SharedExpert(hidden_size, shared_intermediate_size) if shared_intermediate_size else None
        self.shared_expert_gate = (nn.Linear(hidden_size, 1, bias=False)
                                   if shared_intermediate_size and shared_expert_gate else None)

    def forward(self, x: torch.Tensor, routing: RoutingSlot | None = None) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)  # (N, D)
        logits, top_w, top_idx = self.gate(flat)
        dropped = torch.zeros((), device=x.device)
        if self.capacity_factor > 0:
            keep = capacity_mask(top_idx, self.num_experts, self.capacity_factor)
            dropped = (~keep).sum().float()
            top_w = top_w * keep.to(top_w.dtype)  # dropped slots pass through the residual only
        out = self.experts(flat, top_idx, top_w)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        if routing is not None:
            routing.value = layer_routing(logits.view(B, T, -1), top_idx.view(B, T, -1), dropped)
        return out.view(B, T, D).to(x.dtype)


def capacity_mask(top_idx: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """(N, K) bool: slot kept if it is among the first ceil(cf * N K / E) slots of its expert, in slot order
    (token, then k). Expert capacity as in Switch Transformer (Fedus et al., arXiv 2101.03961, section 2.2)."""
    num_tokens, top_k = top_idx.shape
    capacity = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
    onehot = F.one_hot(top_idx.reshape(-1), num_experts)  # (N*K, E)
    position = (torch.cumsum(onehot, dim=0) * onehot).sum(-1) - 1  # rank of the slot within its expert
    return (position < capacity).view(num_tokens, top_k)


def layer_routing(logits: torch.Tensor, top_idx: torch.Tensor, dropped: torch.Tensor) -> LayerRouting:
    """Per-sequence counts and probability sums from logits (B, T, E) and expert ids (B, T, K)."""
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)
    with torch.no_grad():
        counts = F.one_hot(top_idx, num_experts).sum(dim=(1, 2)).float()  # (B, E)
    z = torch.logsumexp(logits.float(), dim=-1)  # (B, T)
    return LayerRouting(counts=counts, prob_sums=probs.sum(dim=1), tokens_per_seq=logits.shape[1],
                        z_sum=z.pow(2).sum(), dropped=dropped)


def balance_loss(counts: torch.Tensor, prob_sums: torch.Tensor, num_tokens: int | torch.Tensor,
                 num_experts: int) -> torch.Tensor:
    """Switch/GShard load-balancing loss E * sum_i f_i P_i, averaged over any leading dimensions.

    f_i = counts_i / sum_j counts_j: the share of routed token slots going to expert i (= c_i / (K T) for
    top-K routing; no gradient). P_i = prob_sums_i / num_tokens: the mean router probability of expert i.
    Perfectly balanced routing gives 1. (Fedus et al., arXiv 2101.03961, eq. 4-6; Qiu et al., arXiv
    2501.11873, its LBL definition, where f is normalised so that uniform routing gives 1.)
    """
    f = counts.detach() / counts.detach().sum(dim=-1, keepdim=True).clamp(min=1)
    p = prob_sums / num_tokens
    return (num_experts * (f * p).sum(dim=-1)).mean()


def z_loss(routing: list[LayerRouting]) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al., arXiv 2202.08906, eq. 5): mean over tokens of logsumexp(x)^2,
    averaged over MoE layers."""
    per_layer = [r.z_sum / (r.counts.shape[0] * r.tokens_per_seq) for r in routing]
    return torch.stack(per_layer).mean()


class BalanceAccumulator:
    """The load-balancing loss of each micro-batch at one of three granularities (Qiu et al., arXiv 2501.11873).

    - ``micro``: f and P from the micro-batch on this rank alone (what frameworks do).
    - ``sequence``: f and P per sequence, averaged over the sequences (the stricter baseline).
    - ``global``: f from the expert counts summed over all data-parallel ranks (``all_reduce``, a callable that
      sums a tensor over the ranks: the paper's extra communication step that synchronises f_i) and over the
      step's micro-batches so far (the paper's buffer for micro-batches processed one by one under gradient
      accumulation). Which micro-batches an early micro-batch's loss sees is our reading, not the paper's
      words: each micro-batch adds its counts to the buffer and its loss uses the buffer after adding them, so
      micro-batch j sees micro-batches 1..j and the last one sees the whole global batch. P stays local.
      Call ``step()`` after the optimizer step.
    The loss is averaged over MoE layers, so its coefficient does not depend on depth. f carries no gradient.
    """

    def __init__(self, granularity: str, num_experts: int, *,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"--moe.balance must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
        self.granularity, self.num_experts = granularity, num_experts
        self.all_reduce = all_reduce
        self.buffer: dict[int, torch.Tensor] = {}  # layer -> (E,) counts of this step so far, all ranks

    def loss(self, record: RoutingRecord) -> torch.Tensor:
        losses = [self.layer_loss(layer, r) for layer, r in sorted(record.by_layer.items())]
        return torch.stack(losses).mean()

    def layer_loss(self, layer: int, r: LayerRouting) -> torch.Tensor:
        num_tokens = r.counts.shape[0] * r.tokens_per_seq
        if self.granularity == "sequence":
            return balance_loss(r.counts, r.prob_sums, r.tokens_per_seq, self.num_experts)
        if self.granularity == "micro":
            return balance_loss(r.counts.sum(0), r.prob_sums.sum(0), num_tokens, self.num_experts)
        counts = r.counts.sum(0)  # (E,)
        if self.all_reduce is not None:
            counts = self.all_reduce(counts.clone())
        self.buffer[layer] = self.buffer[layer] + counts if layer in self.buffer else counts
        return balance_loss(self.buffer[layer], r.prob_sums.sum(0), num_tokens, self.num_experts)

    def step(self) -> None:
        """Forget the counts of the finished optimizer step."""
        self.buffer.clear()


def routing_metric_tensors(record: RoutingRecord, num_experts: int) -> dict[str, torch.Tensor]:
    """``routing_metrics`` as 0-d tensors on the device (no host sync; the trainer reads a step's at once)."""
    layers = record.layers()
    with torch.no_grad():
        out = {f"lbl_{g}": BalanceAccumulator(g, num_experts).loss(record).detach() for g in ("micro", "sequence")}
        loads = torch.stack([r.counts.sum(0) / r.counts.sum() * num_experts for r in layers])  # (L, E)
        out["max_load"], out["min_load"] = loads.max(), loads.min()
        out["dropped_slots"] = torch.stack([r.dropped.float() for r in layers]).sum()
    return out


def routing_metrics(record: RoutingRecord, num_experts: int) -> dict[str, float]:
    """What the trainer logs per micro-batch: LBL at each granularity (local), expert load, dropped slots.

    ``max_load``/``min_load`` are the busiest/idlest expert's share of slots times E (1 = balanced), the
    worst over layers.
    """
    return {k: v.item() for k, v in routing_metric_tensors(record, num_experts).items()}


class MoeObjective:
    """The trainer's side of the seam: per micro-batch, ``aux_loss(record)`` is the balance loss at the run's
    granularity times ``balance_coef`` plus the router z-loss times ``z_loss_coef``; per step, ``step_metrics()``
    reads the step's routing statistics in one host sync.

    Logged per step: ``lbl_micro``, ``lbl_sequence``, ``lbl_global`` (each the mean over the step's micro-batches;
    ``lbl_global`` with the buffer rule of ``BalanceAccumulator``, so the last micro-batch's f is the whole global
    batch's), ``z_loss``, ``max_load`` / ``min_load`` (the extreme over layers and micro-batches) and
    ``dropped_slots`` (summed over the step, this rank). When the run trains at another granularity the global
    LBL is still computed for the log (one more all-reduce of (E,) counts per MoE layer and micro-batch).
    """

    def __init__(self, granularity: str, num_experts: int, *, balance_coef: float, z_loss_coef: float,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if balance_coef < 0 or z_loss_coef < 0:
            raise ValueError(f"--moe.balance_coef and --moe.z_loss_coef must be >= 0, got {balance_coef}, "
                             f"{z_loss_coef}")
        self.num_experts, self.balance_coef, self.z_loss_coef = num_experts, balance_coef, z_loss_coef
        self.balance = BalanceAccumulator(granularity, num_experts, all_reduce=all_reduce)
        self.global_log = None if granularity == "global" else BalanceAccumulator("global", num_experts,
                                                                                   all_reduce=all_reduce)
        self.seen: list[dict[str, torch.Tensor]] = []

    def start_step(self) -> None:
        """Forget the previous step's buffered counts and metrics (also after an OOM retry of the step)."""
        self.balance.step()
        if self.global_log is not None:
            self.global_log.step()
        self.seen = []

    def aux_loss(self, record: RoutingRecord) -> torch.Tensor:
        lbl = self.balance.loss(record)
        zl = z_loss(record.layers())
        metrics = routing_metric_tensors(record, self.num_experts)
        if self.global_log is None:
            metrics["lbl_global"] = lbl.detach()
        else:
            with torch.no_grad():
                metrics["lbl_global"] = self.global_log.loss(record).detach()
        metrics["z_loss"] = zl.detach()
        self.seen.append(metrics)
        loss = self.balance_coef * lbl
        return loss + self.z_loss_coef * zl if self.z_loss_coef else loss

    def step_metrics(self) -> dict[str, float]:
        if not self.seen:
            return {}
        names = list(self.seen[0])
        stacked = {k: torch.stack([m[k].float() for m in self.seen]) for k in names}
        reduced = [stacked[k].max() if k == "max_load" else stacked[k].min() if k == "min_load"
                   else stacked[k].sum() if k == "dropped_slots" else stacked[k].mean() for k in names]
        return dict(zip(names, torch.stack(reduced).tolist(), strict=True))
