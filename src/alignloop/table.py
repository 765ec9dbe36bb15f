"""What a run directory says, for people: each round's `metrics.json` (built from the manifest), the console's
line per finished stage, the table `alignloop run` prints at the end, and `alignloop status`; all from the
run directory alone."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import yaml

STAGES = ("sample", "label", "feedback", "train", "eval")


def round_metrics(rounds: dict, r: int) -> dict:
    """Round r's numbers, from the manifest's `rounds` entries: the table's line, and what the report plots."""
    stages = rounds[str(r)]
    sample, label, feedback, train = (stages[name] for name in STAGES[:4])
    evaluation = stages.get("eval") or {}
    summary = train.get("summary", {})
    return {
        "round": r, "prompts": sample["prompts"], "samples": sample["count"],
        "unscored": label["failed"], "feedback": feedback["count"], "feedback_type": feedback["type"],
        "train_reward": label["reward"], "heldout_reward": evaluation.get("reward"),
        "loss": summary.get("loss"), "accuracy": summary.get("rewards/accuracy"),
        "seconds": {name: stages[name]["seconds"] for name in STAGES if name in stages},
        "train_reward_ci95": label.get("reward_ci95"), "heldout_reward_ci95": evaluation.get("reward_ci95"),
        "heldout_change": evaluation.get("change"), "win_rate": evaluation.get("win_rate"), "kl": evaluation.get("kl"),
        "length": {"train": sample.get("length"), "heldout": evaluation.get("length")},
        "pair_margin": feedback.get("margin"), "heldout_by": evaluation.get("by") or {},
        "tokens": {"sample": sample.get("tokens"), "train": summary.get("tokens"), "eval": evaluation.get("tokens")},
        "heldout_ifeval": evaluation.get("ifeval"), "heldout_ifeval_change": evaluation.get("ifeval_change"),
        "guard": stages.get("guard"),
    }


def stage_line(r: int | str, stage: str, entry: dict) -> str:
    """The console's line for a finished stage: what it made, and how long it took."""
    where = "SFT" if r == "sft" else f"r{int(r):03d}"
    if stage == "sample":
        what = f"{entry['prompts']} prompts -> {entry['count']} samples"
    elif stage == "label":
        what = f"{entry.get('scored', 0)} scored, {entry.get('failed', 0)} unscored, mean reward {_number(entry.get('reward'))}"
    elif stage == "feedback":
        what = f"{entry['count']} {entry['type']} records"
    elif stage == "train":
        summary = entry.get("summary") or {}
        what = entry.get("skipped") or f"{summary.get('steps', 0)} steps, loss {_number(summary.get('loss'), '{:.4f}')}"
    else:
        change = entry.get("change") or {}
        what = f"held-out reward {_number(entry.get('reward'))}" + (
            f" ({change['mean']:+.3f} vs SFT, win rate {entry['win_rate']['mean']:.2f})" if change.get("mean") is not None else "")
        if (accuracy := (entry.get("ifeval") or {}).get("instruction", {})).get("mean") is not None:
            what += f"; IFEval instruction accuracy {accuracy['mean']:.3f}"
    return f"{where} {stage:<8} {what}  ({entry.get('seconds', 0.0):.1f} s)"


def _number(value, spec: str = "{:.3f}") -> str:
    return "n/a" if value is None else spec.format(value)


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
            *(fmt(s.get(k), "{:.0f}") for k in STAGES),
        ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    for path in sorted((run_dir / "rounds").glob("r*/metrics.json")):
        guard = json.loads(path.read_text()).get("guard") or {}
        if guard.get("action", "none") != "none":
            lines.append(f"guard, round {path.parent.name[1:].lstrip('0') or '0'}: {guard['action']} ({guard['reason']})")
    summary = manifest.get("summary", {})
    change = summary.get("heldout_change")
    if change and change.get("ci95"):
        lo, hi = change["ci95"]
        lines.append(f"held-out reward, last round minus SFT: {change['mean']:+.3f} "
                     f"(95% CI {lo:+.3f} to {hi:+.3f}, n={change['n']} prompts)")
    ifeval = (summary.get("heldout_ifeval") or {}).get("change", {}).get("instruction")
    if ifeval and ifeval.get("ci95"):
        lo, hi = ifeval["ci95"]
        before, after = (summary["heldout_ifeval"][k]["instruction"]["mean"] for k in ("sft", "last"))
        lines.append(f"held-out IFEval instruction accuracy (strict): {before:.3f} -> {after:.3f}, {ifeval['mean']:+.3f} "
                     f"(95% CI {lo:+.3f} to {hi:+.3f})")
    length = summary.get("heldout_length") or {}
    if (length.get("sft") or {}).get("words") and (length.get("last") or {}).get("words") is not None:
        before, after = length["sft"], length["last"]
        lines.append(f"held-out answer length: {before['words']:.0f} -> {after['words']:.0f} words "
                     f"({after['words'] / before['words']:.0%} of the SFT model's), cut at the cap "
                     f"{before['truncated']:.0%} -> {after['truncated']:.0%}")
    return "\n".join(lines)


