"""The vLLM sampler on the embedded default (SmolLM2-135M-Instruct, bf16), three comparisons in one run:

1. alignloop's sampling (`VLLMEngine.generate`: chat-template tokens, per-prompt seeds, records with
   log-probs) versus raw `vllm.LLM.generate` on the same engine, prompts and sampling parameters
   (target: at least 0.95x the raw throughput);
2. the sampling side of a 3-round loop: one warm engine that loads each round's weights in place versus
   HALOs' way, a new engine started from each round's checkpoint (training is the same in both and left
   out). The three "rounds" are the SFT weights plus two perturbed copies, written by this script;
3. Hugging Face generate (alignloop's `hf` backend) versus vLLM, in generated tokens per second.

It also reports how busy the idle engine keeps the CPU (it stays resident while the trainer runs on a CPU).
Run it alone: two PyTorch processes on a 2-core machine slow each other down many times over.

    python benchmarks/vllm_sampling.py [--prompts 48] [--n 4] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch


def perturbed_copy(source: str, target: str, seed: int) -> str:
    """A copy of the model with every weight nudged (a stand-in for a trained round's checkpoint)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(os.path.join(source, "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    weights = {k: (v + 1e-3 * torch.randn(v.shape, generator=g, dtype=v.dtype)).contiguous() for k, v in weights.items()}
    save_file(weights, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    return target


def tokens(outputs) -> int:
    return sum(o.record["num_tokens"] for row in outputs for o in row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import psutil
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from alignloop.config import SamplerConfig
    from alignloop.models import encode_prompt, ensure_default_policy, load_causal_lm, load_tokenizer
    from alignloop.prompts.builtin import builtin_prompts
    from alignloop.stages.sample import generate as hf_generate
    from alignloop.vllm_engine import VLLMEngine, _prompt_seed

    sft = str(ensure_default_policy())
    prompts = builtin_prompts("train")[: args.prompts]
    sampler = SamplerConfig(backend="vllm", dtype="bfloat16")
    work = dict(n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens, stop=[])
    rows = []

    # 1. alignloop's sampling vs raw LLM.generate, same engine, alternating, best of `repeats`
    t = time.perf_counter()
    engine = VLLMEngine(sft, sampler, seed=0)
    first_start = time.perf_counter() - t
    tokenizer = load_tokenizer(sft)
    raw_prompts = [TokensPrompt(prompt_token_ids=encode_prompt(tokenizer, p["prompt"])) for p in prompts]
    raw_params = [SamplingParams(n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.max_new_tokens, logprobs=0,
                                 seed=_prompt_seed(0, p["prompt_id"])) for p in prompts]
    engine.generate(prompts[:4], seed=0, **work)  # warm-up
    ours, raw = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        out = engine.generate(prompts, seed=0, **work)
        ours.append((time.perf_counter() - t, tokens(out)))
        t = time.perf_counter()
        res = engine.llm.generate(raw_prompts, raw_params, use_tqdm=False)
        raw.append((time.perf_counter() - t, sum(len(c.token_ids) for r in res for c in r.outputs)))
    ours_tps = max(k / s for s, k in ours)
    raw_tps = max(k / s for s, k in raw)
    rows.append(("raw vllm.LLM.generate", f"{raw_tps:.0f} tok/s", "1.00x"))
    rows.append(("alignloop VLLMEngine.generate", f"{ours_tps:.0f} tok/s", f"{ours_tps / raw_tps:.2f}x"))

    # idle engine: CPU it takes while the trainer would run
    procs = psutil.Process().children(recursive=True)
    for p in procs:
        p.cpu_percent()
    time.sleep(10)
    idle = sum(p.cpu_percent() for p in procs if p.is_running())

    # 2. three rounds: warm engine (in-place reloads) vs a new engine per round
    with tempfile.TemporaryDirectory() as tmp:
        policies = [sft, perturbed_copy(sft, f"{tmp}/r0", 1), perturbed_copy(sft, f"{tmp}/r1", 2)]
        t = time.perf_counter()
        reload_seconds = 0.0
        for r, policy in enumerate(policies):
            t_reload = time.perf_counter()
            engine.load_weights(policy)
            reload_seconds += time.perf_counter() - t_reload
            engine.generate(prompts, seed=r, **work)
        warm = time.perf_counter() - t + first_start  # the warm loop pays one start-up, at the beginning
        engine.close()
        del engine
        t = time.perf_counter()
        for r, policy in enumerate(policies):
            e = VLLMEngine(policy, sampler, seed=0)
            e.generate(prompts, seed=r, **work)
            e.close()
            del e
        restart = time.perf_counter() - t
    rows.append(("3 rounds, warm engine (1 start + reloads)", f"{warm:.1f} s", f"reloads {reload_seconds:.1f} s"))
    rows.append(("3 rounds, new engine per round (HALOs)", f"{restart:.1f} s", f"{restart - warm:+.1f} s saved"))

    # 3. HF generate (alignloop's hf backend, batch 32) vs vLLM
    model = load_causal_lm(sft, "bfloat16").eval()
    hf_tokenizer = load_tokenizer(sft)
    hf_tokenizer.padding_side = "left"
    t = time.perf_counter()
    out = hf_generate(model, hf_tokenizer, prompts, args.n, 1.0, 1.0, args.max_new_tokens, [], 0, 32)
    hf_s = time.perf_counter() - t
    hf_tps = sum(s["num_tokens"] for row in out for s in row) / hf_s
    rows.append(("HF generate (hf backend)", f"{hf_tps:.0f} tok/s", "1.00x"))
    rows.append(("vLLM (vllm backend)", f"{ours_tps:.0f} tok/s", f"{ours_tps / hf_tps:.2f}x"))

    print(f"SmolLM2-135M-Instruct, bf16, {args.prompts} prompts x {args.n} samples, up to {args.max_new_tokens} "
          f"new tokens, {torch.get_num_threads()} threads; engine start-up {first_start:.1f} s; "
          f"idle engine CPU {idle:.0f}%")
    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  {'measured':>12}  {'vs baseline':>16}")
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value:>12}  {ratio:>16}")


if __name__ == "__main__":
    main()
