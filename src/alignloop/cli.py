"""The `alignloop` program: one verb per stage, plus `run` for the whole loop.

Exit codes: 0 success; 2 bad input (config, record file, model path), with a one-line error naming the
file, line and field; 3 nothing to do (no prompts / no feedback); 1 any other failure.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_BAD_INPUT = 2
EXIT_NOTHING_TO_DO = 3


class NothingToDo(Exception):
    pass


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    from .config import SamplerConfig

    d = SamplerConfig()
    p.add_argument("--n", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per generate call")
    p.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float32", "float16"])
    p.add_argument("--backend", default=d.backend, choices=["hf", "vllm"],
                   help="hf: transformers generate; vllm: a vLLM engine (pip install 'alignloop[vllm]')")


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignloop", description="Online iterative alignment: sample, label, feedback, train, repeat.")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("run", help="run or resume the whole loop", description=(
        "Run the loop described by CONFIG (none: the embedded default, SmolLM2-135M-Instruct on built-in "
        "verifiable-instruction prompts). Running the same command again on the same run directory resumes."))
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=1e-5")
    p.add_argument("--run-dir", help="the run directory (same as --set run_dir=...)")

    p = verbs.add_parser("sample", help="sample responses from a policy", description="Sample N responses per prompt.")
    p.add_argument("prompts", help="prompt file (JSONL, JSON array or Parquet)")
    p.add_argument("--out", required=True, help="samples file to write (JSONL)")
    p.add_argument("--policy", default="smollm2-135m-instruct", help="model folder (default: the embedded SmolLM2)")
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true")
    _add_sampling_args(p)

    p = verbs.add_parser("label", help="score samples with a reward function or a reward model", description=(
        "Add a reward to every sample, from a Python function (--function) or a sequence-classification reward "
        "model (--reward-model). With a reward model, `torchrun --nproc_per_node N -m alignloop label ...` (or "
        "`accelerate launch`) scores one shard per process and the main process writes the merged file."))
    p.add_argument("samples", help="samples file")
    p.add_argument("--out", required=True, help="scored samples file to write")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--function", default="alignloop.rewards.ifeval:ifeval_reward", help="reward function module:function")
    source.add_argument("--reward-model", metavar="PATH", help="a reward-model folder (AutoModelForSequenceClassification)")
    from .config import LabelerConfig

    d = LabelerConfig()
    p.add_argument("--head", default=d.head, choices=["auto", "single", "two_label"],
                   help="reward model: auto (1 label: the logit; 2 labels: logits[:, 1]), single or two_label")
    p.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float32"], help="reward model weights")
    p.add_argument("--max-length", type=_at_least(9), default=d.max_length,
                   help="reward model: tokens per conversation; longer ones lose prompt tokens on the left")
    p.add_argument("--batch-size", type=_at_least(1), default=d.batch_size, help="reward model: sequences per forward pass")
    p.add_argument("--trust-remote-code", action="store_true", help="reward model: run the model folder's own code")

    p = verbs.add_parser("feedback", help="turn scored samples into pairwise or binary feedback")
    p.add_argument("scored", help="scored samples file")
    p.add_argument("--out", required=True, help="feedback file to write")
    p.add_argument("--type", default="pairwise", choices=["pairwise", "binary"])
    p.add_argument("--mode", default="max", choices=["random", "max", "min"], help="pairing (pairwise)")
    p.add_argument("--threshold", default="0", help="pairwise: minimum gap; binary: mean, median or a number")
    p.add_argument("--seed", type=int, default=0)

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

    p = verbs.add_parser("train", help="train a policy on one round of feedback")
    p.add_argument("feedback", help="feedback file (contract format, HALOs JSON, or TRL prompt/chosen/rejected); "
                   "scored samples for --loss grpo")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--policy", default="smollm2-135m-instruct", help="policy weights to start from")
    p.add_argument("--reference", help="reference model (default: the policy)")
    p.add_argument("--resume", help="a checkpoint folder whose optimizer and scheduler state to resume")
    p.add_argument("--loss", default="dpo")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="loss hyperparameter, e.g. beta=0.1")
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true")
    from .config import OptimConfig

    d = OptimConfig()
    for name in ("lr", "weight_decay", "warmup_steps", "batch_size", "gradient_accumulation_steps", "epochs", "max_grad_norm", "max_length"):
        p.add_argument("--" + name.replace("_", "-"), type=type(getattr(d, name)), default=getattr(d, name))
    p.add_argument("--mixed-precision", default=d.mixed_precision, choices=["no", "bf16"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
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
        from .vllm_engine import SamplerError

        if isinstance(e, SamplerError):
            print(f"alignloop: error: {message}", file=sys.stderr)
            return 1
        print(f"alignloop: error: {type(e).__name__}: {message} (ALIGNLOOP_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    progress = not args.no_progress
    if args.verb == "run":
        from .config import load_config
        from .loop import format_table, run_loop

        overrides = list(args.set) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
        config = load_config(args.config, overrides)
        manifest = run_loop(config, progress=progress)
        print(format_table(config.run_dir))
        if manifest["summary"]["rounds"] == 0:
            raise NothingToDo("no prompts for a first round")
        return 0

    if args.verb == "sample":
        from .records import read_prompts, write_records
        from .stages.sample import sample_records

        prompts = read_prompts(args.prompts)
        if not prompts:
            raise NothingToDo(f"{args.prompts} holds no prompts")
        engine = None
        if args.backend == "vllm":
            from .config import SamplerConfig
            from .vllm_engine import VLLMEngine

            engine = VLLMEngine(args.policy, SamplerConfig(backend="vllm", dtype=args.dtype), args.seed, args.trust_remote_code)
        records = sample_records(
            prompts, args.policy, n=args.n, round_index=args.round, seed=args.seed, temperature=args.temperature,
            top_p=args.top_p, max_new_tokens=args.max_new_tokens, stop=args.stop, batch_size=args.batch_size,
            dtype=args.dtype, trust_remote_code=args.trust_remote_code, progress="sample" if progress else None,
            engine=engine,
        )
        write_records(args.out, records)
        print(f"wrote {len(records)} samples to {args.out}")
        return 0

    if args.verb == "label" and args.reward_model:
        return _label_with_reward_model(args, progress)

    if args.verb == "label":
        from .records import write_records
        from .rewards import CallableLabeler
        from .stages.label import label_records, read_samples

        labeler = CallableLabeler(args.function)  # a bad function name fails before any work
        samples = read_samples(args.samples)
        if not samples:
            raise NothingToDo(f"{args.samples} holds no samples")
        scored, counts = label_records(samples, labeler, progress="label" if progress else None)
        write_records(args.out, scored)
        print(f"wrote {len(scored)} scored samples to {args.out} ({counts['failed']} could not be scored)")
        return 0

    if args.verb == "feedback":
        from .stages.feedback import feedback_stage

        counts = feedback_stage(args.scored, args.out, args.type, args.mode, args.threshold, args.seed)
        print(f"wrote feedback to {args.out}: {counts}")
        return 0

    if args.verb == "train-rm":
        from .stages.feedback import read_feedback
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

    if args.verb == "train":
        from .config import LossConfig, parse_override
        from .stages.feedback import read_feedback
        from .stages.train import TrainConfig, train_round

        params = {}
        for item in args.param:
            keys, value = parse_override(item)
            params[".".join(keys)] = value
        LossConfig(name=args.loss, **params)  # validates the loss name and its parameters
        from .losses import LOSSES
        from .stages.feedback import read_scored

        # GRPO learns from scored groups of samples; the other losses from feedback records
        feedback = read_scored(args.feedback) if LOSSES[args.loss].feedback == "scored_groups" else read_feedback(args.feedback)
        if not feedback:
            raise NothingToDo(f"{args.feedback} holds no feedback")
        config = TrainConfig(
            loss=args.loss, loss_params=params, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
            batch_size=args.batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps, epochs=args.epochs,
            max_grad_norm=args.max_grad_norm, max_length=args.max_length, mixed_precision=args.mixed_precision,
            seed=args.seed,
        )
        summary = train_round(feedback, policy=args.resume or args.policy, reference=args.reference or args.policy,
                              out_dir=args.out, resume=args.resume, config=config, round_index=args.round,
                              trust_remote_code=args.trust_remote_code, progress=progress)
        print(f"wrote checkpoint {args.out}: {summary}")
        return 0
    raise AssertionError(args.verb)


def _label_with_reward_model(args, progress: bool) -> int:
    """The label verb with a reward model, in one process or many (torchrun / accelerate launch): each
    process scores a shard, all results are gathered in input order, and only the main process writes."""
    import torch
    from accelerate import PartialState

    from .records import write_records
    from .rewards.reward_model import RewardModelLabeler, label_in_processes
    from .stages.label import BATCHES_PER_CHUNK, read_samples

    samples = read_samples(args.samples)  # bad input fails before any model is loaded
    if not samples:
        raise NothingToDo(f"{args.samples} holds no samples")
    state = PartialState(cpu=not torch.cuda.is_available())
    try:
        labeler = RewardModelLabeler(args.reward_model, head=args.head, dtype=args.dtype, max_length=args.max_length,
                                     batch_size=args.batch_size, trust_remote_code=args.trust_remote_code,
                                     device=state.device)
        scored, counts = label_in_processes(samples, labeler, state, BATCHES_PER_CHUNK * args.batch_size,
                                            progress="label" if progress else None)
        if state.is_main_process:
            write_records(args.out, scored)
            print(f"wrote {len(scored)} scored samples to {args.out} ({counts['failed']} could not be scored)")
        state.wait_for_everyone()
    finally:
        if state.use_distributed:
            state.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
