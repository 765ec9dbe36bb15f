"""Hugging Face `generate` as a sampler: batched with left padding, longest prompts first, cut at the first
end-of-sequence token or stop string. Prompts are rendered by `models.encode_prompt`, the function the
trainer uses, so the policy is trained on exactly the tokens it was sampled from."""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from tqdm import tqdm

from .. import distributed
from ..faults import crash_point
from ..models import encode_prompt, inference_device, load_causal_lm, load_tokenizer


def sample_with_hf(policy: str, prompts: list[dict], n: int, sampler, seed: int, trust_remote_code: bool,
                   progress: str | None, on_prompt_done: Callable[[int, list[dict]], None] | None = None) -> list[list[dict]]:
    """Load the policy and sample n outputs per prompt with the `sampler` section's settings."""
    tokenizer = load_tokenizer(policy, trust_remote_code)
    tokenizer.padding_side = "left"
    model = load_causal_lm(policy, sampler.dtype, trust_remote_code).to(inference_device()).eval()
    outputs = generate(model, tokenizer, prompts, n, sampler.temperature, sampler.top_p, sampler.max_new_tokens,
                       sampler.stop, seed, sampler.batch_size, progress, on_prompt_done)
    del model
    return outputs


def generate(
    model,
    tokenizer,
    prompts: list[dict],
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop: list[str],
    seed: int,
    batch_size: int,
    progress: str | None = None,
    on_prompt_done: Callable[[int, list[dict]], None] | None = None,
) -> list[list[dict]]:
    """For each prompt record, n dicts {output, finish_reason, num_tokens, prompt_tokens}.

    temperature 0 means greedy decoding (then n must be 1). Prompts are processed longest first, in
    batches of `batch_size` sequences, so padding stays small and memory peaks early. The batches are the
    same whatever the number of processes, each sampled with its own seed (from `seed` and its place), and
    shared among the processes; so the outputs do not depend on how many there are, nor on a resume.
    `on_prompt_done(i, samples)` is called for each prompt of a batch as soon as the batch is generated (this
    process's batches only).
    """
    if temperature == 0 and n != 1:
        raise ValueError("greedy decoding (temperature 0) gives one distinct sample per prompt; set n to 1")
    encoded = [encode_prompt(tokenizer, p["prompt"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    prompts_per_batch = max(1, batch_size // n)
    eos_ids = _eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    batches = [order[i : i + prompts_per_batch] for i in range(0, len(order), prompts_per_batch)]
    mine = distributed.my_share(len(batches))
    done: list[list[list[dict]]] = []  # per batch of mine, per prompt of the batch, its n outputs
    for b in tqdm(mine, desc=progress or "sample", unit="batch", disable=not progress or not distributed.is_main()):
        batch = batches[b]
        torch.manual_seed(batch_seed(seed, b))
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = encoded[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                num_return_sequences=n,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos_ids,
                stop_strings=stop or None,
                tokenizer=tokenizer if stop else None,
                top_k=None,
                **sampling,
            )
        generated = out[:, width:].cpu()
        done.append([[_decode(tokenizer, generated[row * n + j].tolist(), eos_ids, stop, len(encoded[i])) for j in range(n)]
                     for row, i in enumerate(batch)])
        if on_prompt_done is not None:
            for i, samples in zip(batch, done[-1]):
                on_prompt_done(i, samples)
        crash_point("sample.batch")
    results: list[list[dict]] = [[] for _ in prompts]
    for batch, outputs in zip(batches, distributed.gather_shares(len(batches), done)):
        for i, samples in zip(batch, outputs):
            results[i] = samples
    return results


def batch_seed(seed: int, batch: int) -> int:
    """The sampling seed of one batch of a stage."""
    return int.from_bytes(hashlib.sha256(f"{seed}/batch/{batch}".encode()).digest()[:7], "big")


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _decode(tokenizer, tokens: list[int], eos_ids: list[int], stop: list[str], prompt_tokens: int) -> dict:
    """Cut a generated row at its first end-of-sequence token or stop string and say why it ended."""
    finish_reason = "length"
    for k, t in enumerate(tokens):
        if t in eos_ids:
            tokens, finish_reason = tokens[:k], "stop"
            break
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for s in stop:
        cut = text.find(s)
        if cut >= 0:
            text, finish_reason = text[:cut], "stop"
    return {"output": text, "finish_reason": finish_reason, "num_tokens": len(tokens), "prompt_tokens": prompt_tokens}
