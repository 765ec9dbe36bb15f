"""Stage 4, train: one round of preference optimisation on that round's feedback only.

The recipe, top to bottom:
1. tokenize the records exactly as the sampler rendered them (`models.encode_prompt`) into the loss's
   examples (`alignloop.objectives`: each loss family's examples, reference log-probs and losses);
2. compute the reference log-probs once, then free the reference model, so only the policy is resident
   while training;
3. resume the policy from the last round's checkpoint together with its AdamW moments and scheduler
   position (a fresh optimizer every round would throw the moments away; HALOs restores only the scheduler);
4. train with gradient accumulation and clipping. Under a launcher (torchrun, accelerate
   launch) each micro-batch of `optim.batch_size` examples is split among the processes, which average their
   gradients, so a step sees the same examples whatever the number of processes and the run takes the same
   path (the reference log-probs are shared out the same way);
5. write the checkpoint atomically (`alignloop.checkpoint`: a HF folder plus the optimizer, scheduler and
   trainer state).
"""

from __future__ import annotations

import contextlib
import gc
import json
import random
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from .. import distributed
from ..adapters import adapter_base, inner, is_adapter, trainable_policy
from ..checkpoint import TRAINER_STATE, is_checkpoint, load_training_state, save_checkpoint, training_state_dir
from ..config import AdapterConfig, LossConfig, OptimConfig
from ..faults import crash_point
from ..kernels import lean_layers, with_liger_kernels
from ..models import inference_device, load_causal_lm, load_tokenizer, resolve_model_path
from ..objectives import OBJECTIVES, Example, TrainingError, TrainsOn
from ..records import read_feedback, read_scored

REFERENCE_DTYPE = "float32"  # the reference's weights while it scores the round's examples, once


def training_input(loss: str) -> TrainsOn:
    """Which stage's output a loss trains on: "scored" (scored.jsonl) or "feedback" (feedback.jsonl)."""
    return OBJECTIVES[loss].trains_on


def read_training_records(loss: str, path: str | Path) -> list[dict]:
    """The records a loss trains on, read and checked (errors name the file, line and field)."""
    return read_scored(path) if training_input(loss) == "scored" else read_feedback(path)


def has_training_signal(loss: str, records: list[dict]) -> bool:
    """Whether a round's training records give the loss anything to learn from (`Objective.has_signal`)."""
    return OBJECTIVES[loss].has_signal(records)


def build_examples(records: list[dict], loss: str, tokenizer, max_length: int, seed: int) -> list[Example]:
    """The loss's examples from the records it trains on, cut to `max_length` tokens; `seed` fixes any pairing
    of examples the loss makes."""
    return OBJECTIVES[loss].examples(records, tokenizer, max_length, seed)


def compute_reference_logps(loss: str, examples: list[Example], reference_path: str, dtype: str, batch_size: int,
                            pad_id: int, trust_remote_code: bool, progress: bool, bf16_autocast: bool = False,
                            liger_kernels: bool | None = False, adapter_off=None) -> None:
    """Fill `Example.reference_logps` with the frozen reference's log-probs, as the loss takes them, then free
    the model. The batches are shared among the processes and the results gathered on every one.
    `adapter_off`: the policy's peft wrapper, whose base is the reference; it scores with its adapter switched
    off, and no model is loaded.

    Under bf16 mixed precision the reference runs under the same autocast as the policy, and with the same
    kernels (`liger_kernels`), so that before the first update the policy/reference log-ratio is exactly zero."""
    objective = OBJECTIVES[loss]
    if adapter_off is not None:
        model, switched_off = inner(adapter_off).to(distributed.device()).eval(), adapter_off.disable_adapter()
    else:
        model, switched_off = load_causal_lm(reference_path, dtype, trust_remote_code).to(inference_device()).eval(), contextlib.nullcontext()
        with_liger_kernels(model, liger_kernels)
    device = next(model.parameters()).device
    starts = range(0, len(examples), batch_size)
    mine = distributed.my_share(len(starts))
    done = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast), switched_off:
        for b in tqdm(mine, desc="reference log-probs", disable=not progress):
            done.append(objective.reference_logps(model, examples[starts[b] : starts[b] + batch_size], pad_id))
    for b, logps in enumerate(distributed.gather_shares(len(starts), done)):
        for e, row in zip(examples[starts[b] : starts[b] + batch_size], logps):
            e.reference_logps = row
    if adapter_off is None:
        del model
        gc.collect()
        return_freed_memory()


