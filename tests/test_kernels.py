"""Layer swaps for training (`alignloop.kernels`): the same numbers, less memory or more speed."""

import importlib.util

import pytest
import torch
from safetensors.torch import load_file
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from alignloop.config import LossConfig
from alignloop.kernels import LLAMA_STYLE_MLPS, LLAMA_STYLE_RMS_NORMS, KernelError, lean_layers, with_liger_kernels
from alignloop.models import load_causal_lm, load_tokenizer
from alignloop.stages import train
from alignloop.stages.train import build_examples, loss_on_batch, train_round
from test_train import _config, pairs


def test_lean_rms_norm_computes_llamas_norm_and_its_gradients():
    """Against transformers' LlamaRMSNorm on the same input and weight: the same float32 output (bit for bit)
    and the same gradients for x and the weight (up to float32 rounding); under bfloat16 autocast, the output
    is the bfloat16 cast that a linear layer would have made of Llama's float32 output, bit for bit."""
    torch.manual_seed(0)
    reference = LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(torch.randn(16))
    lean = LlamaRMSNorm(16, eps=1e-5)
    lean.load_state_dict(reference.state_dict())
    assert lean_layers(torch.nn.ModuleDict({"norm": lean})) == 1
    x = torch.randn(2, 5, 16) * 3
    upstream = torch.randn(2, 5, 16)
    grads = []
    for module in (reference, lean):
        xi = x.clone().requires_grad_()
        out = module(xi)
        (out * upstream).sum().backward()
        grads.append((out.detach(), xi.grad, module.weight.grad))
    (out_ref, gx_ref, gw_ref), (out_lean, gx_lean, gw_lean) = grads
    assert torch.equal(out_lean, out_ref)
    assert torch.allclose(gx_lean, gx_ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gw_lean, gw_ref, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lean(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, out_ref.to(torch.bfloat16))


def test_lean_swiglu_computes_llamas_mlp_and_its_gradients():
    """Against transformers' LlamaMLP on the same input and weights, under bfloat16 autocast as in training
    and in float32: the same output bit for bit, and the same gradients for x and the three weights."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2, hidden_act="silu")
    reference = LlamaMLP(config)
    for autocast in (True, False):
        lean = LlamaMLP(config)
        lean.load_state_dict(reference.state_dict())
        assert lean_layers(torch.nn.ModuleDict({"mlp": lean})) == 1
        x, upstream = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
        results = []
        for module in (reference, lean):
            module.zero_grad()
            xi = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = module(xi)
                (out.float() * upstream).sum().backward()
            results.append([out.detach(), xi.grad] + [p.grad for p in module.parameters()])
        for ref, got in zip(*results, strict=True):
            assert got.dtype == ref.dtype and torch.allclose(got, ref, rtol=1e-6, atol=1e-7), autocast
        assert torch.equal(results[1][0], results[0][0])


def test_lean_layers_replace_llamas_norms_before_linear_layers_and_its_mlps(tiny_model):
    """A Llama's two norms and its MLP per decoder layer, and its last norm; another model's instances are
    untouched."""
    model, untouched = load_causal_lm(tiny_model), load_causal_lm(tiny_model)
    assert lean_layers(model) == 3 * model.config.num_hidden_layers + 1
    patched = [n for n, m in model.named_modules() if "forward" in vars(m)]
    assert patched == [f"model.layers.{i}.{n}" for i in range(2) for n in ("mlp", "input_layernorm", "post_attention_layernorm")] + ["model.norm"]
    assert not any("forward" in vars(m) for m in untouched.modules())


@pytest.mark.parametrize("suffix, names", [("RMSNorm", LLAMA_STYLE_RMS_NORMS), ("MLP", LLAMA_STYLE_MLPS)])
def test_the_listed_layers_compute_what_llamas_do(suffix, names):
    """The lean swaps reproduce Llama's forward; every class they are listed for has that forward, word for
    word, in the installed transformers (a class it lacks is skipped)."""
    import importlib
    import inspect

    modeling = importlib.import_module("transformers.models.llama.modeling_llama")
    llama = inspect.getsource(getattr(modeling, "Llama" + suffix).forward)
    checked = 0
    for name in names:
        family = name.removesuffix(suffix).lower()
        try:
            cls = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)
        except (ImportError, AttributeError):
            continue
        assert inspect.getsource(cls.forward) == llama, name
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_a_round_with_lean_layers_takes_the_same_steps(tiny_model, tmp_path, monkeypatch, precision):
    """The trainer's lean layers change memory, not training: two steps with and without them give the same
    losses, grad norms and weights, to float32 rounding without autocast. Under bfloat16 autocast the forward
    is the same bit for bit, and the backward sums the three gradients reaching a norm's output (from q, k
    and v; from gate and up) in bfloat16 rather than float32, a rounding of its own."""
    runs = {}
    for lean in (False, True):
        if not lean:
            monkeypatch.setattr(train, "lean_layers", lambda model: 0)
        else:
            monkeypatch.undo()
        log = []
        out = tmp_path / str(lean)
        train_round(pairs(4), policy=tiny_model, reference=tiny_model, out_dir=out, resume=None,
                    **_config(mixed_precision=precision), progress=False, log=log.append)
        runs[lean] = (log, load_file(str(out / "model.safetensors")))
    (plain, plain_weights), (lean_log, lean_weights) = runs[False], runs[True]
    assert lean_log[0]["loss"] == plain[0]["loss"]  # the first forward: nothing has been trained yet
    rel = 1e-6 if precision == "no" else 1e-3  # measured under bf16: 4e-5 on the grad norms
    for a, b in zip(plain, lean_log, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=rel) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=rel)
    if precision == "no":  # (under bf16 Adam turns a near-zero gradient's rounding into a whole step, 1e-3)
        for name, tensor in plain_weights.items():
            assert torch.allclose(lean_weights[name], tensor, atol=1e-6), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's behaviour")
def test_liger_kernels_stay_off_the_cpu(tiny_model, tmp_path):
    """Liger's kernels are Triton, for GPUs: on a CPU the default (null) trains with torch's layers and the
    summary says so; `true` stops at once with an error naming the setting, and writes no checkpoint."""
    summary = train_round(pairs(2), policy=tiny_model, reference=tiny_model, out_dir=tmp_path / "default",
                          resume=None, **_config(), progress=False)
    assert summary["liger_kernels"] is False
    with pytest.raises(KernelError, match=r"optim\.liger_kernels: true needs a GPU"):
        train_round(pairs(2), policy=tiny_model, reference=tiny_model, out_dir=tmp_path / "liger", resume=None,
                    **_config(liger_kernels=True), progress=False)
    assert not (tmp_path / "liger").exists()


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="needs a GPU and liger-kernel")
def test_liger_kernels_give_the_same_log_probs_and_gradients(tiny_model):
    """On a GPU with liger-kernel: Liger's RMSNorm, RoPE and SwiGLU in place of torch's give the same
    response log-probs and DPO gradients up to bf16 rounding. (The same check on an H200 with SmolLM2-135M's
    shape, random weights, 8 pairs: per-token log-probs within 0.0094, gradient cosine 0.99998.)"""
    from alignloop.logprobs import response_logps
    tok = load_tokenizer(tiny_model)
    examples = build_examples(pairs(4), "dpo", tok, 512, 0)
    for e in examples:
        e.reference_logps = [0.0, 0.0]
    model = load_causal_lm(tiny_model).cuda().train()

    def logps_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses, _ = loss_on_batch("dpo", LossConfig(name="dpo").params, model, examples, tok.pad_token_id)
            logps, mask = response_logps(model, [e.prompt for e in examples], [e.responses for e in examples],
                                         tok.pad_token_id)
        losses.mean().backward()
        return logps.detach().float()[mask], torch.cat([p.grad.flatten() for p in model.parameters()])

    torch_logps, torch_grads = logps_and_grads()
    assert with_liger_kernels(model, True)
    liger_logps, liger_grads = logps_and_grads()
    assert (liger_logps - torch_logps).abs().max() < 0.05
    assert torch.nn.functional.cosine_similarity(liger_grads, torch_grads, dim=0) > 0.999
