"""Tests for alignloop.losses.

(a) hand-computed values: expected numbers are worked out with ``math`` on tiny inputs,
    never by running the same formula through torch;
(b) agreement with TRL (test-only dependency, ``pip install trl==1.16.0 --no-deps``; a missing or other TRL skips
    these cases locally and fails them under CI) for
    every loss TRL also implements. TRL's losses live inside trainer methods; we build bare
    trainer instances with ``object.__new__`` and set only the attributes the method reads.
    Where the loss is inlined in ``_compute_loss`` (DPO, KTO, reward model, GRPO) a fake model
    returns preset per-token log-probs (or scores), so the comparison is on the loss math only.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import statistics
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from alignloop.losses import (
    LOSSES,
    bradley_terry_loss,
    dpo_loss,
    dpo_norm_loss,
    group_advantages,
    grpo_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    mismatched_indices,
    orpo_log_odds,
    orpo_loss,
    sft_loss,
    simpo_loss,
    slic_loss,
)
from conftest import require, trl_problem

DT = torch.float64


def t(*xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=DT)


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x), computed stably with math."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def nls(x: float) -> float:
    """-log sigmoid(x)."""
    return softplus(-x)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    exp = torch.as_tensor(expected, dtype=DT)
    assert actual.shape == exp.shape, (actual.shape, exp.shape)
    torch.testing.assert_close(actual.to(DT), exp, atol=tol, rtol=0)


# ---------------------------------------------------------------------------------------
# (a) hand-computed values
# ---------------------------------------------------------------------------------------


def test_dpo_hand_computed():
    pc, pr, rc, rr = t(-10.0, -20.0), t(-12.0, -18.0), t(-11.0, -19.0), t(-11.0, -19.0)
    # chosen log-ratios (1, -1), rejected log-ratios (-1, 1) -> h = (2, -2), beta*h = (0.2, -0.2)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.1)
    close(losses, [math.log1p(math.exp(-0.2)), math.log1p(math.exp(0.2))])
    close(cr, [0.1, -0.1])
    close(rj, [-0.1, 0.1])
    assert not cr.requires_grad


def test_cdpo_hand_computed():
    pc, pr, rc, rr = t(-10.0, -20.0), t(-12.0, -18.0), t(-11.0, -19.0), t(-11.0, -19.0)
    eps = 0.2
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=eps)
    expected = [(1 - eps) * nls(z) + eps * nls(-z) for z in (0.2, -0.2)]
    close(losses, expected)


def test_dpo_norm_hand_computed():
    # per-token averages: chosen log-ratio -1.0 - -1.2 = 0.2, rejected -2.0 - -1.5 = -0.5, h = 0.7; beta 5 -> 3.5
    losses, cr, rj = dpo_norm_loss(t(-1.0), t(-2.0), t(-1.2), t(-1.5))
    close(losses, [math.log1p(math.exp(-3.5))])
    close(cr, [1.0])
    close(rj, [-2.5])


def test_rpo_hand_computed():
    # as test_dpo_hand_computed, plus alpha * per-token NLL of chosen: -(-10)/5 = 2 and -(-20)/4 = 5
    pc, pr, rc, rr = t(-10.0, -20.0), t(-12.0, -18.0), t(-11.0, -19.0), t(-11.0, -19.0)
    losses, cr, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, rpo_alpha=0.5, chosen_lengths=t(5.0, 4.0))
    close(losses, [math.log1p(math.exp(-0.2)) + 0.5 * 2.0, math.log1p(math.exp(0.2)) + 0.5 * 5.0])
    close(cr, [0.1, -0.1])  # the implicit rewards are DPO's, untouched by the NLL term
    # length-normalised: the log-probs are already per token
    losses, _, _ = dpo_norm_loss(t(-1.0), t(-2.0), t(-1.2), t(-1.5), rpo_alpha=2.0)
    close(losses, [math.log1p(math.exp(-3.5)) + 2.0 * 1.0])


def test_rdpo_hand_computed():
    # as test_dpo_hand_computed (beta*h = 0.2 and -0.2), less length_alpha times the chosen length minus the
    # rejected: 0.01 * (5 - 25) = -0.2 and 0.01 * (30 - 10) = 0.2, so z = 0.4 and -0.4
    pc, pr, rc, rr = t(-10.0, -20.0), t(-12.0, -18.0), t(-11.0, -19.0), t(-11.0, -19.0)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.1, length_alpha=0.01, chosen_lengths=t(5.0, 30.0),
                              rejected_lengths=t(25.0, 10.0))
    close(losses, [math.log1p(math.exp(-0.4)), math.log1p(math.exp(0.4))])
    close(cr, [0.1, -0.1])  # the implicit rewards are DPO's
    close(rj, [-0.1, 0.1])
    with pytest.raises(ValueError, match="length_alpha needs chosen_lengths and rejected_lengths"):
        dpo_loss(pc, pr, rc, rr, length_alpha=0.01, chosen_lengths=t(5.0, 30.0))


def test_dpo_gradients_flow_to_policy_only():
    pc = t(-10.0, -20.0).requires_grad_()
    pr = t(-12.0, -18.0).requires_grad_()
    losses, cr, rj = dpo_loss(pc, pr, t(-11.0, -19.0), t(-11.0, -19.0))
    losses.sum().backward()
    # d/dpc of -log sigmoid(beta*h) = -beta * (1 - sigmoid(beta*h))
    close(pc.grad, [-0.1 * (1 - sig(0.2)), -0.1 * (1 - sig(-0.2))])
    close(pr.grad, [0.1 * (1 - sig(0.2)), 0.1 * (1 - sig(-0.2))])
    assert not cr.requires_grad and not rj.requires_grad


def test_ipo_hand_computed():
    # token-averaged log-probs: h = (-1.0 + 1.2) - (-1.5 + 1.2) = 0.5, target 1/(2*0.1) = 5
    losses, cr, rj = ipo_loss(t(-1.0, -2.0), t(-1.5, -1.0), t(-1.2, -2.0), t(-1.2, -2.0), tau=0.1)
    close(losses, [(0.5 - 5.0) ** 2, (-1.0 - 5.0) ** 2])
    close(cr, [0.1 * 0.2, 0.0])
    close(rj, [0.1 * -0.3, 0.1 * 1.0])
    losses, _, _ = ipo_loss(t(-1.0), t(-1.5), t(-1.2), t(-1.2), tau=0.5)
    close(losses, [(0.5 - 1.0) ** 2])


def test_simpo_hand_computed():
    # beta*(avg_w - avg_l) - gamma = 2*(0.75) - 1.0 = 0.5
    losses, cr, rj = simpo_loss(t(-0.5, -1.0), t(-1.25, -0.9))
    close(losses, [nls(0.5), nls(2.0 * (-0.1 - 0.5))])
    close(cr, [-1.0, -2.0])
    close(rj, [-2.5, -1.8])
    losses, _, _ = simpo_loss(t(-0.5), t(-1.25), beta=10.0, gamma_beta_ratio=0.3, label_smoothing=0.1)
    z = 10.0 * (0.75 - 0.3)
    close(losses, [0.9 * nls(z) + 0.1 * nls(-z)])


def test_slic_hand_computed():
    # TRL "hinge" convention: relu(1 - beta * h)
    pc, pr, rc, rr = t(-10.0, -10.0), t(-12.0, -30.0), t(-11.0, -11.0), t(-11.0, -11.0)
    losses, cr, rj = slic_loss(pc, pr, rc, rr, beta=0.1)
    # h = (1) - (-1) = 2 -> 1 - 0.2 = 0.8;  h = 1 - (-19) = 20 -> relu(1 - 2) = 0
    close(losses, [0.8, 0.0])
    close(cr, [0.1, 0.1])
    close(rj, [-0.1, -1.9])
    # HALOs / paper convention: no reference, margin delta in nats, NLL regulariser
    losses, cr, rj = slic_loss(pc, pr, beta=1.0, delta=5.0, nll_weight=0.1)
    close(losses, [(5.0 - 2.0) + 0.1 * 10.0, 0.0 + 0.1 * 10.0])
    close(cr, [-10.0, -10.0])
    close(rj, [-12.0, -30.0])
    with pytest.raises(ValueError):
        slic_loss(pc, pr, rc, None)


def test_orpo_hand_computed():
    # P(y_w) = 0.5 -> odds 1; P(y_l) = 0.25 -> odds 1/3; log odds ratio = log 3
    pc, pr = t(math.log(0.5)), t(math.log(0.25))
    losses, cr, rj = orpo_loss(pc, pr, beta=0.1)
    close(orpo_log_odds(pc, pr), [math.log(3.0)])
    close(losses, [math.log(2.0) - 0.1 * math.log(0.75)])
    close(cr, [0.1 * math.log(0.5)])
    close(rj, [0.1 * math.log(0.25)])
    # custom SFT term
    losses, _, _ = orpo_loss(pc, pr, beta=0.5, chosen_nll=t(3.0))
    close(losses, [3.0 - 0.5 * math.log(0.75)])
    # very likely / very unlikely responses stay finite (stable log1mexp)
    losses, _, _ = orpo_loss(t(-1e-6, -50.0), t(-60.0, -1e-7))
    assert torch.isfinite(losses).all()


def _kto_fixture():
    policy = t(-10.0, -20.0, -15.0)
    reference = t(-11.0, -18.0, -15.0)
    policy_kl = t(-30.0, -31.0, -29.0)
    reference_kl = t(-30.5, -31.5, -29.0)
    desirable = torch.tensor([True, False, True])
    return policy, reference, policy_kl, reference_kl, desirable


def test_kto_hand_computed():
    policy, reference, policy_kl, reference_kl, desirable = _kto_fixture()
    z0 = (0.5 + 0.5 + 0.0) / 3
    losses, rewards, kl = kto_loss(
        policy, reference, policy_kl, reference_kl, desirable, beta=0.1, desirable_weight=1.33, undesirable_weight=0.7
    )
    r = [1.0, -2.0, 0.0]
    close(kl, z0)
    close(
        losses,
        [1.33 * (1 - sig(0.1 * (r[0] - z0))), 0.7 * (1 - sig(0.1 * (z0 - r[1]))), 1.33 * (1 - sig(0.1 * (r[2] - z0)))],
    )
    close(rewards, [0.1 * x for x in r])


def test_kto_reference_point_clamped_detached_and_overridable():
    policy, reference, _, _, desirable = _kto_fixture()
    policy_kl = t(-30.0, -31.0, -29.0).requires_grad_()
    # mean(policy_kl - reference_kl) = -1 < 0 -> z0 = 0
    losses, _, kl = kto_loss(policy, reference, policy_kl, policy_kl.detach() + 1.0, desirable)
    close(kl, 0.0)
    close(losses, [1 - sig(0.1 * 1.0), 1 - sig(0.1 * 2.0), 1 - sig(0.0)])
    assert not losses.requires_grad  # no gradient path through the reference point
    # explicit (e.g. all-reduced) kl; KL log-probs may then be omitted
    losses, _, kl = kto_loss(policy, reference, None, None, desirable, kl=torch.tensor(0.25))
    close(kl, 0.25)
    close(losses, [1 - sig(0.1 * 0.75), 1 - sig(0.1 * 2.25), 1 - sig(-0.025)])
    _, _, kl = kto_loss(policy, reference, None, None, desirable, kl=-3.0)
    close(kl, 0.0)
    with pytest.raises(ValueError):
        kto_loss(policy, reference, None, None, desirable)
    close(kto_kl_estimate(t(-1.0, -2.0), t(-2.0, -2.0)), 0.5)
    assert mismatched_indices(4).tolist() == [1, 2, 3, 0]


def test_kto_gradient_only_through_policy_logps():
    policy, reference, policy_kl, reference_kl, desirable = _kto_fixture()
    policy = policy.clone().requires_grad_()
    policy_kl = policy_kl.clone().requires_grad_()
    losses, _, _ = kto_loss(policy, reference, policy_kl, reference_kl, desirable)
    losses.sum().backward()
    assert policy_kl.grad is None
    z0 = 1 / 3
    # desirable: d/dr (1 - s(b(r - z))) = -b s (1 - s)
    s0 = sig(0.1 * (1.0 - z0))
    s1 = sig(0.1 * (z0 + 2.0))
    close(policy.grad[:2], [-0.1 * s0 * (1 - s0), 0.1 * s1 * (1 - s1)])


def test_group_advantages_hand_computed():
    rewards = t(1.0, 2.0, 0.0, 2.0, 5.0, 0.0, 1.0, 4.0)
    groups = torch.tensor([3, 7, 3, 7, 9, 3, 3, 7])  # non-contiguous, unequal sizes, a singleton
    adv = group_advantages(rewards, groups)
    g3 = [1.0, 0.0, 0.0, 1.0]
    g7 = [2.0, 2.0, 4.0]
    m3, s3 = statistics.mean(g3), statistics.stdev(g3)
    m7, s7 = statistics.mean(g7), statistics.stdev(g7)
    expected = [
        (1 - m3) / (s3 + 1e-4),
        (2 - m7) / (s7 + 1e-4),
        (0 - m3) / (s3 + 1e-4),
        (2 - m7) / (s7 + 1e-4),
        0.0,  # singleton group
        (0 - m3) / (s3 + 1e-4),
        (1 - m3) / (s3 + 1e-4),
        (4 - m7) / (s7 + 1e-4),
    ]
    close(adv, expected)
    close(group_advantages(rewards, groups, scale=False), [1 - m3, 2 - m7, -m3, 2 - m7, 0.0, -m3, 1 - m3, 4 - m7])
    close(group_advantages(t(3.0, 3.0), torch.tensor([0, 0])), [0.0, 0.0])


def test_grpo_hand_computed():
    policy = [[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0]]
    # ratios: row 0 (A > 0) 1.25 (clipped at 1.2, not at 1.28), 1.4 (clipped), 1;
    #         row 1 (A < 0) 0.7 (clipped at 0.8), exp(-0.2), padding
    old = [[-1.0 - math.log(1.25), -2.0 - math.log(1.4), -0.5], [-0.3 - math.log(0.7), -1.0, -1.0]]
    ref = [[-0.9, -2.5, -0.4], [-0.3, -0.8, -1.0]]
    mask = [[1, 1, 1], [1, 1, 0]]
    adv = [1.5, -0.5]
    beta, eps = 0.04, 0.2

    def expected(eps_high):
        losses, kls, clips = [], [], []
        for i in range(2):
            tot = kl_tot = clip_tot = 0.0
            n = sum(mask[i])
            for j in range(3):
                if not mask[i][j]:
                    continue
                rho = math.exp(policy[i][j] - old[i][j])
                clipped = min(max(rho, 1 - eps), 1 + eps_high)
                d = ref[i][j] - policy[i][j]
                kl = math.exp(d) - d - 1
                tot += -min(rho * adv[i], clipped * adv[i]) + beta * kl
                kl_tot += kl
                clip_tot += float((rho < 1 - eps and adv[i] < 0) or (rho > 1 + eps_high and adv[i] > 0))
            losses.append(tot / n)
            kls.append(kl_tot / n)
            clips.append(clip_tot / n)
        return losses, kls, clips

    args = (torch.tensor(policy, dtype=DT), torch.tensor(mask), torch.tensor(adv, dtype=DT))
    kw = dict(old_logps=torch.tensor(old, dtype=DT), reference_logps=torch.tensor(ref, dtype=DT))
    for eps_high, extra in ((eps, {}), (0.28, {"epsilon_high": 0.28})):
        losses, kl, clip = grpo_loss(*args, **kw, **extra)
        exp_losses, exp_kl, exp_clip = expected(eps_high)
        assert exp_clip == ([2 / 3, 1 / 2] if eps_high == eps else [1 / 3, 1 / 2])
        close(losses, exp_losses)
        close(kl, exp_kl)
        close(clip, exp_clip)


def test_grpo_on_policy_defaults_and_reference_requirement():
    policy = torch.tensor([[-1.0, -2.0], [-0.5, -0.25]], dtype=DT, requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = t(2.0, -1.0)
    losses, kl, clip = grpo_loss(policy, mask, adv, beta=0.0)
    # old = policy.detach(): ratio 1 -> loss = -A, gradient = -A / n_tokens per token
    close(losses, [-2.0, 1.0])
    close(kl, [0.0, 0.0])
    close(clip, [0.0, 0.0])
    losses.sum().backward()
    close(policy.grad, [[-1.0, -1.0], [1.0, 0.0]])
    with pytest.raises(ValueError):
        grpo_loss(policy, mask, adv)  # beta=0.04 needs reference log-probs
    # padding garbage (inf) must not leak into the loss
    bad = torch.tensor([[-1.0, float("-inf")]], dtype=DT)
    losses, _, _ = grpo_loss(bad, torch.tensor([[1, 0]]), t(1.0), reference_logps=torch.tensor([[-1.0, 0.0]], dtype=DT))
    close(losses, [-1.0])


def test_sft_hand_computed():
    losses, avg = sft_loss(t(-6.0, -3.0, -4.0), torch.tensor([3, 0, 8]))
    close(losses, [2.0, 3.0, 0.5])  # zero-token example clamped to one token
    close(avg, [-2.0, -3.0, -0.5])


def test_bradley_terry_hand_computed():
    cr, rr = t(2.0, 0.0, 1.0), t(1.0, 0.5, 1.0)
    losses, acc = bradley_terry_loss(cr, rr)
    close(losses, [math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5)), math.log(2.0)])
    close(acc, [1.0, 0.0, 0.0])
    losses, acc = bradley_terry_loss(cr, rr, margin=0.5)
    close(losses, [math.log1p(math.exp(-0.5)), math.log1p(math.exp(1.0)), math.log1p(math.exp(0.5))])
    losses, _ = bradley_terry_loss(cr, rr, margin=t(1.0, 0.0, -1.0))
    close(losses, [math.log(2.0), math.log1p(math.exp(0.5)), math.log1p(math.exp(-1.0))])
    close(acc, [1.0, 0.0, 0.0])


def test_registry_metadata_matches_functions():
    assert set(LOSSES) == {"dpo", "dpo_norm", "ipo", "simpo", "slic", "orpo", "kto", "grpo", "sft", "bradley_terry"}
    for name, spec in LOSSES.items():
        assert spec.feedback in {"pairwise", "binary", "scored_groups", "any"}, name
        assert spec.logps in {"sum", "average", "token", "none"}, name
        params = inspect.signature(spec.fn).parameters
        sig_defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
        for key, value in spec.defaults.items():
            assert key in sig_defaults and sig_defaults[key] == value, (name, key)
        has_ref = any("reference" in k for k in params)
        assert spec.needs_reference <= has_ref, name
    assert LOSSES["kto"].feedback == "binary" and LOSSES["grpo"].feedback == "scored_groups"
    assert LOSSES["sft"].feedback == "any"
    assert not LOSSES["simpo"].needs_reference and not LOSSES["orpo"].needs_reference
    assert LOSSES["ipo"].logps == LOSSES["simpo"].logps == LOSSES["orpo"].logps == LOSSES["dpo_norm"].logps == "average"
    assert LOSSES["dpo"].logps == LOSSES["kto"].logps == "sum"


# ---------------------------------------------------------------------------------------
# (b) agreement with TRL
# ---------------------------------------------------------------------------------------

TRL_TOL = 1e-5


@pytest.fixture(scope="module")
def trl():
    require(trl_problem())  # the pinned TRL; under CI its absence fails instead of skipping 19 cases
    import trl

    return trl


def _experimental(name: str):
    """CPO and ORPO moved to ``trl.experimental`` in TRL 1.x (importing warns)."""
    require(trl_problem())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(f"trl.experimental.{name}")


class _FakeAccelerator:
    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def autocast(self):
        return contextlib.nullcontext()


class _FakeLM:
    """Stands in for a causal LM called with ``fused_lm_head=True``.

    ``input_ids[:, 0]`` holds a row key into ``table`` ([N, L-1] per-token log-probs); like the
    real fused head, positions whose shifted label is -100 get log-prob 0.
    """

    training = False

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, input_ids=None, labels=None, **_):
        rows = self.table[input_ids[:, 0]]
        keep = labels[:, 1:] != -100
        log_probs = torch.where(keep, rows[:, : keep.shape[1]], torch.zeros((), dtype=rows.dtype))
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(
            log_probs=log_probs,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=zeros.bool(),
            log_sum_sq_probs=zeros,
            aux_loss=None,
        )


def _bare(cls, **attrs):
    obj = object.__new__(cls)
    base = dict(
        accelerator=_FakeAccelerator(),
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    base.update(attrs)
    for key, value in base.items():
        setattr(obj, key, value)
    return obj


def _completion_mask(lengths, width):
    """Column 0 is always a prompt token; ``n`` completion tokens follow it."""
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, 1 : 1 + n] = 1
    return mask


def _pair_batch(seed=0):
    """B=3 preference pairs with varied lengths, as TRL's DPO collator lays them out."""
    g = torch.Generator().manual_seed(seed)
    B, L = 3, 7
    chosen_len, rejected_len = [3, 6, 2], [4, 1, 5]
    completion_mask = _completion_mask(chosen_len + rejected_len, L)
    table = -(torch.rand(2 * B, L - 1, generator=g, dtype=DT) * 3 + 0.05)
    input_ids = torch.randint(5, 50, (2 * B, L), generator=g)
    input_ids[:, 0] = torch.arange(2 * B)
    ref = -(torch.rand(2 * B, generator=g, dtype=DT) * 10 + 1)
    shift = completion_mask[:, 1:].to(DT)
    sums = (table * shift).sum(1)
    lengths = completion_mask.sum(1).to(DT)
    return dict(
        B=B,
        table=table,
        input_ids=input_ids,
        completion_mask=completion_mask,
        ref=ref,
        sums=sums,
        lengths=lengths,
    )


