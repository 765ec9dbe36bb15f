"""The orchestrator: rounds of sample -> label -> feedback -> train -> held-out eval, as a resumable state
machine over the run directory (layout in shared/contracts.md).

Every stage runs through one skeleton, `Run.once`: a stage whose output is complete and matches the manifest
is skipped; otherwise it is computed from its inputs, written atomically, and marked done in `manifest.json`
with the output's hash. So a run killed at any moment and started again, redoing anything unfinished with
the same seeds, ends with the same records as one that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from pathlib import Path
from typing import Callable

from .checkpoint import is_checkpoint
from .config import Config, ConfigError, dump_config, load_saved_config
from .faults import crash_point
from .models import resolve_model_path, weights_sha256
from .prompts.sources import load_prompts
from .records import atomic_write_text, dumps, file_sha256, read_records, write_json, write_records
from .rewards import make_labeler
from .sampling import Sampler
from .sampling.placement import trainer_on
from .stages.evaluate import evaluate_policy, mean_reward, paired_difference
from .stages.feedback import binary_feedback, pairwise_feedback
from .stages.label import BATCHES_PER_CHUNK, label_records
from .stages.sample import sample_records
from .stages.train import has_training_signal, read_training_records, train_round, training_input
from .table import round_metrics


class Run:
    """A run directory: its config, manifest and metrics log, and the skeleton every stage runs through."""

    def __init__(self, config: Config):
        self.config = config
        self.dir = Path(config.run_dir)
        self.manifest_path = self.dir / "manifest.json"

    def open(self) -> None:
        """Start or resume. A resumed run must have the same configuration, compared as parsed configs: a key
        added in a later release, at its default, is not a change."""
        self.dir.mkdir(parents=True, exist_ok=True)
        saved = self.dir / "config.yaml"
        if saved.exists() and load_saved_config(saved) != self.config:
            raise ConfigError(
                f"{saved}: this run directory holds a run with a different configuration; "
                "resume it with the same config or choose another run_dir"
            )
        atomic_write_text(saved, dump_config(self.config))
        if self.manifest_path.exists():
            self.manifest = json.loads(self.manifest_path.read_text())
        else:
            self.manifest = {"format": 1, "rounds": {}}

    def save(self) -> None:
        write_json(self.manifest_path, self.manifest)

    def log(self, event: dict) -> None:
        with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(dumps({"time": time.time(), **event}) + "\n")

    def policy_id(self, policy: str) -> str:
        """A policy's name in records: relative to the run directory for its own checkpoints, so that
        records do not depend on where the run directory lives."""
        path = Path(policy).resolve()
        return str(path.relative_to(self.dir.resolve())) if path.is_relative_to(self.dir.resolve()) else policy

    def round_dir(self, r: int) -> Path:
        return self.dir / "rounds" / f"r{r:03d}"

    def stage(self, r: int | str, name: str) -> dict | None:
        return self.manifest["rounds"].get(str(r), {}).get(name)

    def done(self, r: int | str, name: str, output: Path) -> dict | None:
        """The manifest entry of a completed stage whose output is still there and unchanged: a file with the
        recorded hash, a complete checkpoint, or a checkpoint deleted on purpose once a newer one was complete."""
        entry = self.stage(r, name)
        if entry is None or entry.get("status") != "done":
            return None
        if entry.get("cleaned"):
            return entry
        if output.is_dir():
            return entry if is_checkpoint(output) else None
        return entry if output.is_file() and file_sha256(output) == entry.get("sha256") else None

    def mark_done(self, r: int | str, name: str, output: Path, info: dict) -> dict:
        crash_point(f"mark_done.{name}")
        entry = {"status": "done", "output": str(output.relative_to(self.dir)), **info}
        if output.is_file():
            entry["sha256"] = file_sha256(output)
        self.manifest["rounds"].setdefault(str(r), {})[name] = entry
        self.save()
        self.log({"event": "stage_done", "round": r, "stage": name, **{k: v for k, v in info.items() if k != "summary"}})
        return entry

    def once(self, r: int | str, name: str, output: Path, compute: Callable[[], dict]) -> dict:
        """The stage skeleton: the manifest entry of stage `name` of round `r` when it is done (see `done`);
        otherwise `compute()` writes `output` and returns what to record, and the stage is timed and marked
        done."""
        if entry := self.done(r, name, output):
            return entry
        t = time.time()
        info = compute()
        return self.mark_done(r, name, output, {**info, "seconds": time.time() - t})


def run_loop(config: Config, progress: bool = True, echo=print) -> dict:
    """Run (or resume) the whole loop; returns the manifest."""
    sampler = Sampler(config.sampler, config.seed, config.trust_remote_code)  # a vLLM that cannot run fails here
    try:
        with trainer_on(sampler.placement):
            return _run_rounds(config, sampler, progress, echo)
    finally:
        sampler.close()


def _run_rounds(config: Config, sampler: Sampler, progress: bool, echo) -> dict:
    run = Run(config)
    run.open()
    policy0 = resolve_model_path(config.policy)
    reference = resolve_model_path(config.reference_path)
    if "sft" not in run.manifest:  # the reference is recorded by path and hash, and never deleted
        run.manifest["sft"] = {"policy": policy0, "reference": reference, "reference_sha256": weights_sha256(reference)}
        run.save()
    labeler = make_labeler(config.labeler, run.dir)
    prompts = load_prompts(config.prompts)
    random.Random(config.seed).shuffle(prompts)
    prompts = prompts[: config.total_prompts]
    heldout = load_prompts(config.heldout) if config.heldout else []
    show = lambda what: progress and what or None  # noqa: E731  (a progress bar's title, or none)

    if heldout:
        eval_stage(run, "sft", -1, policy0, heldout, labeler, sampler, show("held-out (SFT)"))
    policy, resume = policy0, None
    for r, start in enumerate(range(0, len(prompts), config.prompts_per_round)):
        seed = config.seed * 1000 + r
        round_prompts = prompts[start : start + config.prompts_per_round]
        sampled = sample_stage(run, r, round_prompts, start, policy, seed, sampler, show(f"sample r{r:03d}"))
        if sampled["count"] == 0:
            echo(f"round {r}: no samples; stopping")
            break
        label_stage(run, r, labeler, show(f"label r{r:03d}"))
        feedback_stage(run, r, seed)
        trained = train_stage(run, r, policy, reference, resume, sampler, progress)
        if "skipped" not in trained:
            policy, resume = str(run.round_dir(r) / "checkpoint"), run.round_dir(r) / "checkpoint"
        if heldout:
            eval_stage(run, r, r, policy, heldout, labeler, sampler, show(f"held-out r{r:03d}"))
        write_json(run.round_dir(r) / "metrics.json", round_metrics(run.manifest["rounds"], r))
        cleanup_checkpoints(run, r)

    run.manifest["summary"] = summarize(run)
    run.manifest["status"] = "complete"
    run.save()
    return run.manifest


def sample_stage(run: Run, r: int, prompts: list[dict], start: int, policy: str, seed: int, sampler: Sampler,
                 progress: str | None) -> dict:
    """n samples per prompt of this round's slice, from the current policy."""
    config = run.config
    out = run.round_dir(r) / "samples.jsonl"

    def compute() -> dict:
        samples = sample_records(prompts, policy, sampler, n=config.samples_per_prompt, round_index=r, seed=seed,
                                 generator=run.policy_id(policy), progress=progress)
        vllm_info = {}
        if sampler.vllm is not None:
            vllm_info["engine_workers"] = sampler.vllm.workers  # where the samples were made
            if sampler.placement is not None:
                vllm_info["trainer"] = sampler.placement.describe()["trainer"]
            if config.sampler.sync_samples:  # a stale engine stops the run here, before its samples are kept
                vllm_info["weight_sync"] = sampler.vllm.check_sync(policy, config.sampler.sync_tolerance,
                                                                  config.sampler.sync_samples, config.trust_remote_code)
        write_records(out, samples)
        return {"policy": policy, "prompts": len(prompts), "prompt_slice": [start, start + len(prompts)],
                "count": len(samples), "input_sha256": hashlib.sha256("".join(dumps(p) for p in prompts).encode()).hexdigest(),
                "seed": seed, "backend": config.sampler.backend, **vllm_info}

    return run.once(r, "sample", out, compute)


