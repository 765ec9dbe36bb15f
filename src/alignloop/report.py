"""`alignloop report RUN_DIR`: one self-contained HTML page about a run, with its plots.

`write_report(run_dir)` reads the run directory (config.yaml, manifest.json, metrics.jsonl, each round's
metrics.json and held-out answers) and writes `RUN_DIR/report/index.html`, plus each plot as a PNG beside it.
The page embeds the PNGs as base64 data URIs and has inline CSS only (no script, no font, no link), so it
opens anywhere with nothing beside it and no network.

It works on a run in progress (later rounds absent, a round half done) and on run directories written before
a field existed: a number that metrics.json lacks is taken from the manifest, else computed from the records
where it can be; a plot with no data is left out, with a note on the page saying why. Nothing in the run
directory other than `report/` is ever modified: the page is built in `report.tmp/` and swapped into place.

Reading top to bottom: loading the run (`load_run`, `round_row`), one function per plot (`plot_*`), the HTML
(`render_html`), and `write_report`, which ties them together.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import matplotlib
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator, PercentFormatter

from . import __version__
from .records import read_records
from .stats import instruction_accuracy, length_stats, mean_with_interval, pair_margin, paired_difference

STAGES = ("sample", "label", "feedback", "train", "eval")
TOKEN_STAGES = ("sample", "train", "eval")
EXAMPLE_PROMPTS = 3  # held-out prompts shown per round, the first by prompt_id, the same every round
MAX_ANSWER_CHARS = 3000  # an answer longer than this is cut on the page (the record keeps it whole)

# matplotlib's default colour cycle, named for what each series is (the same series, the same colour)
BLUE, ORANGE, GREEN, RED, PURPLE, BROWN, PINK, GREY = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
HELDOUT, TRAIN, SFT = BLUE, ORANGE, GREY
STAGE_COLORS = dict(zip(STAGES, (BLUE, ORANGE, GREEN, RED, PURPLE)))
STYLE = {  # applied with rc_context while the figures are drawn, so no global matplotlib state changes
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
    "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.alpha": 0.3, "legend.frameon": False,
}
DPI = 100
WIDTH, WIDE_WIDTH, HEIGHT = 5.6, 11.4, 3.3  # inches: one grid column, the page's width


# ---------------------------------------------------------------- loading the run directory

@dataclass
class RunData:
    """What the page shows, read from a run directory. `rounds` has one row per round the manifest knows
    (finished or not), with the keys of a round's metrics.json; `sft` the SFT model's held-out evaluation."""

    dir: Path
    config: dict
    manifest: dict
    sft: dict | None
    rounds: list[dict]
    steps: list[dict]  # train_step events, the last logged for each optimizer step
    last_event: float | None  # the time of metrics.jsonl's last event
    sft_answers: list[dict]  # eval/sft_heldout.jsonl
    answers: dict[int, list[dict]]  # round -> rounds/rNNN/heldout.jsonl
    problems: list[str] = field(default_factory=list)  # files that could not be read

    @property
    def name(self) -> str:
        return self.dir.resolve().name

    @property
    def finished(self) -> list[dict]:
        return [row for row in self.rounds if row["finished"]]

    @property
    def status(self) -> str:
        return {"complete": "complete", "stopped": "stopped by the guard"}.get(self.manifest.get("status"), "running")

    @property
    def guards(self) -> list[dict]:
        """The rounds after which the guard acted (stop or rollback), each {"round", "action", "best", "reason"}."""
        return [{"round": row["round"], **row["guard"]} for row in self.rounds
                if isinstance(row.get("guard"), dict) and row["guard"].get("action") not in (None, "none")]

    @property
    def labeler_name(self) -> str:
        labeler = self.config.get("labeler") or {}
        name = labeler.get("function") or labeler.get("model") or labeler.get("path") or labeler.get("kind") or "labeler"
        return str(name).rsplit(":", 1)[-1].rsplit("/", 1)[-1]


class Records:
    """The run's record files, each read at most once per report; a missing or unreadable file reads as []."""

    def __init__(self, run_dir: Path, problems: list[str]):
        self.dir, self.problems, self.cache = run_dir, problems, {}

    def __call__(self, relative: str) -> list[dict]:
        if relative not in self.cache:
            path = self.dir / relative
            try:
                self.cache[relative] = read_records(path) if path.is_file() else []
            except (ValueError, OSError) as e:  # a record file is written atomically; this is a damaged one
                self.problems.append(f"{relative}: {e}")
                self.cache[relative] = []
        return self.cache[relative]


