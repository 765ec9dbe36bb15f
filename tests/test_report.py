"""`alignloop report`: the page of a real (tiny) run, rendered in headless Chromium and looked at as a person
would: every plot decoded and drawn in matplotlib's colours, example generations shown (HTML-escaped); and the
page of a run in progress and of an older run directory, with notes for what they lack."""

from __future__ import annotations

import hashlib
import html
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignloop.records import read_records
from conftest import require, tiny_run_overrides

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PLOT_IDS = ("reward", "win_rate", "ifeval", "length", "kl", "pairs", "train_steps", "stages", "heldout_by")
# The fields the report plots that a run directory from before them lacks (the old schema): win rate and KL
# cannot be computed from the records, everything else can.
NEW_EVAL_FIELDS = ("reward_ci95", "tokens", "length", "kl", "win_rate", "change", "by")
NEW_METRICS_FIELDS = ("train_reward_ci95", "heldout_reward_ci95", "heldout_change", "win_rate", "kl", "length",
                      "pair_margin", "heldout_by", "tokens", "guard")
# matplotlib's default colours, as the report draws them
BLUE, ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)
WIDTH = 1200

# Run in the page (a copy of it, never the report itself) before the DOM is dumped: each plot image says
# whether and at what size it decoded, and where it sits, and the page says how tall it is.
PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.querySelectorAll("figure img")) {
    const box = img.getBoundingClientRect();
    img.dataset.rendered = img.complete && img.naturalWidth ? img.naturalWidth + "x" + img.naturalHeight : "broken";
    img.dataset.box = [box.left + scrollX, box.top + scrollY, box.width, box.height].map(Math.round).join(",");
  }
  document.body.dataset.height = Math.ceil(document.documentElement.scrollHeight);
});
</script>"""


# ---------------------------------------------------------------- helpers

def chromium(*args: str, tmp: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    profile = tmp / f"chromium-profile-{time.monotonic_ns()}"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
               f"--user-data-dir={profile}", *args]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def render(page: Path, tmp: Path, screenshot: Path | None = None) -> tuple[str, dict]:
    """The page's DOM after load (from a copy of it alone in a fresh folder, with the probe script), each plot
    image's attributes by figure id, and optionally a full-page screenshot of it."""
    alone = tmp / f"alone-{time.monotonic_ns()}"
    alone.mkdir()
    copy = alone / "page.html"  # nothing beside it: the page must not need its PNGs or anything else
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = chromium("--virtual-time-budget=5000", f"--window-size={WIDTH},900", "--dump-dom", copy.as_uri(), tmp=tmp).stdout
    images = {}
    for figure in re.finditer(r'<figure id="([a-z_]+)"[^>]*>(.*?)</figure>', dom, re.S):
        img = re.search(r"<img\b[^>]*>", figure.group(2))
        images[figure.group(1)] = dict(re.findall(r'\b(data-[a-z]+)="([^"]*)"', img.group(0))) if img else {}
    if screenshot is not None:
        height = int(re.search(r'<body[^>]*data-height="(\d+)"', dom).group(1))
        chromium(f"--window-size={WIDTH},{height}", f"--screenshot={screenshot}", copy.as_uri(), tmp=tmp)
    return dom, images


def count_color(image, box: tuple[int, int, int, int], color, tolerance: int = 24) -> int:
    """Pixels of the screenshot's region (left, top, width, height) within `tolerance` of `color` in each channel."""
    import numpy as np

    left, top, width, height = box
    region = np.asarray(image.crop((left, top, left + width, top + height)).convert("RGB"), dtype=np.int16)
    return int((np.abs(region - np.array(color, dtype=np.int16)) <= tolerance).all(axis=-1).sum())


