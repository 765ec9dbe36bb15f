"""LoRA adapters on the policy (`policy_adapter`), on the tiny random Llama: only the adapter trains, the base
stays as it was, the base with the adapter off is the reference, resume keeps the moments, and a round exports
to a plain model folder."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import alignloop.stages.train as train_stage
from alignloop.adapters import ADAPTER_WEIGHTS, adapter_base, inner, is_adapter, trainable_policy
from alignloop.config import AdapterConfig, LossConfig, OptimConfig
from alignloop.models import load_causal_lm, load_tokenizer, weights_sha256
from alignloop.stages.train import build_examples, compute_reference_logps, train_round
from conftest import bitsandbytes_problem
from test_train import pairs

LORA = AdapterConfig(r=4, alpha=8)


def _round(policy, reference, out, resume=None, round_index=0, lr=1e-2, adapter=LORA, feedback=None, **kw):
    """One dpo round of the tiny model (float32 throughout) with a LoRA adapter, at a learning rate that
    moves the adapter visibly."""
    optim = OptimConfig(lr=lr, batch_size=2, epochs=1, warmup_steps=0, mixed_precision="no")
    return train_round(feedback or pairs(4), policy=str(policy), reference=str(reference), out_dir=out,
                       resume=resume, loss=LossConfig(name="dpo"), optim=optim, round_index=round_index,
                       progress=False, adapter=adapter, **kw)


def _cli_run(run_dir, policy, *overrides) -> subprocess.CompletedProcess:
    """`alignloop run` of the two-round tiny loop with `overrides`, which must end well."""
    from conftest import tiny_run_overrides

    sets = tiny_run_overrides(run_dir, policy) + list(overrides)
    cmd = [sys.executable, "-m", "alignloop.cli", "run", *(a for o in sets for a in ("--set", o))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.fixture(scope="module")
def trained_adapter(tiny_model, tmp_path_factory):
    """A round's adapter checkpoint trained on the tiny model, and the base's hash taken before it."""
    before = weights_sha256(tiny_model)
    out = tmp_path_factory.mktemp("lora") / "r0"
    _round(tiny_model, tiny_model, out)
    return out, before


def test_only_the_adapter_trains_and_the_base_is_untouched(tiny_model, trained_adapter):
    out, before = trained_adapter
    assert weights_sha256(tiny_model) == before  # the base folder is byte for byte what it was
    assert is_adapter(out) and adapter_base(out) == tiny_model
    assert not (out / "model.safetensors").exists()  # the checkpoint holds the adapter, not a model
    adapter = load_file(str(out / ADAPTER_WEIGHTS))
    assert adapter and all("lora_" in k for k in adapter)
    # r 4 on every linear layer of the 2 blocks (q, k, v, o, gate, up, down): an A and a B each
    assert len(adapter) == 2 * 7 * 2
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())  # B starts at 0: it moved
    # the moments are the adapter's alone: one exp_avg per adapter matrix, none for a base weight
    moments = load_file(str(out / "training_state" / "optimizer.safetensors"))
    averaged = {k.removesuffix(".exp_avg") for k in moments if k.endswith(".exp_avg")}
    assert len(averaged) == len(adapter) and all("lora_" in k for k in averaged)
    # loaded for inference, the round's policy is the base with the adapter merged in: a different model
    base, merged = load_causal_lm(tiny_model), load_causal_lm(str(out))
    assert type(merged) is type(base)
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed and all("proj" in n for n in changed)


def test_the_reference_is_the_base_with_the_adapter_off(tiny_model, trained_adapter, monkeypatch):
    """Reference log-probs from the policy with its (trained, non-zero) adapter switched off equal the SFT
    model's, and no second model is loaded for them."""
    out, _ = trained_adapter
    tok = load_tokenizer(tiny_model)
    examples = build_examples(pairs(4), "dpo", tok, 512, seed=0)
    from_sft, from_adapter_off, from_policy = (copy.deepcopy(examples) for _ in range(3))
    compute_reference_logps("dpo", from_sft, tiny_model, "float32", 3, tok.pad_token_id, False, False)
    compute_reference_logps("dpo", from_policy, str(out), "float32", 3, tok.pad_token_id, False, False)
    wrapped = trainable_policy(str(out), tiny_model, LORA, "float32")
    monkeypatch.setattr(train_stage, "load_causal_lm", lambda *a, **k: pytest.fail("a second model was loaded"))
    compute_reference_logps("dpo", from_adapter_off, tiny_model, "float32", 3, tok.pad_token_id, False, False,
                            adapter_off=wrapped)
    sft = torch.tensor([e.reference_logps for e in from_sft])
    torch.testing.assert_close(torch.tensor([e.reference_logps for e in from_adapter_off]), sft, rtol=0, atol=1e-5)
    # with the adapter on, the same examples score differently: the comparison above can tell them apart
    assert (torch.tensor([e.reference_logps for e in from_policy]) - sft).abs().max() > 1e-3
    # and the adapter is on again afterwards
    with torch.no_grad():
        ids = torch.tensor([examples[0].prompt + examples[0].responses[0]])
        on, off = wrapped(input_ids=ids).logits, load_causal_lm(tiny_model)(input_ids=ids).logits
    assert (on - off).abs().max() > 1e-3


