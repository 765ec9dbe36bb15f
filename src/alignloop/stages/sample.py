"""Stage 1, sample: n responses per prompt from the current policy, with the run's sampler
(`alignloop.sampling`: HF generate or a warm vLLM engine). Every extra field of a prompt record (a
verifier's constraints, say) is carried into its samples.
"""

from __future__ import annotations

from ..sampling import Sampler


def sample_records(prompts: list[dict], policy: str, sampler: Sampler, *, n: int, round_index: int, seed: int,
                   generator: str | None = None, progress: str | None = "sample", greedy: bool = False) -> list[dict]:
    """Sample records per the contract, prompt by prompt, sample_id 0..n-1."""
    outputs = sampler.generate(policy, prompts, n, seed, progress, greedy)
    records = []
    for prompt, samples in zip(prompts, outputs):
        for sample_id, sample in enumerate(samples):
            records.append({**prompt, "sample_id": sample_id, **sample, "round": round_index,
                            "generator": generator or policy})
    return records
