"""Each loss family's adapter between the trainer and the pure losses in `alignloop.losses`.

A loss function takes log-probs; which log-probs, of what, built from which records, is what sets the
families apart:
- pairwise (dpo, dpo_norm, ipo, simpo, slic, orpo): a (chosen, rejected) pair per example, log-probs summed or averaged
  over tokens as the loss's paper has it (`LossSpec.logps`), the reference's at the same scale;
- kto: one output per example, desirable or not (pairs are split into one of each), and another example's
  output, whose log-ratio estimates the reference point z0; every process must use the same z0, so the
  trainer averages the processes' estimates and hands the result back;
- sft: the preferred outputs only;
- grpo: scored samples rather than feedback, each output with its advantage within its prompt's group,
  log-probs per token.

An adapter declares which stage's records it trains on (`trains_on`) and turns them into `Example`s; it
scores a batch under the frozen reference, and turns a micro-batch into per-example losses [B] and detached
metrics. The trainer (`stages.train`) only calls these, so it holds no loss names.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import torch

from .logprobs import response_logps, response_token_logps, sequence_logps
from .losses import LOSSES, group_advantages, mismatched_indices
from .models import encode_prompt, encode_response
from .records import chosen_and_rejected, pairs_to_binary

TrainsOn = Literal["scored", "feedback"]  # which stage's output a loss trains on


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, feedback the loss cannot use)."""


@dataclass
class Example:
    """One training example: a prompt and its responses (chosen, rejected) or (output,) plus, for KTO,
    the mismatched output used for the reference point."""

    prompt: list[int]
    responses: list[list[int]]
    desirable: bool = True
    kl_response: list[int] | None = None
    # under the reference: each response's summed log-probs (then kl_response's), or GRPO's per-token ones
    reference_logps: list[float] = field(default_factory=list)
    advantage: float = 0.0  # GRPO: the output's reward relative to its group


