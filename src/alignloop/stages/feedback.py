"""The feedback stage: scored samples -> pairwise or binary feedback (see shared/contracts.md).

The rules are HALOs' (ContextualAI/HALOs, train/label.py) without its bugs:

- Pairwise feedback groups samples by prompt_id and keeps a pair only when |reward_A - reward_B| > threshold,
  strictly (HALOs drops a pair only when the gap is *below* the threshold, so a gap equal to it slipped in).
  Modes: `max` / `min` take each prompt's pair of largest / smallest gap; `random` (HALOs') shuffles a prompt's
  samples and pairs neighbours, dropping a pair that does not clear the rules, so a prompt of samples 1, 1, 0, 0
  may yield no pair at all; `random_maximal` is ours: in the same shuffled order each sample not yet paired
  takes the first later one it clears the rules with, which keeps as many disjoint pairs as a greedy matching
  can (on the embedded default's rounds, 28-41 pairs of 48 prompts against random's 15-27, within 3% of the
  most possible), with no preference for large or small gaps.
- Binary feedback labels a sample desirable when reward >= threshold (HALOs used >, so a reward equal to the
  threshold was undesirable); the threshold may be the mean or median over all scored samples of the round.
- Samples the labeler could not score (reward null) take no part; they are never given a made-up score.
- Randomness (shuffles, A/B order) comes from one RNG per prompt, seeded from (seed, prompt_id), not from a
  global RNG as in HALOs. A prompt's pairs therefore do not depend on the other prompts or on the file order,
  so a resumed or re-sharded round produces the same feedback for the same prompt.

`reward_difference` is the absolute gap |reward_A - reward_B|, as HALOs' train/label.py writes it
(`'reward_difference': abs(sample_A['reward'] - sample_B['reward'])`). Which side won is already in `label`,
so a signed value would only repeat it, and files stay interchangeable with HALOs'.

Two optional rules keep length honest, since a reward can favour short answers (a cut answer misses its end
phrase; a short one breaks fewer rules) and the policy then learns to stop early rather than to comply:
- `truncation_penalty` is subtracted from the reward of a sample cut at the sampler's cap (finish_reason
  "length") before pairs or labels are chosen, as TRL's online trainers' `missing_eos_penalty` does; the
  records carry the penalised reward, the one their label was decided by.
- `length_ratio` keeps a pair only when the shorter answer has at least that fraction of the longer one's
  characters, so the pair teaches what differs besides length.
- `length_balance` takes the length signal out of the round's pairs as a whole: the better answer is the
  longer (in characters) in as many pairs as it is the shorter, however much the reward favours one length, so
  that a policy trained on the pairs' differences is not taught a length. Each prompt's pair is first chosen as
  usual; while one side outnumbers the other, a prompt of that side switches to its best pair of the other side
  (those losing the least gap first; for mode min, gaining the least), and when no prompt can switch, the
  side's pairs of least gap (min: of most gap) are dropped, until the sides differ by at most one pair. Pairs
  of equal lengths count for neither side. This is the one rule under which a prompt's pair depends on
  the other prompts of the round (which the feedback stage always sees whole).
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any

from ..records import binary_record, is_number, read_scored, write_records

PAIRWISE_MODES = ("random", "random_maximal", "max", "min")
BINARY_STATISTICS = ("mean", "median")
FEEDBACK_KINDS = ("pairwise", "binary")


# --------------------------------------------------------------------------------------------------------------
# Pairwise feedback
# --------------------------------------------------------------------------------------------------------------


def pairwise_feedback(scored: list[dict], mode: str = "max", threshold: float = 0.0, seed: int = 0,
                      length_ratio: float | None = None, truncation_penalty: float = 0.0,
                      length_balance: bool = False) -> list[dict]:
    """Pairwise feedback records from scored samples, at most one pair per prompt (max, min) or n//2 (random,
    random_maximal).

    Prompts come out in the order they first appear; within a prompt, samples are taken in sample_id order
    (file order for samples without one), which is what makes ties deterministic. `length_ratio`,
    `truncation_penalty` and `length_balance` (max and min only): see the module docstring.
    """
    _check_pairwise(mode, threshold, length_ratio, length_balance)
    threshold = _pairwise_threshold(threshold)

    groups = _group_by_prompt(penalise_truncated(scored, truncation_penalty))
    rngs = {prompt_id: random.Random(f"{seed}:{prompt_id}") for prompt_id in groups}
    chosen = {prompt_id: _choose_pairs(group, mode, threshold, rngs[prompt_id], length_ratio)
              for prompt_id, group in groups.items()}
    if length_balance:
        chosen = _balance_lengths(chosen, groups, mode, threshold, length_ratio)
    return [_pair_record(prompt_id, better, worse, rngs[prompt_id])
            for prompt_id, pairs in chosen.items() for better, worse in pairs]


def _balance_lengths(chosen: dict[str, list[tuple[dict, dict]]], groups: dict[str, list[dict]], mode: str,
                     threshold: float, length_ratio: float | None) -> dict[str, list[tuple[dict, dict]]]:
    """`length_balance` (module docstring) on one pair per prompt (max, min): as many pairs whose better answer
    is the longer as pairs whose better answer is the shorter."""
    chosen = dict(chosen)
    sign = 1 if mode == "max" else -1
    worth = lambda pair: sign * abs(pair[0]["reward"] - pair[1]["reward"])  # what the mode maximises  # noqa: E731

    def excess() -> int:
        """Pairs of the longer-is-better side less pairs of the other."""
        sides = [longer_is_better(*pairs[0]) for pairs in chosen.values() if pairs]
        return sum(side is True for side in sides) - sum(side is False for side in sides)

    if abs(excess()) <= 1:
        return chosen
    many = excess() > 0  # the side in excess: True, the longer answers win too often
    switches = []
    for pid, pairs in chosen.items():
        if pairs and longer_is_better(*pairs[0]) is many:
            other = _choose_pairs(groups[pid], mode, threshold, random.Random(0), length_ratio, side=not many)
            if other:  # (the RNG is only random mode's)
                switches.append((worth(pairs[0]) - worth(other[0]), pid, other))
    for _, pid, other in sorted(switches, key=lambda s: s[0]):  # stable: ties in prompt order
        if abs(excess()) <= 1:
            break
        chosen[pid] = other
    kept = [pid for pid, pairs in chosen.items() if pairs and longer_is_better(*pairs[0]) is many]
    for pid in sorted(kept, key=lambda pid: worth(chosen[pid][0]))[:max(0, abs(excess()) - 1)]:
        chosen[pid] = []
    return chosen


def penalise_truncated(scored: list[dict], penalty: float) -> list[dict]:
    """The samples with `penalty` taken off the reward of each one cut at the sampler's cap (copies; the
    input is untouched). An unscored sample stays unscored."""
    if not penalty:
        return scored
    cut = lambda s: s.get("finish_reason") == "length" and s.get("reward") is not None  # noqa: E731
    return [{**s, "reward": s["reward"] - penalty} if cut(s) else s for s in scored]


def similar_length(a: dict, b: dict, ratio: float | None) -> bool:
    """Whether the shorter output has at least `ratio` of the longer one's characters (None: always)."""
    if ratio is None:
        return True
    shorter, longer = sorted((len(a["output"]), len(b["output"])))
    return shorter >= ratio * longer


