"""Odds Ratio Preference Optimization (ORPO).

Paper: Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
Model" (arXiv:2403.07691), Eqs. 4-7::

    L = L_SFT + lambda * L_OR,   L_OR = -log sigmoid(log odds(y_w) - log odds(y_l)),
    odds(y) = P(y|x) / (1 - P(y|x)),  P(y|x) = exp(mean token log-prob)

Intuition: SFT alone raises the likelihood of rejected answers too (they share most tokens
with good ones). ORPO adds a weak, reference-free penalty that contrasts the *odds* of the
chosen and rejected response, so preference alignment happens inside the SFT stage, with no
reference model and no separate stage. Using odds rather than probabilities gives a gentler
contrast than a likelihood ratio (which over-suppresses the rejected response).

Conventions: ``P(y|x)`` is the per-token geometric mean, i.e. the inputs are log-probs
**averaged** over response tokens (TRL's ``ORPOTrainer`` uses ``average_log_prob=True``).
``beta`` is the paper's ``lambda`` (TRL also calls it ``beta``; default 0.1).
The SFT term defaults to the per-example mean NLL of the chosen response
(``-policy_chosen_logps``). TRL's ``ORPOTrainer`` instead uses one token-level cross-entropy
over the whole chosen batch that also counts the *prompt* tokens; pass ``chosen_nll`` to
use any NLL you computed yourself. TRL's ``odds_ratio_loss`` returns the *positive*
quantity ``beta * log sigmoid(log_odds)``, which it subtracts; our losses are already signed
for minimisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["orpo_loss", "orpo_log_odds"]

_LN_HALF = -math.log(2.0)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """Numerically stable ``log(1 - exp(x))`` for ``x < 0`` (Maechler 2012)."""
    return torch.where(x < _LN_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor) -> torch.Tensor:
    """``[B]`` log odds ratio ``log odds(y_w) - log odds(y_l)`` from average log-probs (< 0)."""
    return (policy_chosen_logps - policy_rejected_logps) - (
        _log1mexp(policy_chosen_logps) - _log1mexp(policy_rejected_logps)
    )


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    chosen_nll: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""ORPO loss ``NLL(y_w) - beta * log sigmoid(log_odds)`` per example.

    Args:
        policy_chosen_logps: ``[B]`` policy log-probs of chosen responses, **averaged** over
            response tokens; must be < 0 (a probability of exactly 1 has infinite odds).
        policy_rejected_logps: ``[B]`` same for rejected.
        beta: weight ``lambda`` of the odds-ratio term (paper and TRL default 0.1).
        chosen_nll: optional ``[B]`` SFT term to use instead of ``-policy_chosen_logps``.

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` with rewards
        ``beta * avg_logp`` (TRL's logging convention), detached. Use :func:`orpo_log_odds`
        to log the log odds ratio itself. Computed in at least float32 (half-precision inputs
        are upcast, as in TRL).
    """
    # like TRL, compute in at least float32: log(1 - p) is ill-conditioned in bf16/fp16
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    policy_chosen_logps = policy_chosen_logps.to(dtype)
    policy_rejected_logps = policy_rejected_logps.to(dtype)
    log_odds = orpo_log_odds(policy_chosen_logps, policy_rejected_logps)
    nll = -policy_chosen_logps if chosen_nll is None else chosen_nll
    losses = nll - beta * F.logsigmoid(log_odds)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()