def as_in_dom(text: str) -> str:
    """`text` as the browser's DOM serialises it inside an element: line ends normalised, &, <, > and
    no-break spaces escaped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "\ufffd")
    return html.escape(text, quote=False).replace("\xa0", "&nbsp;")


def file_hashes(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.relative_to(run_dir).parts[0] != "report"}


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("report", "checkpoint"))
    return to


@pytest.fixture(scope="module")
def chromium_ok():
    require(None if CHROMIUM else "Chromium for the report's browser test (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory) -> Path:
    """A finished two-round run of the tiny model, made once for this module (tests copy it before changing it)."""
    from alignloop.config import load_config
    from alignloop.loop import run_loop

    run_dir = tmp_path_factory.mktemp("report") / "tiny-run"
    # a second labeler scores the held-out answers too (the heldout_by plot)
    overrides = tiny_run_overrides(run_dir, tiny_model) + ["eval.labelers.gold.function=toy_rewards:distinct_fraction"]
    run_loop(load_config(None, overrides), progress=False)
    return run_dir


# ---------------------------------------------------------------- the page of a finished run

def test_report_of_a_finished_run_renders_every_plot(tiny_run, chromium_ok, tmp_path):
    from PIL import Image

    from alignloop.report import write_report

    run_dir = copy_run(tiny_run, tmp_path / "run")
    before = file_hashes(run_dir)
    started = time.time()
    page = write_report(run_dir)
    seconds = time.time() - started
    assert page == run_dir / "report" / "index.html"
    assert file_hashes(run_dir) == before, "write_report changed a file of the run directory"
    assert not (run_dir / "report.tmp").exists() and not (run_dir / "report.old.tmp").exists()
    assert seconds < 10, f"write_report took {seconds:.1f} s on a 2-round run"

    text = page.read_text(encoding="utf-8")
    # self-contained: no script, no stylesheet or font or image from anywhere else
    assert "<script" not in text
    assert not re.search(r'(src|href)="(?!data:)|url\(|@import', text), "the page refers to something outside it"
    for plot_id in PLOT_IDS:
        assert (run_dir / "report" / f"{plot_id}.png").is_file(), plot_id

    screenshot = tmp_path / "report.png"
    dom, images = render(page, tmp_path, screenshot)
    print(f"\nscreenshot of the tiny run's report: {screenshot}")
    shot = Image.open(screenshot)
    assert shot.width == WIDTH

    missing = [plot_id for plot_id in PLOT_IDS if plot_id not in images]
    notes = {m.group(1): html.unescape(re.sub("<[^>]+>", "", m.group(2)))
             for m in re.finditer(r'<li id="([a-z_]+)-missing">(.*?)</li>', dom, re.S)}
    assert not missing, f"plots missing from the page: {missing}; the page's notes: {notes}"
    for plot_id in PLOT_IDS:
        attrs = images[plot_id]
        width, height = map(int, attrs["data-rendered"].split("x"))  # "broken" fails here
        assert 500 <= width <= 1400 and 250 <= height <= 800, (plot_id, attrs)
        left, top, box_w, box_h = map(int, attrs["data-box"].split(","))
        assert box_w >= 400 and box_h >= 200 and top + box_h <= shot.height, (plot_id, attrs, shot.size)
        # drawn, in the screenshot: lines, markers or bars in matplotlib's first colour
        blue = count_color(shot, (left, top, box_w, box_h), BLUE)
        assert blue >= 150, f"{plot_id}: only {blue} pixels of #1f77b4 in its region of the screenshot"
    for plot_id in ("reward", "length", "pairs", "stages", "heldout_by"):  # with a second series in the second colour
        left, top, box_w, box_h = map(int, images[plot_id]["data-box"].split(","))
        assert count_color(shot, (left, top, box_w, box_h), ORANGE) >= 100, plot_id
    # the page outside the plots is not drawn in those colours: what was counted above is the plots
    first_top = min(int(images[p]["data-box"].split(",")[1]) for p in PLOT_IDS)
    assert count_color(shot, (0, 0, WIDTH, first_top), BLUE) < 50

    # header, table, and the example generations: SFT's answer beside each round's, HTML-escaped
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert re.search(r'class="status status-complete">complete<', dom)
    assert f"<h1>{run_dir.name}<" in dom and "Rounds done: <b>2</b> of 2 planned" in dom
    assert "gold: callable toy_rewards:distinct_fraction" in dom
    assert re.search(r"<th>SFT</th>", dom) and re.search(r"<th>1</th>", dom)
    assert '<details id="examples-r001" open="">' in dom and '<details id="examples-r000">' in dom
    sft = sorted(read_records(run_dir / "eval/sft_heldout.jsonl"), key=lambda r: r["prompt_id"])[:3]
    last = {r["prompt_id"]: r for r in read_records(run_dir / "rounds/r001/heldout.jsonl")}
    block = re.search(r'<details id="examples-r001".*?</details>', dom, re.S).group(0)
    shown = re.findall(r'<div class="prompt"><b>([^<]*)</b>\n(.*?)</div>.*?<div class="answer sft">.*?<pre[^>]*>(.*?)</pre>'
                       r'.*?<div class="answer policy">.*?<pre[^>]*>(.*?)</pre>', block, re.S)
    assert [pid for pid, *_ in shown] == [r["prompt_id"] for r in sft]  # the first 3 held-out prompts, in order
    for (pid, prompt, sft_answer, answer), sft_record in zip(shown, sft):
        assert prompt == as_in_dom(sft_record["prompt"][0]["content"])
        assert sft_answer == as_in_dom(sft_record["output"]) and answer == as_in_dom(last[pid]["output"])
    assert any(answer.strip() for *_, answer in shown)  # some real text, not only blank answers
    assert manifest["status"] == "complete"


# ---------------------------------------------------------------- runs in progress, old runs, and guards

def test_report_of_a_half_done_round(tiny_run, chromium_ok, tmp_path):
    """The last round's training done, its evaluation and metrics.json not yet: the page shows round 0 in full
    and round 1 as in progress."""
    from alignloop.report import write_report

    run_dir = copy_run(tiny_run, tmp_path / "run")
    (run_dir / "rounds/r001/metrics.json").unlink()
    (run_dir / "rounds/r001/heldout.jsonl").unlink()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    del manifest["status"], manifest["summary"], manifest["rounds"]["1"]["eval"]
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"time": 1, "event": "train_step", "step": 99, "lo')  # a killed run's last line
    before = file_hashes(run_dir)
    (run_dir / "report").mkdir()
    (run_dir / "report/stale.png").write_bytes(b"old")  # the previous report is replaced as a whole

    page = write_report(run_dir)
    assert file_hashes(run_dir) == before
    assert not (run_dir / "report/stale.png").exists() and not (run_dir / "report.tmp").exists()
    dom, images = render(page, tmp_path)
    assert re.search(r'class="status status-running">running<', dom)
    assert "Rounds done: <b>1</b>" in dom and "round 1 in progress (sample, label, feedback, train done)" in dom
    assert '<details id="examples-r000" open="">' in dom and "examples-r001" not in dom
    for plot_id in ("reward", "length", "pairs", "train_steps", "stages"):
        assert images[plot_id]["data-rendered"] != "broken", plot_id


def test_answers_and_prompts_are_shown_as_text(tiny_run, chromium_ok, tmp_path):
    """Markup in a prompt or an answer is escaped: it reads as text on the page and runs nothing."""
    from alignloop.report import write_report

    run_dir = copy_run(tiny_run, tmp_path / "run")
    path = run_dir / "rounds/r001/heldout.jsonl"
    records = read_records(path)
    first = min(records, key=lambda r: r["prompt_id"])
    first["output"] = '\n<script>document.title="owned"</script> <b>not bold</b> & "quoted"\n  indented'
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    dom, _ = render(write_report(run_dir), tmp_path)
    assert as_in_dom(first["output"]) in dom  # every character, the leading line end included
    assert "owned" not in re.search(r"<title>(.*?)</title>", dom).group(1)
    assert "<b>not bold</b>" not in dom


def strip_new_fields(run_dir: Path) -> None:
    """Make a run directory look as if written before the report's fields existed (metrics.json's first 11 keys,
    no intervals, lengths, tokens, KL, win rate, margins, guard in the manifest)."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for stages in manifest["rounds"].values():
        for field in NEW_EVAL_FIELDS:
            stages.get("eval", {}).pop(field, None)
        stages.get("label", {}).pop("reward_ci95", None)
        for field in ("tokens", "length"):
            stages.get("sample", {}).pop(field, None)
        stages.get("feedback", {}).pop("margin", None)
        stages.get("train", {}).get("summary", {}).pop("tokens", None)
        stages.pop("guard", None)
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    for path in run_dir.glob("rounds/r*/metrics.json"):
        metrics = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in metrics.items() if k not in NEW_METRICS_FIELDS}, indent=2))
    for path in [run_dir / "eval/sft_heldout.jsonl", *run_dir.glob("rounds/r*/heldout.jsonl")]:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "eval_rewards"}) + "\n" for r in lines))


