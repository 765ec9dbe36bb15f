"""The `alignloop` program: one verb per stage, plus `run` for the whole loop.

Each stage verb takes the same configuration sections as the loop: `--config cfg.yaml` (a run's config file)
and `--set KEY=VALUE`, and its own flags, each a shorthand for one config key (`--temperature` is
`sampler.temperature`), applied last. So `alignloop label` runs every labeler the loop can, and `alignloop
sample` takes every sampler setting.

Exit codes: 0 success; 2 bad input (config, record file, model path), with a one-line error naming the
file, line and field; 3 nothing to do (no prompts / no feedback); 1 any other failure.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_NOTHING_TO_DO = 3
CONFIG = "config:"  # the argparse dest prefix of a flag that sets a config key


class NothingToDo(Exception):
    pass


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}")
        return value

    return parse


def _setting(p: argparse.ArgumentParser, flag: str, key: str, help: str | None = None, **kw) -> None:
    """A flag that sets config key `key` (left out: the config file's value, else the key's default)."""
    if kw.get("action") != "store_const" and "choices" not in kw:
        kw.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    p.add_argument(flag, dest=CONFIG + key, default=None, help=f"{help + '; ' if help else ''}config key {key}", **kw)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="a run's YAML config file: the verb takes its sections")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. sampler.top_p=0.9")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignloop", description="Online iterative alignment: sample, label, feedback, train, repeat.")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="show what the libraries underneath print (vLLM's "
                        "start-up logs, transformers' warnings); by default only alignloop's own lines show")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("run", help="run or resume the whole loop", description=(
        "Run the loop described by CONFIG (none: the embedded default, SmolLM2-135M-Instruct on built-in "
        "verifiable-instruction prompts). Running the same command again on the same run directory resumes."))
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=1e-5")
    p.add_argument("--run-dir", help="the run directory (same as --set run_dir=...)")

    p = verbs.add_parser("sample", help="sample responses from a policy", description=(
        "Sample N responses per prompt with the config's sampler section (hf or vllm, every setting)."))
    p.add_argument("prompts", help="prompt file (JSONL, JSON array or Parquet)")
    p.add_argument("--out", required=True, help="samples file to write (JSONL)")
    p.add_argument("--round", type=int, default=0)
    _config_args(p)
    _setting(p, "--policy", "policy", help="model folder (default: the embedded SmolLM2)")
    _setting(p, "--seed", "seed", type=int)
    _setting(p, "--trust-remote-code", "trust_remote_code", action="store_const", const=True)
    _setting(p, "--n", "samples_per_prompt", type=int, help="samples per prompt (default 4)")
    _setting(p, "--backend", "sampler.backend", choices=["hf", "vllm"],
             help="hf: transformers generate; vllm: a vLLM engine (pip install 'alignloop[vllm]')")
    _setting(p, "--temperature", "sampler.temperature", type=float)
    _setting(p, "--top-p", "sampler.top_p", type=float)
    _setting(p, "--max-new-tokens", "sampler.max_new_tokens", type=int)
    _setting(p, "--stop", "sampler.stop", action="append", help="a stop string (repeatable)")
    _setting(p, "--batch-size", "sampler.batch_size", type=int, help="hf: sequences per generate call")
    _setting(p, "--dtype", "sampler.dtype", choices=["bfloat16", "float32", "float16"])

    p = verbs.add_parser("label", help="score samples with a reward function, a reward model or an LLM judge", description=(
        "Add a reward to every sample with the config's labeler section: a Python function (--function), a "
        "sequence-classification reward model (--reward-model) or an LLM judge (--set labeler.kind=judge ... or "
        "--config). With a reward model, `torchrun --nproc_per_node N -m alignloop label ...` (or `accelerate "
        "launch`) scores one shard per process and the main process writes the merged file. A judge keeps its "
        "answers in judge_cache.jsonl beside the output."))
    p.add_argument("samples", help="samples file")
    p.add_argument("--out", required=True, help="scored samples file to write")
    _config_args(p)
    source = p.add_mutually_exclusive_group()
    _setting(source, "--function", "labeler.function", help="reward function module:function (kind callable)")
    _setting(source, "--reward-model", "labeler.path", metavar="PATH",
             help="a reward-model folder, AutoModelForSequenceClassification (kind reward_model)")
    _setting(p, "--head", "labeler.head", choices=["auto", "single", "two_label"],
             help="reward model: auto (1 label: the logit; 2 labels: logits[:, 1]), single or two_label")
    _setting(p, "--dtype", "labeler.dtype", choices=["bfloat16", "float32"], help="reward model weights")
    _setting(p, "--max-length", "labeler.max_length", type=_at_least(9),
             help="reward model: tokens per conversation; longer ones lose prompt tokens on the left")
    _setting(p, "--batch-size", "labeler.batch_size", type=_at_least(1), help="samples per labeler call (reward model: per forward pass)")
    _setting(p, "--trust-remote-code", "labeler.trust_remote_code", action="store_const", const=True,
             help="reward model: run the model folder's own code")

    p = verbs.add_parser("feedback", help="turn scored samples into pairwise or binary feedback")
    p.add_argument("scored", help="scored samples file")
    p.add_argument("--out", required=True, help="feedback file to write")
    _config_args(p)
    _setting(p, "--type", "feedback.type", choices=["pairwise", "binary"])
    _setting(p, "--mode", "feedback.mode", choices=["random", "random_maximal", "max", "min"], help="pairing (pairwise)")
    _setting(p, "--threshold", "feedback.threshold", type=_number_or_word,
             help="pairwise: minimum gap; binary: mean, median or a number")
    _setting(p, "--length-ratio", "feedback.length_ratio", type=float,
             help="pairwise: keep a pair only when the shorter answer has at least this fraction of the longer's characters")
    _setting(p, "--truncation-penalty", "feedback.truncation_penalty", type=float,
             help="taken off the reward of an answer cut at the sampler's cap")
    _setting(p, "--length-balance", "feedback.length_balance", action="store_const", const=True,
             help="pairwise max/min: as many of the round's pairs with the longer answer better as with the shorter")
    _setting(p, "--seed", "seed", type=int)

    p = verbs.add_parser("train-rm", help="train a Bradley-Terry reward model on pairwise feedback", description=(
        "Add a scalar head to a causal LM and train it on pairwise feedback (contract format, HALOs JSON or TRL "
        "prompt/chosen/rejected; several files are joined). Reports pairwise accuracy on held-out prompts and writes "
        "a sequence-classification folder that `labeler: reward_model` loads."))
    p.add_argument("feedback", nargs="+", help="pairwise feedback file(s)")
    p.add_argument("--out", required=True, help="reward-model folder to write")
    p.add_argument("--base", default="smollm2-135m-instruct", help="causal-LM checkpoint to start from")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="share of prompts held out for accuracy")
    p.add_argument("--train-layers", type=int, help="train only the top N transformer blocks (+ final norm and head); "
                   "default: all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true")

    p = verbs.add_parser("train", help="train a policy on one round of feedback", description=(
        "Train the policy on one round of feedback with the config's loss and optim sections."))
    p.add_argument("feedback", help="feedback file (contract format, HALOs JSON, or TRL prompt/chosen/rejected); "
                   "scored samples for --loss grpo")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--resume", help="a checkpoint folder whose weights, optimizer and scheduler state to resume")
    p.add_argument("--round", type=int, default=0)
    _config_args(p)
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="loss hyperparameter, e.g. beta=0.1")
    _setting(p, "--policy", "policy", help="policy weights to start from")
    _setting(p, "--reference", "reference", help="reference model (default: the policy)")
    _setting(p, "--seed", "seed", type=int)
    _setting(p, "--trust-remote-code", "trust_remote_code", action="store_const", const=True)
    _setting(p, "--loss", "loss.name")
    from .config import OptimConfig

    for name, field in OptimConfig.model_fields.items():
        if field.annotation in (int, float):
            _setting(p, "--" + name.replace("_", "-"), "optim." + name, type=field.annotation)
    _setting(p, "--mixed-precision", "optim.mixed_precision", choices=["no", "bf16"])
    _setting(p, "--strategy", "optim.strategy", choices=["auto", "ddp", "fsdp", "deepspeed"],
             help="under torchrun / accelerate launch: ddp (a copy per process), fsdp (FSDP2, sharded) or "
                  "deepspeed (ZeRO-2/3, optim.zero_stage)")
    _setting(p, "--dtype", "optim.dtype", choices=["float32", "bfloat16"], help="the weights' dtype while training")

    p = verbs.add_parser("report", help="write a run's report: an HTML page of plots", description=(
        "Write RUN_DIR/report/index.html (self-contained) and a PNG per plot beside it, from the run directory "
        "alone; works on a running run. The loop writes it after every round too."))
    p.add_argument("run_dir", help="the run directory")

    p = verbs.add_parser("status", help="where a run stands", description=(
        "Rounds done, the stage in progress or next, prompts left, time spent and left, and the last held-out "
        "numbers, from the run directory alone; works on a running run and a finished one."))
    p.add_argument("run_dir", help="the run directory")

    p = verbs.add_parser("replay", help="recompute a round's recorded stages and compare their hashes", description=(
        "Recompute the recorded stages of one round (or one --stage) from their recorded inputs, in a scratch "
        "folder, and say whether each output's hash matches the manifest's. The run directory is only read; a "
        "stage whose policy checkpoint was deleted (keep_checkpoints) cannot be replayed. Exit code 1 when a "
        "hash differs."))
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("--round", required=True, help="a round number, or sft (the SFT model's held-out evaluation)")
    p.add_argument("--stage", action="append", choices=["sample", "label", "feedback", "train", "eval"],
                   help="the stage to replay (repeatable; default: every recorded stage of the round)")
    p.add_argument("--scratch", help="where to recompute (default: a new temporary folder)")

    p = verbs.add_parser("export", help="a round's policy as a plain HF model folder", description=(
        "Write a kept round's policy to --out as a plain Hugging Face model folder (float32 safetensors, config, "
        "tokenizer) that transformers and vLLM load; a LoRA round's adapter is merged into its base."))
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("--round", type=int, help="which round (default: the last kept one)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist)")
    p.add_argument("--trust-remote-code", action="store_true")
    return parser


def _number_or_word(text: str):
    try:
        return float(text)
    except ValueError:
        return text


# A full disk, a quota, a file-size limit, a read-only file system: said as the one-line StorageError
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:  # read where the libraries are quieted (`models.quiet_libraries`, the vLLM sampler)
        os.environ["ALIGNLOOP_VERBOSE"] = "1"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # one of several processes (torchrun, accelerate launch)
    try:
        if launched:
            from . import distributed

            distributed.init()
        return VERBS[args.verb](args, not args.no_progress)
    except NothingToDo as e:
        print(f"alignloop: nothing to do: {e}", file=sys.stderr)
        return EXIT_NOTHING_TO_DO
    except KeyboardInterrupt:
        print("alignloop: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:
        from .config import ConfigError
        from .models import ModelError
        from .records import RecordError
        from .stages.train import TrainingError

        if os.environ.get("ALIGNLOOP_DEBUG"):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, (ConfigError, RecordError, ModelError, TrainingError, ValueError, FileNotFoundError)):
            print(f"alignloop: error: {message}", file=sys.stderr)
            return EXIT_BAD_INPUT
        from .records import StorageError, storage_error
        from .sampling import SamplerError

        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS and e.filename:  # a write no stage wrapped
            e = storage_error(e.filename, e)
            message = str(e)
        if isinstance(e, (SamplerError, StorageError)):
            print(f"alignloop: error: {message}", file=sys.stderr)
            return 1
        print(f"alignloop: error: {type(e).__name__}: {message} (ALIGNLOOP_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    finally:
        if launched:
            distributed.shutdown()


def _sections(args, *names: str, extra: dict | None = None) -> dict:
    """The config sections a verb needs, from --config, --set and its own flags (which win)."""
    from .config import load_sections

    values = {dest[len(CONFIG):]: v for dest, v in vars(args).items() if dest.startswith(CONFIG) and v is not None}
    return load_sections(args.config, args.set, {**values, **(extra or {})}, names)


def run_verb(args, progress: bool) -> int:
    from .config import load_config
    from .loop import run_loop
    from .table import format_table

    overrides = list(args.set) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    config = load_config(args.config, overrides)
    manifest = run_loop(config, progress=progress, echo=lambda line: print(line, flush=True))
    from . import distributed

    if distributed.is_main():  # under a launcher, the main process speaks for all
        print(format_table(config.run_dir))
    if manifest["summary"]["rounds"] == 0:
        raise NothingToDo("no prompts for a first round")
    return 0


def sample_verb(args, progress: bool) -> int:
    from .records import read_prompts, write_records
    from .sampling import Sampler
    from .sampling.placement import trainer_on
    from .stages.sample import sample_records

    c = _sections(args, "sampler", "samples_per_prompt", "policy", "seed", "trust_remote_code")
    prompts = read_prompts(args.prompts)
    if not prompts:
        raise NothingToDo(f"{args.prompts} holds no prompts")
    sampler = Sampler(c["sampler"], c["seed"], c["trust_remote_code"])
    try:
        with trainer_on(sampler.placement):
            records = sample_records(prompts, c["policy"], sampler, n=c["samples_per_prompt"], round_index=args.round,
                                     seed=c["seed"], progress="sample" if progress else None)
    finally:
        sampler.close()
    from . import distributed

    if distributed.is_main():  # under a launcher every process holds all the samples
        write_records(args.out, records)
        print(f"wrote {len(records)} samples to {args.out}")
    return 0


def label_verb(args, progress: bool) -> int:
    from .records import read_samples, write_records
    from .rewards import make_labeler
    from .stages.label import BATCHES_PER_CHUNK, label_records

    kind = {"labeler.kind": "reward_model"} if getattr(args, CONFIG + "labeler.path") else \
        {"labeler.kind": "callable"} if getattr(args, CONFIG + "labeler.function") else {}
    config = _sections(args, "labeler", extra=kind)["labeler"]
    if config.kind == "reward_model":
        return _label_with_reward_model(args, config, progress)

    def label_once() -> int:  # a judge or a function labels once: on the main process, under a launcher
        labeler = make_labeler(config, Path(args.out).parent)  # a bad function name or key fails before any work
        samples = read_samples(args.samples)
        if not samples:
            raise NothingToDo(f"{args.samples} holds no samples")
        scored, counts = label_records(samples, labeler, BATCHES_PER_CHUNK * config.batch_size,
                                       progress="label" if progress else None)
        write_records(args.out, scored)
        print(f"wrote {len(scored)} scored samples to {args.out} ({counts['failed']} could not be scored)")
        return 0

    from . import distributed

    return distributed.on_main(label_once)


def _label_with_reward_model(args, config, progress: bool) -> int:
    """The label verb with a reward model, in one process or many (torchrun / accelerate launch): the forward
    passes are shared among the processes, and only the main process writes."""
    from . import distributed
    from .models import inference_device
    from .records import read_samples, write_records
    from .rewards.reward_model import RewardModelLabeler
    from .stages.label import label_in_processes

    samples = read_samples(args.samples)  # bad input fails before any model is loaded
    if not samples:
        raise NothingToDo(f"{args.samples} holds no samples")
    labeler = RewardModelLabeler.from_config(config, device=inference_device())
    scored, counts = label_in_processes(samples, labeler, config.batch_size, progress="label" if progress else None)
    if distributed.is_main():
        write_records(args.out, scored)
        print(f"wrote {len(scored)} scored samples to {args.out} ({counts['failed']} could not be scored)")
    distributed.barrier()
    return 0


def feedback_verb(args, progress: bool) -> int:
    from .stages.feedback import feedback_stage

    c = _sections(args, "feedback", "seed")
    fb = c["feedback"]
    counts = feedback_stage(args.scored, args.out, fb.type, fb.mode, fb.threshold, c["seed"], fb.length_ratio,
                            fb.truncation_penalty, fb.length_balance)
    print(f"wrote feedback to {args.out}: {counts}")
    return 0


def train_rm_verb(args, progress: bool) -> int:
    from .records import read_feedback
    from .stages.train_rm import train_reward_model

    pairs = [r for path in args.feedback for r in read_feedback(path) if r["type"] == "pairwise_feedback"]
    if not pairs:
        raise NothingToDo("no pairwise feedback in " + ", ".join(args.feedback))
    metrics = train_reward_model(pairs, base=args.base, out_dir=args.out, lr=args.lr, epochs=args.epochs,
                                 batch_size=args.batch_size, max_length=args.max_length,
                                 heldout_fraction=args.heldout_fraction, seed=args.seed, train_layers=args.train_layers,
                                 trust_remote_code=args.trust_remote_code, progress=progress)
    low, high = metrics["heldout_accuracy_ci95"]
    print(f"wrote reward model {args.out}: held-out pairwise accuracy {metrics['heldout_accuracy']:.3f} "
          f"(95% CI {low:.3f} to {high:.3f}, {metrics['heldout_pairs']} pairs)")
    return 0


def train_verb(args, progress: bool) -> int:
    from .stages.train import read_training_records, train_round

    c = _sections(args, "loss", "optim", "policy", "policy_adapter", "reference", "seed", "trust_remote_code",
                  extra={f"loss.{item.partition('=')[0]}": _yaml(item) for item in args.param})
    loss = c["loss"]
    records = read_training_records(loss.name, args.feedback)
    if not records:
        raise NothingToDo(f"{args.feedback} holds no feedback")
    summary = train_round(records, policy=args.resume or c["policy"], reference=c["reference"] or c["policy"],
                          out_dir=args.out, resume=args.resume, loss=loss, optim=c["optim"], seed=c["seed"],
                          round_index=args.round, trust_remote_code=c["trust_remote_code"], progress=progress,
                          adapter=c["policy_adapter"])
    from . import distributed

    if distributed.is_main():
        print(f"wrote checkpoint {args.out}: {summary}")
    return 0


def _yaml(item: str):
    """The value of a NAME=VALUE --param, typed as YAML types it."""
    from .config import parse_override

    return parse_override(item)[1]


def report_verb(args, progress: bool) -> int:
    from .report import write_report

    print(f"wrote {write_report(_run_dir(args.run_dir))}")
    return 0


def status_verb(args, progress: bool) -> int:
    from .table import format_status

    print(format_status(_run_dir(args.run_dir)))
    return 0


def replay_verb(args, progress: bool) -> int:
    from .replay import replay

    results = replay(_run_dir(args.run_dir), args.round, args.stage, args.scratch, progress)
    for r in results:
        if "skipped" in r:
            print(f"{r['stage']:<9} skipped in the run ({r['skipped']}): nothing to replay")
        elif "gone" in r:
            print(f"{r['stage']:<9} cannot be replayed: {r['gone']}")
        else:
            print(f"{r['stage']:<9} {'match' if r['match'] else 'DIFFERS'}  recorded {str(r['recorded'])[:16]}  "
                  f"replayed {str(r['replayed'])[:16]}  ({r['scratch']})")
    return 0 if all(r.get("match", True) for r in results) else 1


def export_verb(args, progress: bool) -> int:
    from .export import export_round

    round_index, out = export_round(_run_dir(args.run_dir), args.out, args.round, args.trust_remote_code)
    print(f"wrote round {round_index}'s policy to {out}")
    return 0


def _run_dir(path: str) -> Path:
    if not (Path(path) / "manifest.json").exists():
        raise FileNotFoundError(f"{path}: not a run directory (no manifest.json)")
    return Path(path)


VERBS = {"run": run_verb, "sample": sample_verb, "label": label_verb, "feedback": feedback_verb,
         "train-rm": train_rm_verb, "train": train_verb, "report": report_verb, "status": status_verb,
         "export": export_verb, "replay": replay_verb}


if __name__ == "__main__":
    sys.exit(main())
