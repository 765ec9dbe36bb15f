"""The vLLM sampler on the embedded default (SmolLM2-135M-Instruct, bf16), three comparisons in one run:

1. alignloop's sampling (`VLLMEngine.generate`: chat-template tokens, per-prompt seeds, records with
   log-probs) versus raw `vllm.LLM.generate` on the same engine, prompts and sampling parameters, after one
   warm-up call on the first 4 prompts; best of `--repeats` alternating runs, in generated tokens per second
   (target: at least 0.95x the raw throughput);
2. the sampling side of a 3-round loop (training is the same in both and left out). Round r samples its own
   prompts, the built-in train prompts r*P to (r+1)*P - 1 (P = `--prompts`), with seed r, on both sides:
   - warm engine: one process, one engine that loads each round's weights in place. Its time is the three
     rounds plus this process's start-up (Python, imports, engine) up to the ready engine, paid once;
   - new process per round, HALOs' way: each round runs this script again (`--one-round`), a fresh Python
     process that starts an engine from that round's checkpoint, samples and exits; timed from this process,
     start-up included.
   The three "rounds" are the SFT weights plus two perturbed copies, written by this script;
3. Hugging Face generate (alignloop's `hf` backend, batches of 32 sequences) versus vLLM (alignloop's sampling
   as measured in 1), on round 0's prompts, each after the same warm-up and best of `--repeats` runs, in
   generated tokens per second (end-of-sequence tokens counted on both sides).

It also reports how busy the idle engine keeps the CPU (it stays resident while the trainer runs on a CPU).
Run it alone: two PyTorch processes on a 2-core machine slow each other down many times over.

    python benchmarks/vllm_sampling.py [--prompts 48] [--n 4] [--max-new-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import time

# taken before the heavy imports: the warm side of comparison 2 pays one process start-up, imports included,
# as each of the HALOs side's processes does
_STARTED = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

# The environment this process was started with. Starting an engine adds variables to os.environ (vLLM's
# LD_PRELOAD of tcmalloc and libgomp, thread settings, alignloop's thread binding); a HALOs-style round must
# start from the same environment as a fresh process, not inherit them.
_LAUNCH_ENV = dict(os.environ)

ROUNDS = 3
SAMPLER = dict(backend="vllm", dtype="bfloat16")


def perturbed_copy(source: str, target: str, seed: int) -> str:
    """A copy of the model with every weight nudged (a stand-in for a trained round's checkpoint)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(os.path.join(source, "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    weights = {k: (v + 1e-3 * torch.randn(v.shape, generator=g, dtype=v.dtype)).contiguous() for k, v in weights.items()}
    save_file(weights, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    return target


def load_prompts(per_round: int) -> list[dict]:
    """The built-in train prompts of all rounds: round r's are [r * per_round, (r + 1) * per_round)."""
    from alignloop.prompts.builtin import builtin_prompts

    return builtin_prompts("train")[: ROUNDS * per_round]


def sampling_work(args) -> dict:
    return dict(n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens, stop=[])


def sample_round(engine, prompts: list[dict], r: int, args) -> None:
    """Round r's sampling, the same on both sides of comparison 2: that round's own prompts, seed r."""
    engine.generate(prompts[r * args.prompts : (r + 1) * args.prompts], seed=r, **sampling_work(args))


def one_round(args) -> None:
    """The hidden `--one-round POLICY --round R` mode: one HALOs-style round in a process of its own, a new
    engine started from the round's checkpoint, that round's sampling, then exit."""
    from alignloop.config import VLLMSamplerConfig
    from alignloop.sampling.vllm_engine import VLLMEngine

    engine = VLLMEngine(args.one_round, VLLMSamplerConfig(**SAMPLER), seed=0)
    sample_round(engine, load_prompts(args.prompts), args.round, args)
    engine.close()


def new_process_round(policy: str, r: int, args) -> float:
    """Seconds for round r in a new process (`one_round`), timed from here: process start-up included."""
    command = [sys.executable, __file__, "--one-round", policy, "--round", str(r), "--prompts", str(args.prompts),
               "--n", str(args.n), "--max-new-tokens", str(args.max_new_tokens)]
    t = time.perf_counter()
    subprocess.run(command, check=True, env=_LAUNCH_ENV)
    return time.perf_counter() - t


def timed(call, count) -> tuple[float, int]:
    """(seconds, generated tokens) of one call; `count` reads the number of tokens from its result."""
    t = time.perf_counter()
    result = call()
    return time.perf_counter() - t, count(result)


def best_tokens_per_second(runs: list[tuple[float, int]]) -> float:
    return max(k / s for s, k in runs)


def vllm_tokens(outputs) -> int:
    return sum(o.record["num_tokens"] for row in outputs for o in row)


def raw_tokens(results) -> int:
    return sum(len(c.token_ids) for r in results for c in r.outputs)


def hf_tokens(outputs) -> int:
    # vLLM's token ids (and so its records' num_tokens) end with the end-of-sequence token of a sample that
    # stopped; HF's records leave it out, though generate computed it too. Count it here as well.
    return sum(s["num_tokens"] + (s["finish_reason"] == "stop") for row in outputs for s in row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48, help="prompts per round")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    # hidden: one HALOs-style round in a process of its own, started by comparison 2 (see one_round)
    parser.add_argument("--one-round", metavar="POLICY", help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 0 < ROUNDS * args.prompts <= 400:
        parser.error(f"--prompts must be 1 to {400 // ROUNDS}: {ROUNDS} rounds share the 400 built-in train prompts")
    if args.one_round:
        one_round(args)
        return

    import psutil
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from alignloop.config import VLLMSamplerConfig
    from alignloop.models import encode_prompt, ensure_default_policy, load_causal_lm, load_tokenizer
    from alignloop.sampling.hf import generate as hf_generate
    from alignloop.sampling.vllm_engine import VLLMEngine, _prompt_seed

    sft = str(ensure_default_policy())
    round_prompts = load_prompts(args.prompts)
    prompts = round_prompts[: args.prompts]  # comparisons 1 and 3: round 0's prompts
    sampler = VLLMSamplerConfig(**SAMPLER)
    work = sampling_work(args)
    rows = []

    # 1. alignloop's sampling vs raw LLM.generate, same engine, alternating, best of `repeats`
    t = time.perf_counter()
    engine = VLLMEngine(sft, sampler, seed=0)
    first_start = time.perf_counter() - t
    process_start = time.perf_counter() - _STARTED
    tokenizer = load_tokenizer(sft)
    raw_prompts = [TokensPrompt(prompt_token_ids=encode_prompt(tokenizer, p["prompt"])) for p in prompts]
    raw_params = [SamplingParams(n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.max_new_tokens, logprobs=0,
                                 seed=_prompt_seed(0, p["prompt_id"])) for p in prompts]
    engine.generate(prompts[:4], seed=0, **work)  # warm-up
    ours, raw = [], []
    for _ in range(args.repeats):
        ours.append(timed(lambda: engine.generate(prompts, seed=0, **work), vllm_tokens))
        raw.append(timed(lambda: engine.llm.generate(raw_prompts, raw_params, use_tqdm=False), raw_tokens))
    ours_tps = best_tokens_per_second(ours)
    raw_tps = best_tokens_per_second(raw)
    rows.append(("raw vllm.LLM.generate", f"{raw_tps:.0f} tok/s", "1.00x"))
    rows.append(("alignloop VLLMEngine.generate", f"{ours_tps:.0f} tok/s", f"{ours_tps / raw_tps:.2f}x"))

    # idle engine: CPU it takes while the trainer would run
    procs = psutil.Process().children(recursive=True)
    for p in procs:
        p.cpu_percent()
    time.sleep(10)
    idle = sum(p.cpu_percent() for p in procs if p.is_running())

    # 2. three rounds: warm engine (in-place reloads) vs a new process and engine per round
    with tempfile.TemporaryDirectory() as tmp:
        policies = [sft, perturbed_copy(sft, f"{tmp}/r0", 1), perturbed_copy(sft, f"{tmp}/r1", 2)]
        # comparison 1 left round 0's prompts in the prefix cache and round 0 loads no new weights (so nothing
        # clears it); a new engine starts with an empty cache
        engine.llm.reset_prefix_cache()
        t = time.perf_counter()
        reload_seconds = 0.0
        for r, policy in enumerate(policies):
            t_reload = time.perf_counter()
            engine.load_weights(policy)
            reload_seconds += time.perf_counter() - t_reload
            sample_round(engine, round_prompts, r, args)
        warm = time.perf_counter() - t + process_start  # the warm loop pays one start-up, at the beginning
        engine.close()
        del engine
        restart = sum(new_process_round(policy, r, args) for r, policy in enumerate(policies))
    rows.append(("3 rounds, warm engine (1 start + reloads)", f"{warm:.1f} s", f"reloads {reload_seconds:.1f} s"))
    rows.append(("3 rounds, new process per round (HALOs)", f"{restart:.1f} s", f"{restart - warm:+.1f} s saved"))

    # 3. HF generate (alignloop's hf backend, batch 32) vs vLLM: the same warm-up, best of `repeats`
    model = load_causal_lm(sft, "bfloat16").eval()
    hf_tokenizer = load_tokenizer(sft)
    hf_tokenizer.padding_side = "left"

    def hf_run(batch):
        return hf_generate(model, hf_tokenizer, batch, args.n, 1.0, 1.0, args.max_new_tokens, [], 0, 32)

    hf_run(prompts[:4])  # warm-up, as vLLM's
    hf_tps = best_tokens_per_second([timed(lambda: hf_run(prompts), hf_tokens) for _ in range(args.repeats)])
    rows.append(("HF generate (hf backend)", f"{hf_tps:.0f} tok/s", "1.00x"))
    rows.append(("vLLM (vllm backend)", f"{ours_tps:.0f} tok/s", f"{ours_tps / hf_tps:.2f}x"))

    print(f"SmolLM2-135M-Instruct, bf16, {args.prompts} prompts x {args.n} samples, up to {args.max_new_tokens} "
          f"new tokens, {torch.get_num_threads()} threads; engine start-up {first_start:.1f} s "
          f"({process_start:.1f} s from process start); idle engine CPU {idle:.0f}%")
    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  {'measured':>12}  {'vs baseline':>16}")
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value:>12}  {ratio:>16}")


if __name__ == "__main__":
    main()