def _trl_dpo(trl, batch, idx, loss_type, beta=0.1, label_smoothing=0.0, loss_weights=(1.0,)):
    """Run TRL's DPOTrainer._compute_loss on the pairs ``idx``; return (loss, metrics). ``loss_type`` is one of
    TRL's loss types or a list of them, summed with ``loss_weights``."""
    B = batch["B"]
    rows = torch.tensor(list(idx) + [B + i for i in idx])
    model = _FakeLM(batch["table"])
    trainer = _bare(
        trl.DPOTrainer,
        model=model,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=1.0,
        loss_types=[loss_type] if isinstance(loss_type, str) else list(loss_type),
        loss_weights=list(loss_weights),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    inputs = {
        "input_ids": batch["input_ids"][rows],
        "attention_mask": torch.ones_like(batch["input_ids"][rows]),
        "completion_mask": batch["completion_mask"][rows],
        "ref_chosen_logps": batch["ref"][: B][list(idx)],
        "ref_rejected_logps": batch["ref"][B:][list(idx)],
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def _ours_pairs(batch):
    B, s, ref = batch["B"], batch["sums"], batch["ref"]
    return s[:B], s[B:], ref[:B], ref[B:]


def _avg(batch, x, side):
    B, n = batch["B"], batch["lengths"]
    return x / (n[:B] if side == "chosen" else n[B:])


def _check_dpo_like(trl, batch, loss_type, ours_losses, ours_cr, ours_rr, beta):
    B = batch["B"]
    for i in range(B):  # per example
        loss, _ = _trl_dpo(trl, batch, [i], loss_type, beta=beta)
        assert abs(loss.item() - ours_losses[i].item()) < TRL_TOL, (loss_type, i)
    loss, metrics = _trl_dpo(trl, batch, range(B), loss_type, beta=beta)
    assert abs(loss.item() - ours_losses.mean().item()) < TRL_TOL
    assert abs(metrics["rewards/chosen"] - ours_cr.mean().item()) < TRL_TOL
    assert abs(metrics["rewards/rejected"] - ours_rr.mean().item()) < TRL_TOL


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl(trl, beta):
    batch = _pair_batch()
    losses, cr, rr = dpo_loss(*_ours_pairs(batch), beta=beta)
    _check_dpo_like(trl, batch, "sigmoid", losses, cr, rr, beta)


def test_rpo_matches_trl(trl):
    """RPO is TRL's sigmoid loss plus its `sft` loss weighted by alpha (TRL 1.x dropped `rpo_alpha` for this). TRL
    averages the NLL over all of a batch's chosen tokens, ours over each pair's; one pair per call they agree."""
    batch = _pair_batch(4)
    B, alpha = batch["B"], 0.7
    losses, _, _ = dpo_loss(*_ours_pairs(batch), rpo_alpha=alpha, chosen_lengths=batch["lengths"][:B])
    plain, _, _ = dpo_loss(*_ours_pairs(batch))
    assert (losses - plain > 0.1).all()  # the NLL term is there and positive
    for i in range(B):
        loss, _ = _trl_dpo(trl, batch, [i], ["sigmoid", "sft"], loss_weights=(1.0, alpha))
        assert abs(loss.item() - losses[i].item()) < TRL_TOL, i


def test_hinge_slic_matches_trl(trl):
    batch = _pair_batch(1)
    for beta in (0.1, 0.3):
        losses, cr, rr = slic_loss(*_ours_pairs(batch), beta=beta)
        if beta == 0.3:  # both sides of the hinge are exercised
            assert (losses > 0).any() and (losses == 0).any()
        _check_dpo_like(trl, batch, "hinge", losses, cr, rr, beta)


def test_ipo_matches_trl(trl):
    """TRL's IPO divides the summed log-ratios by the completion length; we take averages."""
    batch = _pair_batch(2)
    pc, pr, rc, rr = _ours_pairs(batch)
    tau = 0.1
    losses, _, _ = ipo_loss(
        _avg(batch, pc, "chosen"), _avg(batch, pr, "rejected"), _avg(batch, rc, "chosen"), _avg(batch, rr, "rejected"),
        tau=tau,
    )
    B = batch["B"]
    for i in range(B):
        loss, _ = _trl_dpo(trl, batch, [i], "ipo", beta=tau)
        assert abs(loss.item() - losses[i].item()) < TRL_TOL
    loss, metrics = _trl_dpo(trl, batch, range(B), "ipo", beta=tau)
    assert abs(loss.item() - losses.mean().item()) < TRL_TOL
    # TRL logs rewards from the *summed* log-ratios
    assert abs(metrics["rewards/chosen"] - (tau * (pc - rc)).mean().item()) < TRL_TOL


def test_sft_matches_trl_dpo_sft_term(trl):
    """TRL's DPO ``sft`` loss is the token-weighted mean NLL over the chosen responses."""
    batch = _pair_batch(3)
    B = batch["B"]
    n = batch["lengths"][:B]
    losses, _ = sft_loss(batch["sums"][:B], n)
    loss, _ = _trl_dpo(trl, batch, range(B), "sft")
    assert abs(loss.item() - ((losses * n).sum() / n.sum()).item()) < TRL_TOL


def _cpo(trl, **attrs):
    base = dict(alpha=0.0, label_smoothing=0.0, simpo_gamma=0.5, beta=0.1, loss_type="sigmoid")
    base.update(attrs)
    return _bare(_experimental("cpo").CPOTrainer, **base)


def test_cdpo_matches_trl(trl):
    """TRL 1.16's DPOTrainer ``sigmoid`` loss ignores ``label_smoothing``; CPOTrainer's ``sigmoid``
    loss keeps the cDPO form on ``logits = chosen - rejected``, so feeding it the log-ratios
    reproduces cDPO exactly."""
    batch = _pair_batch(4)
    pc, pr, rc, rr = _ours_pairs(batch)
    for beta, eps in ((0.1, 0.1), (0.5, 0.3)):
        losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
        trl_losses, trl_cr, trl_rj = _cpo(trl, beta=beta, label_smoothing=eps).cpo_loss(pc - rc, pr - rr)
        torch.testing.assert_close(losses, trl_losses, atol=TRL_TOL, rtol=0)
        torch.testing.assert_close(cr, trl_cr, atol=TRL_TOL, rtol=0)
        torch.testing.assert_close(rj, trl_rj, atol=TRL_TOL, rtol=0)


@pytest.mark.parametrize("beta,ratio,eps", [(2.0, 0.5, 0.0), (10.0, 0.3, 0.0), (2.5, 0.55, 0.1)])
def test_simpo_matches_trl_cpo(trl, beta, ratio, eps):
    batch = _pair_batch(5)
    pc, pr, _, _ = _ours_pairs(batch)
    ac, ar = _avg(batch, pc, "chosen"), _avg(batch, pr, "rejected")
    losses, cr, rj = simpo_loss(ac, ar, beta=beta, gamma_beta_ratio=ratio, label_smoothing=eps)
    trainer = _cpo(trl, loss_type="simpo", beta=beta, simpo_gamma=ratio * beta, label_smoothing=eps)
    trl_losses, trl_cr, trl_rj = trainer.cpo_loss(ac, ar)
    torch.testing.assert_close(losses, trl_losses, atol=TRL_TOL, rtol=0)
    torch.testing.assert_close(cr, trl_cr, atol=TRL_TOL, rtol=0)
    torch.testing.assert_close(rj, trl_rj, atol=TRL_TOL, rtol=0)


def test_reference_free_slic_matches_trl_cpo_hinge(trl):
    batch = _pair_batch(6)
    pc, pr, _, _ = _ours_pairs(batch)
    losses, cr, rj = slic_loss(pc, pr, beta=0.2)
    trl_losses, trl_cr, trl_rj = _cpo(trl, loss_type="hinge", beta=0.2).cpo_loss(pc, pr)
    torch.testing.assert_close(losses, trl_losses, atol=TRL_TOL, rtol=0)
    torch.testing.assert_close(cr, trl_cr, atol=TRL_TOL, rtol=0)


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_orpo_matches_trl(trl, beta):
    batch = _pair_batch(7)
    pc, pr, _, _ = _ours_pairs(batch)
    ac = torch.cat([_avg(batch, pc, "chosen"), t(-1e-4, -30.0)])
    ar = torch.cat([_avg(batch, pr, "rejected"), t(-25.0, -2e-3)])
    losses, cr, rj = orpo_loss(ac, ar, beta=beta)
    trainer = _bare(_experimental("orpo").ORPOTrainer, beta=beta)
    trl_losses, trl_cr, trl_rj, trl_ratio, trl_log_odds = trainer.odds_ratio_loss(ac, ar)
    # TRL returns +beta*log sigmoid(log_odds) and adds the SFT term outside the method
    # (TRL upcasts with .float(), i.e. computes in float32 even for float64 inputs)
    torch.testing.assert_close(losses - (-ac), -trl_losses.to(DT), atol=TRL_TOL, rtol=0)
    torch.testing.assert_close(cr, trl_cr.to(DT), atol=TRL_TOL, rtol=0)
    torch.testing.assert_close(rj, trl_rj.to(DT), atol=TRL_TOL, rtol=0)
    assert abs(orpo_log_odds(ac, ar).mean().item() - trl_log_odds.item()) < TRL_TOL


def _trl_kto(trl, *, table, rows, kl_rows, completion_mask, kl_completion_mask, label, ref, ref_kl, **attrs):
    model = _FakeLM(table)
    trainer = _bare(
        trl.KTOTrainer,
        model=model,
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        **attrs,
    )
    ids = torch.full((len(rows), completion_mask.shape[1]), 7)
    ids[:, 0] = torch.tensor(rows)
    kl_ids = torch.full((len(kl_rows), kl_completion_mask.shape[1]), 7)
    kl_ids[:, 0] = torch.tensor(kl_rows)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": completion_mask,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": torch.ones_like(kl_ids),
        "KL_completion_mask": kl_completion_mask,
        "label": label,
        "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


@pytest.mark.parametrize("beta,wd,wu", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.8)])
def test_kto_matches_trl(trl, beta, wd, wu):
    g = torch.Generator().manual_seed(11)
    B, L = 4, 6
    label = torch.tensor([True, False, False, True])
    completion_mask = _completion_mask([3, 5, 2, 4], L)
    kl_completion_mask = _completion_mask([4, 3, 5, 2], L)  # outputs rotated to other prompts
    table = -(torch.rand(2 * B, L - 1, generator=g, dtype=DT) * 2 + 0.05)  # rows 0..B-1 main, B..2B-1 KL
    ref = -(torch.rand(B, generator=g, dtype=DT) * 8 + 1)
    sums = (table[:B] * completion_mask[:, 1:]).sum(1)
    kl_sums = (table[B:] * kl_completion_mask[:, 1:]).sum(1)
    ref_kl = kl_sums - t(1.2, -0.4, 0.9, 0.3)  # mean 0.5; example 1 alone gets clamped to 0
    assert (kl_sums - ref_kl).mean() > 0  # exercise a non-zero reference point
    attrs = dict(beta=beta, desirable_weight=wd, undesirable_weight=wu)

    losses, rewards, kl = kto_loss(sums, ref, kl_sums, ref_kl, label, **attrs)
    loss, metrics = _trl_kto(
        trl, table=table, rows=list(range(B)), kl_rows=list(range(B, 2 * B)), completion_mask=completion_mask,
        kl_completion_mask=kl_completion_mask, label=label, ref=ref, ref_kl=ref_kl, **attrs,
    )
    assert abs(loss.item() - losses.mean().item()) < TRL_TOL
    assert abs(metrics["kl"] - kl.item()) < TRL_TOL
    assert abs(metrics["rewards/chosen"] - rewards[label].mean().item()) < TRL_TOL
    assert abs(metrics["rewards/rejected"] - rewards[~label].mean().item()) < TRL_TOL

    # per example (each on its own, so its own KL pair sets z0; covers both branches and the clamp)
    for i in range(B):
        sl = slice(i, i + 1)
        losses_i, _, _ = kto_loss(sums[sl], ref[sl], kl_sums[sl], ref_kl[sl], label[sl], **attrs)
        loss_i, _ = _trl_kto(
            trl, table=table, rows=[i], kl_rows=[B + i], completion_mask=completion_mask[sl],
            kl_completion_mask=kl_completion_mask[sl], label=label[sl], ref=ref[sl], ref_kl=ref_kl[sl], **attrs,
        )
        assert abs(loss_i.item() - losses_i.item()) < TRL_TOL, i