def load_run(run_dir: str | Path) -> RunData:
    """Everything the page needs from `run_dir`, tolerant of a run in progress and of older run directories."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    problems: list[str] = []
    config = read_json_or_yaml(run_dir / "config.yaml", problems) or {}
    manifest = read_json_or_yaml(run_dir / "manifest.json", problems) or {}
    manifest.setdefault("rounds", {})
    records = Records(run_dir, problems)
    sft_answers = records("eval/sft_heldout.jsonl")

    indices = {int(k) for k in manifest["rounds"] if k.isdigit()}
    indices |= {int(p.parent.name[1:]) for p in run_dir.glob("rounds/r*/metrics.json") if p.parent.name[1:].isdigit()}
    rounds = []
    for r in sorted(indices):
        metrics = read_json_or_yaml(run_dir / "rounds" / f"r{r:03d}" / "metrics.json", problems) or {}
        rounds.append(round_row(r, manifest["rounds"].get(str(r), {}), metrics, records, sft_answers))
    answers = {row["round"]: records(f"rounds/r{row['round']:03d}/heldout.jsonl") for row in rounds}
    sft_entry = manifest["rounds"].get("sft", {}).get("eval")
    sft = sft_row(sft_entry, sft_answers) if sft_entry or sft_answers else None
    steps, last_event = read_events(run_dir / "metrics.jsonl")
    return RunData(run_dir, config, manifest, sft, rounds, steps, last_event, sft_answers,
                   {r: a for r, a in answers.items() if a}, problems)


def read_json_or_yaml(path: Path, problems: list[str]) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (ValueError, OSError, yaml.YAMLError) as e:
        problems.append(f"{path.name}: {e}")
        return None
    return data if isinstance(data, dict) else None


def read_events(path: Path) -> tuple[list[dict], float | None]:
    """metrics.jsonl's train_step events, one per global optimizer step (the last logged: a round killed and
    redone logs its steps again), and the time of the last event. Other events are skipped, and so is a line
    a killed run left half written."""
    steps: dict[int, dict] = {}
    last = None
    if not path.is_file():
        return [], None
    text = path.read_text(encoding="utf-8", errors="replace")
    for n, line in enumerate(text.split("\n")):  # not splitlines(): see records.read_located
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        last = event["time"] if isinstance(event.get("time"), (int, float)) else last
        if event.get("event") == "train_step":
            steps[event.get("step", n)] = event
    return [steps[k] for k in sorted(steps)], last


def round_row(r: int, stages: dict, metrics: dict, records: Records, sft_answers: list[dict]) -> dict:
    """Round r's numbers, with the keys of its metrics.json: from metrics.json where the round is finished,
    else from the manifest's stage entries, else computed from the round's records."""
    sample, label, feedback, train, evaluation = (stages.get(name) or {} for name in STAGES)
    summary = train.get("summary") or {}
    rdir = f"rounds/r{r:03d}"
    scored = lambda: records(f"{rdir}/scored.jsonl") or records(f"{rdir}/samples.jsonl")  # noqa: E731
    heldout = lambda: records(f"{rdir}/heldout.jsonl")  # noqa: E731
    row = {k: v for k, v in metrics.items() if v is not None}

    def fill(key: str, compute: Callable[[], object]) -> None:
        if row.get(key) is None:
            row[key] = compute()

    fill("round", lambda: r)
    fill("prompts", lambda: sample.get("prompts"))
    fill("samples", lambda: sample.get("count"))
    fill("unscored", lambda: label.get("failed"))
    fill("feedback", lambda: feedback.get("count"))
    fill("feedback_type", lambda: feedback.get("type"))
    fill("train_reward", lambda: label.get("reward"))
    fill("heldout_reward", lambda: evaluation.get("reward"))
    fill("loss", lambda: summary.get("loss"))
    fill("accuracy", lambda: summary.get("rewards/accuracy"))
    fill("seconds", lambda: {name: stages[name]["seconds"] for name in STAGES
                             if isinstance(stages.get(name), dict) and "seconds" in stages[name]})
    fill("train_reward_ci95", lambda: label.get("reward_ci95") or (mean_with_interval(rewards(scored()))["ci95"] if label else None))
    fill("heldout_reward_ci95", lambda: evaluation.get("reward_ci95") or (mean_with_interval(rewards(heldout()))["ci95"] if evaluation else None))
    fill("heldout_change", lambda: evaluation.get("change") or (paired_difference(sft_answers, heldout()) if evaluation and sft_answers else None))
    fill("win_rate", lambda: evaluation.get("win_rate"))
    fill("kl", lambda: evaluation.get("kl"))
    fill("heldout_ifeval", lambda: evaluation.get("ifeval") or instruction_accuracy(heldout() if evaluation else []))
    fill("length", lambda: {
        "train": sample.get("length") or (length_stats(scored()) if sample and scored() else None),
        "heldout": evaluation.get("length") or (length_stats(heldout()) if evaluation and heldout() else None)})
    fill("pair_margin", lambda: feedback.get("margin") if "margin" in feedback else
         pair_margin(records(f"{rdir}/feedback.jsonl")) if feedback.get("type") == "pairwise" else None)
    fill("heldout_by", lambda: evaluation.get("by") or reward_by_labeler(heldout() if evaluation else []))
    fill("tokens", lambda: {
        "sample": sample["tokens"] if "tokens" in sample else token_sum(scored()) if sample else None,
        "train": summary.get("tokens"),
        "eval": evaluation["tokens"] if "tokens" in evaluation else token_sum(heldout()) if evaluation else None})
    fill("guard", lambda: stages.get("guard"))
    row["finished"] = bool(metrics)
    row["stages_done"] = [name for name in STAGES if isinstance(stages.get(name), dict) and stages[name].get("status", "done") == "done"]
    return row


def sft_row(entry: dict | None, answers: list[dict]) -> dict:
    """The SFT model's held-out evaluation, as a round's held-out numbers."""
    entry = entry or {}
    return {"reward": entry.get("reward", mean_with_interval(rewards(answers))["mean"]),
            "reward_ci95": entry.get("reward_ci95") or mean_with_interval(rewards(answers))["ci95"],
            "length": entry.get("length") or (length_stats(answers) if answers else None),
            "tokens": entry.get("tokens", token_sum(answers)), "seconds": entry.get("seconds"),
            "by": entry.get("by") or reward_by_labeler(answers), "count": entry.get("count", len(answers)),
            "ifeval": entry.get("ifeval") or instruction_accuracy(answers)}


def rewards(records: list[dict]) -> list[float]:
    return [r["reward"] for r in records if isinstance(r.get("reward"), (int, float))]


def token_sum(records: list[dict]) -> int | None:
    tokens = [r["num_tokens"] for r in records if isinstance(r.get("num_tokens"), int)]
    return sum(tokens) if tokens else None


def reward_by_labeler(answers: list[dict]) -> dict:
    """{name: {"reward", "reward_ci95"}} from the held-out answers' `eval_rewards` (extra eval labelers)."""
    names = sorted({name for a in answers for name in (a.get("eval_rewards") or {})})
    by = {}
    for name in names:
        summary = mean_with_interval([a["eval_rewards"][name] for a in answers
                                      if isinstance((a.get("eval_rewards") or {}).get(name), (int, float))])
        by[name] = {"reward": summary["mean"], "reward_ci95": summary["ci95"]}
    return by


# ---------------------------------------------------------------- the plots

@dataclass
class Plot:
    """A plot of the page: its figure (then its PNG), or why it is left out (`missing`). `wide` plots take the
    page's width."""

    id: str
    title: str
    caption: str = ""
    figure: Figure | None = None
    missing: str | None = None
    wide: bool = False
    png: bytes = b""


