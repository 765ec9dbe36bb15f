"""The orchestrator: rounds of sample -> label -> feedback -> train -> held-out eval, as a resumable state
machine over the run directory (layout in shared/contracts.md).

Every stage writes its output atomically and then marks itself done in `manifest.json` with the output's
hash. On a restart a stage whose output is complete and matches the manifest is skipped; anything else is
redone from its inputs with the same seeds, so a run killed at any moment and started again ends with the
same records as one that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from pathlib import Path

from .config import Config, ConfigError, dump_config
from .evaluate import evaluate_policy, mean_reward, paired_difference
from .faults import crash_point
from .losses import LOSSES
from .models import resolve_model_path, weights_sha256
from .placement import Placement, engine_placement, trainer_on
from .prompts.sources import load_prompts
from .records import atomic_write_text, dumps, file_sha256, read_records, write_json, write_records
from .rewards import make_labeler
from .stages.feedback import binary_feedback, pairwise_feedback
from .stages.label import BATCHES_PER_CHUNK, label_records
from .stages.sample import sample_records
from .stages.train import TrainConfig, is_checkpoint, train_round
from .vllm_engine import SamplerError, VLLMEngine, vllm_missing_reason


class Run:
    """A run directory: its config, manifest and metrics log."""

    def __init__(self, config: Config):
        self.config = config
        self.dir = Path(config.run_dir)
        self.manifest_path = self.dir / "manifest.json"

    def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        saved = self.dir / "config.yaml"
        text = dump_config(self.config)
        if saved.exists() and saved.read_text() != text:
            raise ConfigError(
                f"{saved}: this run directory holds a run with a different configuration; "
                "resume it with the same config or choose another run_dir"
            )
        atomic_write_text(saved, text)
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
        """The manifest entry of a completed stage whose output is still there and unchanged."""
        entry = self.stage(r, name)
        if entry is None or entry.get("status") != "done" or not output.exists():
            return None
        if output.is_file() and file_sha256(output) != entry.get("sha256"):
            return None
        return entry

    def mark_done(self, r: int | str, name: str, output: Path, info: dict) -> dict:
        crash_point(f"mark_done.{name}")
        entry = {"status": "done", "output": str(output.relative_to(self.dir)), **info}
        if output.is_file():
            entry["sha256"] = file_sha256(output)
        self.manifest["rounds"].setdefault(str(r), {})[name] = entry
        self.save()
        self.log({"event": "stage_done", "round": r, "stage": name, **{k: v for k, v in info.items() if k != "summary"}})
        return entry


def run_loop(config: Config, progress: bool = True, echo=print) -> dict:
    """Run (or resume) the whole loop; returns the manifest."""
    placement = None
    if config.sampler.backend == "vllm":  # both checked before any work is done
        if reason := vllm_missing_reason():
            raise SamplerError(reason)
        placement = engine_placement(config.sampler)
    engine = Engine(config, placement)
    try:
        with trainer_on(placement):
            return _run_rounds(config, engine, progress, echo)
    finally:
        engine.close()


class Engine:
    """The run's sampler: None for HF generate, or one vLLM engine started on first use and kept for the
    whole run (it loads each policy's weights in place; see `alignloop.vllm_engine`), on the trainer's
    devices or, with a `placement`, on its own."""

    def __init__(self, config: Config, placement: Placement | None = None):
        self.config = config
        self.placement = placement
        self.vllm: VLLMEngine | None = None

    def __call__(self, policy: str) -> VLLMEngine | None:
        if self.config.sampler.backend != "vllm":
            return None
        if self.vllm is None:
            self.vllm = VLLMEngine(policy, self.config.sampler, self.config.seed, self.config.trust_remote_code,
                                   self.placement)
        return self.vllm

    def sleep(self) -> None:
        if self.vllm is not None:
            self.vllm.sleep()

    def close(self) -> None:
        if self.vllm is not None:
            self.vllm.close()
            self.vllm = None


def _run_rounds(config: Config, engine: Engine, progress: bool, echo) -> dict:
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

    if heldout:
        eval_stage(run, "sft", -1, policy0, heldout, labeler, run.dir / "eval" / "sft_heldout.jsonl",
                   progress and "held-out (SFT)", engine)

    policy = policy0
    resume = None
    r = 0
    while True:
        start, end = r * config.prompts_per_round, min((r + 1) * config.prompts_per_round, len(prompts))
        if start >= end:
            break
        rdir = run.round_dir(r)
        seed = config.seed * 1000 + r
        timings = {}

        # 1. sample
        samples_path = rdir / "samples.jsonl"
        if not (entry := run.done(r, "sample", samples_path)):
            t = time.time()
            samples = sample_records(
                prompts[start:end], policy, n=config.samples_per_prompt, round_index=r, seed=seed,
                temperature=config.sampler.temperature, top_p=config.sampler.top_p,
                max_new_tokens=config.sampler.max_new_tokens, stop=config.sampler.stop,
                batch_size=config.sampler.batch_size, dtype=config.sampler.dtype,
                trust_remote_code=config.trust_remote_code, progress=progress and f"sample r{r:03d}" or None,
                generator=run.policy_id(policy), engine=engine(policy),
            )
            vllm_info = {}
            if engine.vllm is not None:
                vllm_info["engine_workers"] = engine.vllm.workers  # where the samples were made
                if engine.placement is not None:
                    vllm_info["trainer"] = engine.placement.describe()["trainer"]
                if config.sampler.sync_samples:  # a stale engine stops the run here
                    s = config.sampler
                    vllm_info["weight_sync"] = engine.vllm.check_sync(policy, s.sync_tolerance, s.sync_samples,
                                                                      config.trust_remote_code)
            write_records(samples_path, samples)
            entry = run.mark_done(r, "sample", samples_path, {
                "policy": policy, "prompts": end - start, "prompt_slice": [start, end], "count": len(samples),
                "input_sha256": hashlib.sha256("".join(dumps(p) for p in prompts[start:end]).encode()).hexdigest(),
                "seed": seed, "backend": config.sampler.backend, **vllm_info, "seconds": time.time() - t,
            })
        timings["sample"] = entry["seconds"]
        if entry["count"] == 0:
            echo(f"round {r}: no samples; stopping")
            break

        # 2. label
        scored_path = rdir / "scored.jsonl"
        if not (entry := run.done(r, "label", scored_path)):
            t = time.time()
            if hasattr(labeler, "reset_stats"):  # a judge counts parses, failures, tokens and cost per stage
                labeler.reset_stats()
            scored, counts = label_records(read_records(samples_path), labeler, BATCHES_PER_CHUNK * config.labeler.batch_size,
                                           progress and f"label r{r:03d}" or None)
            write_records(scored_path, scored)
            entry = run.mark_done(r, "label", scored_path, {
                "input_sha256": file_sha256(samples_path), "labeler": labeler.name, **getattr(labeler, "stats", {}),
                **counts, "reward": mean_reward(scored), "seconds": time.time() - t,
            })
        timings["label"] = entry["seconds"]

        # 3. feedback
        feedback_path = rdir / "feedback.jsonl"
        if not (entry := run.done(r, "feedback", feedback_path)):
            t = time.time()
            scored = read_records(scored_path)
            fb = config.feedback
            if fb.type == "pairwise":
                feedback = pairwise_feedback(scored, fb.mode, fb.threshold, seed)
            else:
                feedback = binary_feedback(scored, fb.threshold)
            write_records(feedback_path, feedback)
            entry = run.mark_done(r, "feedback", feedback_path, {
                "input_sha256": file_sha256(scored_path), "type": fb.type, "mode": fb.mode,
                "threshold": fb.threshold, "count": len(feedback), "seed": seed, "seconds": time.time() - t,
            })
        timings["feedback"] = entry["seconds"]

        # 4. train (a round without feedback keeps the policy it had); GRPO trains on the scored groups
        checkpoint = rdir / "checkpoint"
        on_groups = LOSSES[config.loss.name].feedback == "scored_groups"
        train_input = scored_path if on_groups else feedback_path
        if (entry["count"] == 0 and not on_groups) or (on_groups and not has_group_signal(read_records(scored_path))):
            entry = run.stage(r, "train") or run.mark_done(r, "train", rdir, {"skipped": "no feedback", "seconds": 0.0, "policy_out": policy})
        elif not ((entry := run.stage(r, "train")) and entry.get("status") == "done"
                  and (entry.get("cleaned") or is_checkpoint(checkpoint))):
            t = time.time()
            engine.sleep()  # on a GPU the engine gives its memory to the trainer until it samples again
            summary = train_round(
                read_records(train_input), policy=policy, reference=reference, out_dir=checkpoint, resume=resume,
                config=_train_config(config), round_index=r, trust_remote_code=config.trust_remote_code,
                progress=progress, log=lambda row: run.log({"event": "train_step", **row}),
            )
            entry = run.mark_done(r, "train", checkpoint, {
                "input_sha256": file_sha256(train_input), "policy_in": policy, "resumed_from": str(resume) if resume else None,
                "policy_out": str(checkpoint), "weights_sha256": weights_sha256(str(checkpoint)),
                "summary": summary, "seconds": time.time() - t,
            })
        timings["train"] = entry["seconds"]
        if "skipped" not in entry:
            policy, resume = str(checkpoint), checkpoint

        # 5. held-out eval of the policy this round produced
        if heldout:
            entry = eval_stage(run, r, r, policy, heldout, labeler, rdir / "heldout.jsonl", progress and f"held-out r{r:03d}",
                               engine)
            timings["eval"] = entry["seconds"]

        write_json(rdir / "metrics.json", round_metrics(run, r, timings))
        cleanup_checkpoints(run, r)
        r += 1

    run.manifest["summary"] = summarize(run)
    run.manifest["status"] = "complete"
    run.save()
    return run.manifest


def eval_stage(run: Run, key: int | str, round_index: int, policy: str, heldout: list[dict], labeler, out: Path,
               progress, engine: Engine) -> dict:
    """Held-out eval of one policy (the SFT model, or a round's checkpoint), done once and recorded."""
    if entry := run.done(key, "eval", out):
        return entry
    t = time.time()
    config = run.config
    scored = evaluate_policy(policy, heldout, labeler, config.sampler, round_index, config.seed,
                             config.trust_remote_code, progress, generator=run.policy_id(policy), engine=engine(policy))
    write_records(out, scored)
    return run.mark_done(key, "eval", out, {"policy": policy, "count": len(scored), "reward": mean_reward(scored),
                                            "seconds": time.time() - t})


def has_group_signal(scored: list[dict]) -> bool:
    """Whether some prompt's samples differ in reward (otherwise every group-relative advantage is 0)."""
    groups: dict[str, set] = {}
    for r in scored:
        if r.get("reward") is not None:
            groups.setdefault(r["prompt_id"], set()).add(r["reward"])
    return any(len(rewards) > 1 for rewards in groups.values())


def _train_config(config: Config) -> TrainConfig:
    o = config.optim
    return TrainConfig(
        loss=config.loss.name, loss_params=config.loss.params, lr=o.lr, weight_decay=o.weight_decay,
        warmup_steps=o.warmup_steps, batch_size=o.batch_size, gradient_accumulation_steps=o.gradient_accumulation_steps,
        epochs=o.epochs, max_grad_norm=o.max_grad_norm, max_length=o.max_length, dtype=o.dtype,
        mixed_precision=o.mixed_precision, seed=config.seed,
    )


def round_metrics(run: Run, r: int, timings: dict) -> dict:
    label, feedback, train = run.stage(r, "label"), run.stage(r, "feedback"), run.stage(r, "train")
    ev = run.stage(r, "eval")
    summary = train.get("summary", {})
    return {
        "round": r, "prompts": run.stage(r, "sample")["prompts"], "samples": run.stage(r, "sample")["count"],
        "unscored": label["failed"], "feedback": feedback["count"], "feedback_type": feedback["type"],
        "train_reward": label["reward"], "heldout_reward": ev["reward"] if ev else None,
        "loss": summary.get("loss"), "accuracy": summary.get("rewards/accuracy"), "seconds": timings,
    }


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


def format_table(run_dir: str | Path) -> str:
    """The per-round table and the held-out change, from a run directory."""
    run_dir = Path(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    rows = []
    head = ("round", "prompts", "samples", "feedback", "train_rwd", "heldout", "loss", "acc",
            "t_sample", "t_label", "t_fb", "t_train", "t_eval")
    sft = manifest["rounds"].get("sft", {}).get("eval")
    if sft:
        rows.append(("SFT", "", "", "", "", f"{sft['reward']:.3f}", "", "", "", "", "", "", f"{sft['seconds']:.0f}"))
    for path in sorted((run_dir / "rounds").glob("r*/metrics.json")):
        m = json.loads(path.read_text())
        s = m["seconds"]
        fmt = lambda v, f="{:.3f}": "" if v is None else f.format(v)  # noqa: E731
        rows.append((
            str(m["round"]), str(m["prompts"]), str(m["samples"]), f"{m['feedback']} {m['feedback_type'][:4]}",
            fmt(m["train_reward"]), fmt(m["heldout_reward"]), fmt(m["loss"], "{:.4f}"), fmt(m["accuracy"], "{:.2f}"),
            *(fmt(s.get(k), "{:.0f}") for k in ("sample", "label", "feedback", "train", "eval")),
        ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    change = manifest.get("summary", {}).get("heldout_change")
    if change and change.get("ci95"):
        lo, hi = change["ci95"]
        lines.append(f"held-out reward, last round minus SFT: {change['mean']:+.3f} "
                     f"(95% CI {lo:+.3f} to {hi:+.3f}, n={change['n']} prompts)")
    return "\n".join(lines)
