"""Simple Preference Optimization (SimPO).

Paper: Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
Reward" (arXiv:2405.14734).

Intuition: DPO's implicit reward ``log pi/pi_ref`` is summed over tokens, which (a) needs a
reference model and (b) does not match the quantity used at generation time, favouring long
answers. SimPO uses the *length-normalised* policy log-likelihood ``(beta/|y|) log pi(y|x)``
as the reward -- the same average log-prob that ranks beams -- and asks for a target reward
margin ``gamma`` between chosen and rejected. No reference model.

Parameterisation: as in the paper's reference implementation we take
``gamma_beta_ratio = gamma / beta``; the paper's defaults are ``beta=2.0``,
``gamma_beta_ratio=0.5`` (i.e. ``gamma = 1.0``). TRL's ``CPOTrainer(loss_type="simpo")``
takes ``simpo_gamma = gamma`` instead, so ``simpo_gamma = gamma_beta_ratio * beta``; with
``cpo_alpha=0`` it computes exactly this loss (given average log-probs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["simpo_loss"]


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""SimPO loss ``-log sigmoid(beta * (avg_w - avg_l) - gamma)``, ``gamma = beta * ratio``.

    Args:
        policy_chosen_logps: ``[B]`` policy log-probs of chosen responses **averaged** over
            response tokens (length-normalised).
        policy_rejected_logps: ``[B]`` same for rejected.
        beta: reward scale (paper default 2.0; range 2.0-10.0).
        gamma_beta_ratio: target margin divided by beta (paper default 0.5).
        label_smoothing: optional cDPO-style label noise (0 in the paper).

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` with rewards
        ``beta * avg_logp`` (the SimPO implicit reward), detached.
    """
    logits = beta * (policy_chosen_logps - policy_rejected_logps - gamma_beta_ratio)
    losses = -F.logsigmoid(logits) * (1.0 - label_smoothing)
    if label_smoothing:
        losses = losses - F.logsigmoid(-logits) * label_smoothing
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()