def label_stage(run: Run, r: int, labeler, progress: str | None) -> dict:
    """A reward for every sample of the round."""
    samples, out = run.round_dir(r) / "samples.jsonl", run.round_dir(r) / "scored.jsonl"

    def compute() -> dict:
        labeler.reset_stats()  # a judge counts parses, failures, tokens and cost per stage
        scored, counts = label_records(read_records(samples), labeler, BATCHES_PER_CHUNK * run.config.labeler.batch_size,
                                       progress)
        write_records(out, scored)
        return {"input_sha256": file_sha256(samples), "labeler": labeler.name, **labeler.stats, **counts,
                "reward": mean_reward(scored)}

    return run.once(r, "label", out, compute)


def feedback_stage(run: Run, r: int, seed: int) -> dict:
    """Pairs or binary labels from the round's scores."""
    scored, out = run.round_dir(r) / "scored.jsonl", run.round_dir(r) / "feedback.jsonl"
    fb = run.config.feedback

    def compute() -> dict:
        records = read_records(scored)
        if fb.type == "pairwise":
            feedback = pairwise_feedback(records, fb.mode, fb.threshold, seed)
        else:
            feedback = binary_feedback(records, fb.threshold)
        write_records(out, feedback)
        return {"input_sha256": file_sha256(scored), "type": fb.type, "mode": fb.mode, "threshold": fb.threshold,
                "count": len(feedback), "seed": seed}

    return run.once(r, "feedback", out, compute)


