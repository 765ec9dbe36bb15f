"""Group Relative Policy Optimization (GRPO).

Paper: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
Language Models" (arXiv:2402.03300), Sec. 4.1, Eq. 3.

Intuition: PPO without a value network. For each prompt we sample a *group* of G outputs and
score them (reward model, verifier, ...). The baseline is the group's own mean score, so an
output's advantage is how much better it is than its siblings, normalised by the group's
standard deviation. Every token of an output shares that advantage. The policy is updated
with PPO's clipped importance-ratio objective (so several gradient steps on the same samples
stay close to the sampling policy ``pi_old``), plus a direct KL penalty to a frozen reference
model using the unbiased, always-positive "k3" estimator (Schulman 2020)::

    kl_t = exp(ref_t - pi_t) - (ref_t - pi_t) - 1

Per token ``t`` of output ``i`` with ratio ``rho = exp(pi_t - old_t)``::

    loss_t = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i) + beta * kl_t

and the per-example loss is the mean over the output's (masked) tokens ("sequence mean", the
paper's ``1/|o_i|`` and TRL's ``loss_type="grpo"``); ``losses.mean()`` then averages over
outputs. Token-weighted variants (DAPO / Dr. GRPO, TRL's newer default ``"dapo"``) differ
only in this reduction. TRL's current ``GRPOConfig`` defaults ``beta`` to 0.0; we keep the
paper's 0.04.
"""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "grpo_loss"]


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    eps: float = 1e-4,
    scale: bool = True,
) -> torch.Tensor:
    r"""Group-relative advantages ``(r - mean_g) / (std_g + eps)``.

    Args:
        rewards: ``[B]`` scalar score of each sampled output.
        group_ids: ``[B]`` integer id of the prompt/group each output belongs to; groups need
            not be contiguous or equally sized.
        eps: added to the std (TRL uses 1e-4).
        scale: divide by the group std (set False for Dr. GRPO-style mean-centring only).

    Returns:
        ``[B]`` detached advantages. ``std`` is the unbiased (Bessel-corrected) group std, as
        in TRL; a group with one output, or with all-equal scores, gets advantage 0.
    """
    rewards = rewards.detach()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    counts = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device)
    counts.index_add_(0, inverse, torch.ones_like(rewards))
    sums = torch.zeros_like(counts).index_add_(0, inverse, rewards)
    centred = rewards - (sums / counts)[inverse]
    if not scale:
        return centred
    sq = torch.zeros_like(counts).index_add_(0, inverse, centred**2)
    std = torch.sqrt(torch.where(counts > 1, sq / (counts - 1).clamp(min=1), torch.zeros_like(sq)))
    return centred / (std[inverse] + eps)


def grpo_loss(
    policy_logps: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logps: torch.Tensor | None = None,
    reference_logps: torch.Tensor | None = None,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.04,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Clipped GRPO objective with a k3 KL penalty, one loss per sampled output.

    Args:
        policy_logps: ``[B, T]`` per-token log-probs of the sampled tokens under the policy
            being trained (with grad).
        mask: ``[B, T]`` 1/True on response tokens that count, 0 on padding.
        advantages: ``[B]`` per-output advantages, e.g. from :func:`group_advantages`.
        old_logps: ``[B, T]`` per-token log-probs under the sampling policy ``pi_old``.
            ``None`` means on-policy with one update per batch: ``policy_logps.detach()`` is
            used, so the ratio is 1 but still carries the policy gradient.
        reference_logps: ``[B, T]`` per-token log-probs under the frozen reference model;
            required unless ``beta == 0``.
        epsilon: lower clip range (``1 - epsilon``), also the upper one unless given.
        epsilon_high: upper clip range (``1 + epsilon_high``); DAPO suggests 0.28.
        beta: KL penalty coefficient (paper 0.04).

    Returns:
        ``(losses [B], kl [B], clip_fraction [B])``: per-output sequence-mean losses, the
        detached per-output mean k3 KL to the reference (zeros when ``beta == 0``), and the
        detached fraction of each output's tokens whose ratio was clipped.
    """
    if epsilon_high is None:
        epsilon_high = epsilon
    mask = mask.to(policy_logps.dtype)
    if old_logps is None:
        old_logps = policy_logps.detach()
    adv = advantages.to(policy_logps.dtype).unsqueeze(-1)

    ratio = torch.exp(policy_logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
    per_token_loss = -torch.min(ratio * adv, clipped_ratio * adv)

    if beta != 0.0:
        if reference_logps is None:
            raise ValueError("grpo_loss needs reference_logps when beta != 0 (pass beta=0.0 to drop the KL term)")
        log_ratio_ref = reference_logps - policy_logps
        per_token_kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1.0
        per_token_loss = per_token_loss + beta * per_token_kl
    else:
        per_token_kl = torch.zeros_like(policy_logps)

    num_tokens = mask.sum(-1).clamp(min=1.0)
    # masked_fill (not just a product) so that inf/nan on padding positions cannot leak in
    keep = mask.bool()
    losses = per_token_loss.masked_fill(~keep, 0.0).sum(-1) / num_tokens
    kl = per_token_kl.detach().masked_fill(~keep, 0.0).sum(-1) / num_tokens
    is_clipped = ((ratio < 1.0 - epsilon) & (adv < 0)) | ((ratio > 1.0 + epsilon_high) & (adv > 0))
    clip_fraction = (is_clipped & keep).to(policy_logps.dtype).sum(-1).detach() / num_tokens
    return losses, kl, clip_fraction