def new_figure(panels: int = 1, wide: bool = False, height: float = HEIGHT) -> tuple[Figure, list]:
    """A figure with its own Agg canvas (never pyplot's global figure manager) and its axes."""
    fig = Figure(figsize=(WIDE_WIDTH if wide else WIDTH, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, panels, squeeze=False)[0])


def round_axis(ax, xs: list[int], sft: bool = False) -> None:
    """Rounds on the x axis as integers (at most ~12 labels), with round -1 named "SFT"."""
    ticks = sorted(set(xs) | ({-1} if sft else set()))
    if len(ticks) > 12:
        step = math.ceil(len(ticks) / 12)
        ticks = ticks[:: step]
    ax.set_xticks(ticks, ["SFT" if t == -1 else str(t) for t in ticks])
    ax.set_xlim(min(ticks) - 0.5, max(ticks) + 0.5)
    ax.set_xlabel("round")


def series(rows: list[dict], get: Callable[[dict], object]) -> tuple[list[int], list]:
    """(rounds, values) of the rows where `get(row)` has a value."""
    xs, ys = [], []
    for row in rows:
        try:
            value = get(row)
        except (KeyError, TypeError, IndexError, AttributeError):  # absent, or null, in this run's rows
            value = None
        if value is not None:
            xs.append(row["round"]), ys.append(value)
    return xs, ys


def with_interval(ax, xs: list[int], means: list[float], cis: list, color: str, label: str, band: bool = True) -> None:
    """A line of means, with its 95% intervals as error bars (and a light band between them)."""
    lo = [m - ci[0] if ci else 0.0 for m, ci in zip(means, cis)]
    hi = [ci[1] - m if ci else 0.0 for m, ci in zip(means, cis)]
    ax.errorbar(xs, means, yerr=[lo, hi], color=color, marker="o", markersize=5, linewidth=2, capsize=4, label=label)
    if band and len(xs) > 1 and any(cis):
        ax.fill_between(xs, [m - d for m, d in zip(means, lo)], [m + d for m, d in zip(means, hi)], color=color, alpha=0.12, linewidth=0)


def mark_guards(ax, run: RunData) -> None:
    """A red vertical line, labelled, at each round after which the guard stopped the run or rolled it back."""
    for guard in run.guards:
        label = f"guard: {guard_text(guard)}"
        ax.axvline(guard["round"], color=RED, linestyle=":", linewidth=1.5)
        ax.annotate(label, (guard["round"], 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                    textcoords="offset points", color=RED, fontsize=8, va="top", rotation=90)


def plot_reward(run: RunData) -> Plot:
    plot = Plot("reward", "Reward per round",
                "Mean reward under the run's labeler: held-out answers (greedy, the same prompts every round) and "
                "the round's training samples, with 95% intervals; the SFT model's held-out reward as round \"SFT\" "
                "and the dashed reference line.")
    held_x, held = series(run.rounds, lambda row: (row["heldout_reward"], row.get("heldout_reward_ci95"))
                          if row["heldout_reward"] is not None else None)
    train_x, train = series(run.rounds, lambda row: (row["train_reward"], row.get("train_reward_ci95"))
                            if row["train_reward"] is not None else None)
    if not held_x and not train_x:
        plot.missing = "no round has a reward yet (no round labeled)"
        return plot
    fig, (ax,) = new_figure()
    if run.sft and run.sft["reward"] is not None:
        sft_ci = run.sft["reward_ci95"]
        ax.axhline(run.sft["reward"], color=SFT, linestyle="--", linewidth=1.2, label="SFT held-out")
        with_interval(ax, [-1], [run.sft["reward"]], [sft_ci], SFT, None, band=False)
    for xs, points, color, label in ((held_x, held, HELDOUT, "held-out"), (train_x, train, TRAIN, "train (round's samples)")):
        if xs:
            with_interval(ax, xs, [mean for mean, _ in points], [ci for _, ci in points], color, label)
    round_axis(ax, held_x + train_x, sft=bool(run.sft and run.sft["reward"] is not None))
    mark_guards(ax, run)
    ax.set_ylabel("reward")
    ax.set_title(f"Reward ({run.labeler_name})")
    ax.legend(loc="best")
    plot.figure = fig
    return plot


def plot_win_rate(run: RunData) -> Plot:
    plot = Plot("win_rate", "Win rate against SFT",
                "Share of held-out prompts on which the round's answer beats the SFT model's under the run's "
                "labeler, with its 95% interval; 0.5 is a draw.")
    xs, wins = series(run.rounds, lambda row: row["win_rate"] if row["win_rate"].get("mean") is not None else None)
    if not xs:
        plot.missing = "no win rate recorded (the manifest's eval \"win_rate\", written by newer versions, with held-out prompts)"
        return plot
    fig, (ax,) = new_figure()
    ax.axhline(0.5, color=SFT, linestyle="--", linewidth=1.2, label="draw (0.5)")
    with_interval(ax, xs, [w["mean"] for w in wins], [w.get("ci95") for w in wins], HELDOUT, "win rate vs SFT")
    round_axis(ax, xs)
    mark_guards(ax, run)
    share_axis(ax, "win rate", "Held-out win rate against the SFT model", legend="lower right")
    plot.figure = fig
    return plot


def share_axis(ax, ylabel: str, title: str, legend: str) -> None:
    """A y axis of shares from 0 to 100%, with its label, the plot's title and the legend."""
    ax.set_ylim(-0.03, 1.03)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc=legend)


