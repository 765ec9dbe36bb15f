"""The training stage on a tiny random Llama with the real SmolLM2 tokenizer."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from alignloop.config import LossConfig, OptimConfig
from alignloop.losses import LOSSES, dpo_loss, dpo_norm_loss, grpo_loss, ipo_loss, kto_loss, orpo_loss, sft_loss, simpo_loss, slic_loss
from alignloop.models import encode_prompt, encode_response, load_causal_lm, load_tokenizer
from alignloop.sampling.hf import generate
from alignloop.stages.train import TrainingError, build_examples, compute_reference_logps, loss_on_batch, train_round
from conftest import launcher_problem, torchrun

PROMPT = [{"role": "user", "content": "Say hi in lowercase."}]


def pairs(n=4):
    """n pairs with one consistent preference: the lowercase answer always wins. It sits in output_A for odd i
    (label 1) and in output_B for even i (label 0), so both directions of `label` are exercised. The answers
    differ in length, so summing and averaging log-probs give different numbers."""
    records = []
    for i in range(n):
        lower, upper = f"hi there {i}" + " and more" * (i % 3), f"HELLO THERE {i}!"
        a, b = (lower, upper) if i % 2 else (upper, lower)
        records.append({"type": "pairwise_feedback", "prompt_id": f"p{i}", "prompt": PROMPT, "output_A": a,
                        "output_B": b, "label": i % 2, "reward_A": float(i % 2), "reward_B": float(1 - i % 2),
                        "reward_difference": 1.0})
    return records


def chosen_rejected(pair: dict) -> tuple[str, str]:
    """Written out here, apart from the trainer's picker: label 1 means output_A is preferred."""
    return (pair["output_A"], pair["output_B"]) if pair["label"] == 1 else (pair["output_B"], pair["output_A"])


def test_sampler_and_trainer_render_prompts_identically(tiny_model):
    """The HF sampler feeds `generate` exactly the tokens the trainer builds its examples from."""
    tok = load_tokenizer(tiny_model)
    text = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert tok.decode(encode_prompt(tok, PROMPT)) == text
    assert text.endswith("<|im_start|>assistant\n")

    model = load_causal_lm(tiny_model).eval()
    fed = []
    real_generate = model.generate

    def recording_generate(input_ids, attention_mask, **kw):
        fed.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask))
        return real_generate(input_ids=input_ids, attention_mask=attention_mask, **kw)

    model.generate = recording_generate
    tok.padding_side = "left"
    prompts = [{"prompt_id": "a", "prompt": PROMPT},
               {"prompt_id": "b", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]}]
    sampled = generate(model, tok, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=4, stop=[], seed=0, batch_size=8)
    binary = [{"type": "binary_feedback", "prompt_id": p["prompt_id"], "prompt": p["prompt"], "output": row[0]["output"],
               "label": True} for p, row in zip(prompts, sampled)]
    examples = build_examples(binary, "kto", tok, max_length=512, seed=0)
    assert sorted(fed) == sorted(e.prompt for e in examples)  # the sampler batches longest prompt first
    assert [row[0]["prompt_tokens"] for row in sampled] == [len(e.prompt) for e in examples]
    # label 0 means B is chosen: the chosen response comes first
    dpo = build_examples(pairs(2), "dpo", tok, max_length=512, seed=0)
    assert dpo[0].prompt == encode_prompt(tok, PROMPT)
    assert dpo[0].responses == [encode_response(tok, "hi there 0"), encode_response(tok, "HELLO THERE 0!")]


def test_kto_takes_pairs_as_desirable_and_undesirable_with_mismatched_kl_outputs(tiny_model):
    """Each example's KL partner is another example's output, compared by value; every output is some example's
    partner exactly once (a derangement), so the reference point averages over the whole round."""
    tok = load_tokenizer(tiny_model)
    feedback = pairs(3)
    examples = build_examples(feedback, "kto", tok, max_length=512, seed=0)
    assert [e.desirable for e in examples] == [True, False] * 3
    expected = [encode_response(tok, text) for pair in feedback for text in chosen_rejected(pair)]
    outputs = [e.responses[0] for e in examples]
    assert outputs == expected and len(set(map(tuple, outputs))) == 6  # six distinct outputs
    for e in examples:
        assert e.kl_response != e.responses[0] and e.kl_response in outputs
    assert sorted(e.kl_response for e in examples) == sorted(outputs)


