"""Tests of the feedback stage against hand-computed expectations.

Rewards are chosen to be exact in binary floating point (0.25, 0.5, 0.625, ...) so that "a gap equal to the
threshold" and "a reward equal to the mean" are really equal, not off by a rounding error.
"""

import json
import random

import pytest

from alignloop.records import RecordError, pairs_to_binary, read_feedback, read_records, read_scored
from alignloop.stages.feedback import binary_feedback, feedback_stage, pairwise_feedback


def sample(pid, sid, reward, round_=0):
    return {
        "prompt_id": pid,
        "sample_id": sid,
        "prompt": [{"role": "user", "content": f"question {pid}"}],
        "output": f"{pid}-{sid}",
        "reward": reward,
        "round": round_,
    }


def group(pid, rewards):
    return [sample(pid, i, r) for i, r in enumerate(rewards)]


def oriented(record):
    """(winner sample_id, loser sample_id, gap) of a pair, whatever its A/B order."""
    if record["label"] == 1:
        return record["sample_id_A"], record["sample_id_B"], record["reward_difference"]
    return record["sample_id_B"], record["sample_id_A"], record["reward_difference"]


def assert_consistent(record):
    """label, rewards and reward_difference agree with each other."""
    a, b = record["reward_A"], record["reward_B"]
    assert record["label"] == (1 if a > b else 0)
    assert record["reward_difference"] == abs(a - b)


# 4 samples, distinct rewards. Gaps (by sample_id):
#   0-1: 0.25   0-2: 0.5   0-3: 0.125   1-2: 0.75   1-3: 0.125   2-3: 0.625
FOUR = [0.5, 0.75, 0.0, 0.625]


# ---------------------------------------------------------------------------------------------- pairwise modes


def test_max_mode_full_record():
    # best = sample 1 (0.75), worst = sample 2 (0.0). The seeded coin for prompt "p1", seed 0 puts the best in A.
    assert pairwise_feedback(group("p1", FOUR), mode="max", seed=0) == [
        {
            "type": "pairwise_feedback",
            "prompt_id": "p1",
            "prompt": [{"role": "user", "content": "question p1"}],
            "output_A": "p1-1",
            "output_B": "p1-2",
            "label": 1,
            "reward_A": 0.75,
            "reward_B": 0.0,
            "reward_difference": 0.75,
            "sample_id_A": 1,
            "sample_id_B": 2,
            "round": 0,
        }
    ]


def test_max_mode_any_seed_is_best_vs_worst():
    for seed in range(10):
        [pair] = pairwise_feedback(group("p1", FOUR), mode="max", seed=seed)
        assert oriented(pair) == (1, 2, 0.75)
        assert_consistent(pair)


def test_min_mode_smallest_gap_with_tie_to_lowest_sample_ids():
    # smallest gap is 0.125, tied between (0,3) and (1,3): the first in sample_id order, (0,3), wins.
    # 0.625 > 0.5, so sample 3 is the winner.
    [pair] = pairwise_feedback(group("p1", FOUR), mode="min", seed=0)
    assert oriented(pair) == (3, 0, 0.125)
    assert (pair["output_A"], pair["output_B"], pair["label"]) == ("p1-3", "p1-0", 1)
    assert (pair["reward_A"], pair["reward_B"]) == (0.625, 0.5)


def test_min_mode_respects_threshold():
    # gaps > 0.125: smallest is 0.25 (0-1); gaps > 0.25: smallest is 0.5 (0-2); gaps > 0.75: none.
    assert [oriented(p) for p in pairwise_feedback(group("p1", FOUR), mode="min", threshold=0.125)] == [(1, 0, 0.25)]
    assert [oriented(p) for p in pairwise_feedback(group("p1", FOUR), mode="min", threshold=0.25)] == [(0, 2, 0.5)]
    assert pairwise_feedback(group("p1", FOUR), mode="min", threshold=0.75) == []