def loss_on_batch(loss: str, params: dict, model, batch: list[Example], pad_id: int, kl_override=None):
    """Per-example losses [B] and detached metrics (floats) for one micro-batch. `kl_override`: the batch-wide
    number the loss takes (`Objective.local_estimate`), averaged over processes; None: this batch's own."""
    losses, metrics = OBJECTIVES[loss].losses(model, batch, params, pad_id, shared=kl_override)
    if not torch.isfinite(losses).all():
        raise TrainingError(f"loss '{loss}' is not finite (NaN or inf) on this batch; lower the learning rate or check the data")
    return losses, {k: float(v) for k, v in metrics.items()}


def forward_pieces(batch: list[Example], max_tokens: int | None) -> list[list[Example]]:
    """`batch` cut, in order, into pieces that each go through the model at once: as many examples as fit
    `max_tokens` padded tokens (rows x the longest row, a row holding a prompt once and its responses), at
    least one. None: the whole batch."""
    if max_tokens is None:
        return [batch]
    pieces: list[list[Example]] = [[]]
    widest = 0
    for example in batch:
        width = len(example.prompt) + sum(len(r) for r in example.responses)
        if pieces[-1] and (len(pieces[-1]) + 1) * max(widest, width) > max_tokens:
            pieces.append([])
            widest = 0
        pieces[-1].append(example)
        widest = max(widest, width)
    return pieces


CPU_TOKENS_PER_FORWARD = 1024  # `optim.max_tokens_per_forward: auto` on a CPU


def token_budget(setting: int | str | None) -> int | None:
    """`optim.max_tokens_per_forward` as `forward_pieces` takes it: "auto" is CPU_TOKENS_PER_FORWARD on a CPU
    and one piece on a GPU (see the setting's comment). On this CPU, before `kernels.lean_layers`, pieces of
    1024 peaked at 4.6 GiB against 5.1 GiB whole; with them, 1024 and 512 peak alike (4.10 and 4.12 GiB), and
    the whole micro-batch has not been measured again."""
    if setting != "auto":
        return setting
    return None if distributed.device().type == "cuda" else CPU_TOKENS_PER_FORWARD


def weighted_mean(metrics: list[tuple[dict, int]]) -> dict:
    """Each metric averaged over the pieces that report it, weighted by their examples."""
    keys = dict.fromkeys(key for m, _ in metrics for key in m)
    return {key: sum(m[key] * n for m, n in metrics if key in m) / sum(n for m, n in metrics if key in m) for key in keys}


def warmup_then_constant(warmup_steps: int):
    """Linear warmup to the full learning rate, then constant: an online run has no known end."""
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