def test_pairwise_loss_refuses_binary_feedback(tiny_model):
    tok = load_tokenizer(tiny_model)
    binary = [{"type": "binary_feedback", "prompt_id": "a", "prompt": PROMPT, "output": "x", "label": True, "reward": 1.0}]
    with pytest.raises(TrainingError, match="needs pairwise feedback"):
        build_examples(binary, "dpo", tok, 512, 0)


def _config(loss="dpo", loss_params=None, **optim):
    """The loss and optim sections of a small, fast round (float32 throughout)."""
    settings = {"lr": 1e-3, "batch_size": 2, "epochs": 1, "warmup_steps": 3, "mixed_precision": "no", **optim}
    return {"loss": LossConfig(name=loss, **(loss_params or {})), "optim": OptimConfig(**settings)}


def test_round_two_resumes_adam_moments_and_scheduler(tiny_model, tmp_path):
    """The second round starts from the first round's Adam moments and scheduler position, not fresh ones."""
    r0, r1, fresh = tmp_path / "r0", tmp_path / "r1", tmp_path / "fresh"
    train_round(pairs(4), policy=tiny_model, reference=tiny_model, out_dir=r0, resume=None, **_config(), progress=False)
    state0 = json.loads((r0 / "training_state" / "trainer_state.json").read_text())
    assert state0["global_step"] == 2
    assert json.loads((r0 / "training_state" / "scheduler.json").read_text())["last_epoch"] == 2
    moments0 = load_file(str(r0 / "training_state" / "optimizer.safetensors"))
    assert any(k.endswith("exp_avg_sq") for k in moments0) and all(torch.isfinite(v).all() for v in moments0.values())

    train_round(pairs(4), policy=str(r0), reference=tiny_model, out_dir=r1, resume=r0, **_config(), round_index=1, progress=False)
    train_round(pairs(4), policy=str(r0), reference=tiny_model, out_dir=fresh, resume=None, **_config(), round_index=1, progress=False)
    assert json.loads((r1 / "training_state" / "trainer_state.json").read_text())["global_step"] == 4
    assert json.loads((r1 / "training_state" / "scheduler.json").read_text())["last_epoch"] == 4
    resumed, restarted = load_file(str(r1 / "training_state" / "optimizer.safetensors")), load_file(str(fresh / "training_state" / "optimizer.safetensors"))
    key = next(k for k in resumed if k.endswith(".step"))
    assert resumed[key].item() == 4 and restarted[key].item() == 2
    # Adam's second moment is a running average: after resuming it still holds round 0's gradients.
    sq = next(k for k in resumed if k.endswith("exp_avg_sq"))
    assert not torch.allclose(resumed[sq], restarted[sq])
    # warmup of 3 steps: step 4 runs at the full learning rate only when the scheduler position survived
    log = []
    train_round(pairs(2), policy=str(r1), reference=tiny_model, out_dir=tmp_path / "r2", resume=r1, **_config(),
                round_index=2, progress=False, log=log.append)
    assert log[0]["lr"] == pytest.approx(1e-3) and log[0]["step"] == 5