def test_random_mode_is_a_seeded_perfect_matching_of_neighbours():
    samples = group("p1", FOUR)
    for seed in range(5):
        pairs = pairwise_feedback(samples, mode="random", seed=seed)
        assert len(pairs) == 2
        matched = [{p["sample_id_A"], p["sample_id_B"]} for p in pairs]
        assert sorted(i for m in matched for i in m) == [0, 1, 2, 3]  # every sample used exactly once
        # the pairs are neighbours (0,1), (2,3) of the per-prompt seeded shuffle
        shuffled = [s["sample_id"] for s in samples]
        random.Random(f"{seed}:p1").shuffle(shuffled)
        assert matched == [{shuffled[0], shuffled[1]}, {shuffled[2], shuffled[3]}]
        for p in pairs:
            assert_consistent(p)
        assert pairwise_feedback(samples, mode="random", seed=seed) == pairs  # same seed reproduces
    matchings = {
        tuple(frozenset((p["sample_id_A"], p["sample_id_B"])) for p in pairwise_feedback(samples, mode="random", seed=s))
        for s in range(20)
    }
    assert len(matchings) > 1  # different seeds can differ


def test_random_mode_seed0_literal():
    # pinned: shuffle of [0,1,2,3] under Random("0:p1") pairs {2,3} then {0,1}
    pairs = pairwise_feedback(group("p1", FOUR), mode="random", seed=0)
    assert [oriented(p) for p in pairs] == [(3, 2, 0.625), (1, 0, 0.25)]


def test_random_mode_odd_group_leaves_one_out_and_threshold_drops_pairs():
    pairs = pairwise_feedback(group("p1", [0.0, 0.25, 0.5]), mode="random", seed=3)
    assert len(pairs) == 1
    # all gaps are <= 0.5, so a 0.5 threshold drops everything
    assert pairwise_feedback(group("p1", [0.0, 0.25, 0.5]), mode="random", threshold=0.5, seed=3) == []


def test_random_maximal_pairs_what_random_leaves_unpaired():
    """Rewards 1, 1, 0, 0: random pairs the shuffle's neighbours, so a seed whose shuffle puts equal rewards side
    by side yields no pair; random_maximal lets each sample take the next one it clears the rules with, so every
    seed yields two pairs, each a 1 over a 0, every sample used once."""
    samples = group("p1", [1.0, 1.0, 0.0, 0.0])
    seeds_random_leaves_empty = 0
    for seed in range(12):
        seeds_random_leaves_empty += pairwise_feedback(samples, mode="random", seed=seed) == []
        pairs = pairwise_feedback(samples, mode="random_maximal", seed=seed)
        assert sorted(oriented(p)[2] for p in pairs) == [1.0, 1.0]
        assert sorted(i for p in pairs for i in (p["sample_id_A"], p["sample_id_B"])) == [0, 1, 2, 3]
        assert {oriented(p)[0] for p in pairs} == {0, 1}
        assert pairwise_feedback(samples, mode="random_maximal", seed=seed) == pairs  # same seed reproduces
    assert seeds_random_leaves_empty > 0  # the case exists among these seeds


def test_random_maximal_is_random_when_every_neighbour_clears():
    # distinct rewards, no length rule: every pair clears, so the greedy pass takes the shuffle's neighbours
    for seed in range(6):
        assert pairwise_feedback(group("p1", FOUR), mode="random_maximal", seed=seed) == \
            pairwise_feedback(group("p1", FOUR), mode="random", seed=seed)


def test_random_maximal_with_length_ratio_pairs_like_lengths():
    # lengths 10, 10, 100, 100: only 0-1 and 2-3 pass a 0.5 ratio; both clear the threshold (gaps 0.25, 0.625)
    samples = sized("p1", FOUR, [10, 10, 100, 100])
    for seed in range(8):
        pairs = pairwise_feedback(samples, mode="random_maximal", seed=seed, length_ratio=0.5)
        assert sorted(oriented(p) for p in pairs) == [(1, 0, 0.25), (3, 2, 0.625)]
        assert len(pairwise_feedback(samples, mode="random", seed=seed, length_ratio=0.5)) <= 2
    # a threshold of 0.25 leaves 2-3 alone
    assert [oriented(p) for p in pairwise_feedback(samples, mode="random_maximal", threshold=0.25,
                                                    length_ratio=0.5)] == [(3, 2, 0.625)]


