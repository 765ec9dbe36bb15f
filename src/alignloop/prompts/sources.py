"""Prompt sources: the built-in set, a file, or a Hugging Face dataset (`datasets.load_dataset`)."""

from __future__ import annotations

from ..records import RecordError, normalize_prompt, read_prompts
from .builtin import builtin_prompts


def load_prompts(source) -> list[dict]:
    """Prompt records ({prompt_id, prompt: [turns], ...extra fields}) from a `PromptSource` config."""
    if source.source == "builtin":
        prompts = builtin_prompts(source.split)
    elif source.source == "file":
        prompts = read_prompts(source.path)
    else:
        prompts = _from_hf(source)
    ids = [p["prompt_id"] for p in prompts]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise RecordError(f"{source.path or source.source}: prompt_id '{dup}' appears more than once")
    return prompts[: source.limit] if source.limit else prompts


def _from_hf(source) -> list[dict]:
    import datasets

    try:
        rows = datasets.load_dataset(source.path, split=source.split)
    except Exception as e:  # datasets raises many types; the user needs the name and the reason
        raise RecordError(f"dataset {source.path} (split {source.split}): cannot load ({str(e).splitlines()[0]})") from None
    if source.column not in rows.column_names:
        raise RecordError(f"dataset {source.path}: no column '{source.column}' (columns: {', '.join(rows.column_names)})")
    prompts = []
    for i, row in enumerate(rows):
        where = f"{source.path}[{source.split}] row {i}"
        record = {k: v for k, v in row.items() if k != source.column}
        record["prompt"] = normalize_prompt(row[source.column], where, None)
        record["prompt_id"] = str(row[source.id_column]) if source.id_column else f"{source.split}-{i:06d}"
        prompts.append(record)
    return prompts
