"""Which implementation a training model's layers run: swaps made in place, before training, that change the
memory or the speed of a step and not its results.

- `lean_layers`: the RMSNorms in front of linear layers keep only their input for the backward, and under
  autocast hand their consumers the low-precision copy those would each have made; the SwiGLU MLPs keep
  only their two projections' outputs and recompute the rest in backward;
- `with_liger_kernels`: Liger's Triton kernels on GPUs (`optim.liger_kernels`).
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

from . import distributed


class KernelError(ValueError):
    """A kernel setting that cannot be honoured here (the message names the setting)."""


# The RMSNorms whose forward is exactly Llama's, `weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`, by class.
# Gemma's (1 + weight), OLMo 2's and others differ and keep their own forward (tests/test_kernels.py compares
# the listed classes' source with Llama's).
LLAMA_STYLE_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "SmolLM3RMSNorm")
# Where such a norm feeds linear layers only (attention and MLP inputs, the output head), so that its output
# may be handed over in autocast's dtype: a decoder layer's two norms and the model's last. Qwen3's per-head
# q_norm / k_norm feed the rotary embedding and keep float32 outputs.
LINEAR_FED_NORMS = ("input_layernorm", "post_attention_layernorm", "norm")
# The MLPs that are exactly Llama's, down_proj(act_fn(gate_proj(x)) * up_proj(x)), by class (and a SiLU act_fn
# and no biases, checked per instance).
LLAMA_STYLE_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Olmo2MLP", "SmolLM3MLP")


class _LeanRMSNorm(torch.autograd.Function):
    """Llama's RMSNorm, x [..., D] -> [..., D], with the same forward arithmetic and a lighter backward: it
    saves x and the per-row 1/rms [..., 1], where autograd would also keep the float32 normalised x [..., D],
    and recomputes that in backward. With `out_dtype` bfloat16 (under autocast) it returns what the linear
    layers after it would each have cast its float32 output to: one bfloat16 copy saved for their backward
    instead of one per layer (q, k and v; gate and up)."""

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (weight * (x32 * rstd).to(x.dtype)).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad = grad.float()
        grad_weight = (grad * normed.to(x.dtype)).reshape(-1, normed.size(-1)).sum(0)
        grad_normed = grad * weight.float()
        # d(x * rstd)/dx applied to grad_normed: rstd * (g - normed * mean(g * normed))
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None, None


def _lean_rms_norm_forward(self, hidden_states):
    device = hidden_states.device.type
    out = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden_states.dtype
    return _LeanRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon, out)


class _LeanSwiGLU(torch.autograd.Function):
    """The SwiGLU MLP's second half, down(silu(gate) * up): gate, up [..., I], the down projection's weight
    [D, I] -> [..., D], with the same forward arithmetic as Llama's MLP under the same autocast. It saves gate
    and up (saved there too) where autograd would also keep silu(gate) and the product [..., I], and
    recomputes those in backward with the same kernels autograd uses (`silu_backward`, the matmuls in the
    forward's dtype)."""

    @staticmethod
    def forward(ctx, gate, up, weight):
        hidden = F.silu(gate) * up
        ctx.save_for_backward(gate, up, weight)
        out = F.linear(hidden, weight)  # under autocast: cast as down_proj would
        ctx.matmul_dtype = out.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        gate, up, weight = ctx.saved_tensors
        silu = F.silu(gate)
        hidden = (silu * up).to(ctx.matmul_dtype)
        grad = grad.to(ctx.matmul_dtype)
        grad_weight = grad.reshape(-1, grad.size(-1)).t() @ hidden.reshape(-1, hidden.size(-1))
        grad_hidden = (grad @ weight.to(ctx.matmul_dtype)).to(gate.dtype)
        grad_gate = torch.ops.aten.silu_backward(grad_hidden * up, gate)
        return grad_gate, grad_hidden * silu, grad_weight.to(weight.dtype)


def _lean_swiglu_forward(self, x):
    if hasattr(self.down_proj.weight, "ds_id"):  # DeepSpeed ZeRO-3: whole only inside down_proj's own forward
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return _LeanSwiGLU.apply(self.gate_proj(x), self.up_proj(x), self.down_proj.weight)


def _is_plain_swiglu(module: torch.nn.Module) -> bool:
    """down(silu(gate(x)) * up(x)) with three bias-free linear layers: Llama's MLP and its copies."""
    projections = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    silu = type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")  # torch's, transformers'
    return (type(module).__name__ in LLAMA_STYLE_MLPS and silu
            and all(type(p) is torch.nn.Linear and p.bias is None for p in projections))


def lean_layers(model: torch.nn.Module) -> int:
    """Give every Llama-style RMSNorm that feeds linear layers `_LeanRMSNorm`'s forward, and every plain
    SwiGLU MLP `_LeanSwiGLU`'s (this model's instances only). Returns how many modules changed."""
    count = 0
    for name, module in model.named_modules():
        if type(module).__name__ in LLAMA_STYLE_RMS_NORMS and name.rsplit(".", 1)[-1] in LINEAR_FED_NORMS:
            module.forward = types.MethodType(_lean_rms_norm_forward, module)
            count += 1
        elif _is_plain_swiglu(module):
            module.forward = types.MethodType(_lean_swiglu_forward, module)
            count += 1
    return count


def with_liger_kernels(model, wanted: bool | None) -> bool:
    """Put Liger's Triton kernels in place of the model's RMSNorm, rotary embedding and SwiGLU layers (in
    place) when `wanted`; None: when liger-kernel is installed, the model trains on a GPU and Liger knows
    its architecture. Returns whether it did.

    Liger's fused linear preference losses are not used: `logprobs` already applies the output head in chunks
    without the full logits, for every loss, and those losses take the reference's hidden states from a
    reference model resident beside the policy, which alignloop frees after scoring the round once. (TRL
    1.16's DPOTrainer makes the same choice: Liger's layer kernels, its own chunked output head.)"""
    if wanted is False:
        return False
    if distributed.device().type != "cuda":
        if wanted:
            raise KernelError("optim.liger_kernels: true needs a GPU (Liger's kernels are written in Triton); "
                                "this process trains on the CPU")
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        if wanted:
            raise KernelError(f"optim.liger_kernels: true needs liger-kernel (pip install liger-kernel): {e}") from e
        return False
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        if wanted:
            raise KernelError(f"optim.liger_kernels: Liger has no kernels for model type '{model_type}'")
        return False
    # Liger logs a warning per optional backend it cannot import (CuTe DSL, Ascend) at the first forward;
    # its Triton kernels are the ones used, so those stay out of the user's terminal.
    logging.getLogger("liger_kernel.backends.registry").setLevel(logging.ERROR)
    # The output head stays alignloop's (`logprobs`): Liger's fused cross-entropy would replace the forward.
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return True