# ---------------------------------------------------------------------------------------------- edge cases


def test_ties_in_max_take_lowest_sample_id():
    # best tied between 0 and 2, worst tied between 1 and 3
    [pair] = pairwise_feedback(group("p1", [1.0, 0.0, 1.0, 0.0]), mode="max")
    assert oriented(pair) == (0, 1, 1.0)


def test_tie_break_uses_sample_id_not_file_order():
    samples = list(reversed(group("p1", [1.0, 0.0, 1.0, 0.0])))  # file order 3,2,1,0
    [pair] = pairwise_feedback(samples, mode="max")
    assert oriented(pair) == (0, 1, 1.0)


def test_one_sample_per_prompt_gives_no_pair():
    for mode in ("max", "min", "random", "random_maximal"):
        assert pairwise_feedback([sample("p1", 0, 0.5)], mode=mode) == []


def test_all_rewards_equal_gives_no_pair_at_threshold_zero():
    for mode in ("max", "min", "random", "random_maximal"):
        assert pairwise_feedback(group("p1", [0.5, 0.5, 0.5, 0.5]), mode=mode, threshold=0.0) == []


def test_null_rewards_take_no_part():
    samples = [sample("p1", 0, None), sample("p1", 1, 0.25), sample("p1", 2, None), sample("p1", 3, 0.75)]
    for mode in ("max", "min", "random", "random_maximal"):
        [pair] = pairwise_feedback(samples, mode=mode)
        assert oriented(pair) == (3, 1, 0.5)
    # only one scored sample left: no pair
    assert pairwise_feedback([sample("p1", 0, None), sample("p1", 1, 0.25)]) == []


def test_threshold_equal_to_gap_drops_pair_just_below_keeps_it():
    samples = group("p1", [0.75, 0.25])  # gap exactly 0.5
    assert pairwise_feedback(samples, mode="max", threshold=0.5) == []
    [pair] = pairwise_feedback(samples, mode="max", threshold=0.4999)
    assert oriented(pair) == (0, 1, 0.5)


def test_groups_in_first_appearance_order():
    samples = [sample("b", 0, 0.0), sample("a", 0, 1.0), sample("b", 1, 1.0), sample("a", 1, 0.0)]
    assert [p["prompt_id"] for p in pairwise_feedback(samples)] == ["b", "a"]


def test_prompt_pairs_do_not_depend_on_other_prompts():
    mine = group("p1", [0.0, 0.25, 0.5, 0.75, 1.0, 0.125])
    others = group("zz", [0.0, 1.0, 0.5])
    for mode in ("random", "random_maximal", "max", "min"):
        alone = pairwise_feedback(mine, mode=mode, seed=7)
        mixed = pairwise_feedback(others + list(reversed(mine)), mode=mode, seed=7)
        assert [p for p in mixed if p["prompt_id"] == "p1"] == alone


def test_ab_order_is_randomised_and_labels_follow_rewards():
    samples = [s for i in range(200) for s in group(f"p{i}", [0.0, 1.0])]
    pairs = pairwise_feedback(samples, mode="max", seed=0)
    assert len(pairs) == 200
    labels = [p["label"] for p in pairs]
    assert 0 < sum(labels) < 200
    assert 60 < sum(labels) < 140  # a fair coin, loosely
    for p in pairs:
        assert_consistent(p)
        assert p["output_A" if p["label"] == 1 else "output_B"].endswith("-1")  # sample 1 has reward 1.0


def test_bad_mode_and_threshold():
    with pytest.raises(ValueError, match="random, random_maximal, max, min"):
        pairwise_feedback(group("p1", FOUR), mode="best")
    with pytest.raises(ValueError, match=">= 0"):
        pairwise_feedback(group("p1", FOUR), threshold=-0.1)


def test_extra_fields_optional():
    bare = [{"prompt_id": "p", "prompt": "q", "output": o, "reward": r} for o, r in (("x", 0.0), ("y", 1.0))]
    [pair] = pairwise_feedback(bare)
    assert set(pair) == {"type", "prompt_id", "prompt", "output_A", "output_B", "label", "reward_A", "reward_B",
                         "reward_difference"}


