"""The whole loop, end to end, on a tiny random model: layout, manifest, resume, and a kill -9 mid-round."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from alignloop.config import load_config
from alignloop.loop import format_table, run_loop
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
    import pytest

    from alignloop.config import ConfigError

    with pytest.raises(ConfigError, match="different configuration"):
        run_loop(load_config(None, overrides + ["optim.lr=0.5"]), progress=False)


def _cli(run_dir, tiny_model):
    args = [a for o in tiny_run_overrides(run_dir, tiny_model) for a in ("--set", o)]
    return [sys.executable, "-m", "alignloop", "--no-progress", "run", *args]


def test_kill_9_mid_round_then_rerun_gives_the_same_records(tiny_model, tmp_path):
    """A run killed with SIGKILL in the middle of round 1 and started again ends with exactly the records
    (and weights) of a run that never stopped."""
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

    assert record_files(killed) == record_files(clean)
    a, b = stage_hashes(killed), stage_hashes(clean)
    assert a == b
    assert not list(killed.glob("**/*.tmp")) and not list(killed.glob("**/.*.tmp"))


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
