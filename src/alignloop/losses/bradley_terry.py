"""Bradley-Terry loss for reward-model training.

Papers: Bradley & Terry 1952; as used for RLHF reward models by Christiano et al. 2017,
Stiennon et al. 2020 and Ouyang et al. 2022 (InstructGPT). The optional margin follows
Llama 2 (Touvron et al. 2023), which adds a margin that grows with the annotated preference
strength.

Intuition: model ``P(y_w > y_l | x) = sigmoid(r(x, y_w) - r(x, y_l))`` and maximise the
likelihood of the observed preferences. Only reward *differences* are identified, so the
scale is set by the data and the offset is arbitrary. A margin ``m`` asks for
``r_w - r_l > m`` before the loss becomes small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bradley_terry_loss"]


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``-log sigmoid(r_w - r_l - margin)`` per pair.

    Args:
        chosen_rewards: ``[B]`` scalar reward-model outputs for the chosen responses.
        rejected_rewards: ``[B]`` same for the rejected responses.
        margin: optional ``[B]`` tensor or float margin (as in TRL's ``RewardTrainer``
            ``margin`` column); ``None`` means 0.

    Returns:
        ``(losses [B], accuracy [B])``: per-pair losses, and a detached float 0/1 tensor that
        is 1 where the model ranks the pair correctly (``r_w > r_l``; ties count as wrong).
    """
    diff = chosen_rewards - rejected_rewards
    logits = diff if margin is None else diff - margin
    losses = -F.logsigmoid(logits)
    accuracy = (diff.detach() > 0).to(chosen_rewards.dtype)
    return losses, accuracy
