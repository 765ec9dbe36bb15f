"""Stage 4, train: one round of preference optimisation on that round's feedback only.

The recipe, top to bottom:
1. tokenize the feedback exactly as the sampler rendered it (`models.encode_prompt`);
2. compute the reference log-probs once, then free the reference model, so only the policy is resident
   while training;
3. resume the policy from the last round's checkpoint together with its AdamW moments and scheduler
   position (a fresh optimizer every round would throw the moments away; HALOs restores only the scheduler);
4. train with gradient accumulation and clipping under Accelerate, so the same code runs data-parallel or
   sharded under `accelerate launch`;
5. write the checkpoint atomically (`alignloop.checkpoint`: a HF folder plus the optimizer, scheduler and
   trainer state).
"""

from __future__ import annotations

import gc
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from ..checkpoint import load_training_state, save_checkpoint
from ..config import LossConfig, OptimConfig
from ..logprobs import response_token_logps, sequence_logps
from ..losses import LOSSES, group_advantages, mismatched_indices
from ..models import encode_prompt, encode_response, inference_device, load_causal_lm, load_tokenizer
from .feedback import pairs_to_binary, read_feedback, read_scored

class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, feedback the loss cannot use)."""


@dataclass
class Example:
    """One training example: a prompt and its responses (chosen, rejected) or (output,) plus, for KTO,
    the mismatched output used for the KL estimate."""

    prompt: list[int]
    responses: list[list[int]]
    desirable: bool = True
    kl_response: list[int] | None = None
    reference: list[float] = field(default_factory=list)  # reference log-probs of responses (+ kl_response)
    advantage: float = 0.0  # GRPO: the output's reward relative to its group


def build_examples(feedback: list[dict], loss: str, tokenizer, max_length: int, seed: int) -> list[Example]:
    """Examples for the loss from the round's feedback; pairs are split for losses that take binary labels."""
    spec = LOSSES[loss]
    if spec.feedback == "scored_groups":
        return _group_examples(feedback, tokenizer, max_length)
    kinds = {r.get("type") for r in feedback}
    if spec.feedback == "binary" and kinds == {"pairwise_feedback"}:
        feedback = pairs_to_binary(feedback)
    elif spec.feedback == "pairwise" and "binary_feedback" in kinds:
        raise TrainingError(f"loss '{loss}' needs pairwise feedback; got binary feedback (use feedback.type: pairwise)")
    examples = []
    for r in feedback:
        prompt = encode_prompt(tokenizer, r["prompt"])
        if r["type"] == "pairwise_feedback":
            chosen, rejected = (r["output_A"], r["output_B"]) if r["label"] == 1 else (r["output_B"], r["output_A"])
            if spec.feedback == "any":  # SFT learns from the preferred output only
                examples.append(Example(prompt, [encode_response(tokenizer, chosen)]))
            else:
                examples.append(Example(prompt, [encode_response(tokenizer, chosen), encode_response(tokenizer, rejected)]))
        else:
            if spec.feedback == "any" and not r["label"]:
                continue
            examples.append(Example(prompt, [encode_response(tokenizer, r["output"])], desirable=bool(r["label"])))
    for e in examples:  # keep the end of each response; cut the prompt from the left if too long
        budget = max_length - max(len(x) for x in e.responses)
        e.prompt = e.prompt[-budget:] if budget > 0 else e.prompt[-1:]
        e.responses = [x[: max_length - len(e.prompt)] for x in e.responses]
    if loss == "kto" and examples:
        # KTO's reference point: each prompt paired with another example's output (a fixed seeded
        # derangement, so it does not depend on how examples fall into batches).
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        partner = mismatched_indices(len(order)).tolist()
        for k, i in enumerate(order):
            e = examples[i]
            e.kl_response = examples[order[partner[k]]].responses[0][: max_length - len(e.prompt)]
    return examples


