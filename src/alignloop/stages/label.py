"""Stage 2, label: a reward for every sample, from any labeler (see `alignloop.rewards`).

A sample the labeler could not score keeps `reward: null` and a `label_error`; it is counted, and the
feedback stage leaves it out.
"""

from __future__ import annotations

from tqdm import tqdm

from .. import distributed
from ..records import RecordError, normalize_prompt

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
    return scored, label_counts(scored)


def label_counts(scored: list[dict]) -> dict:
    """{scored, failed}: how many samples got a reward, and how many could not be scored."""
    failed = sum(r["reward"] is None for r in scored)
    return {"scored": len(scored) - failed, "failed": failed}


def label_in_processes(samples: list[dict], labeler, batch_size: int, progress: str | None = None) -> tuple[list[dict], dict]:
    """Scored records (input order) and counts, on every process, with the labeler's forward passes shared among
    the processes (`alignloop.distributed`; with one process it scores them all).

    The samples are put in batches of `batch_size`, longest text first (so padding stays small), and process k
    scores batches k, k+N, k+2N, ... Each batch is the same whatever the number of processes, so a reward does
    not depend on how many there are."""
    def length(i: int) -> int:
        return len(samples[i]["output"]) + sum(len(turn["content"]) for turn in normalize_prompt(samples[i]["prompt"], "", None))

    order = sorted(range(len(samples)), key=lambda i: -length(i))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    mine = distributed.my_share(len(batches))
    bar = tqdm(total=sum(len(batches[b]) for b in mine), desc=progress or "label", unit="sample",
               disable=not progress or not distributed.is_main())
    done = []
    for b in mine:
        scored, _ = label_records([samples[i] for i in batches[b]], labeler, batch_size, progress=None)
        done.append(scored)
        bar.update(len(scored))
    bar.close()
    merged: list[dict] = [{}] * len(samples)
    for batch, scored in zip(batches, distributed.gather_shares(len(batches), done)):
        for i, record in zip(batch, scored):
            merged[i] = record
    return merged, label_counts(merged)