# ---------------------------------------------------------------------------------------------- length kept honest


def sized(pid, rewards, lengths, cut=()):
    """Samples of one prompt with outputs of the given lengths in characters; those in `cut` hit the cap."""
    out = group(pid, rewards)
    for s, n in zip(out, lengths):
        s["output"] = "x" * n
        s["finish_reason"] = "length" if s["sample_id"] in cut else "stop"
    return out


def test_length_ratio_picks_the_largest_gap_among_similar_lengths():
    # FOUR's best pair (1 beats 2, gap 0.75) has lengths 100 vs 25: a quarter of the longer, below 0.5. With
    # lengths 100, 100, 25, 60: 0-1 (gap 0.25, ratio 1.0), 0-3 (0.125, 0.6), 1-3 (0.125, 0.6) pass; 0-2, 1-2 (0.25)
    # and 2-3 (0.42) fail
    samples = sized("p1", FOUR, [100, 100, 25, 60])
    assert [oriented(p) for p in pairwise_feedback(samples, mode="max")] == [(1, 2, 0.75)]
    assert [oriented(p) for p in pairwise_feedback(samples, mode="max", length_ratio=0.5)] == [(1, 0, 0.25)]
    # min: the smallest passing gap, 0.125, first in sample_id order: 0-3
    assert [oriented(p) for p in pairwise_feedback(samples, mode="min", length_ratio=0.5)] == [(3, 0, 0.125)]
    # a ratio of exactly the shorter/longer fraction keeps the pair (>=): 60 / 100 = 0.6
    assert [oriented(p) for p in pairwise_feedback(samples, mode="min", length_ratio=0.6)] == [(3, 0, 0.125)]
    assert [oriented(p) for p in pairwise_feedback(samples, mode="min", length_ratio=0.61)] == [(1, 0, 0.25)]
    assert pairwise_feedback(samples, mode="max", length_ratio=1.0, threshold=0.25) == []
    with pytest.raises(ValueError, match="length_ratio"):
        pairwise_feedback(samples, length_ratio=0.0)


def test_length_ratio_in_random_mode_drops_pairs_of_unlike_length():
    samples = sized("p1", FOUR, [10, 10, 10, 100])
    for seed in range(6):
        kept = pairwise_feedback(samples, mode="random", seed=seed, length_ratio=0.5)
        every = pairwise_feedback(samples, mode="random", seed=seed)
        # the same matching, less the pair with the long answer (A/B coins may land otherwise)
        assert [oriented(p) for p in kept] == [oriented(p) for p in every if 3 not in (p["sample_id_A"], p["sample_id_B"])]
        assert len(kept) == 1


def test_length_balance_switches_the_prompts_that_lose_least_then_drops_pairs():
    # Each prompt's best (max) pair has the longer answer better:
    #   p1: FOUR at lengths 100, 100, 25, 60: 1>2 (gap 0.75); on the other side only 3>0 (0.125): loses 0.625
    #   p2: 0>1 (gap 1.0, 50 vs 10 chars); 2>1 and 0>2 are longer-better too: cannot switch
    #   p3: 1>0 (gap 1.0, 40 vs 10); the other side's best is 2>0 (0.75, 5 vs 10): loses 0.25
    #   p4: 1>0 (gap 1.0, 20 vs 10): cannot switch
    p1 = sized("p1", FOUR, [100, 100, 25, 60])
    p2 = sized("p2", [1.0, 0.0, 0.5], [50, 10, 30])
    p3 = sized("p3", [0.0, 1.0, 0.75], [10, 40, 5])
    p4 = sized("p4", [0.0, 1.0], [10, 20])
    winners = lambda pairs: {p["prompt_id"]: oriented(p)[:2] for p in pairs}  # noqa: E731
    assert winners(pairwise_feedback(p1 + p2 + p3 + p4, mode="max")) == {"p1": (1, 2), "p2": (0, 1), "p3": (1, 0), "p4": (1, 0)}
    # 4 longer-better against 0: p3 switches first (loses 0.25), then p1 (0.625): 2 against 2
    balanced = pairwise_feedback(p1 + p2 + p3 + p4, mode="max", length_balance=True)
    assert winners(balanced) == {"p1": (3, 0), "p2": (0, 1), "p3": (2, 0), "p4": (1, 0)}
    from alignloop.stages.feedback import chosen_longer

    assert chosen_longer(balanced) == 0.5
    # 3 against 0: one switch (p3) leaves 2 against 1, close enough
    assert winners(pairwise_feedback(p1 + p2 + p3, mode="max", length_balance=True)) == {"p1": (1, 2), "p2": (0, 1), "p3": (2, 0)}
    # nobody can switch: 2 against 0, and one pair of the least gap (a tie: the first prompt's) goes
    assert winners(pairwise_feedback(p2 + p4, mode="max", length_balance=True)) == {"p4": (1, 0)}
    assert pairwise_feedback(p1, mode="max", length_balance=True) == pairwise_feedback(p1, mode="max")  # 1 against 0
    with pytest.raises(ValueError, match="length_balance"):
        pairwise_feedback(p1, mode="random", length_balance=True)
    with pytest.raises(ValueError, match="length_balance"):
        pairwise_feedback(p1, mode="random_maximal", length_balance=True)