def train_round(feedback: list[dict], *, policy: str, reference: str, out_dir: str | Path,
                resume: str | Path | None, loss: LossConfig, optim: OptimConfig, seed: int = 0, round_index: int = 0,
                trust_remote_code: bool = False, progress: bool = True, log=None,
                adapter: AdapterConfig | None = None) -> dict:
    """Train the policy on `feedback` (the records `training_input(loss.name)` names) and write the checkpoint
    to `out_dir` (atomically).

    `policy` is where the weights come from (the SFT model, or the previous round's checkpoint); when
    `resume` names a checkpoint folder, the optimizer, scheduler and trainer state come from it too.
    `adapter`: train a LoRA adapter on the frozen SFT model instead of all the weights (`policy` is then the
    SFT model or a round's adapter checkpoint); a reference that is the SFT model is the policy with its
    adapter switched off.
    `log(dict)` receives one dict per optimizer step. Returns a summary of the round.
    """
    from accelerate.utils import set_seed

    distributed.init()
    how = distributed.strategy(optim.strategy)
    set_seed(seed + round_index)
    objective = OBJECTIVES[loss.name]
    tokenizer = load_tokenizer(policy, trust_remote_code)
    pad_id = tokenizer.pad_token_id
    examples = build_examples(feedback, loss.name, tokenizer, optim.max_length, seed + round_index)
    if not examples:
        raise TrainingError("no training examples in this round's feedback")
    show = progress and distributed.is_main()
    bf16_compute = optim.mixed_precision == "bf16"
    wrapped = None  # the peft wrapper of an adapter policy
    if adapter is not None:
        if adapter.quantize and how not in ("none", "ddp"):  # (`auto` under an FSDP or DeepSpeed launch)
            raise TrainingError(f"policy_adapter.quantize: a 4-bit base trains on one process or under ddp, not {how}")
        base = adapter_base(policy) if is_adapter(policy) else resolve_model_path(policy)
        wrapped = trainable_policy(policy, base, adapter, optim.dtype, trust_remote_code, bf16_compute)
    if objective.needs_reference:
        reference_is_base = wrapped is not None and resolve_model_path(reference) == base
        compute_reference_logps(loss.name, examples, reference, REFERENCE_DTYPE, optim.batch_size, pad_id,
                                trust_remote_code, show, bf16_autocast=bf16_compute,
                                liger_kernels=optim.liger_kernels, adapter_off=wrapped if reference_is_base else None)

    # A crash part-way through this round left its state so far: go on from there.
    partial = partial_checkpoint(out_dir)
    done_before = distributed.on_main(lambda: batches_done(partial, round_index))
    if done_before:
        resume = partial
        if wrapped is not None:
            wrapped = trainable_policy(str(partial), base, adapter, optim.dtype, trust_remote_code, bf16_compute)
        else:
            policy = str(partial)
    model = inner(wrapped) if wrapped is not None else load_causal_lm(policy, optim.dtype, trust_remote_code)
    liger = with_liger_kernels(model, optim.liger_kernels)
    if not liger:
        lean_layers(model)
    model.train()
    model.config.use_cache = False
    if optim.activation_checkpointing:  # non-reentrant: works under DDP and FSDP2 and with inputs without grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # AdamW over the parameters as wrapped (FSDP2 replaces them by shards; a DeepSpeed engine takes the AdamW in)
    model, optimizer = distributed.parallelize(model, how, optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_constant(optim.warmup_steps))
    state = {"global_step": 0, "rounds": []}
    if resume is not None:
        state = load_training_state(model, optimizer, scheduler, resume)
        for group in optimizer.param_groups:  # the config may change the learning rate between runs
            group["initial_lr"] = optim.lr
        scheduler.base_lrs = [optim.lr for _ in optimizer.param_groups]
    # Under bf16 mixed precision the weights stay float32 and the forward passes run in bfloat16.
    autocast = torch.autocast(distributed.device().type, dtype=torch.bfloat16, enabled=bf16_compute)

    # The micro-batches, seeded per round and epoch; each is split among the processes.
    rng = random.Random(seed * 1000 + round_index)
    batches = []
    for _ in range(optim.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        batches += [order[i : i + optim.batch_size] for i in range(0, len(order), optim.batch_size)]
    world, rank = distributed.world(), distributed.rank()
    accumulation = optim.gradient_accumulation_steps
    budget = token_budget(optim.max_tokens_per_forward)
    step_metrics: list[dict] = state.pop("round_steps", [])  # (the steps a partial state had taken)
    state.pop("partial", None)
    accumulated: list[dict] = []
    bar = tqdm(total=len(batches), initial=done_before, desc=f"train r{round_index:03d}", unit="batch", disable=not show)
    for k, batch_ids in enumerate(batches[done_before:], start=done_before):
        part = batch_ids[rank::world]
        # The processes' gradients are averaged, so a process's mean loss weighs as its share of the batch. A
        # process left without an example (a last batch smaller than the number of processes) still takes part,
        # with an example that weighs nothing.
        weight = len(part) * world / len(batch_ids)
        batch = [examples[i] for i in part or batch_ids[:1]]
        steps_now = (k + 1) % accumulation == 0 or k == len(batches) - 1
        with autocast:
            shared = objective.local_estimate(model, batch, pad_id)
        if shared is not None and world > 1:  # every process must use the same number: the batch's
            total, count = distributed.sum_over_processes([float(shared) * len(part), len(part)])
            shared = torch.tensor(total / count, dtype=shared.dtype, device=shared.device)
        batch_loss, piece_metrics = 0.0, []
        pieces = forward_pieces(batch, budget)
        for j, piece in enumerate(pieces):
            with distributed.gradient_sync(model, steps_now and j == len(pieces) - 1), autocast:
                losses, metrics = loss_on_batch(loss.name, loss.params, model, piece, pad_id, kl_override=shared)
                piece_loss = losses.sum() / len(batch)  # the pieces' losses add up to the micro-batch's mean
                distributed.backward(model, (piece_loss * weight if world > 1 else piece_loss) / accumulation)
            batch_loss += piece_loss.item()
            piece_metrics.append((metrics, len(piece)))
        accumulated.append(batch_metrics(batch_loss, weighted_mean(piece_metrics), len(part)))
        bar.update(1)
        if steps_now:
            grad_norm = distributed.step(model, optimizer, optim.max_grad_norm)  # clipped, stepped, cleared
            scheduler.step()
            state["global_step"] += 1
            row = {key: sum(a[key] for a in accumulated if key in a) / sum(key in a for a in accumulated)
                   for key in accumulated[0]}
            row.update(step=state["global_step"], round=round_index, grad_norm=float(grad_norm),
                       lr=scheduler.get_last_lr()[0])
            accumulated = []
            step_metrics.append(row)
            return_freed_memory()
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if log is not None and distributed.is_main():
                log(row)
            if optim.checkpoint_every and len(step_metrics) % optim.checkpoint_every == 0 and k < len(batches) - 1:
                save_checkpoint(model, tokenizer, optimizer, scheduler,
                                {**state, "partial": {"round": round_index, "batches_done": k + 1}, "round_steps": step_metrics},
                                partial, adapter=wrapped)
                crash_point("train.partial")

    bar.close()
    summary = {
        "examples": len(examples), "steps": len(step_metrics), "global_step": state["global_step"],
        "processes": world, "strategy": how, "liger_kernels": liger,
        # the tokens trained on (a row's prompt once, then its responses), over the epochs
        "tokens": optim.epochs * sum(len(e.prompt) + sum(len(x) for x in e.responses) for e in examples),
        "loss": sum(r["loss"] for r in step_metrics) / max(1, len(step_metrics)),
    }
    for key in ("rewards/accuracy", "rewards/margin", "kl"):
        values = [r[key] for r in step_metrics if key in r]
        if values:
            summary[key] = sum(values) / len(values)
    state["rounds"].append({"round": round_index, **summary})
    save_checkpoint(model, tokenizer, optimizer, scheduler, state, Path(out_dir), adapter=wrapped)
    if distributed.is_main():
        shutil.rmtree(partial, ignore_errors=True)
    distributed.release(model)
    del model, optimizer, wrapped
    gc.collect()
    return summary


def partial_checkpoint(out_dir: str | Path) -> Path:
    """Where a round's training keeps its state so far (`optim.checkpoint_every`): beside its checkpoint."""
    return Path(out_dir).with_name(Path(out_dir).name + ".partial")


def batches_done(partial: Path, round_index: int) -> int:
    """How many of this round's micro-batches the state in `partial` has trained on; 0 when there is none (or it
    is another round's)."""
    if not is_checkpoint(partial):
        return 0
    state = json.loads((training_state_dir(partial) / TRAINER_STATE).read_text()).get("partial") or {}
    return state.get("batches_done", 0) if state.get("round") == round_index else 0


def return_freed_memory() -> None:
    """Give the memory freed by a step (its activations) back to the system. glibc's allocator keeps freed heap
    memory for reuse, and the next step's differently sized tensors fit it badly, so on a CPU the trainer's
    resident memory would stay near its high-water mark between steps and creep up (embedded default: 4.6 GB
    between steps after six steps, 2.0 GB, the weights, gradients and moments, with this). A no-op where
    glibc is not the allocator."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        pass


def batch_metrics(loss: float, metrics: dict, count: int) -> dict:
    """A micro-batch's loss and metrics over all processes: each process's means weighted by its examples."""
    if distributed.world() == 1:
        return {"loss": loss, **metrics}
    keys = sorted(set().union(*distributed.gather_objects(list(metrics))))  # every key some process has
    values = [loss * count, count] + [v for key in keys for v in ((metrics[key] * count, count) if key in metrics else (0.0, 0))]
    sums = distributed.sum_over_processes(values)
    merged = {"loss": sums[0] / sums[1]}
    for j, key in enumerate(keys):
        total, weight = sums[2 + 2 * j], sums[3 + 2 * j]
        if weight > 0:
            merged[key] = total / weight
    return merged
