"""One round of training three ways: all weights, a LoRA adapter, and a LoRA adapter on a 4-bit base (QLoRA):
peak memory and seconds, each against full fine-tuning.

The same work for all three: one `alignloop.stages.train.train_round` (the reference log-probs, then one epoch
of DPO) on the same synthetic pairs, micro-batches of `--batch-size` pairs, float32 weights with bfloat16
autocast, in a fresh process each (its peak memory its own), one after another. The adapters are r 16, alpha 32
on every linear layer; QLoRA's base is NormalFloat4, double-quantised (`policy_adapter.quantize: nf4`). The
model is a Llama of random weights built on the fly in the shape asked for (the time and memory do not depend
on the weights) with the embedded default's tokenizer. Peak memory is the GPU's peak allocation where there is
a GPU, else the process's peak resident memory.

    python benchmarks/adapters.py [--shape 1b|7b|smollm2] [--pairs 64] [--words 200] [--batch-size 8]

`smollm2` is SmolLM2-135M's shape; `1b` is TinyLlama-1.1B's; `7b` is Llama-2-7B's (full fine-tuning then needs
about 108 GB for float32 weights, gradients and AdamW moments alone). QLoRA needs bitsandbytes
(`alignloop[qlora]`).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # hidden, layers, heads, key/value heads, intermediate
    "smollm2": (576, 30, 9, 3, 1536),
    "1b": (2048, 22, 32, 4, 5632),
    "7b": (4096, 32, 32, 32, 11008),
}
MODES = ("full", "lora", "qlora")
WORDS = "the of and to in is was for on that with as by at from this be are or an it not which have".split()


def build_model(folder: Path, shape: str) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from alignloop.models import ensure_default_policy

    hidden, layers, heads, kv, inter = SHAPES[shape]
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_policy())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # half the disk; each mode loads it in float32
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def synthetic_pairs(n: int, words: int) -> list[dict]:
    rng = random.Random(0)
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [{"type": "pairwise_feedback", "prompt_id": f"p{i}", "prompt": [{"role": "user", "content": text(words // 2)}],
             "output_A": text(words), "output_B": text(words + 20), "label": i % 2, "reward_A": float(i % 2),
             "reward_B": float(1 - i % 2), "reward_difference": 1.0} for i in range(n)]


def one_round(mode: str, model: str, out: str, pairs: int, words: int, batch_size: int) -> dict:
    """Train one round in this process; its seconds, peak memory and trainable parameters."""
    from alignloop.config import AdapterConfig, LossConfig, OptimConfig
    from alignloop.stages.train import train_round

    adapter = {"full": None, "lora": AdapterConfig(r=16, alpha=32),
               "qlora": AdapterConfig(r=16, alpha=32, quantize="nf4")}[mode]
    optim = OptimConfig(lr=1e-5 if mode == "full" else 1e-4, batch_size=batch_size, epochs=1, warmup_steps=0,
                        mixed_precision="bf16", max_length=1024)
    gpu = torch.cuda.is_available()
    start = time.perf_counter()
    summary = train_round(synthetic_pairs(pairs, words), policy=model, reference=model, out_dir=out, resume=None,
                          loss=LossConfig(name="dpo"), optim=optim, progress=False, adapter=adapter)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "seconds": seconds, "peak_bytes": peak, "tokens": summary["tokens"],
            "steps": summary["steps"], "memory": "GPU allocated" if gpu else "RSS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="smollm2")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--words", type=int, default=200, help="words in each answer (the prompt has half)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--one", nargs=2, metavar=("MODE", "WORKDIR"), help=argparse.SUPPRESS)  # a child's round
    args = parser.parse_args()
    if args.one:
        mode, work = args.one
        print(json.dumps(one_round(mode, f"{work}/model", f"{work}/out-{mode}", args.pairs, args.words, args.batch_size)))
        return

    with tempfile.TemporaryDirectory() as work:
        build_model(Path(work, "model"), args.shape)
        rows = []
        for mode in args.modes:
            child = subprocess.run([sys.executable, __file__, "--one", mode, work, "--pairs", str(args.pairs), "--words",
                                    str(args.words), "--batch-size", str(args.batch_size)], capture_output=True, text=True)
            if child.returncode != 0:
                lines = child.stderr.strip().splitlines()
                rows.append({"mode": mode, "failed": lines[-1] if lines else f"exit {child.returncode}"})
            else:
                rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"one round of DPO, shape {args.shape}, {args.pairs} pairs of ~{args.words} words, batch {args.batch_size}, "
          f"bf16 autocast, on {device}")
    full = next((r for r in rows if r["mode"] == "full" and "failed" not in r), None)
    print("| training | seconds | x full | peak memory | x full |")
    print("|---|--:|--:|--:|--:|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['mode']} | failed: {r['failed'][:80]} | | | |")
            continue
        ratio = lambda key: f"{r[key] / full[key]:.2f}" if full else "-"  # noqa: E731
        print(f"| {r['mode']} | {r['seconds']:.1f} | {ratio('seconds')} | {r['peak_bytes'] / 2**30:.2f} GiB "
              f"({r['memory']}) | {ratio('peak_bytes')} |")


if __name__ == "__main__":
    main()