def test_length_balance_leaves_no_net_length_signal_in_a_round():
    """A reward that favours short answers, with noise: without the balance most pairs teach "shorter is
    better"; with it the better answer is the longer in half the pairs, and most prompts keep a pair."""
    from alignloop.stages.feedback import chosen_longer

    rng = random.Random(0)
    samples = []
    for p in range(200):
        lengths = [rng.randint(20, 400) for _ in range(4)]
        samples += sized(f"p{p}", [rng.random() - n / 400 for n in lengths], lengths)
    assert chosen_longer(pairwise_feedback(samples, mode="max")) < 0.3
    balanced = pairwise_feedback(samples, mode="max", length_balance=True)
    assert abs(chosen_longer(balanced) - 0.5) <= 0.5 / len(balanced) and len(balanced) > 150


def test_truncation_penalty_lowers_cut_answers_before_pairing():
    # sample 1 (0.75) was cut at the cap: with a penalty of 0.5 it counts 0.25, so the best is now 3 (0.625)
    samples = sized("p1", FOUR, [10, 10, 10, 10], cut={1})
    [pair] = pairwise_feedback(samples, mode="max", truncation_penalty=0.5)
    assert oriented(pair) == (3, 2, 0.625)
    assert_consistent(pair)
    [pair] = pairwise_feedback(samples, mode="min", truncation_penalty=0.5)
    assert oriented(pair) == (3, 0, 0.125)  # penalised 0.5, 0.25, 0.0, 0.625: the smallest gap is 0-3's
    # gaps above 0.25: 0-2 (0.5), 1-3 (0.375), 2-3 (0.625); the records carry the penalised rewards
    [pair] = pairwise_feedback(samples, mode="min", threshold=0.25, truncation_penalty=0.5)
    assert oriented(pair) == (3, 1, 0.375)
    assert {pair["reward_A"], pair["reward_B"]} == {0.625, 0.25}
    assert samples[1]["reward"] == 0.75  # the input is untouched


def test_truncation_penalty_in_binary_feedback():
    samples = sized("p1", [1.0, 0.5, 0.5, 0.0], [10] * 4, cut={0})
    # penalised: 0.25, 0.5, 0.5, 0.0; mean 0.3125
    labels = [(r["reward"], r["label"]) for r in binary_feedback(samples, "mean", truncation_penalty=0.75)]
    assert labels == [(0.25, False), (0.5, True), (0.5, True), (0.0, False)]
    assert [r["label"] for r in binary_feedback(samples, "mean")] == [True, True, True, False]


# ---------------------------------------------------------------------------------------------- binary


def labels(records):
    return [(r["prompt_id"], r["sample_id"], r["label"]) for r in records]


