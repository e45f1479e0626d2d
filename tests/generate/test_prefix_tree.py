import random

from batchpilot.generate.prefix_tree import build_groups, common_prefix_len, order_groups, split_for_rank


def _synthetic(seed=0):
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1000) for _ in range(n)] for n in (40, 25, 60)]
    prompts, truth = [], []
    for p, members in zip(prefixes, (5, 3, 7)):
        for _ in range(members):
            prompts.append(p + [1000 + rng.randrange(1000) for _ in range(rng.randint(2, 9))])
            truth.append(len(p))
    prompts += [[2000 + rng.randrange(1000) for _ in range(12)] for _ in range(4)]  # share nothing
    order = list(range(len(prompts)))
    rng.shuffle(order)
    return [prompts[i] for i in order], prefixes


def test_explicit_grouping_attains_the_theoretical_saving():
    """BatchLLM (arXiv 2412.03594): token saving = sum over groups of (members - 1) * prefix_len."""
    prompts, prefixes = _synthetic()
    groups = build_groups(prompts)
    shared = sorted((g.prefix_len, len(g.members)) for g in groups if g.prefix_len)
    assert shared == [(25, 3), (40, 5), (60, 7)]
    assert sum(g.saving for g in groups) == 4 * 40 + 2 * 25 + 6 * 60
    assert sorted(i for g in groups for i in g.members) == list(range(len(prompts)))
    for g in groups:  # every member really starts with the prefix and keeps a token of its own
        first = prompts[g.members[0]]
        assert all(common_prefix_len(first, prompts[i]) >= g.prefix_len < len(prompts[i]) for i in g.members)


def test_flattening_picks_the_better_level():
    sys_prompt = list(range(10))
    a = sys_prompt + list(range(100, 150))  # 2 prompts share 60 tokens, all 4 share 10
    b = sys_prompt + list(range(200, 250))
    prompts = [a + [1], a + [2], b + [3], b + [4]]
    groups = build_groups(prompts)
    assert sorted(g.prefix_len for g in groups) == [60, 60]  # 2 * 60 > 3 * 10
    prompts = [sys_prompt + [i, i + 1] for i in range(30)]  # one big group on the 10-token level
    assert [g.prefix_len for g in build_groups(prompts)] == [10]


def test_identical_prompts_keep_one_token_each_and_min_prefix():
    groups = build_groups([[5, 6, 7]] * 4)
    assert [(g.prefix_len, g.members) for g in groups] == [(2, [0, 1, 2, 3])]
    assert all(g.prefix_len == 0 for g in build_groups([[5, 6, 7]] * 4, min_prefix_len=3))


def test_order_decode_heavy_first_and_rank_split():
    groups = build_groups([[1, 2, 3, 4], [1, 2, 3, 5], [9, 9], [8, 8, 8, 8, 8, 8]])
    ordered = order_groups(groups, [4, 4, 2, 6], [10, 10, 50, 1])
    assert [g.members for g in ordered] == [[2], [0, 1], [3]]
    assert [g.members for g in split_for_rank(ordered, 1, 2)] == [[0, 1]]
