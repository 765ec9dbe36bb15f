"""The orchestrator: rounds of sample -> label -> feedback -> train -> held-out eval, as a resumable state
machine over the run directory (layout in shared/contracts.md).

Every stage runs through one skeleton, `Run.once`: a stage whose output is complete and matches the manifest
is skipped; otherwise it is computed from its inputs, written atomically, and marked done in `manifest.json`
with the output's hash. So a run killed at any moment and started again, redoing anything unfinished with
the same seeds, ends with the same records as one that never stopped.

Under `torchrun` or `accelerate launch` every process runs this same loop (`alignloop.distributed`):
sampling, a reward model's scoring and training are shared among the processes; a judge or a reward function
labels, and the feedback is made, on the main process alone. Only the main process writes the run directory;
the others learn what it decided (a stage done, its manifest entry) from it, never from the files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import time
from pathlib import Path
from typing import Callable

from . import distributed
from .checkpoint import is_checkpoint
from .config import Config, ConfigError, dump_config, keep_saved_sampler, load_saved_config
from .faults import crash_point
from .models import resolve_model_path, weights_sha256
from .prompts.sources import load_prompts
from .records import atomic_write_text, dumps, file_sha256, read_records, read_samples, write_json, write_records
from .rewards import make_labeler
from .rewards.judge import JudgePrefetch
from .sampling import Sampler
from .sampling.placement import trainer_on
from .stages.evaluate import heldout_samples, mean_reward, paired_difference
from .stages.feedback import binary_feedback, pairwise_feedback
from .stages.label import BATCHES_PER_CHUNK, label_in_processes, label_records
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
        def read_or_start() -> dict:
            self.dir.mkdir(parents=True, exist_ok=True)
            # What a killed run was writing: a record file's or a checkpoint's temporary, never renamed into place
            for leftover in list(self.dir.glob("**/*.tmp")):  # pathlib's * matches dot files too
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
            saved = self.dir / "config.yaml"
            if saved.exists() and load_saved_config(saved) != self.config:
                raise ConfigError(
                    f"{saved}: this run directory holds a run with a different configuration; "
                    "resume it with the same config or choose another run_dir"
                )
            atomic_write_text(saved, dump_config(self.config))
            return json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else {"format": 1, "rounds": {}}

        self.manifest = distributed.on_main(read_or_start)

    def save(self) -> None:
        if distributed.is_main():
            write_json(self.manifest_path, self.manifest)

    def log(self, event: dict) -> None:
        if distributed.is_main():
            with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(dumps({"time": time.time(), **event}) + "\n")

    def write_records(self, path: Path, records: list[dict]) -> None:
        """A stage's output, written by the main process (every process holds the same records)."""
        if distributed.is_main():
            write_records(path, records)

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
        recorded hash, a complete checkpoint, or a checkpoint deleted on purpose once a newer one was complete.
        The main process looks; every process gets its answer."""
        return distributed.on_main(lambda: self._done(r, name, output))

    def _done(self, r: int | str, name: str, output: Path) -> dict | None:
        entry = self.stage(r, name)
        if entry is None or entry.get("status") != "done":
            return None
        if entry.get("cleaned"):
            return entry
        if output.is_dir():
            return entry if is_checkpoint(output) else None
        return entry if output.is_file() and file_sha256(output) == entry.get("sha256") else None

    def mark_done(self, r: int | str, name: str, output: Path, info: dict) -> dict:
        """Record a finished stage (the main process's `info`) in the manifest, on every process."""
        def entry_of_main() -> dict:
            crash_point(f"mark_done.{name}")
            entry = {"status": "done", "output": str(output.relative_to(self.dir)), **info}
            if output.is_file():
                entry["sha256"] = file_sha256(output)
            return entry

        entry = distributed.on_main(entry_of_main)
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
    """Run (or resume) the whole loop; returns the manifest. Under a launcher, every process calls this."""
    distributed.init()
    progress = progress and distributed.is_main()
    config = distributed.on_main(lambda: keep_saved_sampler(config, Path(config.run_dir) / "config.yaml"))
    sampler = Sampler(config.sampler, config.seed, config.trust_remote_code)  # a vLLM that cannot run fails here
    try:
        with trainer_on(sampler.placement):
            return _run_rounds(config, sampler, progress, echo)
    finally:
        sampler.close()


def _run_rounds(config: Config, sampler: Sampler, progress: bool, echo) -> dict:
    run = Run(config)
    run.open()
    policy0, reference = local_models(config)
    if "sft" not in run.manifest:  # the reference is recorded by path and hash, and never deleted
        run.manifest["sft"] = distributed.on_main(
            lambda: {"policy": policy0, "reference": reference, "reference_sha256": weights_sha256(reference)})
        run.save()
    # A reward model scores on every process; a judge or a function labels on the main process alone.
    labeler = make_labeler(config.labeler, run.dir) if labels_in_processes(config) or distributed.is_main() else None
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
        sampled = sample_stage(run, r, round_prompts, start, policy, seed, sampler, show(f"sample r{r:03d}"), labeler)
        if sampled["count"] == 0:
            if distributed.is_main():
                echo(f"round {r}: no samples; stopping")
            break
        label_stage(run, r, labeler, show(f"label r{r:03d}"))
        feedback_stage(run, r, seed)
        trained = train_stage(run, r, policy, reference, resume, sampler, progress)
        if "skipped" not in trained:
            policy, resume = str(run.round_dir(r) / "checkpoint"), run.round_dir(r) / "checkpoint"
        if heldout:
            eval_stage(run, r, r, policy, heldout, labeler, sampler, show(f"held-out r{r:03d}"))
        if distributed.is_main():
            write_json(run.round_dir(r) / "metrics.json", round_metrics(run.manifest["rounds"], r))
        cleanup_checkpoints(run, r)

    run.manifest["summary"] = distributed.on_main(lambda: summarize(run))
    run.manifest["status"] = "complete"
    run.save()
    distributed.barrier()
    return run.manifest


def local_models(config: Config) -> tuple[str, str]:
    """The policy's and the reference's folders. The embedded default is converted into a per-machine cache on
    first use, so one process per machine does it before the others look."""
    if distributed.local_rank() == 0:
        resolve_model_path(config.policy), resolve_model_path(config.reference_path)
    distributed.barrier()
    return resolve_model_path(config.policy), resolve_model_path(config.reference_path)


def labels_in_processes(config: Config) -> bool:
    """Whether the labeler's work is shared among the processes (a reward model's forward passes); a judge's
    requests and a reward function run once, on the main process."""
    return config.labeler.kind == "reward_model"


def sample_stage(run: Run, r: int, prompts: list[dict], start: int, policy: str, seed: int, sampler: Sampler,
                 progress: str | None, labeler=None) -> dict:
    """n samples per prompt of this round's slice, from the current policy. With a judge for labeler, the main
    process judges each prompt's samples as soon as they exist (`JudgePrefetch`), so the label stage finds
    the answers in the judge's cache instead of waiting for them all after sampling."""
    config = run.config
    out = run.round_dir(r) / "samples.jsonl"
    judge = labeler if config.labeler.kind == "judge" and distributed.is_main() else None

    def compute() -> dict:
        with JudgePrefetch(judge) if judge else contextlib.nullcontext() as prefetch:
            samples = sample_records(prompts, policy, sampler, n=config.samples_per_prompt, round_index=r, seed=seed,
                                     generator=run.policy_id(policy), progress=progress,
                                     on_prompt_done=prefetch.add if prefetch else None)
            sampled = time.time()
        judge_info = {}
        if prefetch:  # leaving the block waited for the answers still to come: how long the judge kept the round waiting
            judge_info["judge_prefetch"] = {**prefetch.summary(), "seconds_after_sampling": round(time.time() - sampled, 3)}
        vllm_info = {}
        if sampler.vllm is not None:
            vllm_info["engine_workers"] = sampler.vllm.workers  # where the samples were made
            if sampler.placement is not None:
                vllm_info["trainer"] = sampler.placement.describe()["trainer"]
            if config.sampler.sync_samples:  # a stale engine stops the run here, before its samples are kept
                vllm_info["weight_sync"] = sampler.vllm.check_sync(policy, config.sampler.sync_tolerance,
                                                                  config.sampler.sync_samples, config.trust_remote_code)
        run.write_records(out, samples)
        return {"policy": policy, "prompts": len(prompts), "prompt_slice": [start, start + len(prompts)],
                "count": len(samples), "input_sha256": hashlib.sha256("".join(dumps(p) for p in prompts).encode()).hexdigest(),
                "seed": seed, "backend": config.sampler.backend, **vllm_info, **judge_info}

    return run.once(r, "sample", out, compute)


def label_stage(run: Run, r: int, labeler, progress: str | None) -> dict:
    """A reward for every sample of the round."""
    samples, out = run.round_dir(r) / "samples.jsonl", run.round_dir(r) / "scored.jsonl"

    def compute() -> dict:
        scored, stats = label(run.config, read_samples(samples), labeler, progress)
        run.write_records(out, scored)
        return {"input_sha256": file_sha256(samples), **stats, "reward": mean_reward(scored)}

    return run.once(r, "label", out, compute)


def label(config: Config, samples: list[dict], labeler, progress: str | None) -> tuple[list[dict], dict]:
    """The scored samples, on every process, and what to record of the labeling: the labeler's name, its
    stats (a judge counts parses, failures, tokens and cost per stage) and the counts."""
    def once() -> tuple[list[dict], dict]:
        labeler.reset_stats()
        scored, counts = label_records(samples, labeler, BATCHES_PER_CHUNK * config.labeler.batch_size, progress)
        return scored, {"labeler": labeler.name, **labeler.stats, **counts}

    if not labels_in_processes(config):
        return distributed.on_main(once)
    labeler.reset_stats()
    scored, counts = label_in_processes(samples, labeler, config.labeler.batch_size, progress)
    return scored, {"labeler": labeler.name, **labeler.stats, **counts}


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

    return run.once(r, "feedback", out, lambda: distributed.on_main(compute))


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
        samples = heldout_samples(policy, heldout, sampler, round_index, run.config.seed, progress,
                                 generator=run.policy_id(policy))
        scored, _ = label(run.config, samples, labeler, None)
        run.write_records(out, scored)
        return {"policy": policy, "count": len(scored), "reward": mean_reward(scored)}

    return run.once(key, "eval", out, compute)


def cleanup_checkpoints(run: Run, r: int) -> None:
    """Delete round checkpoints older than the newest `keep_checkpoints` complete ones (never the SFT)."""
    complete = distributed.on_main(lambda: [k for k in range(r + 1) if is_checkpoint(run.round_dir(k) / "checkpoint")])
    for k in complete[: -run.config.keep_checkpoints]:
        run.manifest["rounds"][str(k)]["train"]["cleaned"] = True  # recorded first: a resume must not retrain
        run.save()
        if distributed.is_main():
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