def test_binary_mean_over_the_whole_round():
    # scored rewards 0.0, 0.5, 1.0, 0.5 (two prompts, one null): mean = 2.0 / 4 = 0.5; >= 0.5 is desirable
    samples = [sample("a", 0, 0.0), sample("a", 1, 0.5), sample("a", 2, None), sample("b", 0, 1.0), sample("b", 1, 0.5)]
    out = binary_feedback(samples, "mean")
    assert labels(out) == [("a", 0, False), ("a", 1, True), ("b", 0, True), ("b", 1, True)]
    assert out[0] == {
        "type": "binary_feedback",
        "prompt_id": "a",
        "prompt": [{"role": "user", "content": "question a"}],
        "output": "a-0",
        "label": False,
        "reward": 0.0,
        "sample_id": 0,
        "round": 0,
    }


def test_binary_mean_not_equal_to_any_reward():
    # 0.0 + 0.25 + 0.25 + 1.0 = 1.5; mean 0.375
    out = binary_feedback(group("a", [0.0, 0.25, 0.25, 1.0]), "mean")
    assert [r["label"] for r in out] == [False, False, False, True]


def test_binary_median_even_count_is_mean_of_middle_two():
    # sorted 0.0, 0.25, 0.75, 1.0 -> median (0.25 + 0.75) / 2 = 0.5
    out = binary_feedback(group("a", [1.0, 0.0, 0.75, 0.25]), "median")
    assert [r["label"] for r in out] == [True, False, True, False]
    # sorted 0.0, 0.25, 0.25, 1.0 -> median 0.25; rewards equal to it are desirable
    out = binary_feedback(group("a", [0.0, 0.25, 0.25, 1.0]), "median")
    assert [r["label"] for r in out] == [False, True, True, True]


def test_binary_median_odd_count():
    # sorted 0.0, 0.5, 2.0 -> median 0.5 (mean would be 0.8333)
    out = binary_feedback(group("a", [2.0, 0.0, 0.5]), "median")
    assert [r["label"] for r in out] == [True, False, True]


def test_binary_fixed_threshold_and_equality():
    out = binary_feedback(group("a", [0.25, 0.5, 0.75]), 0.5)
    assert [r["label"] for r in out] == [False, True, True]
    out = binary_feedback(group("a", [0.25, 0.5, 0.75]), "0.5")
    assert [r["label"] for r in out] == [False, True, True]


def test_binary_nothing_scored_and_bad_threshold():
    assert binary_feedback([sample("a", 0, None)], "mean") == []
    with pytest.raises(ValueError, match="mean, median"):
        binary_feedback(group("a", [0.0]), "average")


def test_pairs_to_binary():
    pairs = [
        {"type": "pairwise_feedback", "prompt_id": "p", "prompt": [{"role": "user", "content": "q"}],
         "output_A": "good", "output_B": "bad", "label": 1, "reward_A": 1.0, "reward_B": 0.0,
         "reward_difference": 1.0, "sample_id_A": 3, "sample_id_B": 1, "round": 2},
        {"type": "pairwise_feedback", "prompt_id": "r", "prompt": [{"role": "user", "content": "s"}],
         "output_A": "worse", "output_B": "better", "label": 0, "reward_A": 0.25, "reward_B": 0.5,
         "reward_difference": 0.25},
    ]
    assert pairs_to_binary(pairs) == [
        {"type": "binary_feedback", "prompt_id": "p", "prompt": [{"role": "user", "content": "q"}],
         "output": "good", "label": True, "reward": 1.0, "sample_id": 3, "round": 2},
        {"type": "binary_feedback", "prompt_id": "p", "prompt": [{"role": "user", "content": "q"}],
         "output": "bad", "label": False, "reward": 0.0, "sample_id": 1, "round": 2},
        {"type": "binary_feedback", "prompt_id": "r", "prompt": [{"role": "user", "content": "s"}],
         "output": "better", "label": True, "reward": 0.5},
        {"type": "binary_feedback", "prompt_id": "r", "prompt": [{"role": "user", "content": "s"}],
         "output": "worse", "label": False, "reward": 0.25},
    ]


# ---------------------------------------------------------------------------------------------- reading


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = '{"prompt_id": 7, "sample_id": 0, "prompt": "hi", "output": "o", "reward": 0.5}'


