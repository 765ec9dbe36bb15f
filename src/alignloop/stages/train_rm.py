"""Train a Bradley-Terry reward model from a causal-LM checkpoint on pairwise feedback.

The causal LM gets a scalar head (`AutoModelForSequenceClassification`, one label, as TRL and OpenRLHF
train them) and learns r(prompt, chosen) > r(prompt, rejected) with the Bradley-Terry loss
-log sigmoid(r_chosen - r_rejected). Conversations are rendered with the model's own chat template. A seeded
share of the prompts is held out (whole prompts, so no prompt is in both splits) and the pairwise accuracy on
it is reported with a 95% Wilson interval. The result is a sequence-classification folder that
`labeler: reward_model` loads.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from ..logprobs import pad_right
from ..losses import bradley_terry_loss
from ..models import DTYPES, load_tokenizer, resolve_model_path
from ..records import chosen_and_rejected, write_json
from ..rewards.reward_model import encode_for_rm


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at small n and near 0 or 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def split_by_prompt(pairs: list[dict], heldout_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    prompt_ids = sorted({p["prompt_id"] for p in pairs})
    random.Random(seed).shuffle(prompt_ids)
    n_heldout = max(1, round(len(prompt_ids) * heldout_fraction)) if heldout_fraction > 0 and len(prompt_ids) > 1 else 0
    heldout_ids = set(prompt_ids[:n_heldout])
    return [p for p in pairs if p["prompt_id"] not in heldout_ids], [p for p in pairs if p["prompt_id"] in heldout_ids]


def unique_pairs(pairs: list[dict]) -> list[dict]:
    """Pairs with each (prompt, unordered pair of outputs) once: feedback files made with several pairing
    seeds repeat pairs, and a repeated held-out pair would count twice in the accuracy."""
    seen, out = set(), []
    for p in pairs:
        key = (p["prompt_id"], frozenset((p["output_A"], p["output_B"])))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _encode_pairs(pairs: list[dict], tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    encoded = []
    for p in pairs:
        chosen, rejected = chosen_and_rejected(p)
        # the same encoding the reward-model labeler uses, so the model is trained on what it will score
        encoded.append((encode_for_rm(tokenizer, p["prompt"], chosen, max_length)[0],
                        encode_for_rm(tokenizer, p["prompt"], rejected, max_length)[0]))
    return encoded


def _scores(model, sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    """One scalar per sequence [B]; right padding, so the head reads each sequence's last real token."""
    ids, mask = pad_right(sequences, pad_id)
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float()


TRAIN_ACCURACY_PAIRS = 512  # train pairs re-scored for the train accuracy (a seeded sample)


def pairwise_accuracy(model, encoded, pad_id: int, batch_size: int) -> int:
    correct = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            scores = _scores(model, [c for c, _ in batch] + [r for _, r in batch], pad_id).view(2, -1)
            correct += int((scores[0] > scores[1]).sum())
    return correct


def freeze_below(model, train_layers: int) -> int:
    """Train only the top `train_layers` transformer blocks, the final norm and the head; returns the number
    of trainable parameters. With few pairs a frozen body overfits less, and no gradient flows through the
    frozen blocks, so a step costs little more than a forward pass."""
    blocks = getattr(model.base_model, "layers", None) or getattr(model.base_model, "h", None)
    if blocks is None:
        raise ValueError(f"--train-layers: cannot find the transformer blocks of {type(model).__name__}")
    if not 0 <= train_layers <= len(blocks):
        raise ValueError(f"--train-layers {train_layers}: the model has {len(blocks)} blocks")
    for p in model.parameters():
        p.requires_grad_(False)
    top = list(blocks)[len(blocks) - train_layers :]
    norm = getattr(model.base_model, "norm", None) or getattr(model.base_model, "ln_f", None)
    for module in top + [norm, model.score]:
        if module is not None:
            for p in module.parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_reward_model(pairs: list[dict], *, base: str, out_dir: str | Path, lr: float = 1e-5, epochs: int = 1,
                       batch_size: int = 8, max_length: int = 1024, heldout_fraction: float = 0.1, seed: int = 0,
                       dtype: str = "float32", train_layers: int | None = None, trust_remote_code: bool = False,
                       progress: bool = True) -> dict:
    """Train, evaluate on held-out prompts, write the folder atomically, and return the metrics.
    `train_layers`: train only the top blocks (see `freeze_below`); None trains everything."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if not pairs:
        raise ValueError("no pairs to train a reward model on")
    tokenizer = load_tokenizer(base, trust_remote_code)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head's "newly initialized weights" warning is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(base), num_labels=1, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    trainable = freeze_below(model, train_layers) if train_layers is not None else sum(p.numel() for p in model.parameters())
    train, heldout = split_by_prompt(unique_pairs(pairs), heldout_fraction, seed)
    train_enc, heldout_enc = _encode_pairs(train, tokenizer, max_length), _encode_pairs(heldout, tokenizer, max_length)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    losses = []
    for epoch in range(epochs):
        order = list(range(len(train_enc)))
        rng.shuffle(order)
        model.train()
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for batch_ids in tqdm(batches, desc=f"train-rm epoch {epoch}", disable=not progress):
            batch = [train_enc[i] for i in batch_ids]
            scores = _scores(model, [c for c, _ in batch] + [r for _, r in batch], tokenizer.pad_token_id).view(2, -1)
            loss_vec, _ = bradley_terry_loss(scores[0], scores[1])
            loss = loss_vec.mean()
            if not torch.isfinite(loss):
                raise ValueError("reward-model loss is not finite (NaN or inf); lower the learning rate")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    correct = pairwise_accuracy(model, heldout_enc, tokenizer.pad_token_id, batch_size)
    low, high = wilson_interval(correct, len(heldout_enc))
    # The train accuracy only tells overfitting apart; a sample pins it within a few points, where re-scoring
    # every pair took a quarter of a 1,800-pair run.
    train_sample = rng.sample(train_enc, min(len(train_enc), TRAIN_ACCURACY_PAIRS))
    metrics = {
        "train_pairs": len(train_enc), "heldout_pairs": len(heldout_enc), "epochs": epochs, "lr": lr,
        "train_layers": train_layers, "trainable_parameters": trainable,
        "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "heldout_accuracy": correct / len(heldout_enc) if heldout_enc else None, "heldout_accuracy_ci95": [low, high],
        "train_accuracy": pairwise_accuracy(model, train_sample, tokenizer.pad_token_id, batch_size) / max(1, len(train_sample)),
        "train_accuracy_pairs": len(train_sample),
    }
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / "reward_model_metrics.json", metrics)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return metrics
