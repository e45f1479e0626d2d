"""Global prefix grouping of a whole job before it runs (BatchLLM, Zheng et al. 2024, arXiv 2412.03594, section 4).

The prompts (each without its last token, so every member keeps at least one token of its own to
produce logits from) are sorted; the longest common prefixes of neighbours define the compressed
prefix tree (each internal node is an LCP interval of the sorted order). A dynamic programme then
flattens the tree into ONE shared level: a node either becomes a group (saving
``(members - 1) * depth`` prefill tokens and KV) or leaves the choice to its children, whichever
saves more. Groups run as units, so a prefix is prefilled once and its KV lives only while its
group runs. Cost of the flattening: savings of upper levels that the chosen groups do not cover are
lost (BatchLLM reports ~1% of the ideal saving). Groups are ordered decode-heavy first
(``max_tokens / prompt length``, descending) so decode tokens mix with later prefill chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class PrefixGroup:
    prefix_len: int  # 0 for a request that shares nothing
    members: list[int]  # indices into the job's prompts, ascending

    @property
    def saving(self) -> int:
        return (len(self.members) - 1) * self.prefix_len


@dataclass(slots=True)
class _Node:
    depth: int
    lb: int
    rb: int = -1
    children: list[_Node] = field(default_factory=list)


def common_prefix_len(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _lcp_tree(seqs: list[tuple[int, ...]], order: list[int]) -> _Node:
    """The LCP-interval tree of the sorted sequences (bottom-up stack construction)."""
    root = _Node(0, 0)
    stack = [root]
    for i in range(1, len(order) + 1):
        h = common_prefix_len(seqs[order[i - 1]], seqs[order[i]]) if i < len(order) else 0
        lb, last = i - 1, None
        while h < stack[-1].depth:
            last = stack.pop()
            last.rb = i - 1
            lb = last.lb
            if h <= stack[-1].depth:
                stack[-1].children.append(last)
                last = None
        if h > stack[-1].depth:
            stack.append(_Node(h, lb, children=[last] if last else []))
    root.rb = len(order) - 1
    return root


def _best(node: _Node, min_prefix_len: int) -> tuple[int, list[_Node]]:
    """(saving, chosen group nodes) of the best one-level grouping inside ``node``'s interval."""
    here = (node.rb - node.lb) * node.depth if node.depth >= min_prefix_len else 0
    below, chosen = 0, []
    for child in node.children:
        s, c = _best(child, min_prefix_len)
        below += s
        chosen += c
    if here > below:
        return here, [node]
    return below, chosen


def build_groups(prompts: list[list[int]], *, min_prefix_len: int = 1) -> list[PrefixGroup]:
    """Partition the prompts into shared-prefix groups (plus singletons) with the largest token saving."""
    seqs = [tuple(p[:-1]) for p in prompts]
    order = sorted(range(len(seqs)), key=seqs.__getitem__)
    if not order:
        return []
    _, nodes = _best(_lcp_tree(seqs, order), max(1, min_prefix_len))
    covered: set[int] = set()
    groups = []
    for node in nodes:
        members = sorted(order[node.lb:node.rb + 1])
        covered.update(members)
        groups.append(PrefixGroup(node.depth, members))
    groups += [PrefixGroup(0, [i]) for i in range(len(prompts)) if i not in covered]
    return groups


def order_groups(groups: list[PrefixGroup], prompt_lens: list[int], max_tokens: list[int]) -> list[PrefixGroup]:
    """Decode-heavy groups first (BatchLLM): mean max_tokens / mean prompt length, descending; stable."""
    def ratio(g: PrefixGroup) -> float:
        return sum(max_tokens[i] for i in g.members) / max(1, sum(prompt_lens[i] for i in g.members))
    return sorted(groups, key=ratio, reverse=True)


def split_for_rank(groups: list[PrefixGroup], rank: int, world_size: int) -> list[PrefixGroup]:
    """Data parallelism: rank r runs groups r, r + W, r + 2W, ... of the ordered list."""
    return groups[rank::world_size]