def test_a_resumed_round_keeps_the_adapter_moments(tiny_model, trained_adapter, tmp_path):
    out, _ = trained_adapter
    resumed, fresh = tmp_path / "r1", tmp_path / "fresh"
    _round(out, tiny_model, resumed, resume=out, round_index=1)
    _round(out, tiny_model, fresh, resume=None, round_index=1)
    a = load_file(str(resumed / "training_state" / "optimizer.safetensors"))
    b = load_file(str(fresh / "training_state" / "optimizer.safetensors"))
    assert a.keys() == b.keys()
    step = next(k for k in a if k.endswith(".step"))
    assert a[step].item() == 4 and b[step].item() == 2
    sq = next(k for k in a if k.endswith("exp_avg_sq"))
    assert not torch.allclose(a[sq], b[sq], rtol=1e-2, atol=0)  # round 0's gradients are still in the resumed second moment
    # round 1 trained the adapter further from round 0's, on the same base
    assert adapter_base(resumed) == tiny_model
    r0, r1 = load_file(str(out / ADAPTER_WEIGHTS)), load_file(str(resumed / ADAPTER_WEIGHTS))
    assert r0.keys() == r1.keys() and any(not torch.equal(r0[k], r1[k]) for k in r0)
    assert json.loads((resumed / "training_state" / "trainer_state.json").read_text())["global_step"] == 4


