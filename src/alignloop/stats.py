"""The statistics a round is judged by, on scored records alone (no torch): mean rewards with 95% Student t
intervals, the paired change and the win rate between two evaluations of the same prompts, and answer
lengths. The loop records them (`stages.evaluate`); the report recomputes them for run directories written
before they were recorded."""

from __future__ import annotations

import math
import statistics


def mean_reward(scored: list[dict]) -> float | None:
    rewards = [r["reward"] for r in scored if r.get("reward") is not None]
    return sum(rewards) / len(rewards) if rewards else None


def _t_central_probability(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with `df` degrees of freedom, by the closed-form series for whole df
    (Abramowitz and Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    term, total = 1.0, 1.0
    if df % 2 == 0:  # sin(theta) * (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ...), df/2 terms
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    for k in range(1, (df - 1) // 2):  # 2/pi * (theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ...))
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))


def t_quantile_975(df: int) -> float:
    """Student t's 97.5% quantile, the half-width factor of a 95% interval, by bisection on the exact CDF."""
    low, high = 0.0, 1000.0
    for _ in range(80):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_central_probability(mid, df) < 0.95 else (low, mid)
    return (low + high) / 2


def mean_with_interval(values: list[float]) -> dict:
    """{n, mean, ci95}: the mean with its 95% t interval (None where fewer than two values)."""
    n = len(values)
    if n < 2:
        return {"n": n, "mean": values[0] if values else None, "ci95": None}
    mean = statistics.fmean(values)
    half = t_quantile_975(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return {"n": n, "mean": mean, "ci95": [mean - half, mean + half]}


def reward_interval(scored: list[dict]) -> list[float] | None:
    """The 95% interval of the mean reward of the scored records."""
    return mean_with_interval([r["reward"] for r in scored if r.get("reward") is not None])["ci95"]


def _paired(before: list[dict], after: list[dict], key) -> list[tuple[float, float]]:
    """(before, after) rewards, `key(record)`, of the prompts scored in both."""
    a = {r["prompt_id"]: key(r) for r in before if key(r) is not None}
    b = {r["prompt_id"]: key(r) for r in after if key(r) is not None}
    return [(a[k], b[k]) for k in a if k in b]


def paired_difference(before: list[dict], after: list[dict], key=lambda r: r.get("reward")) -> dict:
    """Mean of after-minus-before reward over the prompts scored in both, with a 95% t interval."""
    return mean_with_interval([b - a for a, b in _paired(before, after, key)])


def win_rate(before: list[dict], after: list[dict], key=lambda r: r.get("reward")) -> dict:
    """How often `after`'s answer scores above `before`'s to the same prompt (a tie counts half), over the
    prompts scored in both, with a 95% t interval: 0.5 is no change."""
    return mean_with_interval([1.0 if b > a else 0.5 if b == a else 0.0 for a, b in _paired(before, after, key)])


def pair_margin(feedback: list[dict]) -> float | None:
    """The mean |reward difference| of the pairs among feedback records (None without pairs)."""
    gaps = [abs(f["reward_difference"]) for f in feedback if isinstance(f.get("reward_difference"), (int, float))]
    return statistics.fmean(gaps) if gaps else None


def length_stats(records: list[dict]) -> dict:
    """Mean answer length in tokens (as the sampler counted them) and in words, and the share of answers cut
    at the sampler's `max_new_tokens`."""
    if not records:
        return {"tokens": None, "words": None, "truncated": None}
    tokens = [r["num_tokens"] for r in records if r.get("num_tokens") is not None]
    return {"tokens": statistics.fmean(tokens) if tokens else None,
            "words": statistics.fmean(len(r["output"].split()) for r in records),
            "truncated": sum(r.get("finish_reason") == "length" for r in records) / len(records)}


def ratio_with_interval(numerators: list[float], denominators: list[float]) -> dict:
    """{n, mean, ci95}: sum(numerators) / sum(denominators), each pair one prompt's, with a 95% t interval by
    the ratio estimator's variance (the prompts are the sampled units, not the instructions inside them)."""
    n, total = len(numerators), sum(denominators)
    if n == 0 or total == 0:
        return {"n": n, "mean": None, "ci95": None}
    ratio = sum(numerators) / total
    if n < 2:
        return {"n": n, "mean": ratio, "ci95": None}
    residuals = [a - ratio * b for a, b in zip(numerators, denominators)]
    half = t_quantile_975(n - 1) * math.sqrt(n / (n - 1) * sum(e * e for e in residuals)) / total
    return {"n": n, "mean": ratio, "ci95": [ratio - half, ratio + half]}


def instruction_accuracy(records: list[dict]) -> dict | None:
    """IFEval's strict accuracies over records with `instructions_followed` (a bool per instruction):
    instruction-level (instructions followed / instructions) and prompt-level (share of prompts that
    follow all of theirs), each with its 95% interval; None when no record has them."""
    rows = [r["instructions_followed"] for r in records if r.get("instructions_followed")]
    if not rows:
        return None
    return {"instruction": ratio_with_interval([sum(f) for f in rows], [len(f) for f in rows]),
            "prompt": mean_with_interval([float(all(f)) for f in rows])}


def instruction_accuracy_change(before: list[dict], after: list[dict]) -> dict | None:
    """The paired change of both IFEval accuracies, after minus before, over the prompts checked in both."""
    key = lambda r: r.get("instructions_followed") or None  # noqa: E731
    pairs = _paired(before, after, key)
    if not pairs:
        return None
    return {"instruction": ratio_with_interval([sum(b) - sum(a) for a, b in pairs], [len(a) for a, _ in pairs]),
            "prompt": mean_with_interval([float(all(b)) - float(all(a)) for a, b in pairs])}