def plot_length(run: RunData) -> Plot:
    plot = Plot("length", "Response length",
                "Mean length of the held-out answers and of the round's training samples, in tokens and in words, "
                "and the share cut at max_new_tokens; dashed: the SFT model's held-out answers.", wide=True)
    get = lambda part, key: series(run.rounds, lambda row: row["length"][part][key])  # noqa: E731
    panels = [("tokens", "tokens", "mean tokens"), ("words", "words", "mean words"), ("truncated", "cut at max_new_tokens", "share")]
    if not any(get(part, key)[0] for part in ("heldout", "train") for key, _, _ in panels):
        plot.missing = "no response lengths (neither metrics.json's \"length\" nor num_tokens/output in the records)"
        return plot
    fig, axes = new_figure(3, wide=True)
    sft_length = (run.sft or {}).get("length") or {}
    xs_all = []
    for ax, (key, title, ylabel) in zip(axes, panels):
        for part, color, label in (("heldout", HELDOUT, "held-out"), ("train", TRAIN, "train")):
            xs, ys = get(part, key)
            xs_all += xs
            if xs:
                ax.plot(xs, ys, color=color, marker="o", markersize=5, linewidth=2, label=label)
        if sft_length.get(key) is not None:
            ax.axhline(sft_length[key], color=SFT, linestyle="--", linewidth=1.2, label="SFT held-out")
        if key == "truncated":
            ax.set_ylim(0, 1.05)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        else:
            ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    for ax in axes:
        round_axis(ax, xs_all)
    axes[0].legend(loc="lower left")
    plot.figure = fig
    return plot


def plot_kl(run: RunData) -> Plot:
    plot = Plot("kl", "KL to the reference",
                "KL of the round's policy from the reference (the SFT model) along its held-out answers: per answer, the "
                "sum over its tokens of the KL between the two next-token distributions (on the first eval.kl_answers answers).")
    xs, kls = series(run.rounds, lambda row: row["kl"])
    if not xs:
        plot.missing = "no held-out KL recorded (the manifest's eval \"kl\", written by newer versions)"
        return plot
    fig, (ax,) = new_figure()
    ax.plot(xs, kls, color=HELDOUT, marker="o", markersize=6, linewidth=2, label="KL(policy ‖ reference)")
    ax.axhline(0, color=SFT, linewidth=0.8)
    round_axis(ax, xs)
    mark_guards(ax, run)
    ax.set_ylabel("nats per answer")
    ax.set_title("Held-out KL to the reference")
    ax.legend(loc="upper left")
    plot.figure = fig
    return plot


def plot_pairs(run: RunData) -> Plot:
    plot = Plot("pairs", "Feedback per round",
                "Feedback records made from each round's scored samples (bars) and, for pairs, the mean reward "
                "margin |reward_A - reward_B| (line, right axis).")
    xs, counts = series(run.rounds, lambda row: row["feedback"])
    if not xs:
        plot.missing = "no feedback recorded yet"
        return plot
    kinds = sorted({row.get("feedback_type") for row in run.rounds if row.get("feedback_type")})
    fig, (ax,) = new_figure()
    bars = ax.bar(xs, counts, color=BLUE, width=0.6, label=f"{'/'.join(kinds) or 'feedback'} records")
    ax.bar_label(bars, label_type="center", fontsize=8, color="white")
    ax.set_ylabel("records")
    ax.set_ylim(0, max(counts) * 1.4 + 1)  # room for the legend above the bars
    ax.grid(axis="x", visible=False)
    handles = [bars]
    margin_x, margins = series(run.rounds, lambda row: row["pair_margin"])
    if margin_x:
        twin = ax.twinx()
        twin.spines["right"].set_visible(True)
        (line,) = twin.plot(margin_x, margins, color=ORANGE, marker="o", markersize=6, linewidth=2, label="mean pair margin")
        twin.set_ylim(0, max(margins) * 1.4 or 1)
        twin.set_ylabel("mean |reward difference|")
        twin.grid(False)
        handles.append(line)
    round_axis(ax, xs)
    ax.set_title("Feedback per round")
    ax.legend(handles=handles, labels=[h.get_label() for h in handles], loc="upper left", ncols=2)
    plot.figure = fig
    return plot


def plot_train_steps(run: RunData) -> Plot:
    plot = Plot("train_steps", "Training, per optimizer step",
                "The loss, the preference accuracy (rewards/accuracy) and the gradient norm (before clipping) at "
                "each optimizer step, from metrics.jsonl; dotted lines separate the rounds.", wide=True)
    if not run.steps:
        plot.missing = "no optimizer steps logged yet (metrics.jsonl has no train_step event)"
        return plot
    steps = [event.get("step", i + 1) for i, event in enumerate(run.steps)]
    segments = []  # [round, first step, last step] of each stretch of steps of one round
    for step, event in zip(steps, run.steps):
        if segments and segments[-1][0] == event.get("round"):
            segments[-1][2] = step
        else:
            segments.append([event.get("round"), step, step])
    boundaries = [(a[2] + b[1]) / 2 for a, b in itertools.pairwise(segments)]
    fig, axes = new_figure(3, wide=True)
    for ax, key, title in zip(axes, ("loss", "rewards/accuracy", "grad_norm"), ("loss", "accuracy", "grad norm")):
        xs = [step for step, event in zip(steps, run.steps) if isinstance(event.get(key), (int, float))]
        ys = [event[key] for event in run.steps if isinstance(event.get(key), (int, float))]
        if xs:
            ax.plot(xs, ys, color=BLUE, linewidth=1.5, marker="o" if len(xs) <= 60 else None, markersize=3)
        else:
            ax.text(0.5, 0.5, f"no {key} logged", transform=ax.transAxes, ha="center", color=GREY)
        for x in boundaries:
            ax.axvline(x, color=GREY, linestyle=":", linewidth=1)
        if key == "rewards/accuracy":
            ax.set_ylim(-0.03, 1.03)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        top = ax.secondary_xaxis("top")  # the round of each stretch of steps, named above it
        named = segments[:: math.ceil(len(segments) / 12)]  # at most ~12 names
        top.set_xticks([(first + last) / 2 for _, first, last in named],
                       ["" if r is None else f"r{r}" for r, _, _ in named], fontsize=7.5, color=GREY)
        top.tick_params(length=0, pad=1)
        top.spines["top"].set_visible(False)
    plot.figure = fig
    return plot


