"""The trainer under real data parallelism: two processes on the CPU (torchrun, gloo backend)."""

import json
from pathlib import Path
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import launcher_problem, torchrun

PAIRS = [
    {"type": "pairwise_feedback", "prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"Say hi {i}."}],
     "output_A": f"hi there {i}", "output_B": f"HELLO THERE {i}!", "label": 1, "reward_A": 1.0, "reward_B": 0.0,
     "reward_difference": 1.0}
    for i in range(8)
]


def train_cmd(launcher, feedback, out, policy, accumulation):
    return [*launcher, "-m", "alignloop", "--no-progress", "train", str(feedback), "--out", str(out), "--policy", policy,
            "--batch-size", "2", "--gradient-accumulation-steps", str(accumulation), "--lr", "1e-3",
            "--warmup-steps", "0", "--epochs", "1", "--mixed-precision", "no"]


@pytest.mark.requires(launcher_problem())
def test_two_processes_equal_one_process_with_gradient_accumulation(tiny_model, tmp_path):
    """Two DDP processes with micro-batches of 2 average their gradients; one process accumulating two
    micro-batches of 2 takes the same optimizer steps, so the weights must agree."""
    feedback = tmp_path / "feedback.jsonl"
    feedback.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    two, one = tmp_path / "two", tmp_path / "one"
    r2 = subprocess.run(train_cmd(torchrun(2), feedback, two, tiny_model, 1), capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = subprocess.run(train_cmd([sys.executable], feedback, one, tiny_model, 2), capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]

    state2 = json.loads((two / "training_state" / "trainer_state.json").read_text())
    state1 = json.loads((one / "training_state" / "trainer_state.json").read_text())
    assert state2["global_step"] == state1["global_step"] == 2
    w2, w1, w0 = (load_file(str(p / "model.safetensors")) for p in (two, one, Path(tiny_model)))
    assert w2.keys() == w1.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=2e-6, rtol=1e-4)
    assert any(not torch.equal(w1[k], w0[k]) for k in w1)  # and training did move the weights