def _group_examples(scored: list[dict], tokenizer, max_length: int) -> list[Example]:
    """GRPO trains on scored samples: each output with its advantage within its prompt's group. Groups whose
    outputs all score the same carry no signal and are left out."""
    if scored and "reward" not in scored[0]:
        raise TrainingError("loss 'grpo' trains on scored samples (scored.jsonl), not on feedback records")
    scored = [r for r in scored if r.get("reward") is not None]
    if not scored:
        return []
    ids = {pid: i for i, pid in enumerate(dict.fromkeys(r["prompt_id"] for r in scored))}
    advantages = group_advantages(torch.tensor([float(r["reward"]) for r in scored], dtype=torch.float64),
                                  torch.tensor([ids[r["prompt_id"]] for r in scored]))
    examples = []
    for r, a in zip(scored, advantages.tolist()):
        if a != 0.0:
            prompt = encode_prompt(tokenizer, r["prompt"])
            examples.append(Example(prompt[-max_length // 2 :], [encode_response(tokenizer, r["output"])[: max_length // 2]], advantage=a))
    return examples


def _sequences(examples: list[Example], with_kl: bool):
    """All (prompt, response) sequences of a batch, grouped by response slot: slot 0 of every example,
    then slot 1, ...; then the KL sequences."""
    slots = len(examples[0].responses)
    prompts = [e.prompt for s in range(slots) for e in examples]
    responses = [e.responses[s] for s in range(slots) for e in examples]
    if with_kl:
        prompts += [e.prompt for e in examples]
        responses += [e.kl_response for e in examples]
    return prompts, responses


def compute_reference_logps(examples: list[Example], reference_path: str, dtype: str, batch_size: int,
                            pad_id: int, trust_remote_code: bool, progress: bool, bf16_autocast: bool = False,
                            per_token: bool = False) -> None:
    """Fill `Example.reference` with the frozen reference's summed log-probs, then free the model.

    Under bf16 mixed precision the reference runs under the same autocast as the policy, so that before
    the first update the policy/reference log-ratio is exactly zero."""
    model = load_causal_lm(reference_path, dtype, trust_remote_code).to(inference_device()).eval()
    device = next(model.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
        for start in tqdm(range(0, len(examples), batch_size), desc="reference log-probs", disable=not progress):
            batch = examples[start : start + batch_size]
            prompts, responses = _sequences(batch, with_kl=batch[0].kl_response is not None)
            if per_token:  # GRPO's KL penalty is per token
                logps, mask = response_token_logps(model, prompts, responses, pad_id)
                for e, row, m in zip(batch, logps, mask):
                    e.reference = row[m].tolist()
                continue
            logps, _ = sequence_logps(model, prompts, responses, pad_id)
            per_example = logps.view(-1, len(batch)).t()
            for e, row in zip(batch, per_example):
                e.reference = row.tolist()
    del model
    gc.collect()


def loss_on_batch(loss: str, params: dict, model, batch: list[Example], pad_id: int, kl_override=None):
    """Per-example losses [B] and detached metrics for one micro-batch."""
    spec = LOSSES[loss]
    if spec.logps == "token":
        return _grpo_on_batch(spec, params, model, batch, pad_id)
    slots = len(batch[0].responses)
    prompts, responses = _sequences(batch, with_kl=False)
    logps, lengths = sequence_logps(model, prompts, responses, pad_id)
    B = len(batch)
    if spec.logps == "average":
        logps = logps / lengths.clamp(min=1)
    policy = logps.view(slots, B)
    metrics: dict[str, torch.Tensor] = {}
    if spec.needs_reference:
        ref = torch.tensor([e.reference for e in batch], dtype=logps.dtype, device=logps.device).t()
        if spec.logps == "average":
            ref_lengths = lengths.view(slots, B).clamp(min=1)
            ref = torch.cat([ref[:slots] / ref_lengths, ref[slots:]])
    if spec.feedback == "pairwise":
        args = (policy[0], policy[1], ref[0], ref[1]) if spec.needs_reference else (policy[0], policy[1])
        losses, chosen_rewards, rejected_rewards = spec.fn(*args, **params)
        margin = chosen_rewards - rejected_rewards
        metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                   "rewards/margin": margin.mean(), "rewards/accuracy": (margin > 0).float().mean()}
        if spec.needs_reference:
            metrics["kl"] = (policy[0] - ref[0]).detach().mean()  # sequence log-ratio of chosen: a KL estimate
    elif loss == "kto":
        kl_logps = None
        if kl_override is None:
            with torch.no_grad():
                kl_logps, _ = sequence_logps(model, [e.prompt for e in batch], [e.kl_response for e in batch], pad_id)
        desirable = torch.tensor([e.desirable for e in batch], device=logps.device)
        losses, rewards, kl = spec.fn(policy[0], ref[0], kl_logps, ref[1], desirable, **params, kl=kl_override)
        metrics = {"kl": kl}
        if desirable.any():
            metrics["rewards/chosen"] = rewards[desirable].mean()
        if (~desirable).any():
            metrics["rewards/rejected"] = rewards[~desirable].mean()
    else:  # sft
        losses, _ = spec.fn(policy[0] if spec.logps != "average" else policy[0] * lengths, lengths)
    if not torch.isfinite(losses).all():
        raise TrainingError(f"loss '{loss}' is not finite (NaN or inf) on this batch; lower the learning rate or check the data")
    return losses, {k: float(v) for k, v in metrics.items()}


def _grpo_on_batch(spec, params: dict, model, batch: list[Example], pad_id: int):
    """GRPO on one micro-batch: one update per batch of fresh samples, so the old policy is the current one."""
    logps, mask = response_token_logps(model, [e.prompt for e in batch], [e.responses[0] for e in batch], pad_id)
    reference = torch.zeros_like(logps)
    for row, e in enumerate(batch):
        reference[row, : len(e.reference)] = torch.tensor(e.reference, dtype=logps.dtype)
    advantages = torch.tensor([e.advantage for e in batch], dtype=logps.dtype, device=logps.device)
    losses, kl, clipped = spec.fn(logps, mask, advantages, reference_logps=reference, **params)
    if not torch.isfinite(losses).all():
        raise TrainingError("loss 'grpo' is not finite (NaN or inf) on this batch; lower the learning rate or check the data")
    return losses, {"kl": float(kl.mean()), "clip_fraction": float(clipped.mean()), "advantage": float(advantages.mean())}


def warmup_then_constant(warmup_steps: int):
    """Linear warmup to the full learning rate, then constant: an online run has no known end."""
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


REFERENCE_DTYPE = "float32"  # the reference's weights while it scores the round's examples, once


def training_input(loss: str) -> Literal["scored", "feedback"]:
    """Which stage's output a loss trains on: GRPO on the scored samples (groups of one prompt's samples), the
    others on feedback records."""
    return "scored" if LOSSES[loss].feedback == "scored_groups" else "feedback"


def read_training_records(loss: str, path: str | Path) -> list[dict]:
    """The records a loss trains on, read and checked (errors name the file, line and field)."""
    return read_scored(path) if training_input(loss) == "scored" else read_feedback(path)


def train_round(feedback: list[dict], *, policy: str, reference: str, out_dir: str | Path,
                resume: str | Path | None, loss: LossConfig, optim: OptimConfig, seed: int = 0, round_index: int = 0,
                trust_remote_code: bool = False, progress: bool = True, log=None) -> dict:
    """Train the policy on `feedback` and write the checkpoint to `out_dir` (atomically).

    `policy` is where the weights come from (the SFT model, or the previous round's checkpoint); when
    `resume` names a checkpoint folder, the optimizer, scheduler and trainer state come from it too.
    `log(dict)` receives one dict per optimizer step. Returns a summary of the round.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # cpu=True on a machine without a GPU: Accelerate then sets up gloo data parallelism under torchrun
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=optim.gradient_accumulation_steps,
                              mixed_precision=optim.mixed_precision)
    set_seed(seed + round_index)
    spec = LOSSES[loss.name]
    params = {**spec.defaults, **loss.params}
    tokenizer = load_tokenizer(policy, trust_remote_code)
    pad_id = tokenizer.pad_token_id
    examples = build_examples(feedback, loss.name, tokenizer, optim.max_length, seed + round_index)
    if not examples:
        raise TrainingError("no training examples in this round's feedback")
    show = progress and accelerator.is_main_process
    if spec.needs_reference:
        compute_reference_logps(examples, reference, REFERENCE_DTYPE, optim.batch_size, pad_id,
                                trust_remote_code, show, bf16_autocast=optim.mixed_precision == "bf16",
                                per_token=spec.logps == "token")

    model = load_causal_lm(policy, optim.dtype, trust_remote_code)
    model.train()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_constant(optim.warmup_steps))
    state = {"global_step": 0, "rounds": []}
    if resume is not None:
        state = load_training_state(optimizer, scheduler, resume)
        for group in optimizer.param_groups:  # the config may change the learning rate between runs
            group["initial_lr"] = optim.lr
        scheduler.base_lrs = [optim.lr for _ in optimizer.param_groups]
    model, optimizer = accelerator.prepare(model, optimizer)

    # Each process takes every num_processes-th batch; the order is seeded per round and epoch.
    rng = random.Random(seed * 1000 + round_index)
    batches = []
    for _ in range(optim.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        batches += [order[i : i + optim.batch_size] for i in range(0, len(order), optim.batch_size)]
    world, rank = accelerator.num_processes, accelerator.process_index
    batches = batches[: len(batches) - len(batches) % world] if len(batches) >= world else batches[:1] * world
    my_batches = batches[rank::world]
    step_metrics: list[dict] = []
    accumulated: list[dict] = []
    bar = tqdm(my_batches, desc=f"train r{round_index:03d}", unit="batch", disable=not show)
    for k, batch_ids in enumerate(bar):
        batch = [examples[i] for i in batch_ids]
        with accelerator.accumulate(model):
            kl = None
            if loss.name == "kto":  # the reference point is shared across processes
                with torch.no_grad():
                    kl_logps, _ = sequence_logps(model, [e.prompt for e in batch], [e.kl_response for e in batch], pad_id)
                local = (kl_logps - torch.tensor([e.reference[1] for e in batch], device=kl_logps.device)).mean()
                kl = accelerator.reduce(local.detach(), reduction="mean")
            losses, metrics = loss_on_batch(loss.name, params, model, batch, pad_id, kl_override=kl)
            batch_loss = losses.mean()
            accelerator.backward(batch_loss)
            accumulated.append({"loss": batch_loss.item(), **metrics})
            if accelerator.sync_gradients or k == len(my_batches) - 1:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                state["global_step"] += 1
                row = {key: sum(a[key] for a in accumulated if key in a) / sum(key in a for a in accumulated)
                       for key in accumulated[0]}
                row.update(step=state["global_step"], round=round_index, grad_norm=float(grad_norm),
                           lr=scheduler.get_last_lr()[0])
                accumulated = []
                step_metrics.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                if log is not None and accelerator.is_main_process:
                    log(row)

    summary = {
        "examples": len(examples), "steps": len(step_metrics), "global_step": state["global_step"],
        "loss": sum(r["loss"] for r in step_metrics) / max(1, len(step_metrics)),
    }
    for key in ("rewards/accuracy", "rewards/margin", "kl"):
        values = [r[key] for r in step_metrics if key in r]
        if values:
            summary[key] = sum(values) / len(values)
    state["rounds"].append({"round": round_index, **summary})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(accelerator.unwrap_model(model), tokenizer, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                        scheduler, state, Path(out_dir))
    accelerator.wait_for_everyone()
    del model, optimizer
    gc.collect()
    return summary


