"""The feedback stage: scored samples -> pairwise or binary feedback (see shared/contracts.md).

The rules are HALOs' (ContextualAI/HALOs, train/label.py) without its bugs:

- Pairwise feedback groups samples by prompt_id and keeps a pair only when |reward_A - reward_B| > threshold,
  strictly (HALOs drops a pair only when the gap is *below* the threshold, so a gap equal to it slipped in).
- Binary feedback labels a sample desirable when reward >= threshold (HALOs used >, so a reward equal to the
  threshold was undesirable); the threshold may be the mean or median over all scored samples of the round.
- Samples the labeler could not score (reward null) take no part; they are never given a made-up score.
- Randomness (shuffles, A/B order) comes from one RNG per prompt, seeded from (seed, prompt_id), not from a
  global RNG as in HALOs. A prompt's pairs therefore do not depend on the other prompts or on the file order,
  so a resumed or re-sharded round produces the same feedback for the same prompt.

`reward_difference` is the absolute gap |reward_A - reward_B|, as HALOs' train/label.py writes it
(`'reward_difference': abs(sample_A['reward'] - sample_B['reward'])`). Which side won is already in `label`,
so a signed value would only repeat it, and files stay interchangeable with HALOs'.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
from pathlib import Path
from typing import Any

from ..records import (
    RecordError,
    binary_record,
    is_number,
    normalize_prompt,
    output_text,
    read_located,
    require,
    where,
    write_records,
)

PAIRWISE_MODES = ("random", "max", "min")
BINARY_STATISTICS = ("mean", "median")
FEEDBACK_KINDS = ("pairwise", "binary")


# --------------------------------------------------------------------------------------------------------------
# Pairwise feedback
# --------------------------------------------------------------------------------------------------------------


def pairwise_feedback(scored: list[dict], mode: str = "max", threshold: float = 0.0, seed: int = 0) -> list[dict]:
    """Pairwise feedback records from scored samples, at most one pair per prompt (max, min) or n//2 (random).

    Prompts come out in the order they first appear; within a prompt, samples are taken in sample_id order
    (file order for samples without one), which is what makes ties deterministic.
    """
    if mode not in PAIRWISE_MODES:
        raise ValueError(f"unknown pairwise mode {mode!r}; valid modes: {', '.join(PAIRWISE_MODES)}")
    threshold = _pairwise_threshold(threshold)

    feedback = []
    for prompt_id, group in _group_by_prompt(scored).items():
        rng = random.Random(f"{seed}:{prompt_id}")
        for better, worse in _choose_pairs(group, mode, threshold, rng):
            feedback.append(_pair_record(prompt_id, better, worse, rng))
    return feedback


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


def _choose_pairs(group: list[dict], mode: str, threshold: float, rng: random.Random) -> list[tuple[dict, dict]]:
    """The pairs of one prompt as (better, worse), each with a gap strictly above the threshold.

    Because threshold >= 0, a kept pair never has equal rewards, so "better" is always well defined.
    """
    def clears(a: dict, b: dict) -> bool:
        return abs(a["reward"] - b["reward"]) > threshold

    def ordered(a: dict, b: dict) -> tuple[dict, dict]:
        return (a, b) if a["reward"] > b["reward"] else (b, a)

    if len(group) < 2:
        return []

    if mode == "random":
        shuffled = list(group)
        rng.shuffle(shuffled)
        neighbours = [(shuffled[i], shuffled[i + 1]) for i in range(0, len(shuffled) - 1, 2)]
        return [ordered(a, b) for a, b in neighbours if clears(a, b)]

    if mode == "max":
        # max()/min() return the first of tied items, i.e. the lowest sample_id.
        best = max(group, key=lambda s: s["reward"])
        worst = min(group, key=lambda s: s["reward"])
        return [(best, worst)] if clears(best, worst) else []

    # mode == "min": the smallest gap that still clears the threshold. Groups are a handful of samples, so all
    # pairs are tried; ties go to the first pair in sample_id order (strict < keeps the earlier one).
    chosen = None
    for i, a in enumerate(group):
        for b in group[i + 1:]:
            if clears(a, b) and (chosen is None or abs(a["reward"] - b["reward"]) < chosen[0]):
                chosen = (abs(a["reward"] - b["reward"]), a, b)
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


def binary_feedback(scored: list[dict], threshold: str | float = "mean") -> list[dict]:
    """Binary feedback records: label = reward >= threshold, one record per scored sample, in input order.

    threshold is "mean", "median" (taken over ALL scored samples given, i.e. the whole round, not per prompt)
    or a number. The median of an even count is the mean of the two middle rewards (statistics.median).
    With no scored sample there is no statistic and no feedback: the result is empty.
    """
    rated = [s for s in scored if s.get("reward") is not None]
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


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def read_scored(path: str | Path) -> list[dict]:
    """Scored samples, validated, each error naming file:line and field.

    prompt_id becomes a string, prompt a list of turns; output must be a string; reward must be present and
    be a finite number or null (null = the labeler could not score it). Other fields are carried untouched.
    """
    samples = []
    for record, label, line in read_located(path):
        sample = dict(record)
        sample["prompt_id"] = _prompt_id(record, label, line, required=True)
        sample["prompt"] = normalize_prompt(require(record, "prompt", (str, list), label, line), label, line)
        require(record, "output", str, label, line)
        sample["reward"] = _reward(record, "reward", label, line, required=True)
        if "sample_id" in record:
            require(record, "sample_id", int, label, line)
        samples.append(sample)
    return samples


def read_feedback(path: str | Path) -> list[dict]:
    """Pairwise and/or binary feedback in the contract format, validated and normalised for the trainer.

    Accepted on input, besides the contract records:
    - HALOs JSON arrays: outputs as lists of assistant turns (joined to text), labels as 0/1, "prompt_key"
      in place of "prompt_id";
    - TRL preference records {"prompt", "chosen", "rejected"}: read as a pair with A = chosen, label 1, and
      null rewards (TRL records carry none).
    A record without prompt_id gets one derived from a hash of its prompt, so identical prompts share it.
    Output fields become strings, pairwise labels 0/1, binary labels booleans.
    """
    feedback = []
    for record, label, line in read_located(path):
        kind = record.get("type")
        if kind is None:
            kind = _guess_type(record, label, line)
        if kind == "pairwise_feedback":
            feedback.append(_read_pair(record, label, line))
        elif kind == "binary_feedback":
            feedback.append(_read_binary(record, label, line))
        elif kind == "trl_preference":
            feedback.append(_read_trl(record, label, line))
        else:
            raise RecordError(f"{where(label, line)}: field 'type' must be pairwise_feedback or binary_feedback, got {kind!r}")
    return feedback


def _guess_type(record: dict, label: str, line: int | None) -> str:
    if "chosen" in record or "rejected" in record:
        return "trl_preference"
    if "output_A" in record or "output_B" in record:
        return "pairwise_feedback"
    if "output" in record:
        return "binary_feedback"
    raise RecordError(f"{where(label, line)}: missing field 'type' (and no output_A/output_B, output or chosen/rejected to tell the kind)")


def _read_pair(record: dict, label: str, line: int | None) -> dict:
    pair = dict(record)
    pair["type"] = "pairwise_feedback"
    pair["prompt_id"] = _prompt_id(record, label, line)
    pair["prompt"] = normalize_prompt(require(record, "prompt", (str, list), label, line), label, line)
    for field in ("output_A", "output_B"):
        require(record, field, (str, list), label, line)
        pair[field] = output_text(record[field], label, line, field)
    value = require(record, "label", (int, bool), label, line)
    if value not in (0, 1):
        raise RecordError(f"{where(label, line)}: field 'label' must be 0 or 1, got {value!r}")
    pair["label"] = int(value)
    for field in ("reward_A", "reward_B", "reward_difference"):
        pair[field] = _reward(record, field, label, line, required=False)
    return pair


def _read_binary(record: dict, label: str, line: int | None) -> dict:
    item = dict(record)
    item["type"] = "binary_feedback"
    item["prompt_id"] = _prompt_id(record, label, line)
    item["prompt"] = normalize_prompt(require(record, "prompt", (str, list), label, line), label, line)
    require(record, "output", (str, list), label, line)
    item["output"] = output_text(record["output"], label, line)
    value = require(record, "label", (bool, int), label, line)
    if value not in (0, 1):
        raise RecordError(f"{where(label, line)}: field 'label' must be true/false (or 0/1), got {value!r}")
    item["label"] = bool(value)
    item["reward"] = _reward(record, "reward", label, line, required=False)
    return item


def _read_trl(record: dict, label: str, line: int | None) -> dict:
    pair = {k: v for k, v in record.items() if k not in ("chosen", "rejected")}
    pair["type"] = "pairwise_feedback"
    pair["prompt"] = normalize_prompt(require(record, "prompt", (str, list), label, line), label, line)
    pair["prompt_id"] = _prompt_id(record, label, line)
    for field, target in (("chosen", "output_A"), ("rejected", "output_B")):
        require(record, field, (str, list), label, line)
        pair[target] = output_text(record[field], label, line, field)
    pair["label"] = 1
    for field in ("reward_A", "reward_B", "reward_difference"):
        pair[field] = None
    return pair


def _prompt_id(record: dict, label: str, line: int | None, required: bool = False) -> str:
    """prompt_id as a string (ints accepted); if not required, prompt_key or a hash of the prompt stands in."""
    if required or "prompt_id" in record:
        return str(require(record, "prompt_id", (str, int), label, line))
    if "prompt_key" in record:
        return str(require(record, "prompt_key", (str, int), label, line))
    prompt = normalize_prompt(require(record, "prompt", (str, list), label, line), label, line)
    digest = hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
    return f"h{digest[:16]}"


def _reward(record: dict, field: str, label: str, line: int | None, required: bool) -> float | None:
    """A reward: a finite number or null. NaN/inf (which Python's json accepts) and strings are errors."""
    if field not in record:
        if required:
            raise RecordError(f"{where(label, line)}: missing field '{field}'")
        return None
    value = record[field]
    if value is None or is_number(value):
        return value
    shown = repr(value) if isinstance(value, (float, str)) else type(value).__name__
    raise RecordError(f"{where(label, line)}: field '{field}' must be a finite number or null, got {shown}")


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


def feedback_stage(
    in_path: str | Path,
    out_path: str | Path,
    kind: str = "pairwise",
    mode: str = "max",
    threshold: str | float = 0.0,
    seed: int = 0,
) -> dict:
    """Read scored samples, build feedback, write it atomically, and return counts for the manifest.

    kind "pairwise" uses mode/threshold/seed; kind "binary" uses threshold ("mean", "median", a number or a
    numeric string). Arguments are checked before the input is read, and nothing is written unless the whole
    input is valid, so a failed run leaves no (partial) output file behind.
    Counts: scored (reward not null), unscored (reward null), prompts (distinct prompt_ids in the input), and
    pairs (pairwise) or desirable/undesirable (binary). Zero feedback is not an error here; the caller decides.
    """
    if kind not in FEEDBACK_KINDS:
        raise ValueError(f"unknown feedback kind {kind!r}; valid kinds: {', '.join(FEEDBACK_KINDS)}")
    if kind == "pairwise":
        if mode not in PAIRWISE_MODES:
            raise ValueError(f"unknown pairwise mode {mode!r}; valid modes: {', '.join(PAIRWISE_MODES)}")
        threshold = _pairwise_threshold(threshold)
    else:
        _binary_threshold(threshold, [])

    scored = read_scored(in_path)
    counts = {
        "scored": sum(s["reward"] is not None for s in scored),
        "unscored": sum(s["reward"] is None for s in scored),
        "prompts": len({s["prompt_id"] for s in scored}),
    }
    if kind == "pairwise":
        feedback = pairwise_feedback(scored, mode=mode, threshold=threshold, seed=seed)
        counts["pairs"] = len(feedback)
    else:
        feedback = binary_feedback(scored, threshold=threshold)
        counts["desirable"] = sum(r["label"] for r in feedback)
        counts["undesirable"] = sum(not r["label"] for r in feedback)
    write_records(out_path, feedback)
    return counts
