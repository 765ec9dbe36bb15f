"""Identity Preference Optimisation (IPO).

Paper: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences" (arXiv:2310.12036), Eq. 17.

Intuition: DPO's logistic loss keeps pushing the log-ratio margin towards infinity when the
preference data are (near-)deterministic, so the KL regulariser is effectively ignored. IPO
replaces it with a squared loss that regresses the margin to a *finite* target
``1 / (2 * tau)``: stronger regularisation (larger ``tau``) means a smaller target margin.

Length convention (important): like TRL's ``loss_type="ipo"`` this function expects
log-probs **averaged over response tokens** (sum / number of response tokens), for both the
policy and the reference. TRL computes the same quantity as
``(policy_sum - reference_sum) / n_tokens``; since policy and reference are scored on the same
tokens, that equals ``policy_avg - reference_avg``. The IPO authors confirmed to TRL that the
paper's results used this normalised form. Passing summed log-probs gives a loss whose scale
grows with response length and a target margin that is effectively much smaller.
"""

from __future__ import annotations

import torch

__all__ = ["ipo_loss"]


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    tau: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""IPO loss ``(h - 1/(2 tau))^2``.

    ``h = (pi(y_w) - ref(y_w)) - (pi(y_l) - ref(y_l))`` on **token-averaged** log-probs.

    Args:
        policy_chosen_logps: ``[B]`` policy log-probs of chosen responses, averaged per token.
        policy_rejected_logps: ``[B]`` same for rejected.
        reference_chosen_logps: ``[B]`` reference model, chosen, averaged per token.
        reference_rejected_logps: ``[B]`` reference model, rejected, averaged per token.
        tau: regularisation strength (TRL's ``beta`` for ``loss_type="ipo"``).

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` with rewards
        ``tau * (policy - reference)`` on the averaged log-probs, detached. (TRL logs
        ``beta * `` the *summed* log-ratio instead; multiply by the token count to compare.)
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = (chosen_logratios - rejected_logratios - 1.0 / (2.0 * tau)) ** 2
    return losses, tau * chosen_logratios.detach(), tau * rejected_logratios.detach()
