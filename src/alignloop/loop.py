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
import os
import random
import socket
import shutil
import time
from pathlib import Path
from typing import Callable

from . import distributed
from .checkpoint import is_checkpoint
from .config import Config, ConfigError, config_difference, dump_config, keep_saved_sampler, load_saved_config
from .faults import crash_point
from .models import resolve_model_path, weights_sha256
from .prompts.sources import load_prompts
from .records import append_line, atomic_write_text, dumps, file_sha256, read_records, read_samples, write_json, write_records
from .rewards import make_labeler
from .rewards.judge import JudgePrefetch
from .sampling import Sampler
from .sampling.placement import trainer_on
from .stages.evaluate import check_instructions, heldout_samples, kl_along_answers
from .stages.feedback import build_feedback, chosen_longer
from .stages.label import BATCHES_PER_CHUNK, label_counts, label_in_processes, label_records
from .stages.sample import sample_records
from .stages.train import has_training_signal, read_training_records, train_round, training_input
from .stats import (instruction_accuracy, instruction_accuracy_change, length_stats, mean_reward, mean_with_interval,
                    pair_margin, paired_difference, reward_interval, win_rate)
from .table import round_metrics, stage_line


class Run:
    """A run directory: its config, manifest and metrics log, and the skeleton every stage runs through."""

    def __init__(self, config: Config, echo=None, home: Path | None = None):
        """`home`: the run directory the records name policies relative to, when this one stands in for it
        (`alignloop replay`'s scratch runs)."""
        self.config = config
        self.dir = Path(config.run_dir)
        self.home = Path(home) if home is not None else self.dir
        self.manifest_path = self.dir / "manifest.json"
        self.echo = echo if distributed.is_main() else None  # one line per finished stage, from the main process
        self.trackers = None

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
            if saved.exists() and (before := load_saved_config(saved)) != self.config:
                raise ConfigError(
                    f"{saved}: this run directory holds a run with a different configuration "
                    f"({config_difference(before, self.config)}); resume it with the same config or choose another run_dir"
                )
            atomic_write_text(saved, dump_config(self.config))
            return json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else {"format": 1, "rounds": {}}

        self.manifest = distributed.on_main(read_or_start)

    def save(self) -> None:
        if distributed.is_main():
            write_json(self.manifest_path, self.manifest)

    def log(self, event: dict, step: int | None = None) -> None:
        """An event in metrics.jsonl; with `step` (the optimizer's global step), its numbers also go to the
        trackers (`log_to`), under the same names."""
        if distributed.is_main():
            append_line(self.dir / "metrics.jsonl", dumps({"time": time.time(), **event}))
            if step is not None and self.trackers is not None:
                self.trackers.log({k: v for k, v in event.items() if k != "event"}, step)

    def write_records(self, path: Path, records: list[dict]) -> None:
        """A stage's output, written by the main process (every process holds the same records)."""
        if distributed.is_main():
            write_records(path, records)

    def policy_id(self, policy: str) -> str:
        """A policy's name in records: relative to the run directory for its own checkpoints, so that
        records do not depend on where the run directory lives."""
        path, home = Path(policy).resolve(), self.home.resolve()
        return str(path.relative_to(home)) if path.is_relative_to(home) else policy

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
        if self.echo is not None:
            self.echo(stage_line(r, name, entry))
        return entry

    def in_chunks(self, r: int, name: str, count: int, size: int, compute: Callable[[int, int, int], list[dict]]) -> list[dict]:
        """The records of a long stage, made in chunks of `size` items out of `count`: `compute(k, start, end)`
        makes chunk k's. Each chunk's records are written to `rounds/rRRR/NAME.parts/KKKKK.jsonl` (atomically,
        fsynced) and its hash recorded in the manifest (`parts`) as soon as they exist, so a rerun reads back
        every recorded chunk whose file is unchanged and makes only the rest: a crash loses at most the chunk
        under way. The parts go once the stage's output is written (`once`)."""
        key = f"{r}/{name}"
        folder = self.round_dir(r) / f"{name}.parts"
        records: list[dict] = []
        for k, start in enumerate(range(0, count, size)):
            part = folder / f"{k:05d}.jsonl"
            chunk = distributed.on_main(lambda k=k, part=part: self._kept_chunk(key, k, part))
            if chunk is None:
                chunk = compute(k, start, min(count, start + size))
                if distributed.is_main():
                    write_records(part, chunk)
                    self.manifest.setdefault("parts", {}).setdefault(key, {})[str(k)] = file_sha256(part)
                    self.save()
                    self.log({"event": "chunk_done", "round": r, "stage": name, "chunk": k, "items": [start, min(count, start + size)]})
                crash_point(f"{name}.chunk")
            records += chunk
        return records

    def _kept_chunk(self, key: str, k: int, part: Path) -> list[dict] | None:
        """Chunk k's records when its file is there with the hash the manifest recorded for it."""
        sha = self.manifest.get("parts", {}).get(key, {}).get(str(k))
        return read_records(part) if sha and part.is_file() and file_sha256(part) == sha else None

    def drop_parts(self, r: int | str, name: str) -> None:
        """A finished stage's chunk files and their manifest entry, no longer needed."""
        if not str(r).isdigit():  # the SFT model's evaluation: never in chunks
            return
        if self.manifest.get("parts", {}).pop(f"{r}/{name}", None) is not None:
            if not self.manifest["parts"]:
                del self.manifest["parts"]
            self.save()
        if distributed.is_main():
            shutil.rmtree(self.round_dir(int(r)) / f"{name}.parts", ignore_errors=True)

    def once(self, r: int | str, name: str, output: Path, compute: Callable[[], dict]) -> dict:
        """The stage skeleton: the manifest entry of stage `name` of round `r` when it is done (see `done`);
        otherwise `compute()` writes `output` and returns what to record, and the stage is timed and marked
        done."""
        if entry := self.done(r, name, output):
            self.drop_parts(r, name)  # (left behind when a crash came between the two)
            return entry
        t = time.time()
        info = compute()
        entry = self.mark_done(r, name, output, {**info, "seconds": time.time() - t})
        self.drop_parts(r, name)
        return entry