def plot_stages(run: RunData) -> Plot:
    plot = Plot("stages", "Time and tokens per stage",
                "Wall-clock seconds of each stage in each round (stacked), and the tokens each stage processed: "
                "generated while sampling, trained on, generated for the held-out evaluation.", wide=True)
    xs, seconds = series(run.rounds, lambda row: row["seconds"] or None)
    if not xs:
        plot.missing = "no stage has finished yet"
        return plot
    fig, (ax, ax_tokens) = new_figure(2, wide=True)
    bottom = [0.0] * len(xs)
    for stage in STAGES:
        values = [s.get(stage) or 0.0 for s in seconds]
        if any(values):
            ax.bar(xs, values, bottom=bottom, color=STAGE_COLORS[stage], width=0.6, label=stage)
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("seconds")
    ax.set_title("Seconds per stage")
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    round_axis(ax, xs)
    token_x, tokens = series(run.rounds, lambda row: row["tokens"] if any(v for v in row["tokens"].values()) else None)
    present = [stage for stage in TOKEN_STAGES if any(t.get(stage) for t in tokens)]
    if present:
        width = 0.8 / len(present)
        for i, stage in enumerate(present):
            offset = (i - (len(present) - 1) / 2) * width
            ax_tokens.bar([x + offset for x in token_x], [t.get(stage) or 0 for t in tokens], width=width,
                          color=STAGE_COLORS[stage], label=stage)
        ax_tokens.set_title("Tokens per stage" + ("" if len(present) == len(TOKEN_STAGES) else
                                                  f" (no {', '.join(s for s in TOKEN_STAGES if s not in present)} tokens recorded)"))
        ax_tokens.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax_tokens.yaxis.set_major_formatter(EngFormatter(sep=""))
        round_axis(ax_tokens, token_x)
    else:
        ax_tokens.text(0.5, 0.5, "no token counts recorded", transform=ax_tokens.transAxes, ha="center", color=GREY)
        ax_tokens.set_title("Tokens per stage")
    ax_tokens.set_ylabel("tokens")
    ax_tokens.grid(axis="x", visible=False)
    plot.figure = fig
    return plot


def plot_heldout_by(run: RunData) -> Plot | None:
    """None (no plot, no note) when the run has no extra eval labelers."""
    plot = Plot("heldout_by", "Held-out reward by labeler",
                "Held-out reward per round under each extra evaluation labeler (eval.labelers), beside the run's "
                "own labeler, which the policy was trained against: a proxy pulling away from the others shows "
                "reward hacking. Each labeler has its own scale; SFT at round \"SFT\".", wide=True)
    names = sorted({name for row in run.rounds for name in (row.get("heldout_by") or {})})
    if not names:
        if (run.config.get("eval") or {}).get("labelers"):
            plot.missing = "eval.labelers is set but no round has their held-out rewards yet"
            return plot
        return None
    # one panel per labeler (each has its own scale), or the extra ones together when there are many
    panels = [("run", [None])] + ([(name, [name]) for name in names] if len(names) <= 3 else [("extra", names)])
    fig, axes = new_figure(len(panels), wide=True)
    sft = run.sft or {}
    for ax, (title, members) in zip(axes, panels):
        for name in members:
            if name is None:  # the run's own labeler
                xs, points = series(run.rounds, lambda row: (row["heldout_reward"], row.get("heldout_reward_ci95")))
                at_sft = (sft.get("reward"), sft.get("reward_ci95"))
                color, label = BLUE, f"{run.labeler_name} (trained on)"
            else:
                xs, points = series(run.rounds, lambda row, name=name: (row["heldout_by"][name]["reward"],
                                                                        row["heldout_by"][name].get("reward_ci95")))
                by = (sft.get("by") or {}).get(name) or {}
                at_sft = (by.get("reward"), by.get("reward_ci95"))
                color, label = (ORANGE, GREEN, RED, PURPLE, BROWN, PINK)[names.index(name) % 6], name
            kept = [(x, p) for x, p in zip(xs, points) if p[0] is not None]
            if at_sft[0] is not None:
                kept.insert(0, (-1, at_sft))
            if kept:
                with_interval(ax, [x for x, _ in kept], [p[0] for _, p in kept], [p[1] for _, p in kept], color, label)
        ax.set_title(f"{run.labeler_name} (the run's labeler)" if title == "run" else "extra eval labelers" if title == "extra"
                     else f"{title} (eval labeler)")
        ax.set_ylabel("held-out reward")
        if len(members) > 1:  # a panel of one labeler is named by its title
            ax.legend(loc="best")
        round_axis(ax, [row["round"] for row in run.rounds], sft=bool(sft))
        mark_guards(ax, run)
    plot.figure = fig
    return plot


def plot_ifeval(run: RunData) -> Plot | None:
    """None (no plot, no note) when the held-out prompts carry no IFEval instructions."""
    plot = Plot("ifeval", "IFEval accuracy",
                "IFEval's strict checks on the held-out answers, whatever the run's labeler: instruction-level "
                "accuracy (instructions followed / all) and prompt-level accuracy (prompts whose every instruction "
                "is followed), with 95% intervals over prompts; the SFT model's at round \"SFT\" and dashed.")
    levels = [("instruction", HELDOUT, "instruction-level"), ("prompt", TRAIN, "prompt-level")]
    sft = (run.sft or {}).get("ifeval") or {}
    drawn = [(level, color, label, *series(run.rounds, lambda row, level=level: row["heldout_ifeval"][level]
                                           if row["heldout_ifeval"][level]["mean"] is not None else None))
             for level, color, label in levels]
    if not any(xs for _, _, _, xs, _ in drawn) and not sft:
        return None
    fig, (ax,) = new_figure()
    for level, color, label, xs, points in drawn:
        at_sft = sft.get(level) or {}
        if at_sft.get("mean") is not None:
            ax.axhline(at_sft["mean"], color=color, linestyle="--", linewidth=1, alpha=0.7)
            xs, points = [-1] + xs, [at_sft] + points
        if xs:
            with_interval(ax, xs, [p["mean"] for p in points], [p.get("ci95") for p in points], color, label)
    round_axis(ax, [row["round"] for row in run.rounds], sft=bool(sft))
    mark_guards(ax, run)
    share_axis(ax, "accuracy", "Held-out IFEval accuracy (strict)", legend="best")
    plot.figure = fig
    return plot


PLOTS: tuple[Callable[[RunData], Plot | None], ...] = (
    plot_reward, plot_win_rate, plot_ifeval, plot_length, plot_kl, plot_pairs, plot_train_steps, plot_stages,
    plot_heldout_by)