def format_status(run_dir: str | Path, now: float | None = None) -> str:
    """`alignloop status`: whether the run is running, rounds done, the stage in progress (or next), prompts
    left, time spent and an estimate of the time left, and the last held-out numbers. Works while the run
    runs: it reads only what the run has recorded."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    now = time.time() if now is None else now
    rounds = manifest.get("rounds", {})
    plan = manifest.get("plan") or {}
    per_round = config.get("prompts_per_round", 48)
    total_rounds = plan.get("rounds") or -(-config.get("total_prompts", 144) // per_round)
    done = [int(k) for k, stages in rounds.items() if k != "sft" and _round_done(stages, config)]
    lines = [f"run {run_dir}: {_run_state(manifest)}"]
    lines.append(f"rounds done: {len(done)} of {total_rounds}; prompts left: "
                 f"{max(0, (plan.get('prompts') or config.get('total_prompts', 0)) - sum(rounds[str(k)]['sample']['prompts'] for k in done))}")
    if manifest.get("status") not in ("complete", "stopped"):
        current = len(done)
        if config.get("heldout") is not None and "eval" not in rounds.get("sft", {}):
            lines.append("now: held-out evaluation of the SFT model")
        else:
            stages = rounds.get(str(current), {})
            stage = next((s for s in STAGES if s in _stages_of(config) and stages.get(s, {}).get("status") != "done"), "eval")
            lines.append(f"now: round {current}, {stage}")
    spent = sum(e.get("seconds", 0.0) for stages in rounds.values() for e in stages.values() if isinstance(e, dict))
    started = manifest.get("started") or (manifest.get("process") or {}).get("started")
    line = f"stage time: {_duration(spent)}"
    if started:
        line += f"; since the first start: {_duration(now - started)}"
    if done and manifest.get("status") not in ("complete", "stopped"):
        mean = sum(sum(e.get("seconds", 0.0) for e in rounds[str(k)].values() if isinstance(e, dict)) for k in done) / len(done)
        in_progress = sum(e.get("seconds", 0.0) for e in rounds.get(str(len(done)), {}).values() if isinstance(e, dict))
        line += f"; left: about {_duration(max(0.0, mean * (total_rounds - len(done)) - in_progress))}"
    lines.append(line)
    sft = rounds.get("sft", {}).get("eval")
    evaluated = [k for k in done if rounds[str(k)].get("eval")]
    if sft and evaluated:
        last = rounds[str(evaluated[-1])]["eval"]
        change, wins = last.get("change") or {}, last.get("win_rate") or {}
        text = f"held-out reward: SFT {_number(sft.get('reward'))}, round {evaluated[-1]} {_number(last.get('reward'))}"
        if change.get("ci95"):
            text += f" ({change['mean']:+.3f}, 95% CI {change['ci95'][0]:+.3f} to {change['ci95'][1]:+.3f})"
        if wins.get("mean") is not None:
            text += f"; win rate vs SFT {wins['mean']:.2f}"
        lines.append(text)
    elif sft:
        lines.append(f"held-out reward: SFT {_number(sft.get('reward'))}")
    guards = [(k, rounds[str(k)]["guard"]) for k in done if (rounds[str(k)].get("guard") or {}).get("action", "none") != "none"]
    for k, guard in guards:
        lines.append(f"guard: round {k}: {guard['action']} ({guard['reason']})")
    return "\n".join(lines)


def _stages_of(config: dict) -> tuple[str, ...]:
    return STAGES if config.get("heldout", True) is not None else STAGES[:4]


def _round_done(stages: dict, config: dict) -> bool:
    return all(stages.get(s, {}).get("status") == "done" for s in _stages_of(config))


def _run_state(manifest: dict) -> str:
    """complete, stopped by the guard, running (where this machine can tell), or not running."""
    if manifest.get("status") == "complete":
        return "complete"
    if manifest.get("status") == "stopped":
        return "stopped by the guard"
    process = manifest.get("process") or {}
    if process.get("host") != socket.gethostname():
        return f"in progress (on {process.get('host', 'another machine')}, or stopped there)" if process else "in progress"
    try:
        os.kill(process["pid"], 0)
        return f"running (process {process['pid']})"
    except (OSError, KeyError):
        return "not running (stopped before the end); the same command resumes it"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min" if seconds >= 3600 else f"{seconds // 60} min {seconds % 60:02d} s"
