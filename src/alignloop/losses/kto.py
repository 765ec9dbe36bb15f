"""Kahneman-Tversky Optimization (KTO).

Paper: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
(arXiv:2402.01306), Eq. 7.

Intuition: KTO needs only a binary signal per output ("desirable" / "undesirable"), not
pairs. It maximises a prospect-theory *value* of the implicit reward
``r = log pi(y|x) - log ref(y|x)`` measured relative to a reference point ``z0``, the
policy/reference KL. A desirable output is pushed above ``z0``, an undesirable one below it;
the sigmoid value function saturates, so examples that are already far on the right side
stop contributing (loss aversion is set through the two weights).

The reference point ``z0 = KL(pi || ref)`` is estimated with *mismatched* prompt/output pairs
from the same batch: the caller scores ``(prompt_i, output_j)`` with ``j != i`` (e.g.
``j = i+1 mod B``, see :func:`mismatched_indices`; TRL rotates the other way) under both
models, and ``z0 = mean(policy_kl_logps - reference_kl_logps).clamp(min=0)``, detached (no
gradient flows through ``z0``). Under data parallelism every process should use the same,
global ``z0``: compute :func:`kto_kl_estimate` locally, all-reduce (average) it across
processes and pass the result as ``kl=`` (TRL gathers and averages the per-process means
before clamping; HALOs averages the gathered per-example values).

Loss (with ``w_D``/``w_U`` the desirable/undesirable weights)::

    desirable:   w_D * (1 - sigmoid(beta * (r - z0)))
    undesirable: w_U * (1 - sigmoid(beta * (z0 - r)))

The paper recommends ``w_D * n_D / (w_U * n_U)`` in [1, 4/3] for imbalanced data.
"""

from __future__ import annotations

import torch

__all__ = ["kto_loss", "kto_kl_estimate", "mismatched_indices"]


def mismatched_indices(batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[B]`` index ``(i + 1) % B`` of the output to pair with prompt ``i`` for the KL estimate."""
    return (torch.arange(batch_size, device=device) + 1) % batch_size


def kto_kl_estimate(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor) -> torch.Tensor:
    """Local, unclamped, detached scalar ``mean(policy_kl_logps - reference_kl_logps)``.

    All-reduce (average) this across data-parallel processes and pass it to
    :func:`kto_loss` as ``kl``; ``kto_loss`` applies the ``clamp(min=0)``.
    """
    return (policy_kl_logps - reference_kl_logps).detach().mean()


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    policy_kl_logps: torch.Tensor | None,
    reference_kl_logps: torch.Tensor | None,
    desirable: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""KTO loss for a batch of outputs with binary labels.

    Args:
        policy_logps: ``[B]`` policy log-probs of each (prompt_i, output_i), summed over tokens.
        reference_logps: ``[B]`` reference model, same pairs.
        policy_kl_logps: ``[B]`` policy log-probs of mismatched pairs (prompt_i, output_j),
            j != i, summed over tokens. May be ``None`` when ``kl`` is given.
        reference_kl_logps: ``[B]`` reference model, same mismatched pairs (or ``None``).
        desirable: ``[B]`` bool, True for desirable outputs.
        beta: inverse temperature of the value function.
        desirable_weight: ``lambda_D``.
        undesirable_weight: ``lambda_U``.
        kl: optional override of the reference point ``z0`` (scalar tensor or float), e.g. the
            all-reduced :func:`kto_kl_estimate`; it is detached and clamped at 0.

    Returns:
        ``(losses [B], rewards [B], kl [])``: per-example weighted losses (in input order),
        implicit rewards ``beta * (policy - reference)`` (detached; split them with
        ``desirable`` for logging) and the clamped, detached reference point ``z0``.
    """
    if kl is None:
        if policy_kl_logps is None or reference_kl_logps is None:
            raise ValueError("pass policy_kl_logps and reference_kl_logps, or an explicit kl")
        kl = kto_kl_estimate(policy_kl_logps, reference_kl_logps)
    kl = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    desirable = desirable.to(device=policy_logps.device, dtype=torch.bool)

    logratios = policy_logps - reference_logps
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - kl)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (kl - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, beta * logratios.detach(), kl