def test_read_scored_normalises_and_allows_null(tmp_path):
    path = write_lines(tmp_path / "s.jsonl", [GOOD, "", '{"prompt_id": "x", "prompt": "hi", "output": "o", "reward": null, "label_error": "timeout"}'])
    samples = read_scored(path)
    assert samples[0]["prompt_id"] == "7"
    assert samples[0]["prompt"] == [{"role": "user", "content": "hi"}]
    assert samples[1]["reward"] is None and samples[1]["label_error"] == "timeout"


@pytest.mark.parametrize(
    "bad_line, field",
    [
        ('{"prompt_id": "p", "prompt": "hi", "output": "o", "reward": 0.5', "not valid JSON"),
        ('{"prompt_id": "p", "prompt": "hi", "output": "o"}', "'reward'"),
        ('{"prompt_id": "p", "prompt": "hi", "output": "o", "reward": NaN}', "'reward'"),
        ('{"prompt_id": "p", "prompt": "hi", "output": "o", "reward": Infinity}', "'reward'"),
        ('{"prompt_id": "p", "prompt": "hi", "output": "o", "reward": "0.5"}', "'reward'"),
        ('{"prompt": "hi", "output": "o", "reward": 0.5}', "'prompt_id'"),
        ('{"prompt_id": "p", "prompt": "hi", "output": 3, "reward": 0.5}', "'output'"),
        ('{"prompt_id": "p", "prompt": [], "output": "o", "reward": 0.5}', "'prompt'"),
    ],
)
def test_read_scored_errors_name_file_line_field(tmp_path, bad_line, field):
    path = write_lines(tmp_path / "s.jsonl", [GOOD, "", bad_line])  # the blank line still counts: line 3
    with pytest.raises(RecordError) as err:
        read_scored(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3:")
    assert field in message


def test_read_scored_nan_message(tmp_path):
    path = write_lines(tmp_path / "s.jsonl", ['{"prompt_id": "p", "prompt": "hi", "output": "o", "reward": NaN}'])
    with pytest.raises(RecordError, match=r"s\.jsonl:1: field 'reward' must be a finite number or null, got nan"):
        read_scored(path)


def test_read_scored_json_array_names_item(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps([json.loads(GOOD), {"prompt_id": "p", "prompt": "hi", "output": "o", "reward": "x"}]))
    with pytest.raises(RecordError, match=r"s\.json: item 1: field 'reward'"):
        read_scored(path)


def test_read_feedback_formats(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps([
        # HALOs pairwise: outputs as assistant turns, prompt_key instead of prompt_id
        {"type": "pairwise_feedback", "prompt_key": "k1", "prompt": [{"role": "user", "content": "q"}],
         "output_A": [{"role": "assistant", "content": "a"}], "output_B": [{"role": "assistant", "content": "b"}],
         "label": 0, "reward_A": 0.1, "reward_B": 0.9, "reward_difference": 0.8},
        # HALOs binary with an int label
        {"type": "binary_feedback", "prompt_id": 5, "prompt": "q", "output": [{"role": "assistant", "content": "c"}],
         "label": 1, "reward": 0.7},
        # TRL preference record
        {"prompt": "q", "chosen": "yes", "rejected": "no"},
    ]))
    pair, binary, trl = read_feedback(path)
    assert (pair["prompt_id"], pair["output_A"], pair["output_B"], pair["label"]) == ("k1", "a", "b", 0)
    assert binary == {"type": "binary_feedback", "prompt_id": "5", "prompt": [{"role": "user", "content": "q"}],
                      "output": "c", "label": True, "reward": 0.7}
    assert trl["type"] == "pairwise_feedback"
    assert (trl["output_A"], trl["output_B"], trl["label"]) == ("yes", "no", 1)
    assert trl["reward_A"] is None and "chosen" not in trl
    assert trl["prompt_id"].startswith("h")


def test_read_feedback_round_trips_stage_output(tmp_path):
    scored = tmp_path / "scored.jsonl"
    write_lines(scored, [json.dumps(s) for s in group("p1", FOUR) + group("p2", [0.0, 1.0])])
    feedback_stage(scored, tmp_path / "pairs.jsonl", kind="pairwise", mode="max")
    assert read_feedback(tmp_path / "pairs.jsonl") == read_records(tmp_path / "pairs.jsonl")


@pytest.mark.parametrize(
    "record, field",
    [
        ({"type": "pairwise_feedback", "prompt_id": "p", "prompt": "q", "output_A": "a", "output_B": "b", "label": 2}, "'label'"),
        ({"type": "pairwise_feedback", "prompt_id": "p", "prompt": "q", "output_A": "a", "label": 1}, "'output_B'"),
        ({"type": "binary_feedback", "prompt_id": "p", "prompt": "q", "output": "a", "label": "yes"}, "'label'"),
        ({"type": "binary_feedback", "prompt_id": "p", "prompt": "q", "output": "a", "label": True, "reward": "1"}, "'reward'"),
        ({"type": "scalar_feedback", "prompt_id": "p", "prompt": "q", "output": "a"}, "'type'"),
        ({"prompt_id": "p", "prompt": "q"}, "'type'"),
    ],
)
def test_read_feedback_errors(tmp_path, record, field):
    path = write_lines(tmp_path / "f.jsonl", ['{"prompt": "q", "chosen": "y", "rejected": "n"}', json.dumps(record)])
    with pytest.raises(RecordError) as err:
        read_feedback(path)
    assert str(err.value).startswith(f"{path}:2:")
    assert field in str(err.value)


# ---------------------------------------------------------------------------------------------- the stage


def test_feedback_stage_pairwise(tmp_path):
    scored = write_lines(tmp_path / "scored.jsonl", [
        json.dumps(s) for s in group("p1", FOUR) + [sample("p2", 0, 0.5), sample("p2", 1, None), sample("p3", 0, None)]
    ])
    out = tmp_path / "out" / "feedback.jsonl"
    counts = feedback_stage(scored, out, kind="pairwise", mode="max", threshold=0.0, seed=0)
    assert counts == {"scored": 5, "unscored": 2, "prompts": 3, "pairs": 1}
    [pair] = read_records(out)
    assert oriented(pair) == (1, 2, 0.75)
    assert pair == pairwise_feedback(read_scored(scored), mode="max", seed=0)[0]


def test_feedback_stage_binary(tmp_path):
    scored = write_lines(tmp_path / "scored.jsonl", [json.dumps(s) for s in group("a", [0.0, 0.25, 0.25, 1.0]) + [sample("b", 0, None)]])
    out = tmp_path / "feedback.jsonl"
    assert feedback_stage(scored, out, kind="binary", threshold="median") == {
        "scored": 4, "unscored": 1, "prompts": 2, "desirable": 3, "undesirable": 1}
    assert [r["label"] for r in read_records(out)] == [False, True, True, True]
    assert feedback_stage(scored, out, kind="binary", threshold="0.3")["desirable"] == 1


def test_feedback_stage_bad_input_leaves_no_file(tmp_path):
    scored = write_lines(tmp_path / "scored.jsonl", [GOOD, '{"prompt_id": "p", "prompt": "hi", "output": "o", "reward": NaN}'])
    out = tmp_path / "feedback.jsonl"
    with pytest.raises(RecordError, match=r"scored\.jsonl:2: field 'reward'"):
        feedback_stage(scored, out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored.jsonl"]  # no temporary left either


def test_feedback_stage_bad_arguments(tmp_path):
    scored = write_lines(tmp_path / "scored.jsonl", [GOOD])
    with pytest.raises(ValueError, match="pairwise, binary"):
        feedback_stage(scored, tmp_path / "o.jsonl", kind="scalar")
    with pytest.raises(ValueError, match="random, random_maximal, max, min"):
        feedback_stage(scored, tmp_path / "o.jsonl", mode="worst")
    with pytest.raises(ValueError):
        feedback_stage(scored, tmp_path / "o.jsonl", kind="pairwise", threshold="mean")
    assert not (tmp_path / "o.jsonl").exists()