def test_a_lora_run_samples_with_its_adapter_and_exports(tiny_model, tmp_path):
    """The whole loop with an adapter (HF sampling): round 1 samples from round 0's adapter checkpoint, old
    checkpoints are cleaned as usual, and `alignloop export` writes a plain model folder that transformers
    loads and that computes what the merged adapter computes."""
    run_dir = tmp_path / "run"
    before = weights_sha256(tiny_model)
    _cli_run(run_dir, tiny_model, "policy_adapter.r=4", "policy_adapter.alpha=8")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["rounds"]["1"]["sample"]["policy"] == str(run_dir / "rounds" / "r000" / "checkpoint")
    assert manifest["rounds"]["0"]["train"].get("cleaned")  # keep_checkpoints 1
    last = run_dir / "rounds" / "r001" / "checkpoint"
    assert is_adapter(last) and weights_sha256(tiny_model) == before

    out = tmp_path / "exported"
    done = subprocess.run([sys.executable, "-m", "alignloop.cli", "export", str(run_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "round 1" in done.stdout
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    assert not (out / "training_state").exists()
    from transformers import AutoModelForCausalLM

    exported, merged = AutoModelForCausalLM.from_pretrained(out), load_causal_lm(str(last))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, merged(input_ids=ids).logits)
        assert (exported(input_ids=ids).logits - load_causal_lm(tiny_model)(input_ids=ids).logits).abs().max() > 1e-4

    # a cleaned round and an existing folder are refused in one line, and nothing is written
    for args, said in (([ "--round", "0", "--out", str(tmp_path / "r0")], "round 0 has no checkpoint"),
                       (["--out", str(out)], "already exists")):
        done = subprocess.run([sys.executable, "-m", "alignloop.cli", "export", str(run_dir), *args],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and said in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "r0").exists()


# ---- QLoRA: the frozen base in 4 bits (bitsandbytes; its CPU backend here) ----

QLORA = AdapterConfig(r=4, alpha=8, quantize="nf4")
needs_bitsandbytes = pytest.mark.requires(bitsandbytes_problem())


@pytest.fixture(scope="module")
def qlora_rounds(wide_tiny_model, tmp_path_factory):
    """Two QLoRA rounds on the wide tiny model, the second resumed from the first, and the base's hash before."""
    before = weights_sha256(wide_tiny_model)
    r0 = tmp_path_factory.mktemp("qlora") / "r0"
    r1 = r0.with_name("r1")
    _round(wide_tiny_model, wide_tiny_model, r0, adapter=QLORA)
    _round(r0, wide_tiny_model, r1, resume=r0, round_index=1, adapter=QLORA)
    return r0, r1, before


@needs_bitsandbytes
def test_qlora_trains_the_adapter_on_a_4bit_base_that_stays_untouched(wide_tiny_model, qlora_rounds):
    import bitsandbytes as bnb

    r0, r1, before = qlora_rounds
    assert weights_sha256(wide_tiny_model) == before
    wrapped = trainable_policy(str(r1), wide_tiny_model, QLORA, "float32")
    quantized = [m for m in wrapped.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7 and all(m.weight.dtype == torch.uint8 for m in quantized)  # every linear layer but the head
    assert quantized[0].weight.quant_state.quant_type == "nf4"
    assert sorted(n for n, p in wrapped.named_parameters() if p.requires_grad) == sorted(
        n for n, _ in wrapped.named_parameters() if "lora_" in n)
    for out in (r0, r1):
        assert is_adapter(out) and adapter_base(out) == wide_tiny_model and not (out / "model.safetensors").exists()
        adapter = load_file(str(out / ADAPTER_WEIGHTS))
        assert len(adapter) == 2 * 7 * 2 and all("lora_" in k for k in adapter)
        moments = load_file(str(out / "training_state" / "optimizer.safetensors"))
        assert {k.removesuffix(".exp_avg") for k in moments if k.endswith(".exp_avg")}.__len__() == len(adapter)
    # resumed: round 0's two steps are in round 1's moments, and the adapter moved on
    step = load_file(str(r1 / "training_state" / "optimizer.safetensors"))
    assert next(v for k, v in step.items() if k.endswith(".step")).item() == 4
    a0, a1 = load_file(str(r0 / ADAPTER_WEIGHTS)), load_file(str(r1 / ADAPTER_WEIGHTS))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in a0.items())
    assert any(not torch.equal(a0[k], a1[k]) for k in a0)
    # loaded for inference, a round is the full-precision base with the adapter merged in
    merged = load_causal_lm(str(r1))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


@needs_bitsandbytes
def test_the_qlora_reference_is_the_4bit_base_with_the_adapter_off(wide_tiny_model, qlora_rounds, monkeypatch):
    """With the adapter off, the policy scores as the SFT model quantised to 4 bits does (loaded on its own, no
    adapter): that is QLoRA's reference. It is not the full-precision SFT model, but near it."""
    from alignloop.adapters import load_quantized

    r0, _, _ = qlora_rounds
    tok = load_tokenizer(wide_tiny_model)
    examples = build_examples(pairs(4), "dpo", tok, 512, seed=0)
    from_adapter_off, from_sft = copy.deepcopy(examples), copy.deepcopy(examples)
    wrapped = trainable_policy(str(r0), wide_tiny_model, QLORA, "float32")
    monkeypatch.setattr(train_stage, "load_causal_lm", lambda *a, **k: pytest.fail("a second model was loaded"))
    compute_reference_logps("dpo", from_adapter_off, wide_tiny_model, "float32", 3, tok.pad_token_id, False, False,
                            adapter_off=wrapped)
    monkeypatch.undo()
    compute_reference_logps("dpo", from_sft, wide_tiny_model, "float32", 3, tok.pad_token_id, False, False)
    # the SFT model loaded on its own in 4 bits, scored the same way
    from_quantized = copy.deepcopy(examples)
    monkeypatch.setattr(train_stage, "load_causal_lm", lambda *a, **k: load_quantized(wide_tiny_model, "nf4", "float32", False))
    compute_reference_logps("dpo", from_quantized, wide_tiny_model, "float32", 3, tok.pad_token_id, False, False)
    monkeypatch.undo()
    off = torch.tensor([e.reference_logps for e in from_adapter_off])
    torch.testing.assert_close(off, torch.tensor([e.reference_logps for e in from_quantized]), rtol=0, atol=1e-5)
    sft = torch.tensor([e.reference_logps for e in from_sft])
    gap = (off - sft).abs().max()
    assert 1e-4 < gap < 0.05 * sft.abs().max(), (gap, sft)  # 4 bits change the scores a little, not much


@needs_bitsandbytes
def test_a_qlora_run_samples_merged_and_exports(wide_tiny_model, tmp_path):
    """The whole loop from the command line with `policy_adapter.quantize: nf4`: it ends, the base is
    untouched, bitsandbytes' hub-kernel notice stays out of stderr, and the export loads in transformers."""
    run_dir = tmp_path / "run"
    before = weights_sha256(wide_tiny_model)
    done = _cli_run(run_dir, wide_tiny_model, "policy_adapter.r=4", "policy_adapter.quantize=nf4")
    assert "bitsandbytes" not in done.stderr and "kernels" not in done.stderr, done.stderr[-2000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and weights_sha256(wide_tiny_model) == before
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["policy_adapter"]["quantize"] == "nf4"
    out = tmp_path / "exported"
    done = subprocess.run([sys.executable, "-m", "alignloop.cli", "export", str(run_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        delta = (exported(input_ids=ids).logits - load_causal_lm(wide_tiny_model)(input_ids=ids).logits).abs().max()
    assert delta > 1e-4  # the adapter trained on the 4-bit base, merged into the full-precision one


def test_qlora_settings_that_cannot_work_are_refused_at_config_time(monkeypatch):
    from alignloop import adapters
    from alignloop.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"policy_adapter.quantize: a 4-bit base trains on one process or under "
                                          r"optim.strategy ddp, not fsdp"):
        load_config(None, ["policy_adapter.quantize=nf4", "optim.strategy=fsdp"])
    with pytest.raises(ConfigError, match=r"policy_adapter.quantize: .*'nf4'.*'fp4'"):
        load_config(None, ["policy_adapter.quantize=int4"])
    monkeypatch.setattr(adapters, "bitsandbytes_installed", lambda: False)  # stands in for a machine without it
    with pytest.raises(ConfigError, match=r"policy_adapter.quantize: nf4 needs bitsandbytes "
                                          r"\(pip install 'alignloop\[qlora\]'\)"):
        load_config(None, ["policy_adapter.quantize=nf4"])
    assert load_config(None, ["policy_adapter.r=8"]).policy_adapter.quantize is None  # plain LoRA needs none of it


@needs_bitsandbytes
def test_qlora_gradients_are_those_of_the_dequantized_base(wide_tiny_model, qlora_rounds):
    """A training step through the 4-bit base gives the adapter the gradients the same adapter gets on the
    base's dequantised float32 weights, also after an eval-mode pass without gradients (the reference's
    scoring), after which bitsandbytes' CPU backend would repack the weights into a layout whose matmul has
    no backward, silently cutting the gradient that flows through the base layers."""
    import bitsandbytes as bnb

    r0, _, _ = qlora_rounds
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 12]])
    quantized = inner(trainable_policy(str(r0), wide_tiny_model, QLORA, "float32"))
    with torch.no_grad():
        quantized.eval()(input_ids=ids)
    quantized.train()(input_ids=ids, labels=ids).loss.backward()
    plain = inner(trainable_policy(str(r0), wide_tiny_model, LORA, "float32"))
    layers = {name: m for name, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 2 * 7
    with torch.no_grad():
        for name, m in plain.named_modules():
            if name in layers:
                m.weight.copy_(bnb.functional.dequantize_4bit(layers[name].weight.data, layers[name].weight.quant_state))
    plain.train()(input_ids=ids, labels=ids).loss.backward()
    expected = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in quantized.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys() and len(got) == 2 * 7 * 2
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-3, atol=1e-6, msg=n)
