"""Direct Preference Optimization (sigmoid DPO) and conservative DPO (cDPO).

Paper: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model" (arXiv:2305.18290). cDPO: Mitchell 2023, "A note on DPO with
noisy preferences & relationship to IPO" (label smoothing).

Intuition: the KL-regularised RLHF objective has a closed-form optimum in which the reward
is ``beta * log(pi / pi_ref)`` up to a prompt-only constant. Plugging that implicit reward
into the Bradley-Terry likelihood gives a logistic loss on the *difference of log-ratios*
between chosen and rejected responses; no reward model, no sampling during training.
cDPO assumes each label is flipped with probability ``label_smoothing`` and minimises the
expected loss under that noise, which stops the margin from growing without bound.
RPO: Pang et al. 2024, "Iterative Reasoning Preference Optimization" (arXiv:2404.19733) adds
the chosen response's per-token negative log-likelihood, weighted by ``rpo_alpha`` (TRL's
``rpo_alpha``): DPO alone can lower the chosen response's likelihood along with the
rejected one's, and the NLL term holds it up.
R-DPO: Park et al. 2024, "Disentangling Length from Quality in Direct Preference Optimization"
(arXiv:2403.19159) takes ``length_alpha`` times the chosen response's length minus the rejected one's (in tokens)
off the margin, so that a difference in length explains that much of a preference: pairs won by the shorter
answer push less towards brevity, pairs won by the longer push more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dpo_loss", "dpo_norm_loss"]


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    rpo_alpha: float = 0.0,
    length_alpha: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Sigmoid DPO loss (cDPO when ``label_smoothing > 0``, RPO when ``rpo_alpha > 0``, R-DPO when
    ``length_alpha > 0``).

    With ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))`` and ``|y_w|``, ``|y_l|``
    the chosen and rejected responses' lengths in tokens, ``z = beta * h - length_alpha * (|y_w| - |y_l|)``::

        loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)
               - rpo_alpha * log pi(y_w) / |y_w|

    Args:
        policy_chosen_logps: ``[B]`` policy log-probs of the chosen responses, **summed**
            over response tokens.
        policy_rejected_logps: ``[B]`` same for the rejected responses.
        reference_chosen_logps: ``[B]`` frozen reference model, chosen (summed).
        reference_rejected_logps: ``[B]`` frozen reference model, rejected (summed).
        beta: inverse temperature / strength of the implicit KL penalty (paper: 0.1-0.5).
        label_smoothing: ``eps`` in [0, 0.5), assumed probability that a label is flipped
            (0 = plain DPO).
        rpo_alpha: weight of the chosen response's per-token NLL (0 = plain DPO; RPO's paper: 1).
            Per example, so each pair's NLL counts once whatever its length (TRL averages over
            all of a batch's chosen tokens instead, weighting long responses more).
        length_alpha: R-DPO's weight of the length difference, per token (0 = plain DPO; the paper's
            best runs: 0.005 to 0.05 at beta 0.1); needs both lengths.
        chosen_lengths: ``[B]`` tokens in each chosen response, to turn the summed log-prob into a
            per-token NLL; ``None`` when the log-probs are already averaged per token.
        rejected_lengths: ``[B]`` tokens in each rejected response (R-DPO).

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; rewards are the implicit
        rewards ``beta * (policy - reference)``, detached, for logging (accuracy = chosen >
        rejected, margin = chosen - rejected).
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    if length_alpha:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("length_alpha needs chosen_lengths and rejected_lengths")
        logits = logits - length_alpha * (chosen_lengths - rejected_lengths).to(logits.dtype)
    losses = -F.logsigmoid(logits) * (1.0 - label_smoothing)
    if label_smoothing:
        losses = losses - F.logsigmoid(-logits) * label_smoothing
    if rpo_alpha:
        per_token = policy_chosen_logps if chosen_lengths is None else policy_chosen_logps / chosen_lengths.clamp(min=1)
        losses = losses - rpo_alpha * per_token
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def dpo_norm_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 5.0,
    label_smoothing: float = 0.0,
    rpo_alpha: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Length-normalised DPO: :func:`dpo_loss` on log-probs **averaged** over the response tokens.

    Paper: Lambert et al. 2024, "Tulu 3: Pushing Frontiers in Open Language Model Post-Training"
    (arXiv:2411.15124), the DPO variant of its final recipe, with ``beta = 5`` (an average log-ratio is about a
    sequence length smaller than a summed one, so beta is that much larger). A summed log-ratio grows with the
    number of tokens, so a long rejected answer can be pushed down by many tokens at once; averaging takes
    length out of the margin.

    Args: as :func:`dpo_loss`, with ``[B]`` log-probs averaged over each response's tokens.
    Returns: as :func:`dpo_loss` (implicit rewards per token).
    """
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                    beta=beta, label_smoothing=label_smoothing, rpo_alpha=rpo_alpha)
