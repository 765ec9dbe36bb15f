"""Stage 2, label: a reward for every sample, from any labeler (see `alignloop.rewards`).

A sample the labeler could not score keeps `reward: null` and a `label_error`; it is counted, and the
feedback stage leaves it out.
"""

from __future__ import annotations

from tqdm import tqdm

from ..records import RecordError

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


def label_in_processes(samples: list[dict], labeler, state, chunk_size: int, progress: str | None = None) -> tuple[list[dict], dict]:
    """Scored records (input order) and counts, labeled by all processes of `state` (an accelerate
    PartialState): process k scores samples k, k+N, k+2N, ... (a strided shard, so long and short samples
    spread evenly), `chunk_size` samples per `labeler.score` call, then every process gathers all (index,
    record) pairs and merges them by index. With one process this is plain `label_records`."""
    from accelerate.utils import gather_object

    mine = list(range(state.process_index, len(samples), state.num_processes))
    scored, _ = label_records([samples[i] for i in mine], labeler, chunk_size,
                              progress if state.is_main_process else None)
    gathered = gather_object(list(zip(mine, scored)))
    merged = [record for _, record in sorted(gathered, key=lambda pair: pair[0])]
    if len(merged) != len(samples):
        raise RuntimeError(f"gathered {len(merged)} scored samples from {state.num_processes} processes, expected {len(samples)}")
    return merged, label_counts(merged)
