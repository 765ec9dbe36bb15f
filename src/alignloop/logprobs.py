"""Log-probabilities of responses under a causal LM, counted over response tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, T], padded on the right, so every real token keeps its position (and a
    sequence-classification head, which reads the last non-pad token, finds it)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def pad_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Right-padded prompt+response ids, attention mask, and labels that are -100 everywhere but on the
    response tokens. Shapes [B, T]."""
    input_ids, attention_mask = pad_right([p + r for p, r in zip(prompts, responses)], pad_id)
    labels = torch.full(input_ids.shape, -100, dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        labels[row, len(p) : len(p) + len(r)] = torch.tensor(r)
    return input_ids, attention_mask, labels


def token_logps(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the labels [B, T-1] and the mask of response tokens [B, T-1]."""
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits[:, :-1]
    targets = labels[:, 1:].to(device)
    # cross_entropy is the fused, memory-light log_softmax + gather.
    logps = -F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).view(targets.shape)
    mask = targets != -100
    return logps * mask, mask


def sequence_logps(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Summed response log-probs [B] and response lengths [B]."""
    logps, mask = token_logps(model, *pad_sequences(prompts, responses, pad_id))
    return logps.sum(-1), mask.sum(-1)


def response_token_logps(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Log-probs of each response token, left-aligned: [B, L] with L the longest response, and its mask."""
    logps, mask = token_logps(model, *pad_sequences(prompts, responses, pad_id))
    width = max(len(r) for r in responses)
    out = logps.new_zeros((len(responses), width))
    out_mask = torch.zeros((len(responses), width), dtype=torch.bool, device=logps.device)
    for row, r in enumerate(responses):
        out[row, : len(r)] = logps[row][mask[row]]
        out_mask[row, : len(r)] = True
    return out, out_mask