def _trl_grpo(trl, policy, mask, adv, old, ref, beta, eps_low, eps_high):
    trainer = _bare(
        trl.GRPOTrainer,
        model=SimpleNamespace(training=False),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        loss_type="grpo",
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        _entropy_bonus_enabled=False,
    )
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (policy, torch.zeros_like(policy), None)
    B, T = policy.shape
    inputs = {
        "prompt_ids": torch.ones(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.ones(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
    }
    loss = trainer._compute_loss(None, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


@pytest.mark.parametrize("beta,eps_high", [(0.04, None), (0.0, 0.28), (0.1, 0.2)])
def test_grpo_matches_trl(trl, beta, eps_high):
    g = torch.Generator().manual_seed(13)
    B, T, eps = 6, 5, 0.2
    policy = -(torch.rand(B, T, generator=g, dtype=DT) * 2 + 0.05)
    old = policy + (torch.rand(B, T, generator=g, dtype=DT) - 0.5) * 0.8  # some ratios outside the clip range
    ref = policy + (torch.rand(B, T, generator=g, dtype=DT) - 0.5)
    mask = _completion_mask([5, 3, 4, 1, 2, 5], T + 1)[:, 1:]
    rewards = torch.rand(B, generator=g, dtype=DT)
    adv = group_advantages(rewards, torch.tensor([0, 0, 0, 1, 1, 1]))
    losses, kl, clip = grpo_loss(
        policy, mask, adv, old_logps=old, reference_logps=ref, epsilon=eps, epsilon_high=eps_high, beta=beta
    )
    eh = eps if eps_high is None else eps_high
    loss, metrics = _trl_grpo(trl, policy, mask, adv, old, ref, beta, eps, eh)
    assert abs(loss.item() - losses.mean().item()) < TRL_TOL
    n = mask.sum(1).to(DT)
    if beta:
        assert abs(metrics["kl"] - ((kl * n).sum() / n.sum()).item()) < TRL_TOL  # TRL: token-weighted
    assert abs(metrics["clip_ratio/region_mean"] - ((clip * n).sum() / n.sum()).item()) < TRL_TOL
    assert 0 < clip.sum()
    for i in range(B):
        sl = slice(i, i + 1)
        loss_i, _ = _trl_grpo(trl, policy[sl], mask[sl], adv[sl], old[sl], ref[sl], beta, eps, eh)
        assert abs(loss_i.item() - losses[i].item()) < TRL_TOL, i


def test_group_advantages_match_trl_formula(trl):
    """TRL computes advantages inline (contiguous groups of ``num_generations``) with its
    Bessel-corrected ``nanstd`` and ``+ 1e-4``; reproduce that with TRL's own helper."""
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(17)
    G = 4
    rewards = torch.rand(3 * G, generator=g, dtype=DT)
    rewards[G : 2 * G] = 0.5  # a zero-std group
    grouped = rewards.view(-1, G)
    mean = grouped.mean(1).repeat_interleave(G)
    std = nanstd(grouped, dim=1).repeat_interleave(G)
    trl_adv = (rewards - mean) / (std + 1e-4)
    ours = group_advantages(rewards, torch.arange(3).repeat_interleave(G))
    torch.testing.assert_close(ours, trl_adv, atol=TRL_TOL, rtol=0)


def test_bradley_terry_matches_trl_reward_trainer(trl):
    scores = t(1.5, -0.2, 0.3, 0.9, 0.1, 0.7)  # rows 0..2 chosen, 3..5 rejected

    class ScoreModel:
        training = False

        def __call__(self, input_ids=None, **_):
            return SimpleNamespace(logits=scores[input_ids[:, 0]].unsqueeze(-1))

    model = ScoreModel()
    for margin in (None, t(0.5, 0.0, 1.0)):
        trainer = _bare(trl.RewardTrainer, model=model, args=SimpleNamespace(center_rewards_coefficient=None))
        ids = torch.arange(6).unsqueeze(1).repeat(1, 3)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if margin is not None:
            inputs["margin"] = margin
        loss = trainer.compute_loss(model, inputs)
        losses, acc = bradley_terry_loss(scores[:3], scores[3:], margin=margin)
        assert abs(loss.item() - losses.mean().item()) < TRL_TOL
        assert abs(trainer._metrics["eval"]["accuracy"][-1] - acc.mean().item()) < TRL_TOL
