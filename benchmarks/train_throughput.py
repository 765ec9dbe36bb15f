"""`alignloop train` against TRL's `DPOTrainer` on the same pairs: tokens per second and peak memory.

Three trainers, each run as a fresh Python process (so that each pays its own start-up, imports and model
loading, as a user would, and its peak memory is its own), one after another, never two at once:
- alignloop: `alignloop train feedback.jsonl --loss dpo` (run in-process through `alignloop.cli.main`, the
  function the `alignloop` program calls); the reference log-probs are computed once before training and the
  reference freed before the policy is loaded;
- TRL (ref model resident): TRL's `DPOTrainer` with `precompute_ref_log_probs=False`, its default: a second
  copy of the model stays in memory and runs a forward pass on every batch;
- TRL (ref precomputed): the same with `precompute_ref_log_probs=True`: a reference pass over the data in the
  trainer's constructor (with the policy itself, before any update), then training without a reference model.

The same work for all: the embedded default policy (SmolLM2-135M-Instruct, `alignloop.models.
ensure_default_policy()`), the same pairs, micro-batches of `--batch-size` (8) pairs, no gradient accumulation,
1 epoch, AdamW at lr 5e-5 held constant (no warmup: alignloop `optim.warmup_steps=0`, TRL
`lr_scheduler_type="constant"`), no weight decay, gradients clipped at norm 1.0, DPO's sigmoid loss with beta
0.1, max_length 512, seed 0, float32 weights with bfloat16 autocast. alignloop gets `--set
optim.mixed_precision=bf16 optim.dtype=float32`. TRL gets `bf16=True` with float32 weights
(`model_init_kwargs={"dtype": "float32"}`) and `use_cpu=True`: on a machine without a GPU, transformers'
TrainingArguments refuses `bf16=True` unless `use_cpu=True` is set ("Your setup doesn't support bf16/gpu").
With both, Accelerate's mixed precision is "bf16" (`native_amp`): `prepare_model` wraps the policy's and the
resident reference model's `forward` in `torch.autocast("cpu", dtype=torch.bfloat16)` (outputs converted back
to float32), and the precomputed reference pass enters `accelerator.autocast()`, the same autocast; the
weights, gradients and AdamW moments stay float32. It is the same arrangement as alignloop's, and the script
checks it on every run: a one-shot hook on a linear layer of each model records the dtype of its weights, of
its output and whether autocast is on, and the header prints what it saw.

What is kept equal beyond the settings above, and what is each trainer's own:
- gradient (activation) checkpointing: TRL's configs default it to on, alignloop's to off; it is off for both
  here (TRL `gradient_checkpointing=False`), so both do the same forward and backward passes.
  `--activation-checkpointing` turns it on for both (alignloop `optim.activation_checkpointing=true`, TRL
  `gradient_checkpointing=True`, its default): less memory, one more forward pass per step;
- both write one resumable checkpoint at the end (alignloop: weights, AdamW moments, scheduler, trainer
  state; TRL: `save_strategy="epoch"`, which with one epoch saves once at the end the same things). It is in
  the process seconds and the peak memory, not in the training seconds;
- no evaluation, `report_to="none"`, `logging_strategy="no"` (TRL still computes its per-step metrics), no
  progress bars, `dataloader_num_workers=0`, the datasets cache in a fresh folder per run (TRL caches
  precomputed reference log-probs there: a warm cache would skip the reference pass);
- TRL keeps its defaults otherwise: its fused LM head (log-probs of completion tokens only, in chunks),
  `optim="adamw_torch_fused"` (alignloop: `torch.optim.AdamW`'s default implementation), its padding (both pad
  on the right; TRL puts prompt+chosen and prompt+rejected in separate rows, alignloop a prompt and both
  responses in one row, the prompt computed once).

Data: pairwise feedback records (the contract's `pairwise_feedback`: `prompt` as chat turns, `output_A`,
`output_B`, `label`), read with `alignloop.records.read_feedback`, from `--feedback` files (or run
directories: their `rounds/*/feedback.jsonl`), by default those of the embedded default run
(`runs/default/rounds/r*/feedback.jsonl`, written by `alignloop run`: the embedded default, 3 rounds in about
14 minutes on 2 cores; one such run gave 85 pairs). alignloop trains on them as one feedback.jsonl; TRL on
the same pairs as a conversational dataset `{"prompt": turns, "chosen": [{"role": "assistant", "content":
...}], "rejected": [...]}`, to which it applies the chat template itself.

Measured in every run, and reported as the median over `--repeats` runs per trainer (the trainers' order
rotates between repeats):
- process seconds: the wall time of the whole process (Python start, imports, model loading, tokenizing,
  reference pass, training, checkpoint), as a user waits for it;
- training seconds: the reference pass (first to last reference batch) plus the training loop (start of
  the first batch's loss to the end of the last optimizer step); model loading, tokenizing, building the
  optimizer and the checkpoint are left out. TRL with a resident reference runs its reference forwards
  inside the loop;
- tokens/s: training tokens / training seconds. Training tokens are the non-padding tokens of the
  prompt+chosen and prompt+rejected sequences of the epoch (the prompt counted once per response, whether or
  not the trainer computes it twice), each trainer's own sequences after its cut to max_length (alignloop
  cuts a long pair's prompt from the left, TRL a long sequence's end; the header says how many are longer). The
  reference pass's tokens are not counted; its time is in the seconds. "tok/s process" divides the same
  tokens by the process seconds. The two trainers' sequences differ by one token per response: TRL
  tokenizes the whole conversation with the chat template, which ends every turn with "<|im_end|>\\n", so each
  completion ends with a newline token after the end-of-turn token; alignloop's response ends at
  "<|im_end|>" (`encode_response`), where the sampler stopped. The prompts are the same tokens (both render
  the prompt with `add_generation_prompt=True`, SmolLM2's default system turn included). The header prints
  both counts;
- peak memory: the trainer process's own peak resident set (`resource.getrusage(RUSAGE_SELF).ru_maxrss`,
  taken by the process at its end); the header also gives the peak so far at the end of the reference pass
  and of the training loop, which shows where the peak falls;
- achieved model FLOP/s: 8 * N * training tokens / training seconds, that is 6 N per token for the policy's
  forward and backward plus 2 N per token for the reference forward, N the model's parameters counted as
  matmul weights (the tied input embedding / output head once, as the head's matmul; the attention's
  sequence-squared term left out). It is the same formula for every trainer, so it compares like tokens/s
  does; it is not the arithmetic actually done (alignloop computes a pair's prompt once; both apply the
  output head to completion tokens only). It is shown as a fraction of the bf16 matmul peak measured in the
  same run on the same number of threads: the best of 10 `torch.matmul`s of 2048x2048 bfloat16 matrices;
- alignloop / TRL: the ratio of tokens/s and of peak memory, against each TRL mode.

Targets: alignloop at least 1.5x TRL's tokens/s and at most 0.5x its peak memory.

On a GPU (`--device cuda`, the default where there is one) every trainer runs on the GPU, the matmul peak is
measured there (8192x8192), and the peak memory compared is the GPU memory each process allocated
(`torch.cuda.max_memory_allocated`). Two more trainers can be asked for with `--trainers`, both needing
liger-kernel and a GPU: "alignloop-liger" (`optim.liger_kernels=true`: Liger's RMSNorm, rotary embedding and
SwiGLU kernels; the plain "alignloop" row runs with `optim.liger_kernels=false`) and "trl-liger" (TRL's
`use_liger_kernel=True`, the reference resident: TRL 1.16 applies the same layer kernels and keeps its own
chunked output head, Liger's fused linear DPO loss no longer being used by its DPOTrainer).

Run it alone: two PyTorch processes on a small CPU slow each other down many times over.

    python benchmarks/train_throughput.py [--feedback FILE_OR_RUN_DIR ...] [--limit N] [--repeats 2]
        [--batch-size 8] [--threads T] [--trainers alignloop trl trl-precompute] [--activation-checkpointing]
        [--device cpu|cuda] [--policy MODEL_FOLDER]
    python benchmarks/train_throughput.py --feedback runs/default --limit 8 --repeats 1   # a quick smoke run
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAINERS = ("alignloop", "trl", "trl-precompute", "alignloop-liger", "trl-liger")
LABELS = {"alignloop": "alignloop train", "trl": "TRL (ref model resident)", "trl-precompute": "TRL (ref precomputed)",
          "alignloop-liger": "alignloop train + Liger", "trl-liger": "TRL (ref resident) + Liger"}
LR, BETA, MAX_LENGTH, SEED = 5e-5, 0.1, 512, 0
MATMUL_SIZE, MATMUL_REPEATS = 2048, 10  # on a GPU: 8192
HOW_TO_GET_FEEDBACK = (
    "no feedback files given and none found in the embedded default run ({}). Make some with `alignloop run` "
    "(the embedded default, about 14 minutes on 2 cores: rounds/r000..r002/feedback.jsonl, about 85 pairs), or "
    "one round's with `alignloop sample`, `alignloop label` and `alignloop feedback --type pairwise`; then pass "
    "them (or the run directory) with --feedback")


# ---------------------------------------------------------------------------------------------------------
# In the trainer's own process (the hidden --child mode): instrumentation, then the trainer.


class Record:
    """What a trainer process reports: spans (first start, last end) of the reference pass and the training
    loop, optimizer steps, training tokens, and what the precision probes saw."""

    def __init__(self):
        self.spans: dict[str, list[float]] = {}
        self.steps = 0
        self.tokens = 0
        self.sequences = 0
        self.probes: dict[str, dict] = {}
        self.rss: dict[str, int] = {}  # the peak RSS so far (KiB) at the end of each span
        self.gpu: dict[str, int] = {}  # on a GPU: the peak of allocated GPU memory so far (bytes), likewise

    def start(self, span: str) -> None:
        self.spans.setdefault(span, [time.perf_counter(), time.perf_counter()])

    def end(self, span: str) -> None:
        self.spans[span][1] = time.perf_counter()
        self.rss[span] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if _on_gpu():
            import torch

            self.gpu[span] = torch.cuda.max_memory_allocated()

    def timed(self, cls, name: str, span: str, before=None) -> None:
        """Wrap method `name` of `cls` so that its calls make up span `span`; `before(self, *args)` runs first."""
        original = getattr(cls, name)

        def wrapper(obj, *args, **kwargs):
            if before is not None:
                before(obj, *args)
            self.start(span)
            try:
                return original(obj, *args, **kwargs)
            finally:
                self.end(span)

        setattr(cls, name, wrapper)

    def count_steps(self) -> None:
        """Every optimizer step (any torch optimizer) ends the training loop's span so far."""
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def hook(optimizer, args, kwargs):
            self.steps += 1
            if "loop" in self.spans:
                self.end("loop")

        register_optimizer_step_post_hook(hook)

    def probe(self, model, label: str) -> None:
        """Once, on the first linear layer of the first block: the dtype of its weights and of its output, and
        whether autocast is on where it runs (what "bf16" means inside this trainer)."""
        import torch

        if label in self.probes:
            return
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        name, linear = next(((n, m) for n, m in linears if ".0." in n), linears[0])

        def hook(module, inputs, output):
            self.probes[label] = {"layer": name, "weights": str(module.weight.dtype).replace("torch.", ""),
                                  "output": str(output.dtype).replace("torch.", ""),
                                  "autocast": torch.is_autocast_enabled(output.device.type)}
            handle.remove()

        self.probes[label] = {}
        handle = linear.register_forward_hook(hook)

    def finish(self, path: str, **extra) -> None:
        import torch

        result = {"spans": self.spans, "steps": self.steps, "tokens": self.tokens, "sequences": self.sequences,
                  "probes": self.probes, "rss": self.rss, "gpu": self.gpu, "threads": torch.get_num_threads(),
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "gpu_peak": torch.cuda.max_memory_allocated() if _on_gpu() else 0, **extra}
        Path(path).write_text(json.dumps(result))


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def alignloop_argv(data: str, out: str, policy: str, batch_size: int, checkpointing: bool, liger: bool = False) -> list[str]:
    """The `alignloop` command line of the benchmark (without the program's name)."""
    settings = {"optim.activation_checkpointing": str(checkpointing).lower(), "optim.mixed_precision": "bf16", "optim.dtype": "float32", "optim.epochs": 1, "optim.warmup_steps": 0,
                "optim.lr": LR, "optim.batch_size": batch_size, "optim.gradient_accumulation_steps": 1,
                "optim.max_length": MAX_LENGTH, "optim.max_grad_norm": 1.0, "optim.weight_decay": 0.0,
                "optim.liger_kernels": str(liger).lower()}
    argv = ["--no-progress", "train", data, "--out", out, "--policy", policy, "--loss", "dpo", "--param", f"beta={BETA}",
            "--seed", str(SEED)]
    for key, value in settings.items():
        argv += ["--set", f"{key}={value}"]
    return argv


