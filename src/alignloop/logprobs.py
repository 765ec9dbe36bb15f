"""Log-probabilities of responses under a causal LM, counted over response tokens only.

Two savings make a preference step cheaper than the textbook one (a padded row per response, the full
logits), with the same numbers:
- a prompt and all its responses (a pair's chosen and rejected, KTO's mismatched output) share one row, each
  response attending to the prompt and to itself only, so the prompt (55% of the tokens of the default run's
  pairs, counted per response) goes through the model once;
- the output head, the largest matrix of a small model (49152 x 576 of SmolLM2-135M's 135M parameters), is
  applied only where a response token is predicted, in chunks, by `_HeadLogps`, whose backward recomputes
  each chunk's logits rather than keeping them: no [tokens, vocabulary] tensor outlives its chunk (the idea of
  Liger's fused linear cross-entropy, in plain torch so it runs on any device).
Models for which either would be wrong (logit soft-capping, an attention without custom masks) take the
textbook path.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

HEAD_CHUNK = 1024  # positions per chunk of the output head: [1024, vocabulary] float32 logits at a time
# A packed row's width is rounded up to a multiple of this on these devices. On a GPU each new input shape costs
# the attention a new plan (cuDNN's fused kernels take alignloop's custom mask), about half a second on an
# H200, more than a step of a small model, so a round of many widths is bound by these set-ups; a CPU has no
# such cost and would only compute the padding.
WIDTH_MULTIPLE = {"cuda": 64}
# Config keys of models whose logits are more than hidden states times the output head (Gemma's soft-capping,
# Cohere's and Granite's scaling): those take the plain path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


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


def response_logps(model, prompts: list[list[int]], responses: list[list[list[int]]], pad_id: int):
    """Log-probs of every response token: `responses[i]` holds example i's responses to `prompts[i]` (a pair's
    chosen and rejected, say). Returns logps [B, S, L] and mask [B, S, L], S the most responses of an example
    and L the longest response, each response left-aligned.

    An example's prompt and all its responses go through the model as one row (prompt, response 1, response 2,
    ...), each response attending to the prompt and to itself only and numbered from the prompt's end, so the
    prompt is computed once instead of once per response, with the same result."""
    head = _plain_output_head(model)
    if head is None:
        return _one_row_per_response(model, prompts, responses, pad_id)
    device = next(model.parameters()).device
    B, S = len(prompts), max(len(rs) for rs in responses)
    L = max(1, max(len(r) for rs in responses for r in rs))
    width = max(len(p) + sum(len(r) for r in rs) for p, rs in zip(prompts, responses))
    multiple = WIDTH_MULTIPLE.get(device.type, 1)
    width = -(-width // multiple) * multiple
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, width), dtype=torch.long)
    segment = torch.full((B, width), -1, dtype=torch.long)  # 0: prompt, k: response k, -1: padding
    where = [[], [], [], []]  # per response token: example, response, token, index of the hidden state before it
    targets = []
    for b, (prompt, rs) in enumerate(zip(prompts, responses)):
        P = len(prompt)
        input_ids[b, :P] = torch.tensor(prompt, dtype=torch.long)
        position_ids[b, :P] = torch.arange(P)
        segment[b, :P] = 0
        start = P
        for s, r in enumerate(rs):
            n = len(r)
            input_ids[b, start : start + n] = torch.tensor(r, dtype=torch.long)
            position_ids[b, start : start + n] = torch.arange(P, P + n)
            segment[b, start : start + n] = s + 1
            where[0] += [b] * n
            where[1] += [s] * n
            where[2] += range(n)
            where[3] += ([P - 1] + list(range(start, start + n - 1)))[:n]  # the first follows the prompt's last
            targets += r
            start += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    attends = causal & (((seg_k == 0) | (seg_k == seg_q)) & (seg_k >= 0) | torch.eye(width, dtype=torch.bool))
    hidden = model(input_ids=input_ids.to(device), attention_mask=attends[:, None].to(device),
                   position_ids=position_ids.to(device), output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    b, s, j, h = (torch.tensor(w, dtype=torch.long, device=device) for w in where)
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = head.weight.dtype
    flat = _HeadLogps.apply(hidden[b, h], head.weight, torch.tensor(targets, dtype=torch.long, device=device), dtype)
    logps = torch.zeros((B, S, L), dtype=flat.dtype, device=device).index_put((b, s, j), flat)
    mask = torch.zeros((B, S, L), dtype=torch.bool, device=device).index_put((b, s, j), torch.ones_like(j, dtype=torch.bool))
    return logps, mask


def _one_row_per_response(model, prompts, responses, pad_id):
    """`response_logps` the plain way, for models `_plain_output_head` rules out: a padded row per (prompt,
    response) and the model's full logits."""
    flat_prompts = [p for p, rs in zip(prompts, responses) for _ in rs]
    flat_responses = [r for rs in responses for r in rs]
    input_ids, attention_mask, labels = pad_sequences(flat_prompts, flat_responses, pad_id)
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits[:, :-1]
    targets = labels[:, 1:].to(device)
    # cross_entropy is the fused, memory-light log_softmax + gather.
    token = -F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                             ignore_index=-100, reduction="none").view(targets.shape)
    B, S = len(prompts), max(len(rs) for rs in responses)
    L = max(1, max(len(r) for r in flat_responses))
    logps = token.new_zeros((B, S, L))
    mask = torch.zeros((B, S, L), dtype=torch.bool, device=device)
    row = 0
    for b, (p, rs) in enumerate(zip(prompts, responses)):
        for s, r in enumerate(rs):
            logps[b, s, : len(r)] = token[row, len(p) - 1 : len(p) - 1 + len(r)]
            mask[b, s, : len(r)] = True
            row += 1
    return logps, mask


