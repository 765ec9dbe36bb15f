"""Supervised fine-tuning (negative log-likelihood) on good outputs.

Intuition: plain maximum likelihood on outputs we want more of -- the chosen side of a
preference pair, the desirable outputs of binary feedback, or the best-scored samples of a
group (rejection sampling / RAFT / best-of-n distillation). It needs no reference model and
works with any feedback type, which makes it the baseline every preference loss should beat
and a common regulariser (e.g. ORPO's SFT term, SLiC's ``lambda`` term).
"""

from __future__ import annotations

import torch

__all__ = ["sft_loss"]


def sft_loss(
    policy_logps: torch.Tensor,
    num_tokens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-example mean NLL per token, ``-policy_logps / num_tokens``.

    Args:
        policy_logps: ``[B]`` policy log-probs of the target outputs, summed over response tokens.
        num_tokens: ``[B]`` number of response tokens in each output (clamped to >= 1).

    Returns:
        ``(losses [B], avg_logps [B])``: mean NLL per token for each example, and the detached
        average log-prob per token for logging (``exp(losses)`` is the per-example perplexity).

    ``losses.mean()`` weights every example equally; for the usual token-weighted mean (one
    cross-entropy over all tokens of the batch) use
    ``(losses * num_tokens).sum() / num_tokens.sum()``.
    """
    num_tokens = num_tokens.to(policy_logps.dtype).clamp(min=1)
    avg_logps = policy_logps / num_tokens
    return -avg_logps, avg_logps.detach()
