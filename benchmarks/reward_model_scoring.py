"""How much batching with length sorting buys when a reward model labels samples.

HALOs scores one conversation per forward pass; alignloop's reward-model labeler scores batches of
`batch_size`, sorted by length so that each batch pads to a similar length. This script scores the same
samples with the same model in the same run three ways - one at a time, batched in input order, batched and
length-sorted - and prints samples per second, the share of padding tokens, and the largest difference from
the one-at-a-time scores.

The model is built on the fly (random weights: the speed does not depend on them): a small Llama sequence
classifier with the SmolLM2 tokenizer and chat template from the embedded default.

    python benchmarks/reward_model_scoring.py [--samples 128] [--batch-size 16] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch

from alignloop.models import ensure_default_policy
from alignloop.rewards.reward_model import RewardModelLabeler

WORDS = ("the model answers questions about rivers mountains cities history science music and food with care "
         "because every reader deserves a clear and honest reply that is short when it can be").split()


def build_model(folder: str, layers: int, hidden: int) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_policy())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=2048, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def make_samples(n: int, seed: int = 0) -> list[tuple[dict, str]]:
    """Prompts of 5-60 words and outputs of 5-400 words: the spread a sampling round produces."""
    rng = random.Random(seed)
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [({"prompt": [{"role": "user", "content": text(rng.randint(5, 60))}]}, text(int(rng.paretovariate(1.2) * 5) % 400 + 5))
            for _ in range(n)]


def padding_share(lengths: list[int], batch_size: int) -> float:
    """Padding tokens / all tokens fed when `lengths` are batched in the given order."""
    fed = sum(max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size))
    return 1 - sum(lengths) / fed


def timed(fn) -> tuple[float, list[float]]:
    start = time.perf_counter()
    rewards = fn()
    return time.perf_counter() - start, rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        build_model(folder, args.layers, args.hidden)
        sorted_labeler = RewardModelLabeler(folder, dtype=args.dtype, batch_size=args.batch_size, max_length=2048)
        in_order = RewardModelLabeler(folder, dtype=args.dtype, batch_size=args.batch_size, max_length=2048,
                                      sort_by_length=False)
    items = make_samples(args.samples)
    lengths = [len(sorted_labeler.encode(record, output)[0]) for record, output in items]
    sorted_labeler.score(items[:4])  # warm-up: first calls pay for allocation and kernel selection

    rewards = lambda scores: [s.reward for s in scores]  # noqa: E731
    rows = []
    t1, alone = timed(lambda: [sorted_labeler.score([item])[0].reward for item in items])
    rows.append(("one at a time (HALOs)", t1, 0.0, alone))
    t2, batched = timed(lambda: rewards(in_order.score(items)))
    rows.append((f"batched {args.batch_size}, input order", t2, padding_share(lengths, args.batch_size), batched))
    t3, batched_sorted = timed(lambda: rewards(sorted_labeler.score(items)))
    rows.append((f"batched {args.batch_size}, length-sorted", t3,
                 padding_share(sorted(lengths, reverse=True), args.batch_size), batched_sorted))

    print(f"{args.samples} samples, {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}); "
          f"Llama seq-cls {args.layers} layers x {args.hidden}, {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"| {'mode':<28} | {'seconds':>7} | {'samples/s':>9} | {'padding':>7} | {'x one-at-a-time':>15} | {'max |diff|':>10} |")
    print(f"|{'-' * 30}|{'-' * 8}:|{'-' * 10}:|{'-' * 8}:|{'-' * 16}:|{'-' * 11}:|")
    for name, seconds, padding, scores in rows:
        diff = max(abs(a - b) for a, b in zip(scores, alone))
        print(f"| {name:<28} | {seconds:7.2f} | {args.samples / seconds:9.1f} | {padding:7.0%} | {t1 / seconds:15.2f} | {diff:10.2e} |")


if __name__ == "__main__":
    main()
