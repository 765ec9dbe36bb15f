"""Stage 2, label: a reward for every sample, from any labeler (see `alignloop.rewards`).

A sample the labeler could not score keeps `reward: null` and a `label_error`; it is counted, and the
feedback stage leaves it out.
"""

from __future__ import annotations

from tqdm import tqdm

from ..records import RecordError, normalize_prompt, read_located, require


def read_samples(path) -> list[dict]:
    """Sample records, each checked for the fields a labeler needs (errors name file, line and field)."""
    samples = []
    for s, label, line in read_located(path):
        require(s, "prompt_id", (str, int), label, line)
        normalize_prompt(require(s, "prompt", (str, list), label, line), label, line)
        require(s, "output", str, label, line)
        samples.append(s)
    return samples


# A labeler's `score` sees one chunk at a time: a reward model sorts a chunk by length and an API judge fans it
# out, so a chunk is many forward batches; few enough that the progress bar still moves.
BATCHES_PER_CHUNK = 16


def label_records(samples: list[dict], labeler, batch_size: int = 64 * BATCHES_PER_CHUNK,
                  progress: str | None = "label") -> tuple[list[dict], dict]:
    """Scored sample records (in input order) and counts {scored, failed}; `batch_size` samples per
    `labeler.score` call."""
    scored = []
    bar = tqdm(total=len(samples), desc=progress or "label", unit="sample", disable=not progress)
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        scores = labeler.score([(s, s["output"]) for s in batch])
        if len(scores) != len(batch):
            raise RecordError(f"labeler {labeler.name} returned {len(scores)} scores for {len(batch)} samples")
        for sample, score in zip(batch, scores):
            record = {**sample, "reward": score.reward}
            if score.rewards is not None:
                record["rewards"] = score.rewards
            record.update(score.extra)
            if score.reward is None:
                record["label_error"] = score.error or "no reward"
            else:
                record.pop("label_error", None)
            scored.append(record)
        bar.update(len(batch))
    bar.close()
    failed = sum(r["reward"] is None for r in scored)
    return scored, {"scored": len(scored) - failed, "failed": failed}
