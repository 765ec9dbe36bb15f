"""Alignment losses as small pure functions, plus a plain registry describing them.

Every loss takes per-example tensors and returns per-example losses (reduce them yourself,
usually with ``.mean()``) followed by detached tensors for logging (implicit rewards,
accuracy, KL, ...). Unless a function says otherwise its inputs are per-sequence log-probs of
the *response* tokens, shape ``[B]``: summed over tokens, or averaged over tokens
(length-normalised) where :attr:`LossSpec.logps` says ``"average"``.

``LOSSES`` maps a name to a :class:`LossSpec` recording how to feed the loss:

* ``feedback``: ``"pairwise"`` (chosen/rejected pairs), ``"binary"`` (desirable/undesirable
  labels on single outputs), ``"scored_groups"`` (several scored samples per prompt) or
  ``"any"``.
* ``needs_reference``: whether reference-model log-probs are needed.
* ``logps``: ``"sum"`` / ``"average"`` per-sequence log-probs, ``"token"`` for ``[B, T]``
  per-token log-probs, or ``"none"`` (reward-model scores, not log-probs).
* ``defaults``: the default hyperparameters (identical to the function's keyword defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from .bradley_terry import bradley_terry_loss
from .dpo import dpo_loss, dpo_norm_loss
from .grpo import group_advantages, grpo_loss
from .ipo import ipo_loss
from .kto import kto_kl_estimate, kto_loss, mismatched_indices
from .orpo import orpo_log_odds, orpo_loss
from .sft import sft_loss
from .simpo import simpo_loss
from .slic import slic_loss

Feedback = Literal["pairwise", "binary", "scored_groups", "any"]
LogpsKind = Literal["sum", "average", "token", "none"]


@dataclass(frozen=True)
class LossSpec:
    """What a loss needs; see the module docstring."""

    fn: Callable[..., tuple]
    feedback: Feedback
    needs_reference: bool
    logps: LogpsKind
    defaults: dict[str, Any] = field(default_factory=dict)
    paper: str = ""


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(
        dpo_loss, "pairwise", True, "sum", {"beta": 0.1, "label_smoothing": 0.0, "rpo_alpha": 0.0, "length_alpha": 0.0},
        "Rafailov et al. 2023 (cDPO: Mitchell 2023; RPO: Pang et al. 2024; R-DPO: Park et al. 2024)",
    ),
    "dpo_norm": LossSpec(
        dpo_norm_loss, "pairwise", True, "average", {"beta": 5.0, "label_smoothing": 0.0, "rpo_alpha": 0.0},
        "Lambert et al. 2024 (Tulu 3), length-normalised",
    ),
    "ipo": LossSpec(ipo_loss, "pairwise", True, "average", {"tau": 0.1}, "Azar et al. 2023"),
    "simpo": LossSpec(
        simpo_loss, "pairwise", False, "average",
        {"beta": 2.0, "gamma_beta_ratio": 0.5, "label_smoothing": 0.0}, "Meng et al. 2024",
    ),
    # reference log-probs are optional for slic (None = original reference-free SLiC); the
    # default (TRL "hinge") uses them.
    "slic": LossSpec(
        slic_loss, "pairwise", True, "sum", {"beta": 0.1, "delta": 1.0, "nll_weight": 0.0}, "Zhao et al. 2023",
    ),
    "orpo": LossSpec(orpo_loss, "pairwise", False, "average", {"beta": 0.1}, "Hong et al. 2024"),
    "kto": LossSpec(
        kto_loss, "binary", True, "sum",
        {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}, "Ethayarajh et al. 2024",
    ),
    "grpo": LossSpec(
        grpo_loss, "scored_groups", True, "token",
        {"epsilon": 0.2, "epsilon_high": None, "beta": 0.04}, "Shao et al. 2024",
    ),
    "sft": LossSpec(sft_loss, "any", False, "sum", {}, "maximum likelihood"),
    "bradley_terry": LossSpec(
        bradley_terry_loss, "pairwise", False, "none", {"margin": None}, "Bradley & Terry 1952; Ouyang et al. 2022",
    ),
}

__all__ = [
    "LOSSES",
    "LossSpec",
    "bradley_terry_loss",
    "dpo_loss",
    "dpo_norm_loss",
    "group_advantages",
    "grpo_loss",
    "ipo_loss",
    "kto_kl_estimate",
    "kto_loss",
    "mismatched_indices",
    "orpo_log_odds",
    "orpo_loss",
    "sft_loss",
    "simpo_loss",
    "slic_loss",
]