def run_loop(config: Config, progress: bool = True, echo=print) -> dict:
    """Run (or resume) the whole loop; returns the manifest. Under a launcher, every process calls this."""
    distributed.init()
    progress = progress and distributed.is_main()
    config = distributed.on_main(lambda: keep_saved_sampler(config, Path(config.run_dir) / "config.yaml"))
    if config.log_to:
        from .trackers import check_installed

        check_installed(config.log_to)  # a missing tracker's package fails here, before any work
    sampler = Sampler(config.sampler, config.seed, config.trust_remote_code,  # a vLLM that cannot run fails here
                      lora_rank=config.policy_adapter.r if config.policy_adapter else None)
    run = Run(config, echo)
    try:
        with trainer_on(sampler.placement):
            return _run_rounds(run, sampler, progress)
    finally:
        sampler.close()
        if run.trackers is not None:
            run.trackers.close()


def _run_rounds(run: Run, sampler: Sampler, progress: bool) -> dict:
    config = run.config
    run.open()
    if distributed.is_main() and config.log_to:
        from .trackers import Trackers

        run.trackers = Trackers(config.log_to, run.dir, config.model_dump(mode="json"))
    policy0, reference = local_models(config)
    if "sft" not in run.manifest:  # the reference is recorded by path and hash, and never deleted
        run.manifest["sft"] = distributed.on_main(
            lambda: {"policy": policy0, "reference": reference, "reference_sha256": weights_sha256(reference)})
        run.save()
    # A reward model scores on every process; a judge or a function labels on the main process alone.
    labeler = make_labeler(config.labeler, run.dir) if labels_in_processes(config.labeler) or distributed.is_main() else None
    eval_labelers = {name: (lc, make_labeler(lc, run.dir) if labels_in_processes(lc) or distributed.is_main() else None)
                     for name, lc in config.eval.labelers.items()}
    prompts = load_prompts(config.prompts)
    random.Random(config.seed).shuffle(prompts)
    prompts = prompts[: config.total_prompts]
    heldout = load_prompts(config.heldout) if config.heldout else []
    # for `alignloop status`: who is running the run, and how many rounds it has in all
    run.manifest["plan"] = {"prompts": len(prompts), "rounds": -(-len(prompts) // config.prompts_per_round),
                            "heldout": len(heldout)}
    run.manifest["process"] = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    run.manifest.setdefault("started", time.time())
    run.manifest.pop("status", None)  # complete or stopped until now: a rerun looks again
    run.save()
    show = lambda what: progress and what or None  # noqa: E731  (a progress bar's title, or none)

    evaluate = lambda key, r, policy, title: eval_stage(  # noqa: E731
        run, key, r, policy, reference, heldout, labeler, eval_labelers, sampler, show(title))
    if heldout:
        evaluate("sft", -1, policy0, "held-out (SFT)")
    policy, resume = policy0, None
    train_reference = reference  # the loss's reference: the SFT model's, unless refreshed (`reference_refresh`)
    stopped = False
    for r, start in enumerate(range(0, len(prompts), config.prompts_per_round)):
        seed = config.seed * 1000 + r
        if config.reference_refresh and r > 0 and r % config.reference_refresh == 0:
            train_reference = policy
        round_prompts = prompts[start : start + config.prompts_per_round]
        sampler_policy = policy if config.online else policy0  # offline: always the SFT model's samples
        sampled = sample_stage(run, r, round_prompts, start, sampler_policy, seed, sampler, show(f"sample r{r:03d}"), labeler)
        if sampled["count"] == 0:
            if run.echo is not None:
                run.echo(f"round {r}: no samples; stopping")
            break
        label_stage(run, r, labeler, show(f"label r{r:03d}"))
        feedback_stage(run, r, seed)
        trained = train_stage(run, r, policy, train_reference, resume, sampler, progress)
        if "skipped" not in trained:
            policy, resume = str(run.round_dir(r) / "checkpoint"), run.round_dir(r) / "checkpoint"
        if heldout:
            evaluate(r, r, policy, f"held-out r{r:03d}")
            guard = guard_stage(run, r)
            if guard["action"] == "rollback":  # the next round goes on from the best round's weights and optimizer
                policy, resume = (policy0, None) if guard["best"] == "sft" else (
                    str(run.round_dir(guard["best"]) / "checkpoint"), run.round_dir(guard["best"]) / "checkpoint")
            stopped = guard["action"] == "stop"
        finished_now = distributed.is_main() and not (run.round_dir(r) / "metrics.json").exists()
        if finished_now:  # (a resumed run walks past its finished rounds: nothing to write or redraw for them)
            metrics = round_metrics(run.manifest["rounds"], r)
            write_json(run.round_dir(r) / "metrics.json", metrics)
            step = run.manifest["rounds"][str(r)]["train"].get("summary", {}).get("global_step", 0)
            # the round's mean loss and accuracy are left out: the steps' own, under the same names, are logged
            run.log({"event": "round_done", **{k: v for k, v in metrics.items() if k not in ("loss", "accuracy")}}, step=step)
        cleanup_checkpoints(run, r, keep=train_reference)
        if finished_now:
            write_report_safely(run.dir, echo=run.echo)
        if stopped:
            break

    run.manifest["summary"] = distributed.on_main(lambda: summarize(run))
    run.manifest["status"] = "stopped" if stopped else "complete"
    run.save()
    if distributed.is_main():
        write_report_safely(run.dir, echo=run.echo)
    distributed.barrier()
    return run.manifest


def write_report_safely(run_dir: Path, echo=None) -> None:
    """The run's report (`alignloop report`), redrawn; a report that cannot be drawn is said once and does
    not stop the run, whose records are what matters."""
    try:
        from .report import write_report

        write_report(run_dir)
    except Exception as e:  # noqa: BLE001 (the report only reads what the run wrote)
        if echo is not None:
            echo(f"report not written: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def local_models(config: Config) -> tuple[str, str]:
    """The policy's and the reference's folders. The embedded default is converted into a per-machine cache on
    first use, so one process per machine does it before the others look."""
    if distributed.local_rank() == 0:
        resolve_model_path(config.policy), resolve_model_path(config.reference_path)
    distributed.barrier()
    return resolve_model_path(config.policy), resolve_model_path(config.reference_path)


def labels_in_processes(labeler_config) -> bool:
    """Whether a labeler's work is shared among the processes (a reward model's forward passes); a judge's
    requests and a reward function run once, on the main process."""
    return labeler_config.kind == "reward_model"


def sample_stage(run: Run, r: int, prompts: list[dict], start: int, policy: str, seed: int, sampler: Sampler,
                 progress: str | None, labeler=None) -> dict:
    """n samples per prompt of this round's slice, from the current policy. With a judge for labeler, the main
    process judges each prompt's samples as soon as they exist (`JudgePrefetch`), so the label stage finds
    the answers in the judge's cache instead of waiting for them all after sampling."""
    config = run.config
    out = run.round_dir(r) / "samples.jsonl"
    judge = labeler if config.labeler.kind == "judge" and distributed.is_main() else None

    def compute() -> dict:
        vllm_info = {}

        def sample_chunk(k: int, begin: int, end: int) -> list[dict]:
            chunk = sample_records(prompts[begin:end], policy, sampler, n=config.samples_per_prompt, round_index=r,
                                   seed=chunk_seed(seed, k), generator=run.policy_id(policy), progress=progress,
                                   on_prompt_done=prefetch.add if prefetch else None)
            if sampler.vllm is not None and config.sampler.sync_samples and "weight_sync" not in vllm_info:
                # a stale engine stops the run at its first chunk, before any of its samples are kept
                vllm_info["weight_sync"] = sampler.vllm.check_sync(policy, config.sampler.sync_tolerance,
                                                                  config.sampler.sync_samples, config.trust_remote_code)
            return chunk

        with JudgePrefetch(judge) if judge else contextlib.nullcontext() as prefetch:
            samples = run.in_chunks(r, "sample", len(prompts), config.chunks.sample, sample_chunk)
            sampled = time.time()
        judge_info = {}
        if prefetch:  # leaving the block waited for the answers still to come: how long the judge kept the round waiting
            judge_info["judge_prefetch"] = {**prefetch.summary(), "seconds_after_sampling": round(time.time() - sampled, 3)}
        if sampler.vllm is not None:
            vllm_info["engine_workers"] = sampler.vllm.workers  # where the samples were made
            if sampler.placement is not None:
                vllm_info["trainer"] = sampler.placement.describe()["trainer"]
        run.write_records(out, samples)
        return {"policy": policy, "prompts": len(prompts), "prompt_slice": [start, start + len(prompts)],
                "count": len(samples), "tokens": sum(s.get("num_tokens") or 0 for s in samples), "length": length_stats(samples), "input_sha256": hashlib.sha256("".join(dumps(p) for p in prompts).encode()).hexdigest(),
                "seed": seed, "backend": config.sampler.backend, **vllm_info, **judge_info}

    return run.once(r, "sample", out, compute)


def label_stage(run: Run, r: int, labeler, progress: str | None) -> dict:
    """A reward for every sample of the round."""
    samples, out = run.round_dir(r) / "samples.jsonl", run.round_dir(r) / "scored.jsonl"

    def compute() -> dict:
        records = read_samples(samples)
        stats = {}

        def label_chunk(k: int, begin: int, end: int) -> list[dict]:
            scored, chunk_stats = label(run.config.labeler, records[begin:end], labeler, progress, fresh_stats=not stats)
            stats.update(chunk_stats)  # the labeler's counters run on over the chunks this process labels
            return scored

        scored = run.in_chunks(r, "label", len(records), run.config.chunks.label, label_chunk)
        stats.update(label_counts(scored))
        run.write_records(out, scored)
        return {"input_sha256": file_sha256(samples), **stats, "reward": mean_reward(scored),
                "reward_ci95": reward_interval(scored)}

    return run.once(r, "label", out, compute)


def label(labeler_config, samples: list[dict], labeler, progress: str | None,
          fresh_stats: bool = True) -> tuple[list[dict], dict]:
    """The scored samples, on every process, and what to record of the labeling: the labeler's name, its
    stats (a judge counts parses, failures, tokens and cost per stage; since this call, or, without
    `fresh_stats`, since the last call that had it) and the counts."""
    def once() -> tuple[list[dict], dict]:
        if fresh_stats:
            labeler.reset_stats()
        scored, counts = label_records(samples, labeler, BATCHES_PER_CHUNK * labeler_config.batch_size, progress)
        return scored, {"labeler": labeler.name, **labeler.stats, **counts}

    if not labels_in_processes(labeler_config):
        return distributed.on_main(once)
    if fresh_stats:
        labeler.reset_stats()
    scored, counts = label_in_processes(samples, labeler, labeler_config.batch_size, progress)
    return scored, {"labeler": labeler.name, **labeler.stats, **counts}


def chunk_seed(seed: int, k: int) -> int:
    """The sampling seed of a stage's chunk k: the stage's own for the first chunk (a stage of one chunk samples
    as it did before stages had chunks), one drawn from it for the others."""
    return seed if k == 0 else int.from_bytes(hashlib.sha256(f"{seed}/chunk/{k}".encode()).digest()[:7], "big")


def feedback_stage(run: Run, r: int, seed: int) -> dict:
    """Pairs or binary labels from the round's scores."""
    scored, out = run.round_dir(r) / "scored.jsonl", run.round_dir(r) / "feedback.jsonl"
    fb = run.config.feedback

    def compute() -> dict:
        records = read_records(scored)
        feedback = build_feedback(records, fb.type, fb.mode, fb.threshold, seed, fb.length_ratio, fb.truncation_penalty,
                                  fb.length_balance)
        write_records(out, feedback)
        return {"input_sha256": file_sha256(scored), "type": fb.type, "mode": fb.mode, "threshold": fb.threshold,
                "length_ratio": fb.length_ratio, "truncation_penalty": fb.truncation_penalty,
                "length_balance": fb.length_balance, "count": len(feedback), "margin": pair_margin(feedback),
                "chosen_longer": chosen_longer(feedback), "seed": seed}

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
            log=lambda row: run.log({"event": "train_step", **row}, step=row["step"]), adapter=config.policy_adapter,
        )
        return {"input_sha256": file_sha256(train_input), "policy_in": policy, "reference": reference,
                "resumed_from": str(resume) if resume else None,
                "policy_out": str(checkpoint), "weights_sha256": weights_sha256(str(checkpoint)), "summary": summary}

    return run.once(r, "train", checkpoint, compute)


def eval_stage(run: Run, key: int | str, round_index: int, policy: str, reference: str, heldout: list[dict], labeler,
               eval_labelers: dict, sampler: Sampler, progress: str | None) -> dict:
    """Greedy answers of one policy (the SFT model, or a round's checkpoint) to the held-out prompts, scored by
    the run's labeler and by each of `eval.labelers` (`eval_rewards` in the records); for a round, compared
    with the SFT model's answers, and its KL to the reference along its answers."""
    config = run.config
    out = run.dir / "eval" / "sft_heldout.jsonl" if key == "sft" else run.round_dir(round_index) / "heldout.jsonl"

    def compute() -> dict:
        samples = heldout_samples(policy, heldout, sampler, round_index, config.seed, progress,
                                  generator=run.policy_id(policy), max_new_tokens=config.eval.max_new_tokens)
        scored, _ = label(config.labeler, samples, labeler, None)
        check_instructions(scored)
        for name, (labeler_config, other) in eval_labelers.items():
            rescored, _ = label(labeler_config, samples, other, None)
            for record, again in zip(scored, rescored):
                record.setdefault("eval_rewards", {})[name] = again["reward"]
        kl = None
        if key != "sft" and config.eval.kl:
            kl = kl_along_answers(scored[: config.eval.kl_answers], policy, reference, config.optim.batch_size,
                                  config.optim.mixed_precision == "bf16", config.trust_remote_code)
        run.write_records(out, scored)
        return distributed.on_main(lambda: {"policy": policy, **evaluation_summary(run, key, scored, list(eval_labelers)),
                                            **({"kl": kl} if kl is not None else {})})

    return run.once(key, "eval", out, compute)


def evaluation_summary(run: Run, key: int | str, scored: list[dict], names: list[str]) -> dict:
    """What a held-out evaluation is judged by: the mean reward with its interval, the answers' lengths and,
    for a round, the paired change and the win rate against the SFT model's answers; the same for each
    further labeler, under `by`."""
    sft_path = run.dir / "eval" / "sft_heldout.jsonl"
    sft = read_records(sft_path) if key != "sft" and sft_path.exists() else None
    summary = {"count": len(scored), "reward": mean_reward(scored), "reward_ci95": reward_interval(scored),
               "tokens": sum(r.get("num_tokens") or 0 for r in scored), "length": length_stats(scored)}
    if (accuracy := instruction_accuracy(scored)) is not None:  # IFEval's strict accuracies, where prompts have them
        summary["ifeval"] = accuracy
    if sft is not None:
        summary["change"] = paired_difference(sft, scored)
        summary["win_rate"] = win_rate(sft, scored)
        if (change := instruction_accuracy_change(sft, scored)) is not None:
            summary["ifeval_change"] = change
    summary["by"] = {}
    for name in names:
        of = lambda r, name=name: (r.get("eval_rewards") or {}).get(name)  # noqa: E731
        rewards = mean_with_interval([v for r in scored if (v := of(r)) is not None])
        summary["by"][name] = {"reward": rewards["mean"], "reward_ci95": rewards["ci95"]}
        if sft is not None:
            summary["by"][name]["change"] = paired_difference(sft, scored, key=of)
            summary["by"][name]["win_rate"] = win_rate(sft, scored, key=of)
    return summary


def guard_stage(run: Run, r: int) -> dict:
    """The guard's decision after round r's evaluation (`GuardConfig`), recorded in the manifest once, so a
    resumed run takes the same path: {action: none | stop | rollback, best: the best round so far ("sft" or
    a round), reason}."""
    if entry := run.stage(r, "guard"):
        return entry
    guard = run.config.guard
    evals = {"sft": run.stage("sft", "eval"), **{k: run.stage(k, "eval") for k in range(r + 1)}}
    sft_words = (evals["sft"].get("length") or {}).get("words")
    floor = guard.min_length * sft_words if guard.min_length and sft_words else None
    words = lambda e: (e.get("length") or {}).get("words")  # noqa: E731
    long_enough = lambda e: floor is None or (words(e) is not None and words(e) >= floor)  # noqa: E731
    # the best evaluated policy whose answers are long enough, the earliest among equals
    # (a round that trained nothing left no checkpoint to go back to; its predecessor's evaluation stands for it)
    trained = lambda k: k == "sft" or "skipped" not in run.stage(k, "train")  # noqa: E731
    candidates = [k for k, e in evals.items() if e is not None and e.get("reward") is not None and long_enough(e) and trained(k)]
    best = max(candidates, key=lambda k: evals[k]["reward"], default="sft")
    now = evals[r]
    reasons = []
    if now.get("reward") is not None and best != r and now["reward"] < evals[best]["reward"] - guard.tolerance:
        reasons.append(f"held-out reward {now['reward']:.3f} is more than {guard.tolerance} below "
                       f"{'the SFT model' if best == 'sft' else f'round {best}'}'s {evals[best]['reward']:.3f}")
    if not long_enough(now):
        reasons.append(f"held-out answers average {words(now):.1f} words, below {guard.min_length} x the SFT "
                       f"model's {sft_words:.1f}")
    action = guard.action if reasons else "none"
    entry = {"action": action, "best": best, "best_reward": evals[best]["reward"] if best in evals else None,
             "reward": now.get("reward"), "reason": "; ".join(reasons) or None}
    run.manifest["rounds"][str(r)]["guard"] = entry
    run.save()
    if action != "none":
        run.log({"event": "guard", "round": r, **entry})
        if run.echo is not None:
            run.echo(f"guard: round {r}: {entry['reason']}: "
                     + ("stopping" if action == "stop" else f"going on from {'the SFT model' if best == 'sft' else f'round {best}'}"))
    return entry


def cleanup_checkpoints(run: Run, r: int, keep: str | None = None) -> None:
    """Delete round checkpoints older than the newest `keep_checkpoints` complete ones (never the SFT), but
    the best round's while a guard is on (a rollback goes back to it, and a stopped run ends with it), and
    `keep`, the loss's reference while a refreshed one is a round's checkpoint."""
    complete = distributed.on_main(lambda: [k for k in range(r + 1) if is_checkpoint(run.round_dir(k) / "checkpoint")])
    best = (run.stage(r, "guard") or {}).get("best") if run.config.guard.action != "none" else None
    for k in complete[: -run.config.keep_checkpoints]:
        if k == best or (keep and Path(keep) == run.round_dir(k) / "checkpoint"):
            continue
        run.manifest["rounds"][str(k)]["train"]["cleaned"] = True  # recorded first: a resume must not retrain
        run.save()
        if distributed.is_main():
            shutil.rmtree(run.round_dir(k) / "checkpoint", ignore_errors=True)


def summarize(run: Run) -> dict:
    rounds = sorted(int(k) for k in run.manifest["rounds"] if k != "sft")
    summary: dict = {"rounds": len(rounds)}
    if rounds and (guard := run.stage(rounds[-1], "guard")):
        summary["best_round"] = guard["best"]
    sft_eval = run.dir / "eval" / "sft_heldout.jsonl"
    last = run.round_dir(rounds[-1]) / "heldout.jsonl" if rounds else None
    if sft_eval.exists() and last is not None and last.exists():
        before, after = read_records(sft_eval), read_records(last)
        summary["heldout_sft"] = mean_reward(before)
        summary["heldout_last"] = mean_reward(after)
        summary["heldout_change"] = paired_difference(before, after)
        if (change := instruction_accuracy_change(before, after)) is not None:  # what users measure
            summary["heldout_ifeval"] = {"sft": instruction_accuracy(before), "last": instruction_accuracy(after),
                                         "change": change}
        summary["heldout_length"] = {"sft": length_stats(before), "last": length_stats(after)}
    return summary