def test_a_round_killed_mid_way_goes_on_from_its_step_checkpoint(tiny_model, tmp_path):
    """optim.checkpoint_every: 1 and a SIGKILL after the second step's state is written; the rerun takes only
    steps 3 and 4, from that state, and ends with the weights and moments of a round never killed (CPU,
    float32)."""
    feedback = tmp_path / "feedback.jsonl"
    feedback.write_text("".join(json.dumps(p) + "\n" for p in pairs(8)))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    settings = _config(checkpoint_every=1)
    cmd = [sys.executable, "-m", "alignloop", "--no-progress", "train", str(feedback), "--out", str(killed),
           "--policy", tiny_model, "--lr", "1e-3", "--batch-size", "2", "--warmup-steps", "3", "--mixed-precision", "no",
           "--set", "optim.checkpoint_every=1"]
    crashed = subprocess.run(cmd, env={**os.environ, "ALIGNLOOP_CRASH_AT": "train.partial#2"}, capture_output=True,
                             text=True, timeout=600)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    partial = tmp_path / "killed.partial"
    assert not killed.exists() and json.loads((partial / "training_state/trainer_state.json").read_text())["partial"] == {
        "round": 0, "batches_done": 2}

    steps = []
    train_round(pairs(8), policy=tiny_model, reference=tiny_model, out_dir=killed, resume=None, **settings,
                progress=False, log=steps.append)
    assert [row["step"] for row in steps] == [3, 4]  # the first two steps were not taken again
    assert not partial.exists()
    train_round(pairs(8), policy=tiny_model, reference=tiny_model, out_dir=clean, resume=None, **settings, progress=False)
    for name in ("model.safetensors", "training_state/optimizer.safetensors"):
        a, b = load_file(str(killed / name)), load_file(str(clean / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    state = json.loads((killed / "training_state/trainer_state.json").read_text())
    assert state["global_step"] == 4 and "partial" not in state and state["rounds"][0]["steps"] == 4


def test_training_moves_the_policy_toward_chosen(tiny_model, tmp_path):
    """Several epochs of DPO on one consistent preference raise the chosen-vs-rejected log-ratio margin."""
    log = []
    train_round(pairs(4), policy=tiny_model, reference=tiny_model, out_dir=tmp_path / "c", resume=None,
                **_config(epochs=6, warmup_steps=0), progress=False, log=log.append)
    assert log[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy equals reference before the first step
    assert log[-1]["rewards/margin"] > log[0]["rewards/margin"] + 0.05
    assert log[-1]["loss"] < 0.69
    for key in ("grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "kl", "lr"):
        assert key in log[0]


def test_activation_checkpointing_recomputes_the_same_steps(tiny_model, tmp_path):
    """Recomputing each block in backward changes memory, not numbers: the same losses, grad norms and weights
    (float32)."""
    runs = {}
    for recompute in (False, True):
        log = []
        out = tmp_path / str(recompute)
        train_round(pairs(4), policy=tiny_model, reference=tiny_model, out_dir=out, resume=None,
                    **_config(activation_checkpointing=recompute), progress=False, log=log.append)
        runs[recompute] = (log, load_file(str(out / "model.safetensors")))
    (plain, plain_weights), (recomputed, recomputed_weights) = runs[False], runs[True]
    assert len(plain) == len(recomputed) == 2
    for a, b in zip(plain, recomputed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for name, tensor in plain_weights.items():
        assert torch.allclose(recomputed_weights[name], tensor, atol=1e-6), name


def test_forward_pieces_fill_the_token_budget_in_order():
    """Widths (a prompt once plus its responses) 10, 20, 5: a piece costs its rows times its widest row."""
    from alignloop.objectives import Example
    from alignloop.stages.train import forward_pieces

    batch = [Example([0] * 4, [[1] * 3, [2] * 3]), Example([0] * 10, [[1] * 5, [2] * 5]), Example([0] * 3, [[1] * 2])]
    widths = lambda pieces: [[len(e.prompt) + sum(map(len, e.responses)) for e in piece] for piece in pieces]  # noqa: E731
    assert widths(forward_pieces(batch, 40)) == [[10, 20], [5]]  # 2 x 20 fits, 3 x 20 does not
    assert widths(forward_pieces(batch, 39)) == [[10], [20], [5]]
    assert widths(forward_pieces(batch, 8)) == [[10], [20], [5]]  # a wider example is a piece of its own
    assert widths(forward_pieces(batch, None)) == [[10, 20, 5]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's behaviour")
def test_the_token_budget_is_1024_on_a_cpu_unless_set():
    from pydantic import ValidationError

    from alignloop.stages.train import token_budget

    assert OptimConfig().max_tokens_per_forward == "auto"
    assert token_budget("auto") == 1024
    assert token_budget(60) == 60 and token_budget(None) is None
    for bad in (0, "big"):
        with pytest.raises(ValidationError, match="max_tokens_per_forward"):
            OptimConfig(max_tokens_per_forward=bad)


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_a_micro_batch_in_pieces_takes_the_same_steps(tiny_model, tmp_path, loss):
    """`optim.max_tokens_per_forward` changes memory, not numbers: a micro-batch of 4 run whole, in pieces of
    two, and one example at a time gives the same losses, metrics, grad norms and weights (float32, up to
    rounding). KTO's reference point is still the whole micro-batch's."""
    runs = {}
    for budget in (None, 60, 1):
        log = []
        out = tmp_path / str(budget)
        train_round(pairs(8), policy=tiny_model, reference=tiny_model, out_dir=out, resume=None,
                    **_config(loss=loss, batch_size=4, max_tokens_per_forward=budget), progress=False, log=log.append)
        runs[budget] = (log, load_file(str(out / "model.safetensors")))
    whole, whole_weights = runs[None]
    assert len(whole) == 2 * (2 if loss == "dpo" else 4) // 2
    for budget in (60, 1):
        log, weights = runs[budget]
        for a, b in zip(whole, log, strict=True):
            assert set(a) == set(b)
            for key in a:
                # the pieces' gradients are summed in another order: float32 rounding, carried into later steps
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (budget, key)
        # Adam divides by the root of the second moment, so a near-zero gradient's rounding can move its
        # weight by more than the rounding itself (measured: one KTO element of 2048 by 1.4e-5; a step is 1e-3)
        for name, tensor in whole_weights.items():
            assert torch.allclose(weights[name], tensor, atol=1e-4), (budget, name)


def test_nan_loss_stops_with_a_clear_error_and_no_checkpoint(tiny_model, tmp_path):
    with pytest.raises(TrainingError, match="not finite"):
        train_round(pairs(2), policy=tiny_model, reference=tiny_model, out_dir=tmp_path / "n", resume=None,
                    **_config(loss_params={"beta": float("nan")}), progress=False)
    assert not (tmp_path / "n").exists()


def test_kto_round_runs_and_logs_kl(tiny_model, tmp_path):
    log = []
    summary = train_round(pairs(4), policy=tiny_model, reference=tiny_model, out_dir=tmp_path / "k", resume=None,
                          **_config(loss="kto"), progress=False, log=log.append)
    assert summary["examples"] == 8 and summary["steps"] == 4
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # policy equals reference at the first step


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo", "slic", "orpo", "kto", "sft"])
def test_every_feedback_loss_trains_a_round(loss, tiny_model, tmp_path):
    """Each loss the config accepts runs a round; losses without a reference skip reference log-probs."""
    log = []
    summary = train_round(pairs(4), policy=tiny_model, reference=str(tmp_path / "no-reference-needed") if loss in ("simpo", "orpo", "sft") else tiny_model,
                          out_dir=tmp_path / loss, resume=None, **_config(loss=loss), progress=False, log=log.append)
    assert summary["steps"] == len(log) >= 2
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) for row in log)
    assert (tmp_path / loss / "model.safetensors").exists()


def test_grpo_trains_on_scored_groups(tiny_model, tmp_path):
    """GRPO takes scored samples; a group whose rewards are all equal carries no signal and is left out."""
    scored = [{"prompt_id": "a", "sample_id": i, "prompt": PROMPT, "output": o, "reward": r}
              for i, (o, r) in enumerate([("hi", 1.0), ("HI", 0.0), ("hey", 0.5)])]
    scored += [{"prompt_id": "b", "sample_id": i, "prompt": PROMPT, "output": o, "reward": 0.5} for i, o in enumerate(["x", "y"])]
    scored.append({"prompt_id": "b", "sample_id": 2, "prompt": PROMPT, "output": "z", "reward": None, "label_error": "x"})
    examples = build_examples(scored, "grpo", load_tokenizer(tiny_model), 512, 0)
    assert [round(e.advantage, 4) for e in examples] == [round(0.5 / (0.5 + 1e-4), 4), round(-0.5 / (0.5 + 1e-4), 4)]
    log = []
    summary = train_round(scored, policy=tiny_model, reference=tiny_model, out_dir=tmp_path / "g", resume=None,
                          **_config(loss="grpo"), progress=False, log=log.append)
    assert summary["examples"] == 2 and summary["steps"] == 1
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference before the update
    with pytest.raises(TrainingError, match="scored samples"):
        build_examples(pairs(2), "grpo", load_tokenizer(tiny_model), 512, 0)


# ---- every loss wired end to end: `loss_on_batch` equals the pure loss fed with log-probs computed here ----

# How each loss takes a response's log-prob, as its paper and TRL do: summed over tokens, or averaged.
AVERAGED = {"dpo": False, "dpo_norm": True, "ipo": True, "simpo": True, "slic": False, "orpo": True, "sft": False, "kto": False}


@pytest.fixture(scope="module")
def moved_policy(tiny_model, tmp_path_factory) -> str:
    """The tiny model with every weight nudged: a policy that differs from its reference (the tiny model), so
    that log-ratios are not zero and a swapped or mis-scaled input changes the loss."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("moved-policy")
    shutil.copytree(tiny_model, folder, dirs_exist_ok=True)
    g = torch.Generator().manual_seed(1)
    weights = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous()
               for k, v in load_file(str(folder / "model.safetensors")).items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


def logps_by_hand(model, prompt: list[int], response: list[int]) -> list[float]:
    """Log-probs of each response token after the prompt: one unpadded sequence, log-softmax in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    logps = logits - logits.logsumexp(-1, keepdim=True)
    return [float(logps[len(prompt) + k - 1, t]) for k, t in enumerate(response)]


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("loss", ["dpo", "rpo", "rdpo", "dpo_norm", "ipo", "simpo", "slic", "orpo", "sft"])
def test_pairwise_losses_take_the_right_log_probs(loss, tiny_model, moved_policy):
    """chosen and rejected in the right order, summed or averaged as the loss needs, the reference at the same
    scale: the trainer's loss equals the pure function fed with log-probs computed one sequence at a time.
    "rpo" is dpo with rpo_alpha: its NLL term needs each chosen response's length in tokens; "rdpo" is dpo with
    length_alpha, which needs both responses' lengths."""
    variants = {"rpo": {"rpo_alpha": 1.0}, "rdpo": {"length_alpha": 0.05}}
    params = dict(LOSSES["dpo"].defaults, **variants[loss]) if loss in variants else LOSSES[loss].defaults
    loss = "dpo" if loss in variants else loss
    tok = load_tokenizer(tiny_model)
    feedback = pairs(4)
    examples = build_examples(feedback, loss, tok, 512, seed=0)
    if LOSSES[loss].needs_reference:  # in batches of 3, so one batch is padded and one is not full
        compute_reference_logps(loss, examples, tiny_model, "float32", 3, tok.pad_token_id, False, False)
    policy, reference = load_causal_lm(moved_policy).eval(), load_causal_lm(tiny_model).eval()
    losses, _ = loss_on_batch(loss, params, policy, examples, tok.pad_token_id)

    prompt = encode_prompt(tok, PROMPT)

    def logp(model, text):
        per_token = logps_by_hand(model, prompt, encode_response(tok, text))
        return sum(per_token) / (len(per_token) if AVERAGED[loss] else 1)

    chosen, rejected = zip(*map(chosen_rejected, feedback))
    pc, pr = f64([logp(policy, t) for t in chosen]), f64([logp(policy, t) for t in rejected])
    if loss == "sft":
        expected, _ = sft_loss(pc, f64([len(encode_response(tok, t)) for t in chosen]))
    elif loss in ("simpo", "orpo"):
        expected = {"simpo": simpo_loss, "orpo": orpo_loss}[loss](pc, pr)[0]
    else:
        rc, rr = f64([logp(reference, t) for t in chosen]), f64([logp(reference, t) for t in rejected])
        expected = {"dpo": dpo_loss, "dpo_norm": dpo_norm_loss, "ipo": ipo_loss, "slic": slic_loss}[loss](pc, pr, rc, rr)[0]
        lengths = [f64([len(encode_response(tok, t)) for t in texts]) for texts in (chosen, rejected)]
        if params.get("rpo_alpha"):
            expected = expected - pc / lengths[0]
        if params.get("length_alpha"):  # the pairs' lengths differ, so this is not DPO's loss
            expected = dpo_loss(pc, pr, rc, rr, length_alpha=0.05, chosen_lengths=lengths[0], rejected_lengths=lengths[1])[0]
            assert (expected - dpo_loss(pc, pr, rc, rr)[0]).abs().max() > 1e-3
    assert losses.shape == (4,)
    torch.testing.assert_close(losses.double(), expected, atol=2e-4, rtol=1e-4)


def test_kto_takes_its_outputs_and_mismatched_partners(tiny_model, moved_policy):
    """Here the nudged model is the reference: the policy then gives the partners more probability than the
    reference does, so z0 > 0 and is not clamped away, and a wrong partner would change the loss."""
    tok = load_tokenizer(tiny_model)
    feedback = pairs(3)
    examples = build_examples(feedback, "kto", tok, 512, seed=0)
    compute_reference_logps("kto", examples, moved_policy, "float32", 4, tok.pad_token_id, False, False)
    policy, reference = load_causal_lm(tiny_model).eval(), load_causal_lm(moved_policy).eval()
    losses, metrics = loss_on_batch("kto", LOSSES["kto"].defaults, policy, examples, tok.pad_token_id)

    prompt = encode_prompt(tok, PROMPT)
    outputs = [encode_response(tok, text) for pair in feedback for text in chosen_rejected(pair)]
    desirable = torch.tensor([True, False] * 3)
    partners = [e.kl_response for e in examples]  # which output is each one's partner is checked above
    logp = lambda model, responses: f64([sum(logps_by_hand(model, prompt, r)) for r in responses])  # noqa: E731
    expected, _, kl = kto_loss(logp(policy, outputs), logp(reference, outputs), logp(policy, partners),
                               logp(reference, partners), desirable)
    assert float(kl) > 0.05
    torch.testing.assert_close(losses.double(), expected, atol=2e-4, rtol=1e-4)
    assert metrics["kl"] == pytest.approx(float(kl), abs=1e-4)


def test_grpo_takes_per_token_log_probs_and_group_advantages(tiny_model, moved_policy):
    tok = load_tokenizer(tiny_model)
    scored = [{"prompt_id": "a", "sample_id": i, "prompt": PROMPT, "output": o, "reward": r}
              for i, (o, r) in enumerate([("hi there friend", 1.0), ("HI", 0.0), ("hey", 0.5)])]
    examples = build_examples(scored, "grpo", tok, 512, 0)
    compute_reference_logps("grpo", examples, tiny_model, "float32", 4, tok.pad_token_id, False, False)
    policy, reference = load_causal_lm(moved_policy).eval(), load_causal_lm(tiny_model).eval()
    losses, _ = loss_on_batch("grpo", LOSSES["grpo"].defaults, policy, examples, tok.pad_token_id)

    prompt = encode_prompt(tok, PROMPT)
    responses = [encode_response(tok, "hi there friend"), encode_response(tok, "HI")]  # "hey" is the mean: no signal
    width = max(map(len, responses))
    padded = lambda rows: f64([row + [0.0] * (width - len(row)) for row in rows])  # noqa: E731
    mask = torch.tensor([[k < len(r) for k in range(width)] for r in responses])
    advantage = 0.5 / (0.5 + 1e-4)  # rewards 1 and 0 around the group mean 0.5, sample std 0.5
    expected, _, _ = grpo_loss(padded([logps_by_hand(policy, prompt, r) for r in responses]), mask,
                               f64([advantage, -advantage]),
                               reference_logps=padded([logps_by_hand(reference, prompt, r) for r in responses]))
    torch.testing.assert_close(losses.double(), expected, atol=2e-4, rtol=1e-4)


KTO_WORKER = """
import json, sys
import torch
import alignloop.stages.train as train
from alignloop.logprobs import sequence_logps

feedback, policy, reference, out = sys.argv[1:5]
seen, real = [], train.loss_on_batch

def spy(loss, params, model, batch, pad_id, kl_override=None):
    # this process's own estimate of the reference point, from its own micro-batch
    with torch.no_grad():
        kl_logps, _ = sequence_logps(model, [e.prompt for e in batch], [e.kl_response for e in batch], pad_id)
    local = float((kl_logps - torch.tensor([e.reference_logps[1] for e in batch])).mean())
    seen.append({"used": float(kl_override), "local": local})
    return real(loss, params, model, batch, pad_id, kl_override=kl_override)

train.loss_on_batch = spy
records = [json.loads(line) for line in open(feedback)]
from alignloop.config import LossConfig, OptimConfig
optim = OptimConfig(lr=1e-3, batch_size=4, epochs=1, warmup_steps=0, mixed_precision="no")
train.train_round(records, policy=policy, reference=reference, out_dir=out + "/ckpt", resume=None, loss=LossConfig(name="kto"), optim=optim,
                  progress=False)
rank = torch.distributed.get_rank()
open(f"{out}/rank{rank}.json", "w").write(json.dumps(seen))
"""


@pytest.mark.requires(launcher_problem())
def test_two_process_kto_steps_share_one_reference_point(tiny_model, moved_policy, tmp_path):
    """Under data parallelism KTO's reference point z0 is the mean of the processes' estimates, the same
    number on every process (TRL and HALOs gather it too), not each process's own."""
    feedback = tmp_path / "feedback.jsonl"
    feedback.write_text("".join(json.dumps(p) + "\n" for p in pairs(4)))
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(KTO_WORKER))
    result = subprocess.run([*torchrun(2), str(worker), str(feedback), moved_policy, tiny_model, str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1))
    assert len(rank0) == len(rank1) == 2  # 8 examples in batches of 4, each split 2 + 2: two steps
    for a, b in zip(rank0, rank1):
        assert a["local"] != pytest.approx(b["local"], abs=1e-3)  # the processes' own estimates differ...
        assert a["used"] == b["used"] == pytest.approx((a["local"] + b["local"]) / 2, abs=1e-5)  # ...one z0 is used
