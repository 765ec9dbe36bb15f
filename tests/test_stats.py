"""The statistics a round is judged by (`alignloop.stats`), against hand-computed values and printed tables."""

import math

import pytest

from alignloop.stats import (instruction_accuracy, instruction_accuracy_change, length_stats, mean_with_interval,
                             paired_difference, win_rate)


def records(rewards: dict) -> list[dict]:
    return [{"prompt_id": k, "reward": v} for k, v in rewards.items()]


def test_mean_with_interval_by_hand():
    # half width = t(0.975, n-1) * sd / sqrt(n), t from a printed table
    for values, t in [([1.0, 3.0], 12.706), ([1.0, 2.0, 3.0], 4.303), ([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0], 2.228)]:
        result = mean_with_interval(values)
        n = len(values)
        sd = math.sqrt(sum((v - sum(values) / n) ** 2 for v in values) / (n - 1))
        assert result["ci95"][1] - result["mean"] == pytest.approx(t * sd / math.sqrt(n), rel=2e-4), n
    result = mean_with_interval([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # df 5: t(0.975) = 2.571
    assert result["n"] == 6 and result["mean"] == 3.5
    assert result["mean"] - result["ci95"][0] == pytest.approx(2.571 * math.sqrt(3.5) / math.sqrt(6), rel=2e-4)
    # df 30: t = 2.042
    values = [float(i % 2) for i in range(31)]  # 16 zeros, 15 ones
    result = mean_with_interval(values)
    sd = math.sqrt(sum((v - 15 / 31) ** 2 for v in values) / 30)
    assert result["ci95"][1] - result["mean"] == pytest.approx(2.042 * sd / math.sqrt(31), rel=1e-3)
    assert mean_with_interval([0.5]) == {"n": 1, "mean": 0.5, "ci95": None}
    assert mean_with_interval([]) == {"n": 0, "mean": None, "ci95": None}


def test_paired_change_and_win_rate_count_only_prompts_scored_in_both():
    before = records({"a": 0.0, "b": 0.5, "c": 1.0, "d": 0.2, "e": None})
    after = records({"a": 1.0, "b": 0.5, "c": 0.0, "d": 0.6, "e": 1.0, "f": 1.0})
    change = paired_difference(before, after)
    assert change["n"] == 4 and change["mean"] == pytest.approx((1.0 + 0.0 - 1.0 + 0.4) / 4)
    wins = win_rate(before, after)  # a wins, b ties, c loses, d wins: (1 + 0.5 + 0 + 1) / 4
    assert wins["n"] == 4 and wins["mean"] == pytest.approx(0.625)
    # another labeler's rewards, through `key`
    gold = lambda r: {"a": 1.0, "b": 2.0}.get(r["prompt_id"])  # noqa: E731
    assert win_rate(before, after, key=gold)["mean"] == 0.5  # the same answers' scores: ties


def test_length_stats():
    rows = [{"output": "one two three", "num_tokens": 4, "finish_reason": "stop"},
            {"output": "a b c d e f", "num_tokens": 8, "finish_reason": "length"},
            {"output": "", "num_tokens": 1, "finish_reason": "stop"},
            {"output": "x", "num_tokens": 3, "finish_reason": "stop"}]
    stats = length_stats(rows)
    assert stats == {"tokens": 4.0, "words": (3 + 6 + 0 + 1) / 4, "truncated": 0.25}
    assert length_stats([]) == {"tokens": None, "words": None, "truncated": None}


def test_instruction_accuracy_by_hand():
    rows = [{"prompt_id": "a", "instructions_followed": [True, False]},
            {"prompt_id": "b", "instructions_followed": [True, True, True]},
            {"prompt_id": "c", "instructions_followed": [False]},
            {"prompt_id": "d"}]  # no IFEval instructions: not counted
    accuracy = instruction_accuracy(rows)
    assert accuracy["instruction"]["mean"] == pytest.approx(4 / 6) and accuracy["instruction"]["n"] == 3
    assert accuracy["prompt"]["mean"] == pytest.approx(1 / 3)
    # the ratio estimator's interval: residuals a - R b = 1 - 4/3, 3 - 2, 0 - 2/3; var = n/(n-1) sum e^2 / (sum b)^2
    residuals = [1 - 4 / 3, 3 - 2, 0 - 2 / 3]
    half = 4.303 * math.sqrt(3 / 2 * sum(e * e for e in residuals)) / 6
    assert accuracy["instruction"]["ci95"][1] - 4 / 6 == pytest.approx(half, rel=2e-4)
    assert instruction_accuracy([{"prompt_id": "d"}]) is None

    after = [{"prompt_id": "a", "instructions_followed": [True, True]},
             {"prompt_id": "b", "instructions_followed": [True, False, True]},
             {"prompt_id": "c", "instructions_followed": [True]}]
    change = instruction_accuracy_change(rows, after)
    assert change["instruction"]["mean"] == pytest.approx((1 - 1 + 1) / 6)  # followed counts +1, -1, +1 over 6
    assert change["prompt"]["mean"] == pytest.approx((1 - 1 + 1) / 3)