def _check_pairwise(mode: str, threshold: Any, length_ratio: float | None, length_balance: bool) -> None:
    """Pairwise settings checked before any input is read."""
    if mode not in PAIRWISE_MODES:
        raise ValueError(f"unknown pairwise mode {mode!r}; valid modes: {', '.join(PAIRWISE_MODES)}")
    _pairwise_threshold(threshold)
    if length_ratio is not None and not 0 < length_ratio <= 1:
        raise ValueError(f"length_ratio must be in (0, 1], got {length_ratio!r}")
    if length_balance and mode not in ("max", "min"):
        raise ValueError(f"length_balance takes mode max or min (one pair per prompt), not {mode}")


def longer_is_better(better: dict, worse: dict) -> bool | None:
    """Whether the better answer of a pair (samples) is the longer in characters (None: the same length)."""
    if len(better["output"]) == len(worse["output"]):
        return None
    return len(better["output"]) > len(worse["output"])


def chosen_longer(feedback: list[dict]) -> float | None:
    """The share of pairwise records whose better answer is the longer in characters (a tie counts half; None
    without pairs): 0.5 is no length signal, below it the pairs teach that shorter is better."""
    sides = []
    for f in feedback:
        if f.get("type") == "pairwise_feedback":
            a, b = {"output": f["output_A"]}, {"output": f["output_B"]}
            side = longer_is_better(a, b) if f["label"] == 1 else longer_is_better(b, a)
            sides.append(0.5 if side is None else float(side))
    return statistics.fmean(sides) if sides else None


