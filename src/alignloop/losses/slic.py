"""SLiC-HF: sequence likelihood calibration with a hinge loss.

Paper: Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback"
(arXiv:2305.10425)::

    L = max(0, delta - log pi(y_w|x) + log pi(y_l|x)) - lambda * log pi(y_ref|x)

Intuition: a max-margin (hinge) version of preference learning. Once the chosen response is
ahead of the rejected one by the margin the pair contributes no gradient, unlike the logistic
DPO loss which keeps pushing. The optional NLL term on the chosen response (``nll_weight``,
the paper's ``lambda``) keeps the policy close to the SFT distribution -- SLiC's substitute
for a KL penalty.

Conventions differ between implementations; this function covers both:

* TRL ``DPOTrainer(loss_type="hinge")`` (and ``CPOTrainer(loss_type="hinge")`` without a
  reference): ``relu(1 - beta * h)`` where ``h`` is the log-ratio margin against a reference
  model, i.e. a margin of ``1/beta`` nats scaled by ``beta``; no NLL term. That is our
  default: ``delta=1.0``, ``beta=0.1``, ``nll_weight=0``, with reference log-probs given.
* HALOs ``SLiCTrainer``: no reference model, ``relu(margin - (pi(y_w) - pi(y_l))) +
  lambda_coef * NLL(y_w)``, where HALOs calls the margin ``beta``. Reproduce it with
  reference log-probs ``None``, ``beta=1.0``, ``delta=<HALOs beta>``,
  ``nll_weight=<HALOs lambda_coef>``.
"""

from __future__ import annotations

import torch

__all__ = ["slic_loss"]


def slic_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    delta: float = 1.0,
    nll_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Hinge loss ``relu(delta - beta * h) + nll_weight * (-policy_chosen_logps)``.

    ``h = (pi(y_w) - ref(y_w)) - (pi(y_l) - ref(y_l))`` when reference log-probs are given,
    else ``pi(y_w) - pi(y_l)`` (the original, reference-free SLiC calibration loss).

    Args:
        policy_chosen_logps: ``[B]`` policy log-probs of chosen responses (summed over tokens).
        policy_rejected_logps: ``[B]`` same for rejected.
        reference_chosen_logps: ``[B]`` or ``None`` (both or neither reference tensors).
        reference_rejected_logps: ``[B]`` or ``None``.
        beta: scale of the margin; the hinge is active while ``h < delta / beta``.
        delta: margin in units of ``beta * h``.
        nll_weight: weight of the NLL (summed log-prob) regulariser on the chosen response.

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; rewards are
        ``beta * (policy - reference)`` (or ``beta * policy`` without a reference), detached.
    """
    if (reference_chosen_logps is None) != (reference_rejected_logps is None):
        raise ValueError("pass both reference_chosen_logps and reference_rejected_logps, or neither")
    chosen_scores = policy_chosen_logps
    rejected_scores = policy_rejected_logps
    if reference_chosen_logps is not None:
        chosen_scores = chosen_scores - reference_chosen_logps
        rejected_scores = rejected_scores - reference_rejected_logps
    losses = torch.relu(delta - beta * (chosen_scores - rejected_scores))
    if nll_weight:
        losses = losses - nll_weight * policy_chosen_logps
    return losses, beta * chosen_scores.detach(), beta * rejected_scores.detach()
