"""Stage 1, sample: n responses per prompt from the current policy, with the run's sampler
(`alignloop.sampling`: HF generate or a warm vLLM engine). Every extra field of a prompt record (a
verifier's constraints, say) is carried into its samples.
"""

from __future__ import annotations

from typing import Callable

from ..sampling import Sampler


def sample_records(prompts: list[dict], policy: str, sampler: Sampler, *, n: int, round_index: int, seed: int,
                   generator: str | None = None, progress: str | None = "sample", greedy: bool = False,
                   on_prompt_done: Callable[[list[dict]], None] | None = None,
                   max_new_tokens: int | None = None) -> list[dict]:
    """Sample records per the contract, prompt by prompt, sample_id 0..n-1. `on_prompt_done(records)` gets a
    prompt's records as soon as they exist (for the prompts this process samples). `max_new_tokens`: a cap
    other than the sampler's."""
    def records_of(i: int, samples: list[dict]) -> list[dict]:
        return [{**prompts[i], "sample_id": sample_id, **sample, "round": round_index, "generator": generator or policy}
                for sample_id, sample in enumerate(samples)]

    report = None if on_prompt_done is None else lambda i, samples: on_prompt_done(records_of(i, samples))
    outputs = sampler.generate(policy, prompts, n, seed, progress, greedy, report, max_new_tokens)
    return [record for i, samples in enumerate(outputs) for record in records_of(i, samples)]
