"""Held-out evaluation: greedy answers to held-out prompts, scored by the run's labeler, and the paired
confidence interval of the change between two evaluations."""

from __future__ import annotations

import math
import statistics

from .stages.label import label_records
from .stages.sample import sample_records


def evaluate_policy(policy: str, prompts: list[dict], labeler, sampler, round_index: int, seed: int,
                    trust_remote_code: bool = False, progress: str | None = "held-out",
                    generator: str | None = None, engine=None) -> list[dict]:
    """Scored records of one greedy answer per held-out prompt (from the vLLM `engine` when given)."""
    samples = sample_records(
        prompts, policy, n=1, round_index=round_index, seed=seed, temperature=0.0, top_p=1.0,
        max_new_tokens=sampler.max_new_tokens, stop=sampler.stop, batch_size=sampler.batch_size,
        dtype=sampler.dtype, trust_remote_code=trust_remote_code, progress=progress, generator=generator, engine=engine,
    )
    scored, _ = label_records(samples, labeler, progress=None)
    return scored


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