def child_alignloop(args, record: Record, liger: bool) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from alignloop import cli, objectives
    from alignloop.stages import train

    build_examples, load_causal_lm = train.build_examples, train.load_causal_lm

    def counted_examples(*a, **kw):
        examples = build_examples(*a, **kw)
        record.tokens = sum(len(e.prompt) + len(r) for e in examples for r in e.responses)
        record.sequences = sum(len(e.responses) for e in examples)
        return examples

    loads = []  # a count: keeping the models here would keep the reference alive after the trainer frees it

    def probed_model(*a, **kw):  # train_round loads the reference first, then the policy
        model = load_causal_lm(*a, **kw)
        record.probe(model, "reference" if not loads else "policy")
        loads.append(1)
        return model

    train.build_examples, train.load_causal_lm = counted_examples, probed_model
    record.timed(objectives.Pairwise, "reference_logps", "reference")
    record.timed(objectives.Pairwise, "losses", "loop")
    record.count_steps()
    code = cli.main(alignloop_argv(args.data, os.path.join(args.workdir, "checkpoint"), args.policy, args.batch_size,
                                     args.activation_checkpointing, liger))
    if code:
        sys.exit(code)


def child_trl(args, record: Record, precompute: bool, liger: bool) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    def first_loss(trainer, model, *rest):
        record.probe(model, "policy")
        if trainer.ref_model is not None:
            record.probe(trainer.ref_model, "reference")

    record.timed(DPOTrainer, "_compute_loss", "loop", before=first_loss)
    record.timed(DPOTrainer, "compute_ref_log_probs", "reference",
                 before=lambda trainer, model, *rest: record.probe(model, "reference (precomputed)"))
    record.count_steps()
    config = DPOConfig(
        output_dir=os.path.join(args.workdir, "trl"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], max_length=MAX_LENGTH,
        seed=SEED, bf16=True, use_cpu=not _on_gpu(), model_init_kwargs={"dtype": "float32"},
        gradient_checkpointing=args.activation_checkpointing, precompute_ref_log_probs=precompute, use_liger_kernel=liger,
        save_strategy="epoch", eval_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0)
    dataset = load_dataset("json", data_files=args.data, split="train", cache_dir=os.path.join(args.workdir, "datasets"))
    trainer = DPOTrainer(model=args.policy, args=config, train_dataset=dataset)
    for row in trainer.train_dataset:
        for side in ("chosen_ids", "rejected_ids"):  # the collator's keep_start cut to max_length
            record.tokens += min(len(row["prompt_ids"]) + len(row[side]), MAX_LENGTH)
            record.sequences += 1
    trainer.train()
    record.extra = {"mixed_precision": trainer.accelerator.mixed_precision, "native_amp": trainer.accelerator.native_amp,
                    "optim": getattr(config.optim, "value", config.optim), "pairs_after_filter": len(trainer.train_dataset)}


