"""LoRA adapters on the policy (`policy_adapter`): only small low-rank matrices train, the base model stays
frozen and untouched on disk, and the base with the adapter switched off is the reference, so no second model
is loaded.

A round's checkpoint of an adapter run is a peft adapter folder (`adapter_config.json`, whose
`base_model_name_or_path` names the base folder, and `adapter_model.safetensors`) with the tokenizer and the
`training_state/` of `alignloop.checkpoint`. Wherever a policy is loaded for inference (HF sampling, the
weight-sync check, the held-out KL, `alignloop export`), `models.load_causal_lm` sees such a folder and
returns the base with the adapter merged in.

QLoRA (`policy_adapter.quantize`): the trainer's base is held in 4 bits (bitsandbytes), so the adapter learns
on the quantised base, and the reference, the same base with the adapter off, is the quantised SFT model.
Everything that loads a round's policy for inference merges the adapter into the full-precision base, as
QLoRA models are deployed.

The trainer trains the transformers model inside the peft wrapper (`inner`), with peft's LoRA layers in it:
that model keeps the forward arguments the packed log-prob computation needs (`logits_to_keep`), which the
wrapper's forward does not pass on.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what peft's wrapper adds before the inner model's parameter names


class AdapterError(ValueError):
    """An adapter setting or folder that cannot be used (the message names it)."""


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def _adapter_config(folder: str | Path, key: str):
    path = Path(folder) / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text())[key]
    except (OSError, ValueError, KeyError) as e:
        raise AdapterError(f"{path}: not a readable adapter config ({type(e).__name__}: {e})") from None


def adapter_rank(folder: str | Path) -> int:
    return int(_adapter_config(folder, "r"))


def adapter_base(folder: str | Path) -> str:
    """The base model folder an adapter checkpoint was trained on."""
    base = _adapter_config(folder, "base_model_name_or_path")
    path = Path(folder) / ADAPTER_CONFIG
    if not base:
        raise AdapterError(f"{path}: base_model_name_or_path is empty; the adapter does not say which model it adapts")
    return base


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _peft():
    if not os.environ.get("ALIGNLOOP_VERBOSE"):
        # peft imports bitsandbytes where it is installed, whose CPU backend then warns that it cannot fetch a
        # faster kernel from the hub (which alignloop never reaches): noise, like the other libraries' (--verbose)
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import peft
    except ImportError:
        raise AdapterError("policy_adapter needs peft (pip install 'alignloop[lora]')") from None
    return peft


def load_merged(folder: str | Path, dtype: str = "float32", trust_remote_code: bool = False) -> torch.nn.Module:
    """The base model with the adapter's weights merged in: a plain transformers model."""
    from .models import load_causal_lm

    peft = _peft()
    base = load_causal_lm(adapter_base(folder), dtype, trust_remote_code)
    return peft.PeftModel.from_pretrained(base, str(folder)).merge_and_unload()


def trainable_policy(policy: str, base: str, adapter, dtype: str, trust_remote_code: bool = False,
                     bf16_compute: bool = False):
    """The base model with a trainable LoRA adapter, fresh (`adapter`: the AdapterConfig) or, when `policy` is a
    round's adapter checkpoint, that one's. Returns the peft wrapper; only the adapter's parameters require
    gradients. Under `adapter.quantize` the base's linear layers are 4-bit, computing in bfloat16 when
    `bf16_compute` (bf16 mixed precision), else in float32."""
    from .models import load_causal_lm

    peft = _peft()
    if adapter.quantize is not None:
        model = load_quantized(base, adapter.quantize, dtype, bf16_compute, trust_remote_code)
    else:
        model = load_causal_lm(base, dtype, trust_remote_code)
    if is_adapter(policy):
        return peft.PeftModel.from_pretrained(model, policy, is_trainable=True)
    config = peft.LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                             target_modules=adapter.target_modules, task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, config)
    wrapped.peft_config["default"].base_model_name_or_path = base  # the folder, however `policy` was named
    return wrapped


def load_quantized(base: str, quantize: str, dtype: str, bf16_compute: bool, trust_remote_code: bool = False):
    """`base` with its linear layers (all but the output head) stored in 4 bits, `quantize` being bitsandbytes'
    "nf4" or "fp4", double-quantised, on this process's device; the rest of the model in `dtype`."""
    import bitsandbytes as bnb  # (AdapterConfig.quantize is refused where it is not installed)
    from transformers import BitsAndBytesConfig

    from . import distributed
    from .models import load_causal_lm

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16 if bf16_compute else torch.float32)
    model = load_causal_lm(base, dtype, trust_remote_code, quantization_config=quantization,
                           device_map={"": distributed.device()})
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a layer's weights the first time it runs in eval
            # mode without gradients (the reference's scoring), into a layout whose matmul has no backward: every
            # training step after it would silently lose the gradient through the base layers. Never repack.
            layer.support_avx512bf16_for_cpu = False
    return model


def inner(wrapped) -> torch.nn.Module:
    """The transformers model inside peft's wrapper (its layers carry the adapter)."""
    return wrapped.base_model.model


def save_adapter(wrapped, weights: dict[str, torch.Tensor], folder: Path) -> None:
    """The adapter's config and its tensors, taken from `weights`: the inner model's whole state dict, gathered
    from every process (see `checkpoint.save_checkpoint`)."""
    from safetensors.torch import save_file

    peft = _peft()
    state = peft.get_peft_model_state_dict(wrapped, state_dict={PEFT_PREFIX + k: v for k, v in weights.items()})
    folder.mkdir(parents=True, exist_ok=True)
    wrapped.peft_config["default"].save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
