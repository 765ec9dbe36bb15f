"""The per-round table: each round's `metrics.json` (built from the manifest) and the table `alignloop run`
prints at the end, from a run directory alone."""

from __future__ import annotations

import json
from pathlib import Path

STAGES = ("sample", "label", "feedback", "train", "eval")


def round_metrics(rounds: dict, r: int) -> dict:
    """Round r's line of the table, from the manifest's `rounds` entries."""
    stages = rounds[str(r)]
    sample, label, feedback, train = (stages[name] for name in STAGES[:4])
    evaluation = stages.get("eval")
    summary = train.get("summary", {})
    return {
        "round": r, "prompts": sample["prompts"], "samples": sample["count"],
        "unscored": label["failed"], "feedback": feedback["count"], "feedback_type": feedback["type"],
        "train_reward": label["reward"], "heldout_reward": evaluation["reward"] if evaluation else None,
        "loss": summary.get("loss"), "accuracy": summary.get("rewards/accuracy"),
        "seconds": {name: stages[name]["seconds"] for name in STAGES if name in stages},
    }


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
    change = manifest.get("summary", {}).get("heldout_change")
    if change and change.get("ci95"):
        lo, hi = change["ci95"]
        lines.append(f"held-out reward, last round minus SFT: {change['mean']:+.3f} "
                     f"(95% CI {lo:+.3f} to {hi:+.3f}, n={change['n']} prompts)")
    return "\n".join(lines)
