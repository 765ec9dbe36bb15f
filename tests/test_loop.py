"""The whole loop, end to end, on a tiny random model: layout, manifest, resume, and a kill -9 mid-round."""

import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignloop.config import ConfigError, keep_saved_sampler, load_config
from alignloop.loop import Run, run_loop
from alignloop.table import format_status, format_table
from alignloop.records import read_records
from conftest import tiny_run_overrides


def record_files(run_dir: Path) -> dict[str, bytes]:
    files = {}
    for path in sorted(run_dir.glob("rounds/*/*.jsonl")) + sorted(run_dir.glob("eval/*.jsonl")):
        files[str(path.relative_to(run_dir))] = path.read_bytes()
    return files


def stage_hashes(run_dir: Path) -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {(r, s): (e.get("sha256"), e.get("weights_sha256")) for r, stages in manifest["rounds"].items() for s, e in stages.items()}


def test_two_rounds_layout_manifest_and_cleanup(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    config = load_config(None, tiny_run_overrides(run_dir, tiny_model))
    manifest = run_loop(config, progress=False)
    assert manifest["status"] == "complete" and manifest["summary"]["rounds"] == 2
    for r in ("r000", "r001"):
        for name in ("samples.jsonl", "scored.jsonl", "feedback.jsonl", "heldout.jsonl", "metrics.json"):
            assert (run_dir / "rounds" / r / name).exists(), (r, name)
    # keep_checkpoints=1: the older round checkpoint goes once the newer is complete; the SFT model stays.
    assert not (run_dir / "rounds/r000/checkpoint").exists()
    assert (run_dir / "rounds/r001/checkpoint/model.safetensors").exists()
    assert Path(tiny_model, "model.safetensors").exists()
    assert manifest["rounds"]["0"]["train"]["cleaned"] is True
    # each round takes the next slice of the seeded shuffled prompt list, n samples per prompt
    s0, s1 = read_records(run_dir / "rounds/r000/samples.jsonl"), read_records(run_dir / "rounds/r001/samples.jsonl")
    assert len(s0) == len(s1) == 18
    assert not {r["prompt_id"] for r in s0} & {r["prompt_id"] for r in s1}
    assert [r["sample_id"] for r in s0[:3]] == [0, 1, 2] and {r["round"] for r in s1} == {1}
    assert manifest["rounds"]["1"]["sample"]["prompt_slice"] == [6, 12]
    assert "judge_prefetch" not in manifest["rounds"]["0"]["sample"]  # a reward function labels after sampling
    assert manifest["rounds"]["1"]["sample"]["policy"].endswith("r000/checkpoint")
    assert manifest["rounds"]["1"]["train"]["resumed_from"].endswith("r000/checkpoint")
    scored = read_records(run_dir / "rounds/r000/scored.jsonl")
    assert all(0.0 <= r["reward"] <= 1.0 for r in scored) and "instruction_id_list" in scored[0]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(m["event"] == "train_step" and "grad_norm" in m for m in metrics)
    table = format_table(run_dir)
    assert "heldout" in table and "\n    1 " in table and "held-out reward, last round minus SFT" in table

    # The same command again redoes nothing.
    before = stage_hashes(run_dir)
    mtime = (run_dir / "rounds/r001/samples.jsonl").stat().st_mtime_ns
    run_loop(config, progress=False)
    assert stage_hashes(run_dir) == before
    assert (run_dir / "rounds/r001/samples.jsonl").stat().st_mtime_ns == mtime


def test_resume_refuses_a_different_config(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(run_dir, tiny_model) + ["total_prompts=6"]
    run_loop(load_config(None, overrides), progress=False)
    with pytest.raises(ConfigError, match="different configuration"):
        run_loop(load_config(None, overrides + ["optim.lr=0.5"]), progress=False)


# Config files that release 0.1.0 saved in run directories, and the settings that wrote them: its defaults that
# have changed since, then each file's own.
DEFAULTS_0_1_0 = ["sampler.max_new_tokens=64", "optim.lr=5e-5", "optim.epochs=2", "eval.max_new_tokens=null",
                  "feedback.length_ratio=null", "feedback.truncation_penalty=0", "feedback.mode=max"]
RELEASE_0_1_0 = {
    "default": [],
    "judge": ["labeler.kind=judge", "labeler.base_url=http://127.0.0.1:8000/v1", "labeler.model=judge",
              "labeler.api_key_env=JUDGE_KEY"],
    "reward_model": ["labeler.kind=reward_model", "labeler.path=/models/rm", "labeler.dtype=float32"],
    "vllm": ["sampler.backend=vllm", "sampler.devices=[1]", "loss.name=kto", "feedback.type=binary",
             "feedback.threshold=median"],
}


@pytest.mark.parametrize("name", list(RELEASE_0_1_0))
def test_a_run_directory_of_release_0_1_0_resumes_without_complaint(name, tmp_path, monkeypatch):
    """Resuming compares parsed configurations, not text: 0.1.0 saved every labeler kind's and sampler backend's
    fields (a judge's `function`, a vLLM sampler's `batch_size`), and later keys are absent from its files.
    Its default sampler was hf; the same command, which now defaults to vLLM where it is installed, resumes
    such a run with hf (`keep_saved_sampler`), as `run_loop` does."""
    monkeypatch.chdir(tmp_path)  # the saved run_dir is runs/default
    run_dir = tmp_path / "runs" / "default"
    run_dir.mkdir(parents=True)
    saved = Path(__file__).parent / "fixtures" / "release_0_1_0" / f"{name}.yaml"
    (run_dir / "config.yaml").write_bytes(saved.read_bytes())
    given = keep_saved_sampler(load_config(None, DEFAULTS_0_1_0 + RELEASE_0_1_0[name]), run_dir / "config.yaml")
    assert given.sampler.backend == ("vllm" if name == "vllm" else "hf")
    Run(given).open()
    assert load_config(run_dir / "config.yaml") == given  # rewritten, the same config
    changed = keep_saved_sampler(load_config(None, DEFAULTS_0_1_0 + RELEASE_0_1_0[name] + ["optim.lr=0.5"]), run_dir / "config.yaml")
    with pytest.raises(ConfigError, match=r"different configuration \(optim.lr: 5e-05 -> 0.5\)"):
        Run(changed).open()
    # today's defaults are a different run, and the error says where they differ first
    with pytest.raises(ConfigError, match=r"different configuration \(sampler.max_new_tokens: 64 -> 256, .* and \d+ more\)"):
        Run(keep_saved_sampler(load_config(None, RELEASE_0_1_0[name]), run_dir / "config.yaml")).open()
    if name == "default":  # a backend the command does choose is kept, and is a different run
        chosen = keep_saved_sampler(load_config(None, DEFAULTS_0_1_0 + ["sampler.backend=vllm"]), run_dir / "config.yaml")
        with pytest.raises(ConfigError, match="different configuration"):
            Run(chosen).open()


def _cli(run_dir, tiny_model, *extra):
    args = [a for o in tiny_run_overrides(run_dir, tiny_model) + list(extra) for a in ("--set", o)]
    return [sys.executable, "-m", "alignloop", "--no-progress", "run", *args]


# Batches of 6 sequences: round 0's and round 1's sampling take 3 batches each (6 prompts x 3 samples), each
# held-out evaluation 1 (6 prompts x 1), so that crash points inside sampling have somewhere to be.
SMALL_BATCHES = "sampler.batch_size=6"


def _manifest_rounds(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["rounds"]


# (crash point, what the run directory shows at that moment). Counts are per process: `mark_done.eval` is
# reached first for the SFT evaluation, `sample.batch` in the order SFT eval (1), round 0 (3), its eval (1),
# round 1 (3): #7 is in the middle of round 1's sampling.
KILL_POINTS = {
    "checkpoint.tmp#1": lambda d: (d / "rounds/r000/checkpoint.tmp/model.safetensors").exists()
                                   and not (d / "rounds/r000/checkpoint").exists(),
    "checkpoint.tmp#2": lambda d: (d / "rounds/r001/checkpoint.tmp/model.safetensors").exists()
                                   and not (d / "rounds/r001/checkpoint.tmp/training_state").exists(),
    "sample.batch#7": lambda d: "eval" in _manifest_rounds(d)["0"] and not (d / "rounds/r001/samples.jsonl").exists(),
    "mark_done.sample#2": lambda d: (d / "rounds/r001/samples.jsonl").exists() and "1" not in _manifest_rounds(d),
    "mark_done.label#2": lambda d: (d / "rounds/r001/scored.jsonl").exists() and "label" not in _manifest_rounds(d)["1"],
    "mark_done.feedback#2": lambda d: (d / "rounds/r001/feedback.jsonl").exists()
                                       and "feedback" not in _manifest_rounds(d)["1"],
    "mark_done.train#2": lambda d: (d / "rounds/r001/checkpoint/training_state").is_dir()
                                    and "train" not in _manifest_rounds(d)["1"],
    "mark_done.eval#3": lambda d: (d / "rounds/r001/heldout.jsonl").exists() and "eval" not in _manifest_rounds(d)["1"],
}


@pytest.fixture(scope="module")
def clean_run(tiny_model, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    subprocess.run(_cli(run_dir, tiny_model, SMALL_BATCHES), check=True, capture_output=True)
    return run_dir


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_at_each_crash_point_then_rerun_gives_the_same_records(point, clean_run, tiny_model, tmp_path):
    """A run SIGKILLed at an exact moment (`alignloop.faults`) and started again with the same command ends
    with exactly the records and weights of a run that never stopped, and leaves no temporary files."""
    killed = tmp_path / "killed"
    crashed = subprocess.run(_cli(killed, tiny_model, SMALL_BATCHES), env={**os.environ, "ALIGNLOOP_CRASH_AT": point},
                             capture_output=True, text=True, timeout=600)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert KILL_POINTS[point](killed)  # it died where it was meant to

    result = subprocess.run(_cli(killed, tiny_model, SMALL_BATCHES), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(killed, clean_run)


# Chunks of 2 prompts (3 per round) sampled in batches of 1 prompt (3 sequences), so a chunk is 2 batches; label
# chunks of 4 samples (5 per round). `sample.batch` counts: SFT eval 1-2 (6 prompts, 3 a batch), round 0 3-8.
CHUNKED = ["chunks.sample=2", "chunks.label=4", "sampler.batch_size=3"]


@pytest.fixture(scope="module")
def chunked_run(tiny_model, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("chunked") / "run"
    subprocess.run(_cli(run_dir, tiny_model, *CHUNKED), check=True, capture_output=True)
    return run_dir


def chunks_done(run_dir: Path, r: int, stage: str) -> list[int]:
    """The chunks of a stage that were made, in order, over every run of the directory (metrics.jsonl)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["chunk"] for row in rows if row["event"] == "chunk_done" and row["round"] == r and row["stage"] == stage]


@pytest.mark.parametrize("point, stage, done_before", [
    ("sample.batch#5", "sample", [0]),  # chunk 1 of round 0's sampling half made: chunk 0 is kept, chunk 1 redone
    ("label.chunk#2", "label", [0, 1]),  # round 0's label chunk 1 just recorded: chunks 0 and 1 are kept
])
def test_kill_9_in_a_stage_keeps_its_finished_chunks(point, stage, done_before, chunked_run, tiny_model, tmp_path):
    """A stage killed part-way keeps every chunk it finished: the rerun makes only the chunk under way and the
    rest, and ends with the records of a run never killed."""
    killed = tmp_path / "run"
    crashed = subprocess.run(_cli(killed, tiny_model, *CHUNKED), env={**os.environ, "ALIGNLOOP_CRASH_AT": point},
                             capture_output=True, text=True, timeout=600)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert chunks_done(killed, 0, stage) == done_before
    parts = sorted(p.name for p in (killed / "rounds/r000" / f"{stage}.parts").glob("*.jsonl"))
    assert parts == [f"{k:05d}.jsonl" for k in done_before]  # on disk, recorded in the manifest
    assert len(json.loads((killed / "manifest.json").read_text())["parts"][f"0/{stage}"]) == len(done_before)

    result = subprocess.run(_cli(killed, tiny_model, *CHUNKED), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    everything = list(range(3 if stage == "sample" else 5))
    assert chunks_done(killed, 0, stage) == everything  # each chunk made once: none of the finished ones again
    assert_same_run(killed, chunked_run)
    assert not list(killed.glob("rounds/*/*.parts")) and "parts" not in json.loads((killed / "manifest.json").read_text())


def test_a_stage_in_chunks_samples_as_one_chunk_did(chunked_run, clean_run):
    """Chunks change how a stage's work is cut, not the layout of its records: the same prompts and sample ids
    in the same order, with the same fields, as a stage done in one piece."""
    ours, theirs = (read_records(d / "rounds/r000/samples.jsonl") for d in (chunked_run, clean_run))
    assert [(r["prompt_id"], r["sample_id"]) for r in ours] == [(r["prompt_id"], r["sample_id"]) for r in theirs]
    assert [set(r) for r in ours] == [set(r) for r in theirs]


def assert_same_run(resumed: Path, clean: Path) -> None:
    assert record_files(resumed) == record_files(clean)
    assert stage_hashes(resumed) == stage_hashes(clean)
    assert not list(resumed.glob("**/*.tmp")) and not list(resumed.glob("**/.*.tmp"))


def test_kill_9_at_a_random_moment_of_round_1_then_rerun_gives_the_same_records(tiny_model, tmp_path):
    """The same, with the kill sent from outside while round 1 runs, as a user's kill -9 would be."""
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_cli(clean, tiny_model), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_cli(killed, tiny_model), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "rounds/r001/scored.jsonl").exists():  # round 1 labeled: feedback/train still to come
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "rounds/r001/heldout.jsonl").exists()
    result = subprocess.run(_cli(killed, tiny_model), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert_same_run(killed, clean)


def test_loop_with_kto_on_binary_feedback_and_grpo_on_scored_groups(tiny_model, tmp_path):
    """The loss picked in the config runs in the loop with the feedback it takes."""
    kto = load_config(None, tiny_run_overrides(tmp_path / "kto", tiny_model)
                      + ["loss.name=kto", "feedback.type=binary", "feedback.threshold=median", "total_prompts=6"])
    manifest = run_loop(kto, progress=False)
    feedback = read_records(tmp_path / "kto/rounds/r000/feedback.jsonl")
    assert {f["type"] for f in feedback} == {"binary_feedback"} and len(feedback) == 18
    assert manifest["rounds"]["0"]["train"]["summary"]["examples"] == 18

    grpo = load_config(None, tiny_run_overrides(tmp_path / "grpo", tiny_model) + ["loss.name=grpo", "total_prompts=6"])
    manifest = run_loop(grpo, progress=False)
    train = manifest["rounds"]["0"]["train"]
    assert train["input_sha256"] == manifest["rounds"]["0"]["label"]["sha256"]  # trained on scored.jsonl
    assert train["summary"]["steps"] >= 1


def test_a_resumed_run_removes_what_a_killed_one_was_writing(tmp_path, tiny_model):
    """A kill -9 mid-write leaves a record file's temporary (`.feedback.jsonl.<random>.tmp`) or a checkpoint's
    temporary folder (`checkpoint.tmp/`) that was never renamed into place; opening the run again removes them,
    and nothing else."""
    config = load_config(None, tiny_run_overrides(tmp_path / "run", tiny_model))
    Run(config).open()
    round_dir = tmp_path / "run" / "rounds" / "r000"
    (round_dir / "checkpoint.tmp").mkdir(parents=True)
    (round_dir / "checkpoint.tmp" / "model.safetensors").write_bytes(b"half")
    (round_dir / ".feedback.jsonl.k2j4.tmp").write_text('{"half": ')
    (round_dir / "samples.jsonl").write_text("{}\n")
    Run(config).open()
    assert sorted(p.name for p in round_dir.iterdir()) == ["samples.jsonl"]


def _falling_run(tmp_path, tiny_model, action: str):
    """Three rounds whose held-out reward rises in round 0 and falls by 0.3 in round 1 (`toy_rewards.falls_in_round_1`)."""
    overrides = tiny_run_overrides(tmp_path / action, tiny_model) + [
        "total_prompts=18", "labeler.function=toy_rewards:falls_in_round_1", f"guard.action={action}", "guard.tolerance=0.05"]
    return load_config(None, overrides)


def test_guard_rolls_back_to_the_best_round_with_its_optimizer_state(tiny_model, tmp_path):
    """Round 1's held-out reward falls more than the tolerance below round 0's: round 2 starts from round 0's
    checkpoint (weights, moments and scheduler), which was kept for it, and the decision is in the manifest,
    the metrics log, the table and the status."""
    config = _falling_run(tmp_path, tiny_model, "rollback")
    lines = []
    manifest = run_loop(config, progress=False, echo=lines.append)
    run_dir = Path(config.run_dir)
    rounds = manifest["rounds"]
    assert rounds["0"]["guard"]["action"] == "none" and rounds["0"]["guard"]["best"] == 0
    guard = rounds["1"]["guard"]
    assert guard["action"] == "rollback" and guard["best"] == 0 and guard["best_reward"] == pytest.approx(0.6, abs=0.011)
    assert "more than 0.05 below round 0" in guard["reason"]
    assert rounds["2"]["sample"]["policy"].endswith("rounds/r000/checkpoint")
    assert rounds["2"]["train"]["resumed_from"].endswith("rounds/r000/checkpoint")
    # round 2 resumed round 0's optimizer: its first step is global step 4 (round 0 took 3), not 7
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s["event"] == "train_step" and s["round"] == 2][0] == 4
    assert any(s["event"] == "guard" and s["round"] == 1 for s in steps)
    assert any("guard: round 1" in line and "going on from round 0" in line for line in lines)
    assert rounds["2"]["guard"]["best"] == 2  # round 2 beat round 0: its checkpoint alone is kept
    assert not (run_dir / "rounds/r000/checkpoint").exists() and (run_dir / "rounds/r002/checkpoint").exists()
    assert manifest["status"] == "complete" and manifest["summary"]["best_round"] == 2
    assert "guard, round 1: rollback" in format_table(run_dir)


def test_guard_stops_the_run_and_keeps_the_best_checkpoint(tiny_model, tmp_path):
    config = _falling_run(tmp_path, tiny_model, "stop")
    manifest = run_loop(config, progress=False, echo=lambda line: None)
    run_dir = Path(config.run_dir)
    assert manifest["status"] == "stopped" and manifest["summary"]["rounds"] == 2
    assert manifest["rounds"]["1"]["guard"]["action"] == "stop"
    assert not (run_dir / "rounds/r002").exists()  # never sampled
    assert (run_dir / "rounds/r000/checkpoint").exists()  # the best round's, kept though older than round 1's
    status = format_status(run_dir)
    assert "stopped by the guard" in status and "rounds done: 2 of 3" in status and "guard: round 1: stop" in status
    # the same command on a stopped run does nothing more
    again = run_loop(config, progress=False, echo=lambda line: None)
    assert again["status"] == "stopped" and not (run_dir / "rounds/r002").exists()


def test_guard_length_floor(tmp_path):
    """Held-out answers shorter than `min_length` x the SFT model's (in words) trip the guard, and such a
    round is never the best one to go back to."""
    config = load_config(None, [f"run_dir={tmp_path}", "guard.action=rollback", "guard.min_length=0.5"])
    run = Run(config)
    run.manifest = {"rounds": {
        "sft": {"eval": {"reward": 0.4, "length": {"words": 100.0}}},
        "0": {"train": {}, "eval": {"reward": 0.5, "length": {"words": 80.0}}},
        "1": {"train": {}, "eval": {"reward": 0.9, "length": {"words": 40.0}}},  # higher reward, too short
    }}
    from alignloop.loop import guard_stage

    assert guard_stage(run, 0)["action"] == "none"
    decision = guard_stage(run, 1)
    assert decision["action"] == "rollback" and decision["best"] == 0
    assert "40.0 words, below 0.5 x the SFT model's 100.0" in decision["reason"]
    assert json.loads((tmp_path / "manifest.json").read_text())["rounds"]["1"]["guard"] == decision


def test_console_shows_a_line_per_stage_and_nothing_from_the_libraries(tiny_model, tmp_path):
    """`alignloop --no-progress run`: one line per finished stage on stdout, then the table; nothing on stderr
    (no transformers or DeepSpeed notices, no loading bars). `alignloop status` while it runs says so."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cli(tmp_path / "run", tiny_model), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "run/rounds/r000/heldout.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended early"
        time.sleep(0.05)
    proc.send_signal(signal.SIGSTOP)  # frozen mid-run: alive, and not moving on while we look
    try:
        status = subprocess.run([sys.executable, "-m", "alignloop", "status", str(tmp_path / "run")],
                                capture_output=True, text=True, timeout=120)
    finally:
        proc.send_signal(signal.SIGCONT)
    assert status.returncode == 0, status.stderr
    assert f"running (process {proc.pid})" in status.stdout and "rounds done: 1 of 2" in status.stdout
    assert "now: round 1, sample" in status.stdout and "prompts left: 6" in status.stdout
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert err == ""
    lines = out.splitlines()
    stages = ["sample", "label", "feedback", "train", "eval"]
    expected = ["SFT eval"] + [f"r{r:03d} {s}" for r in (0, 1) for s in stages]
    assert [line.split("  ")[0].split(" (")[0][: len(e)] for line, e in zip(lines, expected)] == expected
    assert lines[len(expected)].lstrip().startswith("round")  # then the table
    assert "complete" in subprocess.run([sys.executable, "-m", "alignloop", "status", str(tmp_path / "run")],
                                        capture_output=True, text=True).stdout


def test_log_to_tensorboard_gets_the_metrics_of_metrics_jsonl(tiny_model, tmp_path):
    """`log_to: [tensorboard]`: every train step's and every round's numbers, under metrics.jsonl's names, at
    the optimizer's global step; read back from the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config(None, tiny_run_overrides(tmp_path / "run", tiny_model) + ["log_to=[tensorboard]"])
    run_loop(config, progress=False, echo=lambda line: None)
    events = EventAccumulator(str(tmp_path / "run/tensorboard"))
    events.Reload()
    logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steps = [e for e in logged if e["event"] == "train_step"]
    loss = events.Scalars("loss")
    assert [s.step for s in loss] == [e["step"] for e in steps]
    assert [s.value for s in loss] == pytest.approx([e["loss"] for e in steps], rel=1e-6)
    assert [s.value for s in events.Scalars("rewards/accuracy")] == pytest.approx([e["rewards/accuracy"] for e in steps], rel=1e-6)
    rounds = [json.loads((tmp_path / f"run/rounds/r00{r}/metrics.json").read_text()) for r in (0, 1)]
    heldout = events.Scalars("heldout_reward")
    assert [h.value for h in heldout] == pytest.approx([r["heldout_reward"] for r in rounds], rel=1e-6)
    assert [h.step for h in heldout] == [3, 6]  # each round's last optimizer step
    assert events.Scalars("win_rate/mean")[-1].value == pytest.approx(rounds[1]["win_rate"]["mean"])
    assert events.Scalars("length/heldout/words")[0].value == pytest.approx(rounds[0]["length"]["heldout"]["words"])


def test_eval_labelers_max_new_tokens_and_ifeval_accuracy(tiny_model, tmp_path):
    """`eval.labelers`: a second labeler scores every held-out answer too (`eval_rewards` in the records), with
    its own mean, interval, change and win rate against the SFT answers; the round's numbers are those of the
    records. `eval.max_new_tokens` caps the held-out answers alone, and IFEval's checks are recorded."""
    from toy_rewards import distinct_fraction

    config = load_config(None, tiny_run_overrides(tmp_path / "run", tiny_model) + [
        "total_prompts=6", "eval.labelers={gold: {kind: callable, function: 'toy_rewards:distinct_fraction'}}",
        "eval.max_new_tokens=5"])
    manifest = run_loop(config, progress=False, echo=lambda line: None)
    heldout = read_records(tmp_path / "run/rounds/r000/heldout.jsonl")
    sft = read_records(tmp_path / "run/eval/sft_heldout.jsonl")
    for records in (heldout, sft):
        assert [r["eval_rewards"]["gold"] for r in records] == [distinct_fraction(r, r["output"]) for r in records]
    gold = manifest["rounds"]["0"]["eval"]["by"]["gold"]
    assert gold["reward"] == pytest.approx(sum(r["eval_rewards"]["gold"] for r in heldout) / len(heldout))
    assert gold["change"]["mean"] == pytest.approx(gold["reward"] - manifest["rounds"]["sft"]["eval"]["by"]["gold"]["reward"])
    assert 0.0 <= gold["win_rate"]["mean"] <= 1.0 and gold["win_rate"]["n"] == len(heldout)
    metrics = json.loads((tmp_path / "run/rounds/r000/metrics.json").read_text())
    assert metrics["heldout_by"]["gold"]["reward"] == gold["reward"]
    assert metrics["kl"] == manifest["rounds"]["0"]["eval"]["kl"] and metrics["kl"] >= 0
    # eval.max_new_tokens caps the held-out answers, not the training samples (sampler.max_new_tokens: 12)
    assert max(r["num_tokens"] for r in heldout + sft) == 5
    assert max(r["num_tokens"] for r in read_records(tmp_path / "run/rounds/r000/samples.jsonl")) == 12
    # IFEval's strict checks on the built-in prompts' instructions, whatever the run's labeler
    assert all(len(r["instructions_followed"]) == len(r["instruction_id_list"]) for r in heldout)
    ifeval = manifest["rounds"]["0"]["eval"]["ifeval"]
    assert ifeval["instruction"]["n"] == len(heldout)
    assert ifeval["instruction"]["mean"] == sum(sum(r["instructions_followed"]) for r in heldout) / sum(len(r["instruction_id_list"]) for r in heldout)
    assert metrics["heldout_ifeval_change"] == manifest["rounds"]["0"]["eval"]["ifeval_change"]
    # the run's summary and its closing lines: the accuracy users measure and the answers' length, SFT to last
    summary = manifest["summary"]
    assert summary["heldout_ifeval"]["last"] == ifeval and summary["heldout_ifeval"]["change"] == metrics["heldout_ifeval_change"]
    assert summary["heldout_ifeval"]["sft"] == manifest["rounds"]["sft"]["eval"]["ifeval"]
    assert summary["heldout_length"]["last"] == manifest["rounds"]["0"]["eval"]["length"]
    assert summary["heldout_length"]["sft"] == manifest["rounds"]["sft"]["eval"]["length"]
    table = format_table(tmp_path / "run")
    change = summary["heldout_ifeval"]["change"]["instruction"]
    before, after = (summary["heldout_ifeval"][k]["instruction"]["mean"] for k in ("sft", "last"))
    assert (f"held-out IFEval instruction accuracy (strict): {before:.3f} -> {after:.3f}, {change['mean']:+.3f} "
            f"(95% CI {change['ci95'][0]:+.3f} to {change['ci95'][1]:+.3f})") in table


def test_the_table_ends_with_what_users_measure(tmp_path):
    """The closing lines of `format_table`, from a run's summary with hand-picked numbers."""
    interval = lambda mean, lo, hi: {"n": 100, "mean": mean, "ci95": [lo, hi]}  # noqa: E731
    summary = {"heldout_change": interval(0.135, 0.033, 0.237),
               "heldout_ifeval": {"sft": {"instruction": interval(0.4, 0.32, 0.48)},
                                  "last": {"instruction": interval(0.57, 0.49, 0.65)},
                                  "change": {"instruction": interval(0.17, 0.071, 0.269)}},
               "heldout_length": {"sft": {"tokens": 125.5, "words": 89.36, "truncated": 0.35},
                                  "last": {"tokens": 73.8, "words": 46.23, "truncated": 0.16}}}
    (tmp_path / "manifest.json").write_text(json.dumps({"rounds": {}, "summary": summary}))
    assert format_table(tmp_path).splitlines()[-3:] == [
        "held-out reward, last round minus SFT: +0.135 (95% CI +0.033 to +0.237, n=100 prompts)",
        "held-out IFEval instruction accuracy (strict): 0.400 -> 0.570, +0.170 (95% CI +0.071 to +0.269)",
        "held-out answer length: 89 -> 46 words (52% of the SFT model's), cut at the cap 35% -> 16%"]
    summary["heldout_length"]["sft"]["words"] = 0.0  # no share of nothing: the line is left out
    (tmp_path / "manifest.json").write_text(json.dumps({"rounds": {}, "summary": summary}))
    assert "answer length" not in format_table(tmp_path)


def test_offline_run_samples_every_round_from_the_sft_model(tiny_model, tmp_path):
    """`online: false`: the same loop, but each round's samples come from the SFT model while training goes
    on from round to round, so online and offline runs compare on equal budgets."""
    config = load_config(None, tiny_run_overrides(tmp_path / "run", tiny_model) + ["online=false"])
    manifest = run_loop(config, progress=False, echo=lambda line: None)
    rounds = manifest["rounds"]
    assert rounds["1"]["sample"]["policy"] == tiny_model
    assert {s["generator"] for s in read_records(tmp_path / "run/rounds/r001/samples.jsonl")} == {tiny_model}
    assert rounds["1"]["train"]["policy_in"].endswith("rounds/r000/checkpoint")  # training still goes on
    assert rounds["1"]["eval"]["policy"].endswith("rounds/r001/checkpoint")


def test_reference_refreshed_every_round_is_the_previous_rounds_policy(tiny_model, tmp_path):
    """`reference_refresh: 1` (HALOs' online script): round r's loss takes round r-1's checkpoint as its
    reference, so before round r's first update the policy/reference log-ratio is zero, as in round 0."""
    config = load_config(None, tiny_run_overrides(tmp_path / "run", tiny_model) + ["reference_refresh=1", "total_prompts=18"])
    manifest = run_loop(config, progress=False, echo=lambda line: None)
    rounds = manifest["rounds"]
    assert rounds["0"]["train"]["reference"] == tiny_model
    assert rounds["1"]["train"]["reference"].endswith("rounds/r000/checkpoint")
    assert rounds["2"]["train"]["reference"].endswith("rounds/r001/checkpoint")
    steps = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    first = {s["round"]: s for s in reversed(steps) if s["event"] == "train_step"}  # each round's first step
    for r in (0, 1, 2):  # an untrained policy against itself: no margin, chance accuracy of ties
        assert first[r]["rewards/margin"] == pytest.approx(0.0, abs=1e-5), r
    assert manifest["sft"]["reference"] == tiny_model  # the held-out KL still measures from the SFT model


def test_reference_refreshed_every_other_round_is_kept_until_replaced(tiny_model, tmp_path):
    """`reference_refresh: 2`: rounds 0-1 take the SFT model, rounds 2-3 round 1's checkpoint, which stays on
    disk while it is the reference although keep_checkpoints is 1."""
    config = load_config(None, tiny_run_overrides(tmp_path / "run", tiny_model) + ["reference_refresh=2", "total_prompts=18"])
    manifest = run_loop(config, progress=False, echo=lambda line: None)
    references = [manifest["rounds"][r]["train"]["reference"] for r in ("0", "1", "2")]
    assert references[:2] == [tiny_model, tiny_model] and references[2].endswith("rounds/r001/checkpoint")
    assert (tmp_path / "run/rounds/r001/checkpoint/model.safetensors").exists()
    assert not (tmp_path / "run/rounds/r000/checkpoint").exists()


def test_replay_recomputes_every_stage_of_a_round_to_the_recorded_hashes(tiny_model, tmp_path):
    """`alignloop replay`: every stage of round 1 (its sampling policy, round 0's checkpoint, is kept) and the
    SFT model's evaluation recomputed in a scratch folder match the manifest; a recorded input that was changed
    makes the stage after it differ (exit 1); a deleted policy is a one-line error."""
    run_dir = tmp_path / "run"
    subprocess.run(_cli(run_dir, tiny_model, "keep_checkpoints=2"), check=True, capture_output=True)
    before = record_files(run_dir)
    replay = lambda *args: subprocess.run([sys.executable, "-m", "alignloop", "--no-progress", "replay", str(run_dir),  # noqa: E731
                                           *args], capture_output=True, text=True, timeout=600)
    result = replay("--round", "1", "--scratch", str(tmp_path / "scratch"))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [[s, "match"] for s in ("sample", "label", "feedback", "train", "eval")]
    assert replay("--round", "sft", "--scratch", str(tmp_path / "scratch2")).stdout.split()[:2] == ["eval", "match"]
    assert record_files(run_dir) == before  # the run directory is only read

    samples = run_dir / "rounds/r001/samples.jsonl"
    samples.write_text(samples.read_text().replace('"output": "', '"output": "x', 1))
    result = replay("--round", "1", "--stage", "label", "--scratch", str(tmp_path / "scratch3"))
    assert result.returncode == 1 and result.stdout.split()[:2] == ["label", "DIFFERS"]

    shutil.rmtree(run_dir / "rounds/r000/checkpoint")
    result = replay("--round", "1", "--stage", "train")
    assert result.returncode == 2 and "is gone" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    # the whole round: said before any work for the stages whose policy went; the others are replayed
    result = replay("--round", "1", "--scratch", str(tmp_path / "scratch4"))
    assert result.returncode == 1, result.stderr[-3000:]  # (label still differs: its input was changed above)
    assert [line.split()[:2] for line in result.stdout.splitlines()] == [
        ["sample", "cannot"], ["label", "DIFFERS"], ["feedback", "match"], ["train", "cannot"], ["eval", "match"]]
    assert not (tmp_path / "scratch4/1-sample").exists()


def _file_size_limit(limit: int):
    """A preexec_fn: every file the run writes is cut at `limit` bytes and the write fails with EFBIG (Python
    ignores SIGXFSZ), as on a full disk."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("limit, stage", [(8_000, None), (1_000_000, "train")])
def test_a_full_disk_stops_with_one_line_and_the_same_command_goes_on(limit, stage, clean_run, tiny_model, tmp_path):
    """Files cut at 8 kB (a record file is the first to fail) or 1 MB (the first checkpoint, 6 MB of tiny
    weights): a one-line error naming the file, a non-zero exit, every finished stage and the manifest intact;
    the same command, with room again, ends with the records of a run that never ran out."""
    killed = tmp_path / "run"
    full = subprocess.run(_cli(killed, tiny_model, SMALL_BATCHES), capture_output=True, text=True, timeout=600,
                          preexec_fn=_file_size_limit(limit))
    assert full.returncode == 1, full.stderr[-3000:]
    error = full.stderr.strip().splitlines()
    assert len(error) == 1 and str(killed) in error[0] and "File too large" in error[0], full.stderr[-3000:]
    manifest = json.loads((killed / "manifest.json").read_text())  # intact: it parses, and what it records is there
    for r, stages in manifest["rounds"].items():
        for name, entry in stages.items():
            if "sha256" in entry:
                assert (killed / entry["output"]).is_file(), (r, name)
    if stage == "train":
        assert "train" not in manifest["rounds"]["0"] and "feedback" in manifest["rounds"]["0"]
        assert not (killed / "rounds/r000/checkpoint.tmp").exists()  # nothing half-written left

    again = subprocess.run(_cli(killed, tiny_model, SMALL_BATCHES), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_run(killed, clean_run)
    for line in (killed / "metrics.jsonl").read_text().splitlines():  # a line the full disk tore was cut off
        json.loads(line)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("chattr"), reason="needs root's chattr to make a folder read-only")
def test_a_read_only_round_folder_stops_with_one_line_and_the_same_command_goes_on(clean_run, tiny_model, tmp_path):
    """Round 0's folder made immutable (chattr +i: read-only even for root, whom permissions do not stop) before
    the run: the SFT evaluation finishes and is kept, round 0's sampling fails naming the folder; writable
    again, the same command finishes with the records of a run never stopped."""
    killed = tmp_path / "run"
    folder = killed / "rounds" / "r000"
    folder.mkdir(parents=True)
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    try:
        failed = subprocess.run(_cli(killed, tiny_model, SMALL_BATCHES), capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert failed.returncode == 1, failed.stderr[-3000:]
    error = failed.stderr.strip().splitlines()
    assert len(error) == 1 and str(folder) in error[0] and "not permitted" in error[0], failed.stderr[-3000:]
    assert list(json.loads((killed / "manifest.json").read_text())["rounds"]) == ["sft"]
    assert (killed / "eval/sft_heldout.jsonl").is_file()

    again = subprocess.run(_cli(killed, tiny_model, SMALL_BATCHES), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_run(killed, clean_run)