def _plain_output_head(model) -> torch.nn.Linear | None:
    """The model's output head when `response_logps` may pack and project it itself: its logits are exactly
    the final hidden states times the head's weight, its forward can skip computing them (`logits_to_keep`),
    and its attention takes a custom mask (sdpa, no sliding window). None otherwise, and under DeepSpeed
    ZeRO-3, whose parameters (`ds_id`) are whole only inside the model's forward: the head's weight is an
    empty partition where `_HeadLogps` would use it."""
    wrapped = type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine")
    inner = getattr(model, "module", model) if wrapped else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    config = getattr(inner, "config", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or config is None:
        return None
    if hasattr(head.weight, "ds_id"):
        return None
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in _LOGIT_TRANSFORMS):
        return None
    if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(config, "sliding_window", None):
        return None
    return head if "logits_to_keep" in inspect.signature(inner.forward).parameters else None


class _HeadLogps(torch.autograd.Function):
    """log p(target) = h·w_target - logsumexp(h·Wᵀ) for N positions: hidden [N, D], weight [V, D], targets [N]
    -> [N] float32. The matmul runs in `dtype` (bfloat16 under autocast, as the model's own head would), the
    softmax in float32; both passes go in chunks of HEAD_CHUNK positions, the backward recomputing them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype):
        ctx.save_for_backward(hidden, weight, targets)
        ctx.dtype = dtype
        w = weight.to(dtype)
        out = []
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.size(0), HEAD_CHUNK):
                logits = (hidden[s : s + HEAD_CHUNK].to(dtype) @ w.t()).float()
                picked = logits.gather(1, targets[s : s + HEAD_CHUNK, None]).squeeze(1)
                out.append(picked - logits.logsumexp(-1))
        return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets = ctx.saved_tensors
        dtype = ctx.dtype
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.size(0), HEAD_CHUNK):
                h = hidden[s : s + HEAD_CHUNK].to(dtype)
                g = grad[s : s + HEAD_CHUNK]
                # d log p(t) / d logits = onehot(t) - softmax(logits), scaled by the incoming gradient
                d_logits = (h @ w.t()).float().softmax(-1).mul_(-g[:, None])
                d_logits.scatter_add_(1, targets[s : s + HEAD_CHUNK, None], g[:, None])
                d_logits = d_logits.to(dtype)
                grad_hidden[s : s + HEAD_CHUNK] = (d_logits @ w).to(hidden.dtype)
                grad_weight += (d_logits.t() @ h).float()
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def sequence_logps(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Summed log-probs of each prompt's one response [B] and the responses' lengths [B]."""
    logps, mask = response_logps(model, prompts, [[r] for r in responses], pad_id)
    return logps[:, 0].sum(-1), mask[:, 0].sum(-1)


def response_token_logps(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Log-probs of each prompt's one response, token by token, left-aligned: [B, L] with L the longest
    response, and its mask."""
    logps, mask = response_logps(model, prompts, [[r] for r in responses], pad_id)
    return logps[:, 0], mask[:, 0]