def _pairwise_threshold(threshold: Any) -> float:
    """A pairwise threshold is a gap, so it must be a finite number >= 0 (a numeric string is accepted)."""
    value = _as_number(threshold)
    if value is None:
        raise ValueError(f"pairwise threshold must be a number >= 0, got {threshold!r}")
    if value < 0:
        raise ValueError(f"pairwise threshold must be >= 0, got {value}")
    return value


def _group_by_prompt(scored: list[dict]) -> dict[str, list[dict]]:
    """Scored (non-null reward) samples by prompt_id, prompts in first-appearance order, samples by sample_id."""
    groups: dict[str, list[tuple[int, dict]]] = {}
    for position, sample in enumerate(scored):
        if sample.get("reward") is None:
            continue
        groups.setdefault(sample["prompt_id"], []).append((position, sample))

    def order(item: tuple[int, dict]):
        position, sample = item
        sample_id = sample.get("sample_id")
        # Samples without an integer sample_id go after those with one, in file order.
        return (0, sample_id, position) if isinstance(sample_id, int) else (1, 0, position)

    return {pid: [s for _, s in sorted(items, key=order)] for pid, items in groups.items()}


def _choose_pairs(group: list[dict], mode: str, threshold: float, rng: random.Random,
                  length_ratio: float | None = None, side: bool | None = None) -> list[tuple[dict, dict]]:
    """The pairs of one prompt as (better, worse), each with a gap strictly above the threshold and lengths
    within `length_ratio`; with `side` (max and min) only pairs whose better answer is the longer (True) or the
    shorter (False).

    Because threshold >= 0, a kept pair never has equal rewards, so "better" is always well defined.
    """
    def ordered(a: dict, b: dict) -> tuple[dict, dict]:
        return (a, b) if a["reward"] > b["reward"] else (b, a)

    def clears(a: dict, b: dict) -> bool:
        if not (abs(a["reward"] - b["reward"]) > threshold and similar_length(a, b, length_ratio)):
            return False
        return side is None or longer_is_better(*ordered(a, b)) is side

    if len(group) < 2:
        return []

    if mode in ("random", "random_maximal"):
        shuffled = list(group)
        rng.shuffle(shuffled)
        if mode == "random":
            neighbours = [(shuffled[i], shuffled[i + 1]) for i in range(0, len(shuffled) - 1, 2)]
            return [ordered(a, b) for a, b in neighbours if clears(a, b)]
        pairs, paired = [], set()
        for i, a in enumerate(shuffled):
            if i in paired:
                continue
            j = next((j for j in range(i + 1, len(shuffled)) if j not in paired and clears(a, shuffled[j])), None)
            if j is not None:
                paired.update((i, j))
                pairs.append(ordered(a, shuffled[j]))
        return pairs

    # max / min: the largest / smallest gap among the pairs that clear the threshold (and the length rule).
    # Groups are a handful of samples, so all pairs are tried; ties go to the first pair in sample_id order (the
    # strict comparison keeps the earlier one). For max without a length rule that is the first best sample
    # against the first worst one.
    sign = 1 if mode == "max" else -1
    chosen = None
    for i, a in enumerate(group):
        for b in group[i + 1:]:
            gap = sign * abs(a["reward"] - b["reward"])
            if clears(a, b) and (chosen is None or gap > chosen[0]):
                chosen = (gap, a, b)
    return [ordered(chosen[1], chosen[2])] if chosen else []


def _pair_record(prompt_id: str, better: dict, worse: dict, rng: random.Random) -> dict:
    """One contract pairwise record; A/B order is a coin flip so the trainer never learns 'A always wins'."""
    if rng.random() < 0.5:
        a, b, label = better, worse, 1
    else:
        a, b, label = worse, better, 0
    record = {
        "type": "pairwise_feedback",
        "prompt_id": prompt_id,
        "prompt": a["prompt"],
        "output_A": a["output"],
        "output_B": b["output"],
        "label": label,
        "reward_A": a["reward"],
        "reward_B": b["reward"],
        "reward_difference": abs(a["reward"] - b["reward"]),
    }
    if "sample_id" in a and "sample_id" in b:
        record["sample_id_A"] = a["sample_id"]
        record["sample_id_B"] = b["sample_id"]
    if "round" in a:
        record["round"] = a["round"]
    return record


