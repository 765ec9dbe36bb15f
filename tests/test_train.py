"""The training stage on a tiny random Llama with the real SmolLM2 tokenizer."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from alignloop.logprobs import sequence_logps
from alignloop.models import encode_prompt, encode_response, load_causal_lm, load_tokenizer
from alignloop.stages.train import TrainConfig, TrainingError, build_examples, train_round

PROMPT = [{"role": "user", "content": "Say hi in lowercase."}]


def pairs(n=4):
    return [
        {"type": "pairwise_feedback", "prompt_id": f"p{i}", "prompt": PROMPT, "output_A": f"hi there {i}",
         "output_B": f"HELLO THERE {i}", "label": i % 2, "reward_A": 1.0 * (i % 2), "reward_B": 1.0 * (1 - i % 2),
         "reward_difference": 1.0}
        for i in range(n)
    ]


def test_sequence_logps_sum_only_response_tokens(tiny_model):
    """Checked against a token-by-token log_softmax written out by hand."""
    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model).eval()
    prompt, response = encode_prompt(tok, PROMPT), encode_response(tok, "hi there")
    short = encode_response(tok, "hi")
    with torch.no_grad():
        logps, lengths = sequence_logps(model, [prompt, prompt], [response, short], tok.pad_token_id)
        logits = model(torch.tensor([prompt + response])).logits[0].log_softmax(-1)
    expected = sum(float(logits[len(prompt) + k - 1, t]) for k, t in enumerate(response))
    assert lengths.tolist() == [len(response), len(short)]
    assert logps[0].item() == pytest.approx(expected, abs=1e-4)
    assert response[-1] == tok.eos_token_id  # the end-of-turn token is trained on


def test_sampler_and_trainer_render_prompts_identically(tiny_model):
    tok = load_tokenizer(tiny_model)
    text = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert tok.decode(encode_prompt(tok, PROMPT)) == text
    assert text.endswith("<|im_start|>assistant\n")
    examples = build_examples(pairs(2), "dpo", tok, max_length=512, seed=0)
    assert examples[0].prompt == encode_prompt(tok, PROMPT)
    # label 0 means B is chosen: the chosen response comes first
    assert examples[0].responses[0] == encode_response(tok, "HELLO THERE 0")


def test_kto_takes_pairs_as_desirable_and_undesirable_with_mismatched_kl_outputs(tiny_model):
    tok = load_tokenizer(tiny_model)
    examples = build_examples(pairs(3), "kto", tok, max_length=512, seed=0)
    assert [e.desirable for e in examples] == [True, False] * 3
    outputs = [e.responses[0] for e in examples]
    for e in examples:
        assert e.kl_response in outputs and e.kl_response is not e.responses[0]


def test_pairwise_loss_refuses_binary_feedback(tiny_model):
    tok = load_tokenizer(tiny_model)
    binary = [{"type": "binary_feedback", "prompt_id": "a", "prompt": PROMPT, "output": "x", "label": True, "reward": 1.0}]
    with pytest.raises(TrainingError, match="needs pairwise feedback"):
        build_examples(binary, "dpo", tok, 512, 0)


def _config(**kw):
    return TrainConfig(**{"loss": "dpo", "lr": 1e-3, "batch_size": 2, "epochs": 1, "warmup_steps": 3, **kw})


def test_round_two_resumes_adam_moments_and_scheduler(tiny_model, tmp_path):
    """The second round starts from the first round's Adam moments and scheduler position, not fresh ones."""
    r0, r1, fresh = tmp_path / "r0", tmp_path / "r1", tmp_path / "fresh"
    train_round(pairs(4), policy=tiny_model, reference=tiny_model, out_dir=r0, resume=None, config=_config(), progress=False)
    state0 = json.loads((r0 / "training_state" / "trainer_state.json").read_text())
    assert state0["global_step"] == 2
    assert json.loads((r0 / "training_state" / "scheduler.json").read_text())["last_epoch"] == 2
    moments0 = load_file(str(r0 / "training_state" / "optimizer.safetensors"))
    assert any(k.endswith("exp_avg_sq") for k in moments0) and all(torch.isfinite(v).all() for v in moments0.values())

    train_round(pairs(4), policy=str(r0), reference=tiny_model, out_dir=r1, resume=r0, config=_config(), round_index=1, progress=False)
    train_round(pairs(4), policy=str(r0), reference=tiny_model, out_dir=fresh, resume=None, config=_config(), round_index=1, progress=False)
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
    train_round(pairs(2), policy=str(r1), reference=tiny_model, out_dir=tmp_path / "r2", resume=r1, config=_config(),
                round_index=2, progress=False, log=log.append)
    assert log[0]["lr"] == pytest.approx(1e-3) and log[0]["step"] == 5


def test_training_moves_the_policy_toward_chosen(tiny_model, tmp_path):
    """Several epochs of DPO on one consistent preference raise the chosen-vs-rejected log-ratio margin."""
    log = []
    train_round(pairs(4), policy=tiny_model, reference=tiny_model, out_dir=tmp_path / "c", resume=None,
                config=_config(epochs=6, warmup_steps=0), progress=False, log=log.append)
    assert log[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy equals reference before the first step
    assert log[-1]["rewards/margin"] > log[0]["rewards/margin"] + 0.05
    assert log[-1]["loss"] < 0.69
    for key in ("grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "kl", "lr"):
        assert key in log[0]


def test_nan_loss_stops_with_a_clear_error_and_no_checkpoint(tiny_model, tmp_path):
    with pytest.raises(TrainingError, match="not finite"):
        train_round(pairs(2), policy=tiny_model, reference=tiny_model, out_dir=tmp_path / "n", resume=None,
                    config=_config(loss_params={"beta": float("nan")}), progress=False)
    assert not (tmp_path / "n").exists()


def test_kto_round_runs_and_logs_kl(tiny_model, tmp_path):
    log = []
    summary = train_round(pairs(4), policy=tiny_model, reference=tiny_model, out_dir=tmp_path / "k", resume=None,
                          config=_config(loss="kto"), progress=False, log=log.append)
    assert summary["examples"] == 8 and summary["steps"] == 4
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # policy equals reference at the first step


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo", "slic", "orpo", "kto", "sft"])
def test_every_feedback_loss_trains_a_round(loss, tiny_model, tmp_path):
    """Each loss the config accepts runs a round; losses without a reference skip reference log-probs."""
    log = []
    summary = train_round(pairs(4), policy=tiny_model, reference=str(tmp_path / "no-reference-needed") if loss in ("simpo", "orpo", "sft") else tiny_model,
                          out_dir=tmp_path / loss, resume=None, config=_config(loss=loss), progress=False, log=log.append)
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
                          config=_config(loss="grpo"), progress=False, log=log.append)
    assert summary["examples"] == 2 and summary["steps"] == 1
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference before the update
    with pytest.raises(TrainingError, match="scored samples"):
        build_examples(pairs(2), "grpo", load_tokenizer(tiny_model), 512, 0)
