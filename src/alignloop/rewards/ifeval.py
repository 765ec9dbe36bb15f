"""Verifier reward: the fraction of a prompt's IFEval instructions that an output follows.

`ifeval_reward(prompt_record, output)` reads the record's `instruction_id_list` and aligned `kwargs`
(IFEval's format, as written by `alignloop.prompts.builtin`), builds each checker from
`if_verifiable.ifeval.instructions_registry.INSTRUCTION_DICT` and returns strict partial credit
(IFEval's "instruction-level strict accuracy" for one sample): passed / total, in [0, 1].

Semantics follow `if_verifiable.common.evaluate_instructions` in strict mode: a reasoning model's
"<think>...</think>" block is stripped first and an empty output scores 0.0. Unlike it, an unknown
instruction id, a kwargs list of the wrong length, an unexpected or missing checker argument is a
ValueError rather than silently skipped or filled in at random (IFEval's checkers draw a random value
for a missing argument). Only strict checks are run (no loose variants), so a call costs one
`check_following` per instruction.

The language checks inside `change_case:english_lowercase`/`english_capital` use langdetect, which is
random unless seeded; this module seeds `langdetect.DetectorFactory.seed = 0` (when nobody has set it)
so that the same output always gets the same reward.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ifeval_reward", "instructions_followed"]

_REGISTRY: dict[str, Any] | None = None
_STRIP_THINKING = None
# Checkers whose build_description takes arguments: the names it must be given. Filled lazily.
_REQUIRED_ARGS: dict[str, tuple[str, ...]] = {}
# Built checkers, keyed by (instruction id, frozen kwargs); a checker keeps no per-output state.
_CHECKER_CACHE: dict[tuple, Any] = {}
_CHECKER_CACHE_MAX = 65536


def _registry() -> dict[str, Any]:
    """IFEval's instruction registry (imported once; the import pulls in nltk and datasets)."""
    global _REGISTRY, _STRIP_THINKING
    if _REGISTRY is None:
        import langdetect
        from if_verifiable.common import strip_thinking
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

        if langdetect.DetectorFactory.seed is None:
            langdetect.DetectorFactory.seed = 0
        _STRIP_THINKING = strip_thinking
        _REGISTRY = INSTRUCTION_DICT
    return _REGISTRY


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _required_args(instruction_id: str, checker_class) -> tuple[str, ...]:
    names = _REQUIRED_ARGS.get(instruction_id)
    if names is None:
        import inspect

        params = inspect.signature(checker_class.build_description).parameters
        names = tuple(p for p in params if p not in ("self", "kwargs", "args"))
        _REQUIRED_ARGS[instruction_id] = names
    return names


def _checker(prompt_id: Any, instruction_id: str, kwargs: Any):
    registry = _REGISTRY if _REGISTRY is not None else _registry()
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise ValueError(
            f"prompt_id {prompt_id}: kwargs for instruction {instruction_id!r} must be an object, "
            f"got {type(kwargs).__name__}"
        )
    try:
        key = (instruction_id, _freeze(kwargs))
        cached = _CHECKER_CACHE.get(key)
    except TypeError:  # an unhashable value slipped through: just build it
        key, cached = None, None
    if cached is not None:
        return cached

    checker_class = registry.get(instruction_id)
    if checker_class is None:
        raise ValueError(
            f"prompt_id {prompt_id}: unknown IFEval instruction id {instruction_id!r} "
            f"(known: {', '.join(sorted(registry))})"
        )
    given = {k: v for k, v in kwargs.items() if v is not None}
    needed = _required_args(instruction_id, checker_class)
    unexpected = sorted(set(given) - set(needed))
    if unexpected:
        raise ValueError(
            f"prompt_id {prompt_id}: instruction {instruction_id!r} takes no argument(s) "
            f"{', '.join(unexpected)} (it takes: {', '.join(needed) or 'none'})"
        )
    missing = [k for k in needed if k not in given]
    if missing:
        raise ValueError(
            f"prompt_id {prompt_id}: instruction {instruction_id!r} is missing argument(s) "
            f"{', '.join(missing)} in kwargs"
        )
    checker = checker_class(instruction_id)
    try:
        checker.build_description(**given)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"prompt_id {prompt_id}: bad kwargs for instruction {instruction_id!r}: {e}"
        ) from e
    if key is not None:
        if len(_CHECKER_CACHE) >= _CHECKER_CACHE_MAX:
            _CHECKER_CACHE.clear()
        _CHECKER_CACHE[key] = checker
    return checker


def ifeval_reward(prompt_record: dict, output: str) -> float:
    """Fraction (0.0-1.0) of the record's IFEval instructions that `output` follows (strict).
    Raises ValueError for a record without `instruction_id_list`, an unknown instruction id, or
    kwargs that do not fit the instructions.
    """
    followed = instructions_followed(prompt_record, output)
    return sum(followed) / len(followed)


def instructions_followed(prompt_record: dict, output: str) -> list[bool]:
    """Whether `output` follows each of the record's IFEval instructions (strict), in the record's order:
    what IFEval's instruction-level and prompt-level accuracies count. Errors as `ifeval_reward`'s."""
    prompt_id = prompt_record.get("prompt_id", "?")
    ids = prompt_record.get("instruction_id_list")
    if ids is None:
        raise ValueError(
            f"prompt_id {prompt_id}: missing field 'instruction_id_list' (the ifeval reward needs "
            "IFEval instruction ids and their kwargs on each prompt record)"
        )
    if isinstance(ids, str) or not isinstance(ids, (list, tuple)) or not ids:
        raise ValueError(
            f"prompt_id {prompt_id}: field 'instruction_id_list' must be a non-empty list of "
            "IFEval instruction ids"
        )
    kwargs_list = prompt_record.get("kwargs")
    if kwargs_list is None:
        kwargs_list = [{}] * len(ids)
    elif not isinstance(kwargs_list, (list, tuple)) or len(kwargs_list) != len(ids):
        raise ValueError(
            f"prompt_id {prompt_id}: field 'kwargs' must be a list aligned with "
            f"'instruction_id_list' ({len(ids)} entries)"
        )
    # Build (and so validate) every checker before looking at the output.
    checkers = [_checker(prompt_id, iid, kw) for iid, kw in zip(ids, kwargs_list)]

    if not isinstance(output, str):
        raise ValueError(f"prompt_id {prompt_id}: output must be a string, got {type(output).__name__}")
    response = _STRIP_THINKING(output)
    if not response.strip():
        return [False] * len(checkers)
    return [bool(c.check_following(response)) for c in checkers]
