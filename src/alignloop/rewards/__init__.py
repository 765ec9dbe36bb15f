"""Labelers: whatever turns (prompt record, output) into a reward.

A labeler is any object with `name` and `score(items) -> list[Score]`, taking a whole batch so that reward
models can batch on their side and API judges can fan out asynchronously inside `score`. A labeler may fail
for one item: it returns `Score(reward=None, error="...")` for it and the sample is left out of feedback,
never given a made-up number.

The simplest labeler wraps a plain Python function `module:function(prompt_record, output) -> float`
(`CallableLabeler`); the embedded default's verifier `alignloop.rewards.ifeval:ifeval_reward` is one. An LLM
judge behind an OpenAI-compatible API is `alignloop.rewards.judge.JudgeLabeler`; a trained
sequence-classification reward model is `alignloop.rewards.reward_model.RewardModelLabeler`.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol


@dataclass
class Score:
    reward: float | None
    error: str | None = None
    rewards: dict[str, float] | None = None  # per-objective rewards, for multi-objective labelers
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"judge": {...}} merged into the record


class Labeler(Protocol):
    """What the label stage calls: `score` a batch; `stats` counts the labeler's work since `reset_stats()`
    (a judge's requests, tokens and cost; empty for labelers with nothing to count), recorded per stage."""

    name: str
    stats: dict[str, float]

    def score(self, items: list[tuple[dict, str]]) -> list[Score]: ...

    def reset_stats(self) -> None: ...


def load_function(spec: str) -> Callable:
    """`package.module:function` -> the function, or a ValueError that says what is missing."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function '{spec}': expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward function '{spec}': cannot import module '{module_name}' ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function '{spec}': module '{module_name}' has no function '{attr}'")
    return fn


class CallableLabeler:
    """Scores with a Python function of (prompt record, output). An exception or a non-finite or
    non-numeric return fails that one sample, with the reason kept."""

    def __init__(self, spec: str):
        self.name = spec
        self.fn = load_function(spec)
        self.stats: dict[str, float] = {}

    def reset_stats(self) -> None:
        pass  # nothing to count

    def score(self, items: list[tuple[dict, str]]) -> list[Score]:
        scores = []
        for record, output in items:
            try:
                value = self.fn(record, output)
            except Exception as e:  # one bad sample must not sink the round
                scores.append(Score(None, f"{type(e).__name__}: {e}"))
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                scores.append(Score(None, f"reward function returned {value!r}, not a finite number"))
            else:
                scores.append(Score(float(value)))
        return scores


def make_labeler(config, run_dir=None) -> Labeler:
    """The labeler a labeler config section (`alignloop.config.LabelerConfig`) names. A judge keeps its answers in `run_dir/judge_cache.jsonl` (when a
    run directory is given) so that a resumed or repeated run does not pay for them twice."""
    if config.kind == "callable":
        return CallableLabeler(config.function)
    if config.kind == "judge":
        from pathlib import Path

        from .judge import JudgeLabeler

        return JudgeLabeler(config, cache_path=Path(run_dir) / "judge_cache.jsonl" if run_dir else None)
    if config.kind == "reward_model":
        from .reward_model import RewardModelLabeler

        return RewardModelLabeler.from_config(config)
    raise ValueError(f"labeler.kind '{config.kind}' is not available")
