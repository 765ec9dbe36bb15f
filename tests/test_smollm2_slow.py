"""End to end on the real embedded default model, SmolLM2-135M-Instruct (slow: minutes on a CPU)."""

import json
import subprocess
import sys

import pytest

from alignloop.records import read_records

pytestmark = pytest.mark.slow


def test_embedded_default_aligns(tmp_path):
    """`alignloop run` with no config: 3 rounds on SmolLM2, measured as users measure (greedy answers of up to
    256 tokens to held-out prompts on new topics, judged by IFEval's strict checkers): the instruction-level
    accuracy up by at least 0.15 and the held-out reward above the SFT model's, both paired 95% confidence
    intervals over the held-out prompts excluding zero, with the answers no shorter than 70% of the SFT model's
    (the issue's targets; about 10 minutes on 2 CPU cores with vLLM, the default where it is installed, as in
    CI).

    The run is seed 0's, whose samples are the same run after run; it ends at +0.206 and 76% of the length. At
    seeds 1 and 2 the same default ends at +0.127 with 24% of the length and +0.091 with 77% (README), so these
    thresholds hold for this seed, not for the default's effect in general."""
    run_dir = tmp_path / "default"
    cmd = [sys.executable, "-m", "alignloop", "--no-progress", "run", "--run-dir", str(run_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, result.stderr[-2000:]
    print(result.stdout)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    summary = manifest["summary"]
    assert manifest["status"] == "complete" and summary["rounds"] == 3
    # online: round 1 samples from round 0's policy; a real instruct model answers in words, the verifier scores
    # them; the policy resumes its steps; only the last round's checkpoint is kept
    samples = read_records(run_dir / "rounds/r001/samples.jsonl")
    assert len(samples) == 48 * 4 and all(s["generator"] == "rounds/r000/checkpoint" for s in samples)
    scored = read_records(run_dir / "rounds/r000/scored.jsonl")
    assert sum(len(s["output"].split()) >= 3 for s in scored) >= 0.9 * len(scored)
    assert 0.0 < sum(s["reward"] for s in scored) / len(scored) < 1.0
    steps = [manifest["rounds"][str(r)]["train"]["summary"]["global_step"] for r in range(3)]
    assert 0 < steps[0] < steps[1] < steps[2], steps
    assert (run_dir / "rounds/r002/checkpoint/model.safetensors").exists()
    assert not (run_dir / "rounds/r000/checkpoint").exists() and not (run_dir / "rounds/r001/checkpoint").exists()
    change = summary["heldout_change"]
    assert change["n"] == 100 and change["ci95"][0] > 0, change
    assert summary["heldout_last"] > summary["heldout_sft"] + 0.05
    accuracy = summary["heldout_ifeval"]["change"]["instruction"]
    assert accuracy["n"] == 100 and accuracy["mean"] >= 0.15 and accuracy["ci95"][0] > 0, accuracy
    length = summary["heldout_length"]
    assert length["last"]["words"] >= 0.70 * length["sft"]["words"], length  # the floor the project aims for
    assert length["last"]["truncated"] < length["sft"]["truncated"], length  # fewer answers cut at the cap
    # the console: a line per finished stage, then the table; nothing from vLLM, transformers and the rest
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert any(line.startswith("held-out IFEval instruction accuracy (strict): ") for line in lines[-4:])
    assert any(line.startswith("held-out answer length: ") for line in lines[-4:])
    assert lines[0].startswith("SFT eval") and [line[:4] for line in lines[1:16]] == [f"r00{r}" for r in range(3) for _ in range(5)]
    # the report, redrawn after every round: every plot of the default run (the browser test is test_report's)
    page = (run_dir / "report/index.html").read_text()
    for plot in ("reward", "win_rate", "ifeval", "length", "kl", "pairs", "train_steps", "stages"):
        assert f'id="{plot}"' in page and (run_dir / f"report/{plot}.png").stat().st_size > 10_000, plot