def train_stage(run: Run, r: int, policy: str, reference: str, resume: Path | None, sampler: Sampler,
                progress: bool) -> dict:
    """The round's checkpoint, trained on the round's feedback (or scored samples, for a loss that takes
    them); a round with nothing to learn from keeps the policy it had."""
    config = run.config
    rdir = run.round_dir(r)
    train_input = rdir / {"scored": "scored.jsonl", "feedback": "feedback.jsonl"}[training_input(config.loss.name)]
    records = read_training_records(config.loss.name, train_input)
    if not has_training_signal(config.loss.name, records):
        return run.stage(r, "train") or run.mark_done(r, "train", rdir, {"skipped": "no feedback", "seconds": 0.0,
                                                                         "policy_out": policy})
    checkpoint = rdir / "checkpoint"

    def compute() -> dict:
        sampler.sleep()  # on a GPU the engine gives its memory to the trainer until it samples again
        summary = train_round(
            records, policy=policy, reference=reference, out_dir=checkpoint, resume=resume,
            loss=config.loss, optim=config.optim, seed=config.seed, round_index=r,
            trust_remote_code=config.trust_remote_code, progress=progress,
            log=lambda row: run.log({"event": "train_step", **row}),
        )
        return {"input_sha256": file_sha256(train_input), "policy_in": policy, "resumed_from": str(resume) if resume else None,
                "policy_out": str(checkpoint), "weights_sha256": weights_sha256(str(checkpoint)), "summary": summary}

    return run.once(r, "train", checkpoint, compute)


def eval_stage(run: Run, key: int | str, round_index: int, policy: str, heldout: list[dict], labeler,
               sampler: Sampler, progress: str | None) -> dict:
    """Greedy answers of one policy (the SFT model, or a round's checkpoint) to the held-out prompts, scored."""
    out = run.dir / "eval" / "sft_heldout.jsonl" if key == "sft" else run.round_dir(round_index) / "heldout.jsonl"

    def compute() -> dict:
        scored = evaluate_policy(policy, heldout, labeler, sampler, round_index, run.config.seed, progress,
                                 generator=run.policy_id(policy))
        write_records(out, scored)
        return {"policy": policy, "count": len(scored), "reward": mean_reward(scored)}

    return run.once(key, "eval", out, compute)


def cleanup_checkpoints(run: Run, r: int) -> None:
    """Delete round checkpoints older than the newest `keep_checkpoints` complete ones (never the SFT)."""
    complete = [k for k in range(r + 1) if is_checkpoint(run.round_dir(k) / "checkpoint")]
    for k in complete[: -run.config.keep_checkpoints]:
        run.manifest["rounds"][str(k)]["train"]["cleaned"] = True  # recorded first: a resume must not retrain
        run.save()
        shutil.rmtree(run.round_dir(k) / "checkpoint", ignore_errors=True)


def summarize(run: Run) -> dict:
    rounds = sorted(int(k) for k in run.manifest["rounds"] if k != "sft")
    summary: dict = {"rounds": len(rounds)}
    sft_eval = run.dir / "eval" / "sft_heldout.jsonl"
    last = run.round_dir(rounds[-1]) / "heldout.jsonl" if rounds else None
    if sft_eval.exists() and last is not None and last.exists():
        before, after = read_records(sft_eval), read_records(last)
        summary["heldout_sft"] = mean_reward(before)
        summary["heldout_last"] = mean_reward(after)
        summary["heldout_change"] = paired_difference(before, after)
    return summary
