"""Bradley-Terry reward-model training on a tiny random Llama."""

import json

import pytest

from alignloop.stages.train_rm import freeze_below, split_by_prompt, train_reward_model, unique_pairs, wilson_interval


def separable_pairs(n: int) -> list[dict]:
    """Chosen answers are calm lowercase words, rejected ones shout: a preference a tiny model can learn."""
    return [{"type": "pairwise_feedback", "prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}],
             "output_A": "yes indeed " * (1 + i % 3), "output_B": "NO!!! NEVER!!! " * (1 + i % 4), "label": 1,
             "reward_A": 1.0, "reward_B": 0.0, "reward_difference": 1.0} for i in range(n)]


def test_wilson_interval_hand_values():
    low, high = wilson_interval(8, 10)  # p = 0.8, n = 10: 0.4902 to 0.9433
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_split_keeps_prompts_whole():
    pairs = separable_pairs(20) + separable_pairs(20)  # every prompt twice
    train, heldout = split_by_prompt(pairs, 0.25, seed=0)
    assert len(heldout) == 10 and len(train) == 30
    assert not {p["prompt_id"] for p in train} & {p["prompt_id"] for p in heldout}


def test_repeated_pairs_count_once_whatever_their_order():
    pairs = separable_pairs(3)
    swapped = {**pairs[0], "output_A": pairs[0]["output_B"], "output_B": pairs[0]["output_A"], "label": 0}
    other_prompt = {**pairs[1], "prompt_id": "elsewhere"}
    assert unique_pairs(pairs + [swapped, dict(pairs[2]), other_prompt]) == pairs + [other_prompt]


def test_frozen_body_trains_only_the_top_blocks_and_head(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = freeze_below(model, 1)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("model.layers.1.", "model.norm", "score")) for n in names)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in names)
    with pytest.raises(ValueError, match="the model has 2 blocks"):
        freeze_below(model, 3)

    train_reward_model(separable_pairs(16), base=tiny_model, out_dir=tmp_path / "rm", lr=1e-2, epochs=1,
                       heldout_fraction=0.25, train_layers=1, progress=False)
    after = dict(AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").named_parameters())
    for n, p in before.items():
        changed = not torch.equal(p, after[n].detach())
        assert changed == (n in names or n == "score.weight"), n  # the head is new (random) in `before`


def test_reaches_clearly_above_chance_on_a_separable_set(tiny_model, tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    import alignloop.stages.train_rm as train_rm

    monkeypatch.setattr(train_rm, "TRAIN_ACCURACY_PAIRS", 20)  # the train accuracy is taken on a sample
    metrics = train_reward_model(separable_pairs(60), base=tiny_model, out_dir=tmp_path / "rm", lr=3e-3, epochs=4,
                                 batch_size=8, heldout_fraction=0.25, progress=False)
    assert metrics["heldout_pairs"] == 15 and metrics["train_pairs"] == 45
    assert metrics["heldout_accuracy"] >= 0.9 and metrics["heldout_accuracy_ci95"][0] > 0.5
    assert metrics["train_accuracy_pairs"] == 20 and metrics["train_accuracy"] >= 0.9
    assert (metrics["train_accuracy"] * 20) == round(metrics["train_accuracy"] * 20)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert model.config.num_labels == 1 and (tmp_path / "rm/model.safetensors").exists()
    assert json.loads((tmp_path / "rm/reward_model_metrics.json").read_text())["heldout_accuracy"] == metrics["heldout_accuracy"]


def test_train_rm_cli_then_label_with_the_trained_model(tiny_model, tmp_path):
    """`alignloop train-rm` writes a folder that `alignloop label --reward-model` scores with."""
    import subprocess
    import sys

    from alignloop.records import read_records, write_records

    feedback = tmp_path / "feedback.jsonl"
    write_records(feedback, separable_pairs(40))
    cmd = [sys.executable, "-m", "alignloop", "--no-progress", "train-rm", str(feedback), "--out", str(tmp_path / "rm"),
           "--base", tiny_model, "--lr", "3e-3", "--epochs", "4", "--heldout-fraction", "0.25"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "held-out pairwise accuracy" in result.stdout
    samples = tmp_path / "samples.jsonl"
    write_records(samples, [{"prompt_id": "q", "sample_id": i, "prompt": "Question 99?", "output": o}
                            for i, o in enumerate(["yes indeed yes indeed", "NO!!! NEVER!!! NO!!!"])])
    result = subprocess.run([sys.executable, "-m", "alignloop", "--no-progress", "label", str(samples), "--out",
                             str(tmp_path / "scored.jsonl"), "--reward-model", str(tmp_path / "rm"), "--dtype", "float32"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    good, bad = read_records(tmp_path / "scored.jsonl")
    assert good["reward"] > bad["reward"]
