"""`alignloop replay RUN_DIR --round N [--stage S]`: recompute recorded stages of a run from their recorded
inputs, in a scratch folder, and say whether each output's hash matches the one in the manifest.

Each stage is replayed by the loop's own stage function (`alignloop.loop`), on a scratch run directory that
holds the run's config and copies of the stage's input files, with the recorded policy, reference, seeds and
prompt slice: so a replay computes exactly what the run computed, and a mismatch means the stage is not
reproducible here (another machine's numerics, a changed model folder, an API judge answering anew), not
that the replay did something else. The run directory itself is only read.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

from .config import load_saved_config
from .loop import Run, eval_stage, feedback_stage, label_stage, sample_stage, train_stage
from .models import weights_sha256
from .prompts.sources import load_prompts
from .rewards import make_labeler
from .sampling import Sampler

STAGES = ("sample", "label", "feedback", "train", "eval")
INPUTS = {"label": ["samples.jsonl"], "feedback": ["scored.jsonl"], "train": ["scored.jsonl", "feedback.jsonl"]}


class ReplayError(ValueError):
    """A stage that cannot be replayed (the message says which and why)."""


def replay(run_dir: str | Path, round_index: int | str, stages: list[str] | None = None,
           scratch: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Replay the named stages of one round (None: every recorded one; round "sft": the SFT model's held-out
    evaluation). Returns one dict per stage: {stage, recorded, replayed, match} (hashes; a training round's
    are its weights'), {stage, skipped: why} for a stage the run skipped, or {stage, gone: why} for one whose
    policy checkpoint was deleted (keep_checkpoints). Every stage's inputs are checked before any work: a stage
    asked for by name whose inputs are gone is an error, and so is a round none of whose stages can be replayed."""
    run_dir = Path(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    key = str(round_index)
    entries = manifest["rounds"].get(key)
    if entries is None:
        raise ReplayError(f"{run_dir}: no round {key} in the manifest (rounds: {', '.join(manifest['rounds'])})")
    wanted = stages or [s for s in STAGES if s in entries]
    for stage in wanted:
        if stage not in STAGES:
            raise ReplayError(f"--stage {stage}: not a stage (one of {', '.join(STAGES)})")
        if stage not in entries or entries[stage].get("status") != "done":
            raise ReplayError(f"{run_dir}: round {key} has no finished {stage} stage to replay")
    gone = {stage: why for stage in wanted if (why := _gone(stage, entries[stage], manifest))}
    if gone and (stages or len(gone) == len(wanted)):
        raise ReplayError(next(iter(gone.values())))
    config = load_saved_config(run_dir / "config.yaml")
    scratch = Path(scratch) if scratch else Path(tempfile.mkdtemp(prefix="alignloop-replay-"))
    sampler = None
    results = []
    try:
        for stage in wanted:
            entry = entries[stage]
            if "skipped" in entry:
                results.append({"stage": stage, "skipped": entry["skipped"]})
                continue
            if stage in gone:
                results.append({"stage": stage, "gone": gone[stage]})
                continue
            folder = scratch / f"{key}-{stage}"
            shutil.rmtree(folder, ignore_errors=True)
            run = _scratch_run(run_dir, folder, config, key, stage)
            if stage in ("sample", "eval") and sampler is None:
                sampler = Sampler(config.sampler, config.seed, config.trust_remote_code,
                                  lora_rank=config.policy_adapter.r if config.policy_adapter else None)
            replayed = _replay_stage(run, stage, key, entry, manifest, sampler, progress)
            recorded = entry.get("weights_sha256") if stage == "train" else entry.get("sha256")
            results.append({"stage": stage, "recorded": recorded, "replayed": replayed, "match": recorded == replayed,
                            "scratch": str(folder)})
    finally:
        if sampler is not None:
            sampler.close()
    return results


def _scratch_run(run_dir: Path, folder: Path, config, key: str, stage: str) -> Run:
    """A run directory in `folder` with the run's config, the stage's recorded inputs copied in, and a manifest
    that knows nothing of the stage; policies are named relative to the real run directory, as in its records."""
    folder.mkdir(parents=True)
    run = Run(config.model_copy(update={"run_dir": str(folder)}), echo=None, home=run_dir)
    run.manifest = {"format": 1, "rounds": {}}
    if key != "sft":
        run.round_dir(int(key)).mkdir(parents=True)
        for name in INPUTS.get(stage, []):
            if (run_dir / "rounds" / f"r{int(key):03d}" / name).exists():
                shutil.copy2(run_dir / "rounds" / f"r{int(key):03d}" / name, run.round_dir(int(key)) / name)
    if stage == "eval" and key != "sft":  # a round's evaluation is compared with the SFT model's answers
        (folder / "eval").mkdir()
        shutil.copy2(run_dir / "eval" / "sft_heldout.jsonl", folder / "eval" / "sft_heldout.jsonl")
    return run


def _gone(stage: str, entry: dict, manifest: dict) -> str | None:
    """Why a recorded stage cannot be replayed here (a policy, reference or checkpoint it read was deleted), or
    None."""
    if "skipped" in entry:
        return None
    needed = {"sample": [("policy", entry.get("policy"))], "eval": [("policy", entry.get("policy"))],
              "train": [("policy", entry.get("policy_in")), ("reference", entry.get("reference")),
                        ("checkpoint", entry.get("resumed_from"))]}.get(stage, [])
    if stage == "eval":
        needed.append(("reference", manifest.get("sft", {}).get("reference")))
    for what, path in needed:
        if path and not Path(path).exists():
            return (f"{what} {path} is gone (a round's checkpoint is deleted under keep_checkpoints; keep more to "
                    "replay older rounds)")
    return None


def _replay_stage(run: Run, stage: str, key: str, entry: dict, manifest: dict, sampler, progress: bool) -> str | None:
    """Recompute one stage in the scratch run; returns its output's hash."""
    config = run.config
    show = (lambda title: title) if progress else (lambda title: None)
    if stage == "sample":
        prompts = load_prompts(config.prompts)
        random.Random(config.seed).shuffle(prompts)
        start, end = entry["prompt_slice"]
        labeler = None  # a judge's prefetch only moves labeling earlier
        done = sample_stage(run, int(key), prompts[start:end], start, entry["policy"], entry["seed"],
                            sampler, show(f"replay sample r{int(key):03d}"), labeler)
        return done["sha256"]
    if stage == "label":
        labeler = make_labeler(config.labeler, run.dir)  # asked anew: a judge's cache is the scratch run's
        return label_stage(run, int(key), labeler, show(f"replay label r{int(key):03d}"))["sha256"]
    if stage == "feedback":
        return feedback_stage(run, int(key), entry["seed"])["sha256"]
    if stage == "train":
        done = train_stage(run, int(key), entry["policy_in"], entry["reference"],
                           Path(entry["resumed_from"]) if entry.get("resumed_from") else None, _NoSampler(), progress)
        return weights_sha256(str(run.round_dir(int(key)) / "checkpoint")) if "skipped" not in done else None
    # eval
    heldout = load_prompts(config.heldout)
    labeler = make_labeler(config.labeler, run.dir)
    eval_labelers = {name: (lc, make_labeler(lc, run.dir)) for name, lc in config.eval.labelers.items()}
    reference = manifest["sft"]["reference"]
    round_index = -1 if key == "sft" else int(key)
    done = eval_stage(run, key if key == "sft" else int(key), round_index, entry["policy"],
                      reference, heldout, labeler, eval_labelers, sampler, show(f"replay eval {key}"))
    return done["sha256"]


class _NoSampler:
    """The train stage puts the run's sampler to sleep while it trains; a replay of training has none."""

    def sleep(self) -> None:
        pass