# --------------------------------------------------------------------------------------------------------------
# Binary feedback
# --------------------------------------------------------------------------------------------------------------


def binary_feedback(scored: list[dict], threshold: str | float = "mean", truncation_penalty: float = 0.0) -> list[dict]:
    """Binary feedback records: label = reward >= threshold, one record per scored sample, in input order.

    threshold is "mean", "median" (taken over ALL scored samples given, i.e. the whole round, not per prompt)
    or a number. The median of an even count is the mean of the two middle rewards (statistics.median).
    With no scored sample there is no statistic and no feedback: the result is empty. `truncation_penalty`:
    see the module docstring (the statistic is taken over the penalised rewards).
    """
    rated = [s for s in penalise_truncated(scored, truncation_penalty) if s.get("reward") is not None]
    if not rated:
        _binary_threshold(threshold, [])  # still reject a bad threshold
        return []
    cut = _binary_threshold(threshold, [s["reward"] for s in rated])
    return [binary_record(s, s["reward"] >= cut) for s in rated]


def _binary_threshold(threshold: Any, rewards: list[float]) -> float | None:
    """The numeric cut for binary labels; None when a statistic is asked of no rewards."""
    if threshold in BINARY_STATISTICS:
        if not rewards:
            return None
        return statistics.fmean(rewards) if threshold == "mean" else statistics.median(rewards)
    value = _as_number(threshold)
    if value is None:
        raise ValueError(f"binary threshold must be one of {', '.join(BINARY_STATISTICS)} or a number, got {threshold!r}")
    return value


def _as_number(value: Any) -> float | None:
    """A finite float from a number or a numeric string ("0.5"), else None."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not is_number(value):
        return None
    return float(value)


# --------------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------------


def build_feedback(scored: list[dict], kind: str, mode: str, threshold: str | float, seed: int,
                   length_ratio: float | None = None, truncation_penalty: float = 0.0,
                   length_balance: bool = False) -> list[dict]:
    """Feedback of `kind` from scored samples: the pairing or labelling the loop and the feedback verb share."""
    if kind == "pairwise":
        return pairwise_feedback(scored, mode, threshold, seed, length_ratio, truncation_penalty, length_balance)
    return binary_feedback(scored, threshold, truncation_penalty)


def feedback_stage(
    in_path: str | Path,
    out_path: str | Path,
    kind: str = "pairwise",
    mode: str = "max",
    threshold: str | float = 0.0,
    seed: int = 0,
    length_ratio: float | None = None,
    truncation_penalty: float = 0.0,
    length_balance: bool = False,
) -> dict:
    """Read scored samples, build feedback, write it atomically, and return counts for the manifest.

    kind "pairwise" uses mode/threshold/seed/length_ratio/length_balance; kind "binary" uses threshold ("mean", "median", a
    number or a numeric string); both take truncation_penalty. Arguments are checked before the input is read,
    and nothing is written unless the whole input is valid, so a failed run leaves no (partial) output file.
    Counts: scored (reward not null), unscored (reward null), prompts (distinct prompt_ids in the input), and
    pairs (pairwise) or desirable/undesirable (binary). Zero feedback is not an error here; the caller decides.
    """
    if kind not in FEEDBACK_KINDS:
        raise ValueError(f"unknown feedback kind {kind!r}; valid kinds: {', '.join(FEEDBACK_KINDS)}")
    if kind == "pairwise":
        _check_pairwise(mode, threshold, length_ratio, length_balance)
    else:
        _binary_threshold(threshold, [])

    scored = read_scored(in_path)
    counts = {
        "scored": sum(s["reward"] is not None for s in scored),
        "unscored": sum(s["reward"] is None for s in scored),
        "prompts": len({s["prompt_id"] for s in scored}),
    }
    feedback = build_feedback(scored, kind, mode, threshold, seed, length_ratio, truncation_penalty, length_balance)
    if kind == "pairwise":
        counts["pairs"] = len(feedback)
    else:
        counts["desirable"] = sum(r["label"] for r in feedback)
        counts["undesirable"] = sum(not r["label"] for r in feedback)
    write_records(out_path, feedback)
    return counts
