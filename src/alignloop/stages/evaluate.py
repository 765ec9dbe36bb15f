"""Stage 5, eval: greedy answers to held-out prompts (scored by the run's labeler, in the loop), and the paired
confidence interval of the change between two evaluations."""

from __future__ import annotations

import math
import statistics

from ..sampling import Sampler
from .sample import sample_records


def heldout_samples(policy: str, prompts: list[dict], sampler: Sampler, round_index: int, seed: int,
                    progress: str | None = "held-out", generator: str | None = None) -> list[dict]:
    """One greedy answer per held-out prompt, from the run's sampler (the loop scores them with its labeler)."""
    return sample_records(prompts, policy, sampler, n=1, round_index=round_index, seed=seed, generator=generator,
                          progress=progress, greedy=True)


def mean_reward(scored: list[dict]) -> float | None:
    rewards = [r["reward"] for r in scored if r.get("reward") is not None]
    return sum(rewards) / len(rewards) if rewards else None


def _t_quantile_975(df: int) -> float:
    """Student t 97.5% quantile (Cornish-Fisher expansion around the normal; within 0.01 for df >= 5)."""
    z = 1.959963984540054
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_difference(before: list[dict], after: list[dict]) -> dict:
    """Mean of after-minus-before reward over the prompts scored in both, with a 95% t interval."""
    a = {r["prompt_id"]: r["reward"] for r in before if r.get("reward") is not None}
    b = {r["prompt_id"]: r["reward"] for r in after if r.get("reward") is not None}
    diffs = [b[k] - a[k] for k in a if k in b]
    n = len(diffs)
    if n < 2:
        return {"n": n, "mean": diffs[0] if diffs else None, "ci95": None}
    mean = statistics.fmean(diffs)
    half = _t_quantile_975(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return {"n": n, "mean": mean, "ci95": [mean - half, mean + half]}