def draw_plots(run: RunData) -> list[Plot]:
    """Every plot the run has data for (and a note for each it lacks). A plot that fails on data it did not
    expect becomes a note too: the loop writes the report after every round and must not stop for it."""
    plots = []
    with matplotlib.rc_context(STYLE):
        for make in PLOTS:
            try:
                plot = make(run)
                if plot is not None and plot.figure is not None:
                    plot.png = png_bytes(plot.figure)
            except Exception as error:  # noqa: BLE001
                name = make.__name__.removeprefix("plot_")
                plot = Plot(name, name, missing=f"it could not be drawn ({type(error).__name__}: {error})")
            if plot is not None:
                plots.append(plot)
    return plots


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


# ---------------------------------------------------------------- the page

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #222;
       background: #fff; margin: 0; }
main { max-width: 1160px; margin: 0 auto; padding: 16px 20px 40px; }
h1 { font-size: 22px; margin: 8px 0 4px; }
h2 { font-size: 17px; margin: 28px 0 10px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.status { display: inline-block; padding: 1px 9px; border-radius: 10px; font-size: 13px; font-weight: 600;
          vertical-align: middle; margin-left: 8px; }
.status-complete { background: #e3f4e3; color: #1d6b1d; }
.status-running { background: #e6effa; color: #1f4f8a; }
.status-stopped { background: #fbe5e5; color: #9b1c1c; }
dl.config { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 10px 0; }
dl.config dt { color: #666; }
dl.config dd { margin: 0; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px;
               overflow-wrap: anywhere; }
.headline { font-size: 15px; margin: 8px 0; }
.guard { color: #9b1c1c; font-weight: 600; margin: 4px 0; }
.problem { color: #8a5a00; }
table.rounds { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
table.rounds th, table.rounds td { padding: 3px 9px; border-bottom: 1px solid #e5e5e5; text-align: right;
                                   white-space: nowrap; }
table.rounds th { background: #f5f5f5; font-weight: 600; }
table.rounds .ci { color: #888; font-size: 11px; }
table.rounds td { vertical-align: top; }
.scroll { overflow-x: auto; }
table.rounds tr.partial td { color: #777; font-style: italic; }
.plots { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); grid-auto-flow: row dense; gap: 18px 20px; }
figure { margin: 0; }
figure.wide { grid-column: 1 / -1; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 12.5px; color: #555; margin-top: 4px; }
figcaption b { color: #222; }
ul.notes { color: #666; font-size: 13px; }
details { border: 1px solid #ddd; border-radius: 6px; margin: 8px 0; padding: 0 12px; }
details[open] { padding-bottom: 10px; }
summary { cursor: pointer; padding: 8px 0; font-weight: 600; }
.example { margin: 10px 0 16px; }
.prompt { background: #f6f6f6; border-left: 3px solid #bbb; padding: 6px 10px; white-space: pre-wrap;
          overflow-wrap: anywhere; font-size: 13px; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; margin-top: 6px; }
.answer h4 { margin: 0 0 3px; font-size: 12.5px; color: #555; font-weight: 600; }
.answer pre { margin: 0; padding: 6px 10px; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 12.5px;
              font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; border-radius: 4px; }
.answer pre.blank { height: 1.5em; overflow: hidden; }
.answer.sft pre { background: #f3f3f3; }
.answer.policy pre { background: #eef4fb; }
.cut { color: #a05a00; font-weight: 400; }
.small { color: #777; font-size: 12px; }
footer { margin-top: 30px; color: #999; font-size: 12px; }
"""

e = html.escape


def fmt(value, spec: str = ".3f", empty: str = "–") -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return empty
    return format(round(value) if spec.endswith("d") else value, spec)


def fmt_ci(ci, spec: str = ".3f") -> str:
    return f"[{format(ci[0], spec)}, {format(ci[1], spec)}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""


def render_html(run: RunData, plots: list[Plot]) -> str:
    body = "\n".join([render_header(run), render_table(run), render_plots(plots), render_examples(run),
                      f"<footer>alignloop {e(__version__)} · written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}</footer>"])
    return (f"<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{e(run.name)} · alignloop report</title>\n<style>{CSS}</style>\n</head>\n"
            f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n")


def render_header(run: RunData) -> str:
    config = run.config
    status_class = {"complete": "complete", "running": "running"}.get(run.status, "stopped")
    per_round, total = config.get("prompts_per_round"), config.get("total_prompts")
    planned = (run.manifest.get("plan") or {}).get("rounds")
    if planned is None and isinstance(per_round, int) and isinstance(total, int) and per_round > 0:
        planned = math.ceil(total / per_round)  # at most: the prompt source may have fewer prompts
    planned = f" of {planned} planned" if planned is not None else ""
    partial = [row for row in run.rounds if not row["finished"]]
    in_progress = "".join(f"; round {row['round']} in progress ({', '.join(row['stages_done']) or 'no stage'} done)"
                          for row in partial)
    loss = dict(config.get("loss") or {})
    loss_text = f"{loss.pop('name', '?')}" + (f" ({', '.join(f'{k}={v}' for k, v in loss.items())})" if loss else "")
    labeler = config.get("labeler") or {}
    eval_labelers = (config.get("eval") or {}).get("labelers") or {}
    if not isinstance(eval_labelers, dict):
        eval_labelers = {str(name): {} for name in eval_labelers}
    sampler = config.get("sampler") or {}
    feedback = config.get("feedback") or {}
    items = [
        ("policy", config.get("policy")),
        ("reference", config.get("reference")),
        ("loss", loss_text if config.get("loss") else None),
        ("labeler", describe_labeler(labeler) if labeler else None),
        ("eval labelers", "; ".join(f"{name}: {describe_labeler(lc)}" for name, lc in eval_labelers.items()) or None),
        ("feedback", " ".join(f"{k}={feedback[k]}" for k in ("type", "mode", "threshold") if k in feedback) or None),
        ("sampler", f"{sampler.get('backend', '?')}, max_new_tokens={sampler.get('max_new_tokens')}, "
                    f"temperature={sampler.get('temperature')}" if sampler else None),
        ("prompts", f"{per_round} per round, {config.get('samples_per_prompt')} samples each, {total} in all"
         if per_round else None),
    ]
    lines = [f"<header>\n<h1>{e(run.name)}<span class=\"status status-{status_class}\">{e(run.status)}</span></h1>",
             (f"<p>Rounds done: <b>{len(run.finished)}</b>{e(planned)}{e(in_progress)}. Run directory: "
              f"<code>{e(str(run.dir.resolve()))}</code>{e(times(run))}</p>")]
    lines.append(headline(run))
    for guard in run.guards:
        best = guard.get("best")
        lines.append(f"<p class=\"guard\">Guard after round {guard['round']}: {e(str(guard['action']))}"
                     + (f" (best: {'SFT' if best == 'sft' else f'round {e(str(best))}'})" if best is not None else "")
                     + (f" — {e(str(guard['reason']))}" if guard.get("reason") else "") + "</p>")
    lines.append("<dl class=\"config\">" + "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in items if v is not None)
                 + "</dl>")
    lines += [f"<p class=\"problem\">Could not read {e(p)}</p>" for p in run.problems]
    return "\n".join(lines) + "\n</header>"


def times(run: RunData) -> str:
    """When the run started and when it last logged anything (local time of the machine writing the page)."""
    at = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t))  # noqa: E731
    started = run.manifest.get("started")
    text = f". Started {at(started)}" if isinstance(started, (int, float)) else ""
    if run.last_event is not None:
        text += f"{'; last' if text else '. Last'} event {at(run.last_event)}"
    return text


def describe_labeler(labeler: dict) -> str:
    """A labeler's config in a few words: its kind and what it runs (function, judge model or reward model)."""
    if not isinstance(labeler, dict):
        return str(labeler)
    what = labeler.get("function") or labeler.get("model") or labeler.get("path")
    return f"{labeler.get('kind', 'callable')}" + (f" {what}" if what else "")


def guard_text(guard) -> str:
    """A guard's decision in a few words: "rollback → r0", "stop", or "" when it let the run go on."""
    if not isinstance(guard, dict) or guard.get("action") in (None, "none"):
        return ""
    best = guard.get("best")
    return str(guard["action"]) + ("" if best is None else f" → {'SFT' if best == 'sft' else f'r{best}'}")


def headline(run: RunData) -> str:
    """The held-out reward of the SFT model and of the latest evaluated round, and the paired change."""
    evaluated = [row for row in run.rounds if row.get("heldout_reward") is not None]
    if not evaluated or not run.sft or run.sft["reward"] is None:
        return ""
    last = evaluated[-1]
    change = last.get("heldout_change") or {}
    text = (f"Held-out reward: SFT {fmt(run.sft['reward'])} → round {last['round']} {fmt(last['heldout_reward'])}")
    if change.get("mean") is not None:
        text += f", change {fmt(change['mean'], '+.3f')}"
        if change.get("ci95"):
            text += f" (95% CI {fmt(change['ci95'][0], '+.3f')} to {fmt(change['ci95'][1], '+.3f')}, n={change.get('n')})"
    return f"<p class=\"headline\">{e(text)}</p>"


def render_table(run: RunData) -> str:
    """The per-round numbers (metrics.json), one row per round, SFT first; a column no round has is left out."""
    def plain(key, spec):
        return lambda row: f"<td>{fmt(row.get(key), spec)}</td>"

    def with_ci(get_mean, get_ci, spec=".3f"):  # the 95% interval in small print under the value
        return lambda row: (f"<td>{fmt(get_mean(row), spec)}"
                            + (f"<br><span class=\"ci\">{e(fmt_ci(get_ci(row), spec))}</span>" if get_ci(row) else "") + "</td>")

    part = lambda key, sub: lambda row: (row.get(key) or {}).get(sub)  # noqa: E731
    columns = [  # (heading, the row's key, its cell)
        ("prompts", "prompts", plain("prompts", "d")),
        ("samples", "samples", plain("samples", "d")),
        ("unscored", "unscored", plain("unscored", "d")),
        ("feedback", "feedback", lambda row: f"<td>{fmt(row.get('feedback'), 'd')} {e((row.get('feedback_type') or '')[:4])}</td>"),
        ("train reward", "train_reward", with_ci(lambda row: row.get("train_reward"), lambda row: row.get("train_reward_ci95"))),
        ("held-out reward", "heldout_reward", with_ci(lambda row: row.get("heldout_reward"), lambda row: row.get("heldout_reward_ci95"))),
        ("change vs SFT", "heldout_change", with_ci(part("heldout_change", "mean"), part("heldout_change", "ci95"), "+.3f")),
        ("win rate", "win_rate", with_ci(part("win_rate", "mean"), part("win_rate", "ci95"), ".2f")),
        ("KL", "kl", plain("kl", ".4f")),
        ("loss", "loss", plain("loss", ".4f")),
        ("accuracy", "accuracy", plain("accuracy", ".2f")),
        ("seconds", "seconds", lambda row: f"<td>{fmt(sum((row.get('seconds') or {}).values()) or None, '.0f')}</td>"),
        ("guard", "guard", lambda row: f"<td>{e(guard_text(row.get('guard')))}</td>"),
    ]
    if not run.rounds and not run.sft:
        return "<section id=\"table\"><h2>Rounds</h2><p class=\"note\">No round has started yet.</p></section>"
    has = lambda row, key: guard_text(row.get(key)) if key == "guard" else row.get(key) not in (None, {}, "")  # noqa: E731
    shown = [c for c in columns if any(has(row, c[1]) for row in run.rounds)]
    head = "<tr><th>round</th>" + "".join(f"<th>{e(title)}</th>" for title, _, _ in shown) + "</tr>"
    rows = []
    if run.sft:
        sft = {"heldout_reward": run.sft["reward"], "heldout_reward_ci95": run.sft["reward_ci95"],
               "seconds": {"eval": run.sft["seconds"]} if run.sft.get("seconds") is not None else None}
        rows.append("<tr><th>SFT</th>" + "".join(cells(sft) if key in sft else "<td></td>" for _, key, cells in shown) + "</tr>")
    for row in run.rounds:
        css = "" if row["finished"] else " class=\"partial\""
        rows.append(f"<tr{css}><th>{row['round']}</th>" + "".join(cells(row) for _, _, cells in shown) + "</tr>")
    return ("<section id=\"table\"><h2>Rounds</h2>\n<div class=\"scroll\"><table class=\"rounds\">\n" + head + "\n"
            + "\n".join(rows) + "\n</table></div>\n<p class=\"note small\">Brackets: 95% intervals. Seconds: all stages of the round. "
              "Italic: a round in progress.</p></section>")


def render_plots(plots: list[Plot]) -> str:
    figures, notes = [], []
    for plot in plots:
        if plot.missing:
            notes.append(f"<li id=\"{plot.id}-missing\"><b>{e(plot.title)}</b>: not plotted, {e(plot.missing)}.</li>")
            continue
        data = base64.b64encode(plot.png).decode("ascii")
        width, height = (round(v) for v in plot.figure.get_size_inches() * DPI)
        css = " class=\"wide\"" if plot.wide else ""
        figures.append(
            f"<figure id=\"{plot.id}\"{css}>"
            f"<img src=\"data:image/png;base64,{data}\" width=\"{width}\" height=\"{height}\" alt=\"{e(plot.title)}\">"
            f"<figcaption><b>{e(plot.title)}.</b> {e(plot.caption)}</figcaption></figure>")
    return ("<section id=\"plots\"><h2>Plots</h2>\n<div class=\"plots\">\n" + "\n".join(figures) + "\n</div>\n"
            + (f"<ul class=\"notes\">{''.join(notes)}</ul>" if notes else "") + "</section>")


def prompt_text(record: dict) -> str:
    turns = record.get("prompt")
    if isinstance(turns, str):
        return turns
    if isinstance(turns, list):
        if len(turns) == 1 and isinstance(turns[0], dict):
            return str(turns[0].get("content", ""))
        return "\n\n".join(f"[{t.get('role')}] {t.get('content')}" for t in turns if isinstance(t, dict))
    return ""


def render_answer(record: dict | None, who: str, css: str) -> str:
    if record is None:
        return f"<div class=\"answer {css}\"><h4>{e(who)}</h4><pre>(no answer recorded)</pre></div>"
    output = str(record.get("output", ""))
    shown = output if len(output) <= MAX_ANSWER_CHARS else output[:MAX_ANSWER_CHARS] + f"… ({len(output) - MAX_ANSWER_CHARS} more characters)"
    cut = " <span class=\"cut\">· cut at max_new_tokens</span>" if record.get("finish_reason") == "length" else ""
    blank = " <span class=\"cut\">· blank (only white space)</span>" if not output.strip() else ""
    pre = "<pre class=\"blank\">" if blank else "<pre>"
    reward = record.get("reward")
    # the line end after <pre> is dropped by the HTML parser, so an answer's own first line end stays
    return (f"<div class=\"answer {css}\"><h4>{e(who)} · reward {fmt(reward, '.3f', 'unscored')} · "
            f"{fmt(record.get('num_tokens'), 'd', '?')} tokens{cut}{blank}</h4>{pre}\n{e(shown)}</pre></div>")


def render_examples(run: RunData) -> str:
    """For the first held-out prompts (by prompt_id), the SFT answer beside each round's answer, a collapsible
    block per round, the latest open."""
    head = "<section id=\"examples\"><h2>Example generations</h2>\n"
    if not run.answers:
        return head + "<p class=\"note\">No held-out answers yet (the run has no held-out prompts, or no round was evaluated).</p></section>"
    sft = {a.get("prompt_id"): a for a in run.sft_answers}
    pool = sft or {a.get("prompt_id") for a in run.answers[min(run.answers)]}  # no SFT evaluation: the first round's
    chosen = sorted(pool, key=str)[:EXAMPLE_PROMPTS]
    prompts = {a.get("prompt_id"): a for answers in [run.sft_answers, *run.answers.values()] for a in answers}
    blocks = []
    latest = max(run.answers)
    for r, answers in sorted(run.answers.items()):
        by_id = {a.get("prompt_id"): a for a in answers}
        row = next((row for row in run.rounds if row["round"] == r), {})
        items = []
        for pid in chosen:
            items.append(f"<div class=\"example\"><div class=\"prompt\"><b>{e(str(pid))}</b>\n{e(prompt_text(prompts[pid]))}</div>"
                         f"<div class=\"pair\">{render_answer(sft.get(pid), 'SFT', 'sft')}"
                         f"{render_answer(by_id.get(pid), f'round {r}', 'policy')}</div></div>")
        summary = f"Round {r}: held-out reward {fmt(row.get('heldout_reward'))}" + (
            f" (SFT {fmt(run.sft['reward'])})" if run.sft and run.sft["reward"] is not None else "")
        blocks.append(f"<details id=\"examples-r{r:03d}\"{' open' if r == latest else ''}><summary>{e(summary)}</summary>"
                      + "".join(items) + "</details>")
    return head + f"<p>The first {len(chosen)} held-out prompts by prompt_id: the SFT model's greedy answer beside each round's.</p>\n" + "\n".join(blocks) + "</section>"


# ---------------------------------------------------------------- writing it

def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report/index.html (self-contained) and the plots as RUN_DIR/report/*.png; returns the
    page's path. Built in RUN_DIR/report.tmp/ and swapped into place, so a reader never sees half a report."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    plots = draw_plots(run)
    page = render_html(run, plots)

    tmp, final, old = run_dir / "report.tmp", run_dir / "report", run_dir / "report.old.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for plot in plots:
        if plot.png:
            (tmp / f"{plot.id}.png").write_bytes(plot.png)
    (tmp / "index.html").write_text(page, encoding="utf-8")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final / "index.html"


if __name__ == "__main__":  # python -m alignloop.report RUN_DIR
    if len(sys.argv) != 2:
        sys.exit("usage: python -m alignloop.report RUN_DIR")
    print(write_report(sys.argv[1]))