class Objective:
    """What the trainer asks of a loss family. A family sets `trains_on` and writes `examples`, `losses` and,
    when its loss uses the reference model, `reference_logps`."""

    trains_on: TrainsOn = "feedback"

    def __init__(self, loss: str):
        self.loss = loss
        self.spec = LOSSES[loss]

    @property
    def needs_reference(self) -> bool:
        return self.spec.needs_reference

    def examples(self, records: list[dict], tokenizer, max_length: int, seed: int) -> list[Example]:
        raise NotImplementedError

    def has_signal(self, records: list[dict]) -> bool:
        """Whether the round's records (the stage output named by `trains_on`) give the loss anything to learn
        from; a round without is skipped and keeps its policy."""
        return bool(records)

    def reference_logps(self, model, batch: list[Example], pad_id: int) -> list[list[float]]:
        """Each example's `Example.reference_logps`, scored by `model` (the frozen reference)."""
        raise NotImplementedError

    def local_estimate(self, model, batch: list[Example], pad_id: int) -> torch.Tensor | None:
        """A number the loss takes from the whole batch rather than from each example, estimated on this
        process's micro-batch (detached); the trainer averages it over the processes and passes the result
        to `losses` as `shared`, so that every process uses the same one. None: the loss takes no such number."""
        return None

    def losses(self, model, batch: list[Example], params: dict, pad_id: int,
               shared: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Per-example losses [B] of `model` (with gradients) and detached metrics for the log."""
        raise NotImplementedError


class Pairwise(Objective):
    """dpo, ipo, simpo, slic, orpo: a (chosen, rejected) pair per example."""

    def examples(self, records, tokenizer, max_length, seed):
        if "binary_feedback" in {r.get("type") for r in records}:
            raise TrainingError(f"loss '{self.loss}' needs pairwise feedback; got binary feedback (use feedback.type: pairwise)")
        return _feedback_examples(records, tokenizer, max_length)

    def reference_logps(self, model, batch, pad_id):
        return _summed_logps(model, batch, pad_id, with_kl=False)

    def losses(self, model, batch, params, pad_id, shared=None):
        token_logps, mask = response_logps(model, [e.prompt for e in batch], [e.responses for e in batch], pad_id)
        policy, lengths = token_logps.sum(-1).t(), mask.sum(-1).t()  # [2, B]: chosen, rejected
        averaged = self.spec.logps == "average"
        if averaged:
            policy = policy / lengths.clamp(min=1)
        if self.needs_reference:
            ref = torch.tensor([e.reference_logps for e in batch], dtype=policy.dtype, device=policy.device).t()
            if averaged:  # the same tokens as the policy's, so the same lengths
                ref = ref / lengths.clamp(min=1)
            if params.get("rpo_alpha") and not averaged:  # RPO's NLL is per token: summed log-probs need the lengths
                params = {**params, "chosen_lengths": lengths[0]}
            if params.get("length_alpha"):  # R-DPO: the length difference
                params = {**params, "chosen_lengths": lengths[0], "rejected_lengths": lengths[1]}
            losses, chosen_rewards, rejected_rewards = self.spec.fn(policy[0], policy[1], ref[0], ref[1], **params)
        else:
            losses, chosen_rewards, rejected_rewards = self.spec.fn(policy[0], policy[1], **params)
        margin = chosen_rewards - rejected_rewards
        metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                   "rewards/margin": margin.mean(), "rewards/accuracy": (margin > 0).float().mean()}
        if self.needs_reference:
            metrics["kl"] = (policy[0] - ref[0]).detach().mean()  # sequence log-ratio of chosen: a KL estimate
        return losses, metrics


class KTO(Objective):
    """kto: one output per example, desirable or not, and a mismatched output for the reference point."""

    def examples(self, records, tokenizer, max_length, seed):
        if {r.get("type") for r in records} == {"pairwise_feedback"}:
            records = pairs_to_binary(records)
        examples = _feedback_examples(records, tokenizer, max_length)
        if examples:
            # Each prompt paired with another example's output (a fixed seeded derangement, so it does not
            # depend on how examples fall into batches).
            order = list(range(len(examples)))
            random.Random(seed).shuffle(order)
            partner = mismatched_indices(len(order)).tolist()
            for k, i in enumerate(order):
                e = examples[i]
                e.kl_response = examples[order[partner[k]]].responses[0][: max_length - len(e.prompt)]
        return examples

    def reference_logps(self, model, batch, pad_id):
        return _summed_logps(model, batch, pad_id, with_kl=True)

    def local_estimate(self, model, batch, pad_id):
        """The reference point z0 on this micro-batch: the mean policy/reference log-ratio of the mismatched
        (prompt, other example's output) pairs."""
        with torch.no_grad():
            kl_logps, _ = sequence_logps(model, [e.prompt for e in batch], [e.kl_response for e in batch], pad_id)
        reference = torch.tensor([e.reference_logps[1] for e in batch], device=kl_logps.device)
        return (kl_logps - reference).mean().detach()

    def losses(self, model, batch, params, pad_id, shared=None):
        logps, _ = sequence_logps(model, [e.prompt for e in batch], [e.responses[0] for e in batch], pad_id)
        reference = torch.tensor([e.reference_logps[0] for e in batch], dtype=logps.dtype, device=logps.device)
        if shared is None:  # one process on its own: its own estimate
            shared = self.local_estimate(model, batch, pad_id)
        desirable = torch.tensor([e.desirable for e in batch], device=logps.device)
        losses, rewards, kl = self.spec.fn(logps, reference, None, None, desirable, **params, kl=shared)
        metrics = {"kl": kl}
        if desirable.any():
            metrics["rewards/chosen"] = rewards[desirable].mean()
        if (~desirable).any():
            metrics["rewards/rejected"] = rewards[~desirable].mean()
        return losses, metrics


class SFT(Objective):
    """sft: maximum likelihood of the preferred outputs (the chosen side of pairs, desirable outputs)."""

    def examples(self, records, tokenizer, max_length, seed):
        return _feedback_examples(records, tokenizer, max_length, preferred_only=True)

    def losses(self, model, batch, params, pad_id, shared=None):
        logps, lengths = sequence_logps(model, [e.prompt for e in batch], [e.responses[0] for e in batch], pad_id)
        losses, _ = self.spec.fn(logps, lengths)  # sft has no hyperparameters
        return losses, {}


class GRPO(Objective):
    """grpo: scored samples, each output with its advantage within its prompt's group; one update per batch
    of fresh samples, so the old policy is the current one."""

    trains_on = "scored"

    def examples(self, records, tokenizer, max_length, seed):
        """An output whose advantage is 0 (all of a group scoring the same, say) carries no signal and is left out."""
        examples = []
        for record, advantage in self._advantages(records):
            if advantage != 0.0:
                prompt = encode_prompt(tokenizer, record["prompt"])
                response = encode_response(tokenizer, record["output"])
                examples.append(Example(prompt[-max_length // 2 :], [response[: max_length // 2]], advantage=advantage))
        return examples

    def has_signal(self, records):
        """Some prompt whose samples differ in reward: otherwise every advantage is 0."""
        return any(advantage != 0.0 for _, advantage in self._advantages(records))

    def _advantages(self, records: list[dict]) -> list[tuple[dict, float]]:
        """Each scored sample (reward not null) with its reward relative to its prompt's group."""
        if records and "reward" not in records[0]:
            raise TrainingError(f"loss '{self.loss}' trains on scored samples (scored.jsonl), not on feedback records")
        scored = [r for r in records if r.get("reward") is not None]
        if not scored:
            return []
        ids = {pid: i for i, pid in enumerate(dict.fromkeys(r["prompt_id"] for r in scored))}
        advantages = group_advantages(torch.tensor([float(r["reward"]) for r in scored], dtype=torch.float64),
                                      torch.tensor([ids[r["prompt_id"]] for r in scored]))
        return list(zip(scored, advantages.tolist()))

    def reference_logps(self, model, batch, pad_id):
        """Per token: GRPO's KL penalty is per token."""
        logps, mask = response_token_logps(model, [e.prompt for e in batch], [e.responses[0] for e in batch], pad_id)
        return [row[m].tolist() for row, m in zip(logps, mask)]

    def losses(self, model, batch, params, pad_id, shared=None):
        logps, mask = response_token_logps(model, [e.prompt for e in batch], [e.responses[0] for e in batch], pad_id)
        reference = torch.zeros_like(logps)
        for row, e in enumerate(batch):
            reference[row, : len(e.reference_logps)] = torch.tensor(e.reference_logps, dtype=logps.dtype)
        advantages = torch.tensor([e.advantage for e in batch], dtype=logps.dtype, device=logps.device)
        losses, kl, clipped = self.spec.fn(logps, mask, advantages, reference_logps=reference, **params)
        return losses, {"kl": kl.mean(), "clip_fraction": clipped.mean(), "advantage": advantages.mean()}


OBJECTIVES: dict[str, Objective] = {
    **{name: Pairwise(name) for name in ("dpo", "dpo_norm", "ipo", "simpo", "slic", "orpo")},
    "kto": KTO("kto"),
    "sft": SFT("sft"),
    "grpo": GRPO("grpo"),
}


def _feedback_examples(records: list[dict], tokenizer, max_length: int, preferred_only: bool = False) -> list[Example]:
    """Examples from feedback records: a pair gives (chosen, rejected), or its chosen output alone when
    `preferred_only`; a binary record gives its output with its label (undesirable ones are left out when
    `preferred_only`). Each is cut to `max_length` tokens: the end of each response is kept, the prompt is
    cut from the left."""
    examples = []
    for record in records:
        prompt = encode_prompt(tokenizer, record["prompt"])
        if record["type"] == "pairwise_feedback":
            chosen, rejected = chosen_and_rejected(record)
            texts = [chosen] if preferred_only else [chosen, rejected]
            examples.append(Example(prompt, [encode_response(tokenizer, text) for text in texts]))
        elif record["label"] or not preferred_only:
            examples.append(Example(prompt, [encode_response(tokenizer, record["output"])], desirable=bool(record["label"])))
    for e in examples:
        budget = max_length - max(len(x) for x in e.responses)
        e.prompt = e.prompt[-budget:] if budget > 0 else e.prompt[-1:]
        e.responses = [x[: max_length - len(e.prompt)] for x in e.responses]
    return examples


def _summed_logps(model, batch: list[Example], pad_id: int, with_kl: bool) -> list[list[float]]:
    """Each example's summed log-probs of its responses (then of its KL response), in one forward pass."""
    responses = [e.responses + [e.kl_response] if with_kl else e.responses for e in batch]
    logps, _ = response_logps(model, [e.prompt for e in batch], responses, pad_id)
    return logps.sum(-1).tolist()