def run_child(args) -> None:
    record = Record()
    record.extra = {}
    liger = args.child.endswith("-liger")
    if args.child.startswith("alignloop"):
        child_alignloop(args, record, liger)
    else:
        child_trl(args, record, precompute=args.child == "trl-precompute", liger=liger)
    record.finish(args.result, **record.extra)


# ---------------------------------------------------------------------------------------------------------
# In the benchmark's process: data, the peak, the runs, the table.


def feedback_files(given: list[str] | None) -> list[str]:
    if not given:
        from alignloop.config import Config

        default = os.path.join(Config().run_dir, "rounds", "r*", "feedback.jsonl")
        files = sorted(glob.glob(default))
        if not files:
            raise SystemExit("train_throughput.py: error: " + HOW_TO_GET_FEEDBACK.format(default))
        return files
    files = []
    for path in given:
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, "rounds", "r*", "feedback.jsonl")))
            if not found:
                raise SystemExit(f"train_throughput.py: error: {path}: a directory without rounds/r*/feedback.jsonl")
            files += found
        else:
            files.append(path)
    return files


def write_data(files: list[str], limit: int | None, folder: str) -> tuple[str, str, list[dict]]:
    """The pairs of `files` (the first `limit`) as one contract feedback.jsonl for alignloop and as a TRL
    conversational preference dataset; returns both paths and the pairs."""
    from alignloop.records import chosen_and_rejected, read_feedback

    pairs = [r for f in files for r in read_feedback(f) if r["type"] == "pairwise_feedback"][:limit]
    if not pairs:
        raise SystemExit(f"train_throughput.py: error: no pairwise feedback in {', '.join(files)}")
    ours, theirs = os.path.join(folder, "feedback.jsonl"), os.path.join(folder, "trl.jsonl")
    with open(ours, "w") as a, open(theirs, "w") as b:
        for pair in pairs:
            chosen, rejected = chosen_and_rejected(pair)
            a.write(json.dumps(pair) + "\n")
            b.write(json.dumps({"prompt": pair["prompt"], "chosen": [{"role": "assistant", "content": chosen}],
                                "rejected": [{"role": "assistant", "content": rejected}]}) + "\n")
    return ours, theirs, pairs


