"""Reading and writing the record files that the stages exchange (see shared/contracts.md).

Every reader accepts JSON Lines, a HALOs-style JSON array, or (for prompts) Parquet, and every error names
the file, the line (or array index) and the field at fault. Every writer is atomic: the records go to a
temporary file beside the target, which is fsynced and renamed over it, so a crash never leaves a
half-written output behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable


class RecordError(ValueError):
    """Bad input: the message names the file, the line and the field."""


class StorageError(RuntimeError):
    """A file that cannot be written (a full disk, a file-size limit, a read-only directory); the message names
    it. Whatever was written before is intact, and the same command goes on once the cause is gone."""


def storage_error(path: str | Path, e: Exception) -> StorageError:
    """The one-line error for a write to `path` that failed with `e` (an OSError, or safetensors' own error,
    which wraps the OS's)."""
    return StorageError(f"{path}: cannot write: {getattr(e, 'strerror', None) or e}; free space or make it "
                        "writable, then run the same command again")


def where(path: str | Path, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def read_located(path: str | Path) -> list[tuple[dict, str, int | None]]:
    """All records of a JSONL file, a JSON array file, or a Parquet file, in file order, each with where it
    sits as (record, source, line) for `where(source, line)`: JSONL records carry their 1-based line, array
    and Parquet records a label "file: item i" / "file: row i"."""
    path = Path(path)
    if not path.exists():
        raise RecordError(f"{path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(r, f"{path}: row {i}", None) for i, r in enumerate(pq.read_table(path).to_pylist())]
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise RecordError(f"{path}: item {i}: expected a JSON object, got {type(record).__name__}")
        return [(r, f"{path}: item {i}", None) for i, r in enumerate(records)]
    located = []
    # split on "\n" alone: str.splitlines() also splits on U+2028, U+0085 and the like, which a model's output
    # can hold and which JSON writes unescaped (a vLLM sample with U+2028 once broke a round's samples file)
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise RecordError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        located.append((record, str(path), lineno))
    return located


def read_records(path: str | Path) -> list[dict]:
    """All records of a record file, in file order (see `read_located`)."""
    return [record for record, _, _ in read_located(path)]


def require(record: dict, field: str, kind: type | tuple[type, ...], path: str | Path, line: int | None) -> Any:
    """record[field], checked for presence and type, or a RecordError naming file, line and field."""
    if field not in record:
        raise RecordError(f"{where(path, line)}: missing field '{field}'")
    value = record[field]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        names = "/".join(t.__name__ for t in _as_tuple(kind))
        raise RecordError(f"{where(path, line)}: field '{field}' must be {names}, got {type(value).__name__}")
    return value


def _as_tuple(kind):
    return kind if isinstance(kind, tuple) else (kind,)


def normalize_prompt(prompt: Any, path: str | Path, line: int | None) -> list[dict]:
    """A prompt as a list of chat turns; a plain string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise RecordError(f"{where(path, line)}: field 'prompt' must be a string or a non-empty list of turns")
    for i, turn in enumerate(prompt):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise RecordError(f"{where(path, line)}: field 'prompt[{i}]' must be {{'role': str, 'content': str}}")
    return prompt


def output_text(output: Any, path: str | Path, line: int | None, field: str = "output") -> str:
    """An output as text; HALOs' list of assistant turns is joined."""
    if isinstance(output, str):
        return output
    if isinstance(output, list) and all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in output):
        return "".join(t["content"] for t in output)
    raise RecordError(f"{where(path, line)}: field '{field}' must be a string or a list of assistant turns")


def preferred_sides(pair: dict) -> tuple[str, str]:
    """("A", "B") when a pairwise feedback record prefers output_A (label 1), else ("B", "A"): the one reading
    of the contract's `label` for the trainer, the reward-model trainer and KTO's split of pairs."""
    return ("A", "B") if pair["label"] == 1 else ("B", "A")


def chosen_and_rejected(pair: dict) -> tuple[str, str]:
    """The preferred and the other output of a pairwise feedback record."""
    chosen, rejected = preferred_sides(pair)
    return pair[f"output_{chosen}"], pair[f"output_{rejected}"]


def binary_record(sample: dict, label: bool, prefix: str = "") -> dict:
    """One contract binary record from a sample (prefix "" ) or from one side of a pair (prefix "A"/"B")."""
    suffix = f"_{prefix}" if prefix else ""
    record = {
        "type": "binary_feedback",
        "prompt_id": sample["prompt_id"],
        "prompt": sample["prompt"],
        "output": sample[f"output{suffix}"],
        "label": bool(label),
        "reward": sample.get(f"reward{suffix}"),
    }
    if f"sample_id{suffix}" in sample:
        record["sample_id"] = sample[f"sample_id{suffix}"]
    if "round" in sample:
        record["round"] = sample["round"]
    return record


def pairs_to_binary(pairs: list[dict]) -> list[dict]:
    """Two binary records per pair, the preferred output desirable and the other undesirable (KTO on pairs).

    Records come out pair by pair, desirable first. An output that appears in several pairs appears several
    times, each with its own label; nothing is deduplicated.
    """
    records = []
    for pair in pairs:
        preferred, other = preferred_sides(pair)
        records.append(binary_record(pair, True, preferred))
        records.append(binary_record(pair, False, other))
    return records


def read_samples(path) -> list[dict]:
    """Sample records, each checked for the fields a labeler needs (errors name file, line and field)."""
    samples = []
    for s, source, line in read_located(path):
        require(s, "prompt_id", (str, int), source, line)
        normalize_prompt(require(s, "prompt", (str, list), source, line), source, line)
        require(s, "output", str, source, line)
        samples.append(s)
    return samples




def read_scored(path: str | Path) -> list[dict]:
    """Scored samples, validated, each error naming file:line and field.

    prompt_id becomes a string, prompt a list of turns; output must be a string; reward must be present and
    be a finite number or null (null = the labeler could not score it). Other fields are carried untouched.
    """
    samples = []
    for record, source, line in read_located(path):
        sample = dict(record)
        sample["prompt_id"] = _prompt_id(record, source, line, required=True)
        sample["prompt"] = normalize_prompt(require(record, "prompt", (str, list), source, line), source, line)
        require(record, "output", str, source, line)
        sample["reward"] = _reward(record, "reward", source, line, required=True)
        if "sample_id" in record:
            require(record, "sample_id", int, source, line)
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
    for record, source, line in read_located(path):
        kind = record.get("type")
        if kind is None:
            kind = _guess_type(record, source, line)
        if kind == "pairwise_feedback":
            feedback.append(_read_pair(record, source, line))
        elif kind == "binary_feedback":
            feedback.append(_read_binary(record, source, line))
        elif kind == "trl_preference":
            feedback.append(_read_trl(record, source, line))
        else:
            raise RecordError(f"{where(source, line)}: field 'type' must be pairwise_feedback or binary_feedback, got {kind!r}")
    return feedback


def _guess_type(record: dict, source: str, line: int | None) -> str:
    if "chosen" in record or "rejected" in record:
        return "trl_preference"
    if "output_A" in record or "output_B" in record:
        return "pairwise_feedback"
    if "output" in record:
        return "binary_feedback"
    raise RecordError(f"{where(source, line)}: missing field 'type' (and no output_A/output_B, output or chosen/rejected to tell the kind)")


def _read_pair(record: dict, source: str, line: int | None) -> dict:
    pair = dict(record)
    pair["type"] = "pairwise_feedback"
    pair["prompt_id"] = _prompt_id(record, source, line)
    pair["prompt"] = normalize_prompt(require(record, "prompt", (str, list), source, line), source, line)
    for field in ("output_A", "output_B"):
        require(record, field, (str, list), source, line)
        pair[field] = output_text(record[field], source, line, field)
    value = require(record, "label", (int, bool), source, line)
    if value not in (0, 1):
        raise RecordError(f"{where(source, line)}: field 'label' must be 0 or 1, got {value!r}")
    pair["label"] = int(value)
    for field in ("reward_A", "reward_B", "reward_difference"):
        pair[field] = _reward(record, field, source, line, required=False)
    return pair


def _read_binary(record: dict, source: str, line: int | None) -> dict:
    item = dict(record)
    item["type"] = "binary_feedback"
    item["prompt_id"] = _prompt_id(record, source, line)
    item["prompt"] = normalize_prompt(require(record, "prompt", (str, list), source, line), source, line)
    require(record, "output", (str, list), source, line)
    item["output"] = output_text(record["output"], source, line)
    value = require(record, "label", (bool, int), source, line)
    if value not in (0, 1):
        raise RecordError(f"{where(source, line)}: field 'label' must be true/false (or 0/1), got {value!r}")
    item["label"] = bool(value)
    item["reward"] = _reward(record, "reward", source, line, required=False)
    return item


def _read_trl(record: dict, source: str, line: int | None) -> dict:
    pair = {k: v for k, v in record.items() if k not in ("chosen", "rejected")}
    pair["type"] = "pairwise_feedback"
    pair["prompt"] = normalize_prompt(require(record, "prompt", (str, list), source, line), source, line)
    pair["prompt_id"] = _prompt_id(record, source, line)
    for field, target in (("chosen", "output_A"), ("rejected", "output_B")):
        require(record, field, (str, list), source, line)
        pair[target] = output_text(record[field], source, line, field)
    pair["label"] = 1
    for field in ("reward_A", "reward_B", "reward_difference"):
        pair[field] = None
    return pair


def _prompt_id(record: dict, source: str, line: int | None, required: bool = False) -> str:
    """prompt_id as a string (ints accepted); if not required, prompt_key or a hash of the prompt stands in."""
    if required or "prompt_id" in record:
        return str(require(record, "prompt_id", (str, int), source, line))
    if "prompt_key" in record:
        return str(require(record, "prompt_key", (str, int), source, line))
    prompt = normalize_prompt(require(record, "prompt", (str, list), source, line), source, line)
    digest = hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
    return f"h{digest[:16]}"


def _reward(record: dict, field: str, source: str, line: int | None, required: bool) -> float | None:
    """A reward: a finite number or null. NaN/inf (which Python's json accepts) and strings are errors."""
    if field not in record:
        if required:
            raise RecordError(f"{where(source, line)}: missing field '{field}'")
        return None
    value = record[field]
    if value is None or is_number(value):
        return value
    shown = repr(value) if isinstance(value, (float, str)) else type(value).__name__
    raise RecordError(f"{where(source, line)}: field '{field}' must be a finite number or null, got {shown}")


def read_prompts(path: str | Path) -> list[dict]:
    """Prompt records with a normalised 'prompt' and a 'prompt_id' (made from the position if absent)."""
    prompts = []
    for i, (record, source, line) in enumerate(read_located(path)):
        if "prompt" not in record:
            raise RecordError(f"{where(source, line)}: missing field 'prompt'")
        record = dict(record)
        record["prompt"] = normalize_prompt(record["prompt"], source, line)
        record["prompt_id"] = str(record.get("prompt_id", f"p{i:06d}"))
        prompts.append(record)
    return prompts


def _json_default(value):
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(record: dict) -> str:
    """One record as one JSON line. NaN/inf are refused: they are not JSON and hide bugs."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False, default=_json_default)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise storage_error(path, e) from e
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a record file is as readable as any other
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise storage_error(path, e) from e
        raise


def append_line(path: str | Path, line: str) -> None:
    """One line at the end of a log file (metrics.jsonl). A write the disk cut short leaves a torn last line,
    which the next append (a rerun's) cuts off first, so the file stays one JSON object per line."""
    path = Path(path)
    try:
        with open(path, "a+b") as f:
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(max(0, end - (1 << 16)))
                tail = f.read()
                if not tail.endswith(b"\n"):
                    keep = tail.rfind(b"\n") + 1
                    f.truncate(end - len(tail) + keep if keep or end <= len(tail) else end)
            f.write(line.encode("utf-8") + b"\n")
    except OSError as e:
        raise storage_error(path, e) from e


def write_records(path: str | Path, records: Iterable[dict]) -> int:
    """Write records as JSONL atomically; returns how many were written."""
    lines = [dumps(r) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False, default=_json_default) + "\n")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
