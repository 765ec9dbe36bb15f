"""The loop and the trainer under real data parallelism: processes on this CPU started by torch's launcher
(`python -m torch.distributed.run`, gloo), compared with one process.

What needs GPUs cannot run here: NCCL, vLLM engines per process or in tensor-parallel groups, DeepSpeed's
CUDA side (its NCCL collectives, bf16 ZeRO with float32 master weights, fused kernels). DeepSpeed ZeRO-2/3
itself runs here, on gloo with a torch AdamW. The README's recipes cover the rest; they are checked on a GPU
machine when one is lent, never by these tests.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import bitsandbytes_problem, deepspeed_problem, free_port, launcher_problem, torchrun
from test_loop import record_files, stage_hashes

# The launcher gives each of several processes one thread; a lone process gets one too, so that its float sums
# run in the same order and "the same records" can be asked byte for byte. CPU only, even on a GPU machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}

PAIRS = [
    {"type": "pairwise_feedback", "prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"Say hi {i}."}],
     "output_A": f"hi there {i}", "output_B": f"HELLO THERE {i}!", "label": 1, "reward_A": 1.0, "reward_B": 0.0,
     "reward_difference": 1.0}
    for i in range(8)
]


def train_cmd(launcher, feedback, out, policy, batch_size, accumulation, *extra):
    return [*launcher, "-m", "alignloop", "--no-progress", "train", str(feedback), "--out", str(out), "--policy", policy,
            "--batch-size", str(batch_size), "--gradient-accumulation-steps", str(accumulation), "--lr", "1e-3",
            "--warmup-steps", "0", "--epochs", "1", "--mixed-precision", "no", *extra]


@pytest.mark.requires(launcher_problem())
def test_two_processes_take_the_steps_of_one_process(tiny_model, tmp_path):
    """A micro-batch of 4 examples is split 2 + 2 between two DDP processes, which average their gradients;
    with two micro-batches accumulated per step, both take the optimizer steps one process takes on the
    whole micro-batches, so the weights must agree."""
    feedback = tmp_path / "feedback.jsonl"
    feedback.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    two, one = tmp_path / "two", tmp_path / "one"
    r2 = subprocess.run(train_cmd(torchrun(2), feedback, two, tiny_model, 4, 2), capture_output=True, text=True,
                        timeout=600, env=ENV)
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = subprocess.run(train_cmd([sys.executable], feedback, one, tiny_model, 4, 2), capture_output=True, text=True,
                        timeout=600, env=ENV)
    assert r1.returncode == 0, r1.stderr[-3000:]

    state2 = json.loads((two / "training_state" / "trainer_state.json").read_text())
    state1 = json.loads((one / "training_state" / "trainer_state.json").read_text())
    assert state2["global_step"] == state1["global_step"] == 1  # 8 pairs = 2 micro-batches of 4 = 1 step
    assert_close_weights(two, one, atol=2e-6)
    w1, w0 = (load_file(str(p / "model.safetensors")) for p in (one, Path(tiny_model)))
    assert any(not torch.equal(w1[k], w0[k]) for k in w1)  # and training did move the weights


@pytest.mark.requires(launcher_problem())
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", pytest.param("ddp-qlora", marks=pytest.mark.requires(bitsandbytes_problem()))])
def test_two_processes_train_the_lora_adapter_of_one_process(strategy, tiny_model, wide_tiny_model, tmp_path):
    """policy_adapter under DDP and FSDP2, and a 4-bit base (QLoRA) under DDP: the adapter (and its moments)
    two processes train is the one a single process trains; the base's weights never enter a checkpoint."""
    feedback = tmp_path / "feedback.jsonl"
    feedback.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    two, one = tmp_path / "two", tmp_path / "one"
    lora = ("--set", "policy_adapter.r=4", "--lr", "1e-2")
    policy = tiny_model
    if strategy == "ddp-qlora":
        strategy, policy, lora = "ddp", wide_tiny_model, (*lora, "--set", "policy_adapter.quantize=nf4")
    r2 = subprocess.run(train_cmd(torchrun(2), feedback, two, policy, 4, 2, *lora, "--strategy", strategy),
                        capture_output=True, text=True, timeout=600, env=ENV)
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = subprocess.run(train_cmd([sys.executable], feedback, one, policy, 4, 2, *lora), capture_output=True,
                        text=True, timeout=600, env=ENV)
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert not (two / "model.safetensors").exists()
    assert_close_weights(two, one, atol=2e-6, weights="adapter_model.safetensors")
    adapter = load_file(str(one / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())  # it trained


def assert_close_weights(a: Path, b: Path, atol: float, weights: str = "model.safetensors") -> None:
    """Weights (`weights`: the file that holds them) and AdamW moments of two checkpoints agree within `atol`."""
    for name in (weights, "training_state/optimizer.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=1e-4, msg=lambda m: f"{name} {key}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# The whole loop: 2 rounds on the tiny model, labeled by a tiny reward model whose forward passes are shared
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop_config(tiny_model, smollm2_path, tmp_path_factory) -> Path:
    """Batches that do not divide evenly between two processes: 3 examples per training micro-batch, 4 samples
    per reward-model batch (18 samples: 5 batches), 6 sequences per sampling batch."""
    from transformers import AutoTokenizer

    from test_reward_model import build_rm

    folder = tmp_path_factory.mktemp("loop-config")
    rm = build_rm(folder / "rm", AutoTokenizer.from_pretrained(smollm2_path), 1, None)
    config = folder / "config.yaml"
    config.write_text(f"""\
policy: {tiny_model}
prompts_per_round: 6
total_prompts: 12
samples_per_prompt: 3
heldout: {{limit: 6}}
sampler: {{backend: hf, max_new_tokens: 12, dtype: float32, batch_size: 6}}
eval: {{max_new_tokens: 12}}
feedback: {{mode: max, length_ratio: null, truncation_penalty: 0}}
labeler: {{kind: reward_model, path: {rm}, dtype: float32, batch_size: 4}}
optim: {{batch_size: 3, epochs: 1, lr: 1.0e-3, mixed_precision: "no"}}
""")
    return config


def run_cmd(processes: int, config: Path, run_dir: Path, *settings: str) -> list[str]:
    launcher = torchrun(processes) if processes > 1 else [sys.executable]
    return [*launcher, "-m", "alignloop", "--no-progress", "run", str(config), "--set", f"run_dir={run_dir}",
            *(a for s in settings for a in ("--set", s))]


def run(processes: int, config: Path, run_dir: Path, *settings: str, crash_at: str | None = None,
        env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, **(env or {})}
    if crash_at:
        env["ALIGNLOOP_CRASH_AT"] = crash_at
    return subprocess.run(run_cmd(processes, config, run_dir, *settings), capture_output=True, text=True, timeout=600,
                          env=env)


def train_steps(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["event"] == "train_step"]


@pytest.fixture(scope="module")
def one_process_run(loop_config, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    result = run(1, loop_config, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def two_process_run(loop_config, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("two") / "run"
    result = run(2, loop_config, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    # the main process alone prints the stage lines and the table
    assert result.stdout.count("held-out reward, last round minus SFT") == 1 and result.stdout.count("r000 sample ") == 1
    return run_dir


def final_checkpoint(run_dir: Path) -> Path:
    return run_dir / "rounds/r001/checkpoint"


@pytest.mark.requires(launcher_problem())
def test_two_process_run_writes_the_records_of_one_process(one_process_run, two_process_run):
    """Sampling, reward-model scoring, reference log-probs and training shared between two processes: the
    samples, scores, feedback and held-out answers of both rounds are byte for byte those of one process (so
    round 1 sampled from the same policy), and the weights and moments agree to float32 rounding."""
    files = record_files(two_process_run)
    assert len(files) == 9 and files == record_files(one_process_run)
    assert_close_weights(final_checkpoint(two_process_run), final_checkpoint(one_process_run), atol=1e-5)
    assert len(train_steps(two_process_run)) == 4  # 2 rounds x 6 pairs / 3 a step, logged once


@pytest.mark.requires(launcher_problem())
def test_fsdp_takes_the_path_of_ddp(loop_config, two_process_run, tmp_path):
    """FSDP2 (`fully_shard` per transformer block on a CPU device mesh): parameters, gradients and moments
    sharded between the two processes, gathered whole into the checkpoint. The loss of every step, the
    records and the weights are DDP's, to float32 rounding."""
    run_dir = tmp_path / "run"
    result = run(2, loop_config, run_dir, "optim.strategy=fsdp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_path(run_dir, two_process_run)


def assert_same_path(run_dir: Path, ddp_run: Path) -> None:
    """The loss, gradient norm and margin of every step, the records, and the final weights and moments of a
    run are those of the 2-process DDP run, to float32 rounding."""
    steps, ddp = train_steps(run_dir), train_steps(ddp_run)
    assert [s["step"] for s in steps] == [s["step"] for s in ddp] == [1, 2, 3, 4]
    for a, b in zip(steps, ddp):
        for key in ("loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
        # The margin is beta times a difference of sums of ~100 log-probs, each sum good to ~1e-4 in float32.
        assert a["rewards/margin"] == pytest.approx(b["rewards/margin"], abs=1e-5)
    assert record_files(run_dir) == record_files(ddp_run)
    assert_close_weights(final_checkpoint(run_dir), final_checkpoint(ddp_run), atol=1e-5)


def accelerate_launch(example: str, loop_config, run_dir: Path) -> None:
    """`accelerate launch --config_file examples/EXAMPLE --num_processes 2 -m alignloop run ...`, which must succeed."""
    config = Path(__file__).parents[1] / "examples" / example
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
              "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    result = subprocess.run([*launch, *run_cmd(1, loop_config, run_dir)[1:]], capture_output=True, text=True,
                            timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]


def trained_with(run_dir: Path, round_index: int = 1) -> tuple:
    summary = json.loads((run_dir / "manifest.json").read_text())["rounds"][str(round_index)]["train"]["summary"]
    return summary["processes"], summary["strategy"]


@pytest.mark.requires(launcher_problem())
def test_accelerate_launch_with_an_fsdp_config(loop_config, one_process_run, tmp_path):
    """`accelerate launch --config_file examples/fsdp.yaml` (the README's command, with 2 processes): the
    trainer takes FSDP from the launcher's config, and every process still loads whole models for sampling
    and scoring (an FSDP config would otherwise leave all but the first process with empty weights)."""
    run_dir = tmp_path / "run"
    accelerate_launch("fsdp.yaml", loop_config, run_dir)
    assert trained_with(run_dir) == (2, "fsdp")
    assert record_files(run_dir) == record_files(one_process_run)
    assert_close_weights(final_checkpoint(run_dir), final_checkpoint(one_process_run), atol=1e-5)


@pytest.fixture(scope="module")
def zero_everything(tmp_path_factory) -> dict:
    """The environment of an `accelerate launch` whose DeepSpeed JSON partitions every parameter under ZeRO-3
    (by default those under 1e5 elements, all of the tiny model's but its embeddings, stay whole)."""
    path = tmp_path_factory.mktemp("deepspeed") / "ds_config.json"
    path.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    return {"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}


@pytest.mark.requires(launcher_problem())
@pytest.mark.requires(deepspeed_problem())
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_takes_the_path_of_ddp(stage, loop_config, two_process_run, zero_everything, tmp_path):
    """DeepSpeed ZeRO-2 (gradients and moments partitioned) and ZeRO-3 (the weights too, each gathered by the
    engine's forward: the output head is then applied by the model itself, not packed) on two processes over
    gloo, with a torch AdamW and DeepSpeed's own clipping: the loss and gradient norm of every step, the
    records, and the weights and moments gathered whole into the checkpoint are DDP's, to float32 rounding.
    Not checked on a CPU: NCCL, DeepSpeed's bf16 mode (optim.dtype: bfloat16), offloading (refused)."""
    run_dir = tmp_path / "run"
    result = run(2, loop_config, run_dir, "optim.strategy=deepspeed", f"optim.zero_stage={stage}", env=zero_everything)
    assert result.returncode == 0, result.stderr[-3000:]
    assert trained_with(run_dir) == (2, "deepspeed")
    assert_same_path(run_dir, two_process_run)


@pytest.mark.requires(launcher_problem())
@pytest.mark.requires(deepspeed_problem())
@pytest.mark.parametrize("before, after, stage", [(2, 1, 3), (1, 2, 3), (1, 2, 2)])
def test_resume_deepspeed_with_another_number_of_processes(before, after, stage, loop_config, one_process_run,
                                                          zero_everything, tmp_path):
    """A DeepSpeed run killed after round 0 resumes on one process, and a one-process run under DeepSpeed on
    two: round 1 starts from round 0's AdamW moments, gathered whole from the ZeRO partitions or loaded
    into them, and ends where an uninterrupted one-process run ends."""
    run_dir = tmp_path / "run"
    settings = ("optim.strategy=deepspeed", f"optim.zero_stage={stage}")
    crashed = run(before, loop_config, run_dir, *settings, crash_at="mark_done.eval#2", env=zero_everything)
    assert crashed.returncode != 0 and (run_dir / "rounds/r000/checkpoint").is_dir()
    assert not (run_dir / "rounds/r001").exists()
    resumed = run(after, loop_config, run_dir, *settings, env=zero_everything)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert trained_with(run_dir, 0) == (before, "deepspeed" if before > 1 else "none")
    assert trained_with(run_dir, 1) == (after, "deepspeed" if after > 1 else "none")
    assert record_files(run_dir) == record_files(one_process_run)
    # Moments restarted from zero at round 1 would be far off after its two steps.
    assert_close_weights(final_checkpoint(run_dir), final_checkpoint(one_process_run), atol=1e-5)
    state = json.loads((final_checkpoint(run_dir) / "training_state/trainer_state.json").read_text())
    assert state["global_step"] == 4 and [r["round"] for r in state["rounds"]] == [0, 1]


@pytest.mark.requires(launcher_problem())
@pytest.mark.requires(deepspeed_problem())
def test_accelerate_launch_with_a_deepspeed_config(loop_config, one_process_run, tmp_path):
    """`accelerate launch --config_file examples/deepspeed_zero3.yaml` (the README's command, with 2 processes
    on this CPU): the trainer takes DeepSpeed ZeRO-3 from the launcher's config and ends where one process
    ends."""
    run_dir = tmp_path / "run"
    accelerate_launch("deepspeed_zero3.yaml", loop_config, run_dir)
    assert trained_with(run_dir) == (2, "deepspeed")
    assert record_files(run_dir) == record_files(one_process_run)
    assert_close_weights(final_checkpoint(run_dir), final_checkpoint(one_process_run), atol=1e-5)


@pytest.mark.requires(launcher_problem())
def test_two_nodes_with_the_slurm_scripts_rendezvous(loop_config, one_process_run, tmp_path):
    """examples/slurm_2nodes.sbatch's torchrun line, as two nodes of one process each on this machine: each
    "node" is its own launcher, and they meet through the c10d rendezvous as SLURM's would."""
    script = (Path(__file__).parents[1] / "examples" / "slurm_2nodes.sbatch").read_text()
    assert "--rdzv_backend c10d" in script and "-m alignloop run" in script
    run_dir, port = tmp_path / "run", free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "test-job",
            *run_cmd(1, loop_config, run_dir)[1:]]
    nodes = [subprocess.Popen(node, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [n.communicate(timeout=600) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [err[-3000:] for _, err in outputs]
    assert sum(out.count("held-out reward, last round minus SFT") for out, _ in outputs) == 1  # one main process in the whole job
    assert record_files(run_dir) == record_files(one_process_run)


@pytest.mark.requires(launcher_problem())
@pytest.mark.parametrize("fault, says", [
    ("the second process SIGKILLed while it samples", "exitcode  : -9"),
    ("the main process fails alone (its labeler cannot be made)", "no_such_module"),
])
def test_a_failing_process_takes_the_job_down_at_once(fault, says, loop_config, tmp_path):
    """No process waits forever for one that died or failed: the launcher stops the job within seconds and
    says which process failed and why."""
    config, crash_at = loop_config, None
    if "SIGKILL" in fault:
        crash_at = "sample.batch#1@1"
    else:  # a reward function is made on the main process only, so the others are already sampling
        config = tmp_path / "config.yaml"
        config.write_text("\n".join("labeler: {kind: callable, function: 'no_such_module:score'}"
                                     if line.startswith("labeler:") else line
                                     for line in loop_config.read_text().splitlines()) + "\n")
    started = time.time()
    result = run(2, config, tmp_path / "run", crash_at=crash_at)
    assert result.returncode != 0 and time.time() - started < 120
    assert says in result.stderr + result.stdout


@pytest.mark.requires(launcher_problem())
@pytest.mark.parametrize("before, after, strategy", [(2, 1, "ddp"), (1, 2, "ddp"), (2, 1, "fsdp"), (1, 2, "fsdp")])
def test_resume_with_another_number_of_processes(before, after, strategy, loop_config, one_process_run, tmp_path):
    """A run killed after round 0 resumes under another number of processes: round 1 starts from round 0's
    checkpoint, its AdamW moments and scheduler position, and ends where an uninterrupted run ends. Under
    FSDP the moments were saved from shards and are loaded whole, or the other way round."""
    run_dir = tmp_path / "run"
    setting = f"optim.strategy={strategy}"
    crashed = run(before, loop_config, run_dir, setting, crash_at="mark_done.eval#2")  # round 0's eval written
    assert crashed.returncode != 0 and (run_dir / "rounds/r000/checkpoint").is_dir()
    assert not (run_dir / "rounds/r001").exists()
    resumed = run(after, loop_config, run_dir, setting)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert record_files(run_dir) == record_files(one_process_run)
    # Moments restarted from zero at round 1 would be far off after its two steps.
    assert_close_weights(final_checkpoint(run_dir), final_checkpoint(one_process_run), atol=1e-5)
    state = json.loads((final_checkpoint(run_dir) / "training_state/trainer_state.json").read_text())
    assert state["global_step"] == 4 and [r["round"] for r in state["rounds"]] == [0, 1]


@pytest.mark.requires(launcher_problem())
def test_kill_9_of_the_whole_job_mid_round_then_rerun(loop_config, two_process_run, tmp_path):
    """The launcher and both processes SIGKILLed at once (as a scheduler ends a job) while round 1 trains;
    the same command again ends with exactly the records, manifest hashes and weights of a run that never
    stopped, and no temporary files."""
    run_dir = tmp_path / "run"
    job = subprocess.Popen(run_cmd(2, loop_config, run_dir), env=ENV, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while "feedback" not in json.loads((run_dir / "manifest.json").read_text() if (run_dir / "manifest.json").exists()
                                       else "{}").get("rounds", {}).get("1", {}):
        assert job.poll() is None and time.time() < deadline, "the run ended before the kill point"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (run_dir / "rounds/r001/heldout.jsonl").exists()
    rerun = run(2, loop_config, run_dir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert record_files(run_dir) == record_files(two_process_run)
    assert stage_hashes(run_dir) == stage_hashes(two_process_run)
    assert not list(run_dir.glob("**/*.tmp")) and not list(run_dir.glob("**/.*.tmp"))


# Chunks of 2 prompts (3 a round) and 4 samples (5 a round), and a step checkpoint after every optimizer step
IN_PIECES = ["chunks.sample=2", "chunks.label=4", "optim.checkpoint_every=1"]


@pytest.fixture(scope="module")
def one_process_run_in_pieces(loop_config, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one-in-pieces") / "run"
    result = run(1, loop_config, run_dir, *IN_PIECES)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.requires(launcher_problem())
@pytest.mark.parametrize("point, kept", [
    ("label.chunk#2@0", ("label", [0, 1])),  # round 0's second label chunk recorded, the third not begun
    ("train.partial#1@0", ("train", 1)),  # round 0's first optimizer step kept in checkpoint.partial
])
def test_two_processes_killed_mid_stage_keep_their_chunks_and_steps(point, kept, loop_config, one_process_run_in_pieces,
                                                                    tmp_path):
    """Mid-stage resume under a launcher: the job killed part-way through labeling (or training) keeps the
    chunks (or the step checkpoint) it finished, the same command redoes only the rest, and the run ends with
    the records of one process that never stopped, and its weights."""
    run_dir = tmp_path / "run"
    crashed = run(2, loop_config, run_dir, *IN_PIECES, crash_at=point)
    assert crashed.returncode != 0
    stage, done = kept
    from test_loop import chunks_done

    if stage == "label":
        assert chunks_done(run_dir, 0, "label") == done and "label" not in json.loads((run_dir / "manifest.json").read_text())["rounds"].get("0", {})
    else:
        state = json.loads((run_dir / "rounds/r000/checkpoint.partial/training_state/trainer_state.json").read_text())
        assert state["global_step"] == done and not (run_dir / "rounds/r000/checkpoint").exists()
    resumed = run(2, loop_config, run_dir, *IN_PIECES)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if stage == "label":
        assert chunks_done(run_dir, 0, "label") == [0, 1, 2, 3, 4]  # the kept two were not made again
    else:
        steps = [row["step"] for row in train_steps(run_dir) if row["round"] == 0]
        assert steps == [1, 2], steps  # step 1 before the kill; the rerun went on with step 2 alone
    assert record_files(run_dir) == record_files(one_process_run_in_pieces)
    assert_close_weights(final_checkpoint(run_dir), final_checkpoint(one_process_run_in_pieces), atol=1e-5)