def uncut_lengths(pairs: list[dict], policy: str) -> list[int]:
    """alignloop's prompt+response lengths before any cut to max_length."""
    from alignloop.models import encode_prompt, encode_response, load_tokenizer
    from alignloop.records import chosen_and_rejected

    tokenizer = load_tokenizer(policy)
    lengths = []
    for pair in pairs:
        prompt = len(encode_prompt(tokenizer, pair["prompt"]))
        lengths += [prompt + len(encode_response(tokenizer, text)) for text in chosen_and_rejected(pair)]
    return lengths


def matmul_parameters(policy: str) -> int:
    """N: the parameters that multiply activations. The input embedding is a lookup, not a matmul, so it is
    left out unless it is tied to the output head, which then counts once, as the head."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(policy))
    unique = {id(p): p.numel() for p in model.parameters()}
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return sum(unique.values()) - (0 if embedding is head else embedding.numel())


def matmul_peak(dtype) -> float:
    """FLOP/s of the best of MATMUL_REPEATS square matmuls of MATMUL_SIZE (8192 on a GPU), after two warm-up
    ones."""
    import torch

    device, size = ("cuda", 4 * MATMUL_SIZE) if _on_gpu() else ("cpu", MATMUL_SIZE)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for k in range(MATMUL_REPEATS + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        if k >= 2:
            best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def warm_page_cache(policy: str) -> None:
    """Read the model's files once, so that the first timed run does not pay for a cold disk."""
    for f in Path(policy).iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def run_trainer(trainer: str, data: str, args, folder: str) -> dict:
    """One run of `trainer` in a process of its own; its report plus the process's wall time."""
    workdir = tempfile.mkdtemp(prefix=trainer + "-", dir=folder)
    result, log = os.path.join(workdir, "result.json"), os.path.join(folder, trainer + ".log")
    command = [sys.executable, os.path.abspath(__file__), "--child", trainer, "--data", data, "--workdir", workdir,
               "--result", result, "--policy", args.policy, "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--device", args.device] + (["--activation-checkpointing"] if args.activation_checkpointing else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=os.path.join(workdir, "datasets"),
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false",
               ALIGNLOOP_DEBUG="1")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    with open(log, "w") as out:
        t = time.perf_counter()
        code = subprocess.run(command, check=False, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        wall = time.perf_counter() - t
    if code != 0 or not os.path.exists(result):
        tail = Path(log).read_text()[-4000:]
        raise SystemExit(f"train_throughput.py: {LABELS[trainer]} failed (exit {code}); the end of its output:\n{tail}")
    report = json.loads(Path(result).read_text())
    shutil.rmtree(workdir)  # the checkpoints: ~1.6 GB each
    spans = report["spans"]
    report["process_s"] = wall
    report["train_s"] = sum(end - start for start, end in spans.values())
    # the peak memory compared: the process's resident set on a CPU, the GPU memory it allocated on a GPU
    report["peak_mib"] = report["gpu_peak"] / 2**20 if args.device == "cuda" else report["maxrss_kib"] / 1024
    return report


def median(reports: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in reports)


def memory_path(report: dict) -> str:
    """The peak memory so far at the end of the reference pass, of the training loop, and of the process."""
    if report["gpu"]:
        marks = [(span, report["gpu"][span] / 2**20) for span in ("reference", "loop") if span in report["gpu"]]
        marks.append(("process", report["gpu_peak"] / 2**20))
    else:
        marks = [(span, report["rss"][span] / 1024) for span in ("reference", "loop") if span in report["rss"]]
        marks.append(("process", report["maxrss_kib"] / 1024))
    return ", ".join(f"{span} {mib:.0f} MiB" for span, mib in marks)


def table_row(cells, widths) -> str:
    """A markdown table row: the first cell left-aligned, the others right-aligned."""
    return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"


def describe_probes(probes: dict) -> str:
    seen = []
    for label, p in probes.items():
        if p:
            how = f"autocast {p['output']}" if p["autocast"] else f"no autocast, {p['output']}"
            seen.append(f"{label}: {p['weights']} weights, {how} matmuls")
        else:
            seen.append(f"{label}: never ran")
    return "; ".join(seen)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Feedback: by default the embedded default run's (runs/default/rounds/r*/feedback.jsonl), which "
               "`alignloop run` writes (about 14 minutes on 2 cores, about 85 pairs); or pass feedback.jsonl files "
               "or run directories with --feedback. Run the benchmark alone on the machine.")
    parser.add_argument("--feedback", nargs="+", metavar="PATH", help="feedback.jsonl files or run directories")
    parser.add_argument("--limit", type=int, help="use the first N pairs only (a quick smoke run)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per trainer; the median is reported")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per micro-batch")
    parser.add_argument("--threads", type=int, help="torch threads for every trainer and the matmul peak "
                        "(default: torch's default here)")
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS[:3]))
    parser.add_argument("--policy", help="the model folder (default: the embedded default policy)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="where every trainer runs (default: cuda when "
                        "there is a GPU); on a GPU the peak memory compared is the GPU memory allocated")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="both trainers recompute activations in backward (TRL's default; off by default here)")
    # hidden: one trainer run, in a process of its own (see run_trainer)
    parser.add_argument("--child", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    if args.repeats < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--repeats, --batch-size and --limit must be positive")

    from importlib.metadata import version

    import torch

    from alignloop.models import ensure_default_policy

    args.threads = args.threads or torch.get_num_threads()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cpu":  # this process's matmul peak too
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible")
    torch.set_num_threads(args.threads)
    args.policy = str(Path(args.policy).resolve()) if args.policy else str(ensure_default_policy())
    files = feedback_files(args.feedback)
    n_params = matmul_parameters(args.policy)
    bf16_peak, fp32_peak = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    warm_page_cache(args.policy)

    with tempfile.TemporaryDirectory(prefix="train_throughput-") as folder:
        ours, theirs, pairs = write_data(files, args.limit, folder)
        lengths = uncut_lengths(pairs, args.policy)
        runs: dict[str, list[dict]] = {t: [] for t in args.trainers}
        memory = "GPU memory allocated" if args.device == "cuda" else "RSS"
        for r in range(args.repeats):
            k = r % len(args.trainers)  # rotate the order between repeats
            for trainer in args.trainers[k:] + args.trainers[:k]:
                report = run_trainer(trainer, ours if trainer == "alignloop" else theirs, args, folder)
                runs[trainer].append(report)
                print(f"  run {r + 1}/{args.repeats} {LABELS[trainer]}: {report['process_s']:.1f} s process, "
                      f"{report['train_s']:.1f} s training, peak {memory} {memory_path(report)}", file=sys.stderr)

    rows = {}
    for trainer, reports in runs.items():
        for report in reports:
            report["tps"] = report["tokens"] / report["train_s"]
            report["tps_process"] = report["tokens"] / report["process_s"]
            report["flops"] = 8 * n_params * report["tokens"] / report["train_s"]
        keys = ("process_s", "train_s", "tps", "tps_process", "peak_mib", "flops")
        rows[trainer] = {key: median(reports, key) for key in keys}
        first = reports[0]
        rows[trainer].update(steps=first["steps"], memory=memory_path(first), tokens=first["tokens"], probes=first["probes"],
                             extra={k: first[k] for k in ("mixed_precision", "native_amp", "optim") if k in first})
        if len({(x["tokens"], x["steps"]) for x in reports}) != 1:
            print(f"warning: {LABELS[trainer]}: tokens or steps differ between repeats", file=sys.stderr)

    cut = sum(n > MAX_LENGTH for n in lengths)
    print(f"{Path(args.policy).name} (N = {n_params / 1e6:.1f}M matmul parameters), {len(pairs)} pairs from "
          f"{len(files)} feedback file(s), micro-batch {args.batch_size}, 1 epoch, lr {LR:g}, beta {BETA}, max_length "
          f"{MAX_LENGTH} ({cut} of {len(lengths)} sequences longer), float32 weights + bf16 autocast; "
          f"activation checkpointing {'on' if args.activation_checkpointing else 'off'} for both")
    print(f"torch {torch.__version__}, transformers {version('transformers')}, TRL {version('trl')}; "
          f"{args.threads} torch thread(s) ({os.cpu_count()} CPUs); "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}; median of {args.repeats} run(s) per trainer")
    print("alignloop's command: alignloop " + " ".join(alignloop_argv("feedback.jsonl", "CHECKPOINT", "POLICY", args.batch_size, args.activation_checkpointing)))
    size = 4 * MATMUL_SIZE if args.device == "cuda" else MATMUL_SIZE
    print(f"matmul peak ({size}x{size}, best of {MATMUL_REPEATS}): bf16 {bf16_peak / 1e9:.1f} GFLOP/s, "
          f"float32 {fp32_peak / 1e9:.1f} GFLOP/s")
    token_counts = ", ".join(f"{LABELS[t]} {rows[t]['tokens']}" for t in rows)
    print(f"training tokens per epoch (prompt+chosen, prompt+rejected, no padding): {token_counts}")
    if "alignloop" in rows and any(not t.startswith("alignloop") for t in rows):
        other = next(t for t in rows if not t.startswith("alignloop"))
        extra = (rows[other]["tokens"] - rows["alignloop"]["tokens"]) / (2 * len(pairs))
        print(f"  TRL - alignloop: {extra:+.2f} tokens per response (TRL's chat template adds '\\n' after each "
              f"'<|im_end|>'; alignloop's responses end at '<|im_end|>')")
    for trainer, reports in runs.items():
        kept = reports[0].get("pairs_after_filter", len(pairs))
        if kept != len(pairs):
            print(f"  warning: {LABELS[trainer]} dropped {len(pairs) - kept} pair(s) whose prompt fills max_length")
    for trainer, row in rows.items():
        settings = ", ".join(f"{k} {v}" for k, v in row["extra"].items())
        print(f"  {LABELS[trainer]}: {describe_probes(row['probes'])}{'; ' + settings if settings else ''}; "
              f"peak {memory} by the end of: {row['memory']}")

    base = rows.get("alignloop")  # with Liger's kernels where alignloop's plain row is not run
    base = base or rows.get("alignloop-liger")
    header = ("trainer", "steps", "process s", "train s", "tok/s", "tok/s process",
              "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB", "GFLOP/s", "of bf16 peak",
              "alignloop tok/s ÷", "alignloop memory ÷")
    widths = [max(len(h), 24 if i == 0 else 0) for i, h in enumerate(header)]
    print(table_row(header, widths))
    print("|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    for trainer, row in rows.items():
        ratio_tps = ratio_rss = "-"
        if base is not None and not trainer.startswith("alignloop"):
            ratio_tps = f"{base['tps'] / row['tps']:.2f}x"
            ratio_rss = f"{base['peak_mib'] / row['peak_mib']:.2f}x"
        cells = (LABELS[trainer], str(row["steps"]), f"{row['process_s']:.1f}", f"{row['train_s']:.1f}",
                 f"{row['tps']:.0f}", f"{row['tps_process']:.0f}", f"{row['peak_mib']:.0f}",
                 f"{row['flops'] / 1e9:.1f}", f"{row['flops'] / bf16_peak:.1%}", ratio_tps, ratio_rss)
        print(table_row(cells, widths))
    if base is not None:
        for trainer, row in rows.items():
            if not trainer.startswith("alignloop"):
                speed, ratio = base["tps"] / row["tps"], base["peak_mib"] / row["peak_mib"]
                print(f"target vs {LABELS[trainer]}: tokens/s {speed:.2f}x (>= 1.5x: {'met' if speed >= 1.5 else 'not met'}), "
                      f"peak memory {ratio:.2f}x (<= 0.5x: {'met' if ratio <= 0.5 else 'not met'})")


if __name__ == "__main__":
    main()