def test_report_of_an_old_run_directory_notes_what_it_lacks(tiny_run, chromium_ok, tmp_path):
    from alignloop.report import write_report

    run_dir = copy_run(tiny_run, tmp_path / "run")
    strip_new_fields(run_dir)
    page = write_report(run_dir)
    dom, images = render(page, tmp_path)
    # what the records still give is plotted (reward intervals, lengths, margins, sample/eval tokens) ...
    for plot_id in ("reward", "length", "pairs", "train_steps", "stages"):
        assert plot_id in images and images[plot_id]["data-rendered"] != "broken", plot_id
    # ... what they cannot give is a note, not a plot and not an error
    for plot_id in ("win_rate", "kl"):
        assert plot_id not in images
        assert re.search(rf'<li id="{plot_id}-missing">.*?not plotted, no .*?</li>', dom), plot_id
    assert "could not be drawn" not in dom


def test_a_guard_rollback_is_shown(tiny_run, chromium_ok, tmp_path):
    """The guard's rollback after round 1, recorded as the loop records it: the header says so and the reward
    plot marks the round in red."""
    from PIL import Image

    from alignloop.report import write_report

    run_dir = copy_run(tiny_run, tmp_path / "run")
    guard = {"action": "rollback", "best": 0, "best_reward": 0.5, "reward": 0.2,
             "reason": "held-out reward 0.200 is more than 0.05 below round 0's 0.500"}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["rounds"]["1"]["guard"] = guard
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    path = run_dir / "rounds/r001/metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "guard": guard}))
    page = write_report(run_dir)
    screenshot = tmp_path / "guard.png"
    dom, images = render(page, tmp_path, screenshot)
    assert "Guard after round 1: rollback (best: round 0) — held-out reward 0.200 is more than 0.05 below" in dom
    left, top, width, height = map(int, images["reward"]["data-box"].split(","))
    assert count_color(Image.open(screenshot), (left, top, width, height), (0xD6, 0x27, 0x28)) >= 40  # its red line


def test_write_report_keeps_matplotlib_state_and_is_quick(tiny_run, tmp_path):
    """In a fresh interpreter: pyplot is never imported (no global figures), rcParams are as they were."""
    run_dir = copy_run(tiny_run, tmp_path / "run")
    # (the raw values: reading rcParams["backend"] the usual way would itself import pyplot to resolve it)
    code = ("import sys, time, matplotlib\n"
            "raw = lambda: {k: repr(dict.__getitem__(matplotlib.rcParams, k)) for k in dict.keys(matplotlib.rcParams)}\n"
            "before = raw(); t = time.time()\n"
            "from alignloop.report import write_report; write_report(sys.argv[1])\n"
            "seconds = time.time() - t\n"
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
            "assert raw() == before, 'rcParams changed'\n"
            "print(f'{seconds:.2f}')")
    result = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    seconds = float(result.stdout.split()[-1])
    print(f"\nwrite_report with its imports, 2 rounds: {seconds:.2f} s")
    assert seconds < 15
