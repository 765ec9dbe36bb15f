"""Stage 5, eval: greedy answers to held-out prompts (scored by the run's labeler, in the loop), and the KL to
the reference along them; the statistics the scores are judged by are in `alignloop.stats`."""

from __future__ import annotations

import statistics

import torch

from .. import distributed
from ..logprobs import HEAD_CHUNK, _plain_output_head, pad_sequences
from ..models import encode_prompt, encode_response, inference_device, load_causal_lm, load_tokenizer
from ..sampling import Sampler
from .sample import sample_records


def heldout_samples(policy: str, prompts: list[dict], sampler: Sampler, round_index: int, seed: int,
                    progress: str | None = "held-out", generator: str | None = None,
                    max_new_tokens: int | None = None) -> list[dict]:
    """One greedy answer per held-out prompt, from the run's sampler (the loop scores them with its labeler),
    of at most `max_new_tokens` (None: the sampler's cap)."""
    return sample_records(prompts, policy, sampler, n=1, round_index=round_index, seed=seed, generator=generator,
                          progress=progress, greedy=True, max_new_tokens=max_new_tokens)


def check_instructions(records: list[dict]) -> None:
    """Add IFEval's strict per-instruction checks (`instructions_followed`) to the records whose prompt has
    IFEval instructions (`instruction_id_list`), whatever the run's labeler: the accuracies users report
    (`stats.instruction_accuracy`). A prompt whose instructions the checkers cannot build is left without."""
    from ..rewards.ifeval import instructions_followed

    for record in records:
        if record.get("instruction_id_list"):
            try:
                record["instructions_followed"] = instructions_followed(record, record["output"])
            except ValueError:
                pass


def kl_along_answers(records: list[dict], policy: str, reference: str, batch_size: int, bf16_autocast: bool,
                     trust_remote_code: bool = False) -> float | None:
    """The mean over answers of sum_t KL(policy(.|x, y<t) || reference(.|x, y<t)), t over the answer's tokens:
    how far the policy's next-token distributions have moved from the reference's along the answers it gives.
    Exact per position (full distributions, not a one-sample log-ratio), so it is never negative and needs
    no sampled answers: the held-out answers are greedy. The batches (answers of similar length together) are
    shared among the processes; the output head runs only where an answer token is predicted."""
    tokenizer = load_tokenizer(policy, trust_remote_code)
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in records]
    answers = [encode_response(tokenizer, r["output"]) for r in records]
    order = sorted(range(len(records)), key=lambda i: -(len(prompts[i]) + len(answers[i])))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    device = inference_device()
    models = [load_causal_lm(path, "float32", trust_remote_code).to(device).eval() for path in (policy, reference)]
    mine = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
        for b in distributed.my_share(len(batches)):
            ids, mask, labels = pad_sequences([prompts[i] for i in batches[b]], [answers[i] for i in batches[b]],
                                              tokenizer.pad_token_id)
            predicted = (labels[:, 1:] != -100).to(device)  # the positions whose next token is an answer token
            per_position = _kl_per_position(models, ids.to(device), mask.to(device), predicted)
            mine.append(torch.zeros(len(ids)).index_add_(0, predicted.nonzero()[:, 0].cpu(), per_position.cpu()).tolist())
    del models
    per_answer = [kl for batch in distributed.gather_shares(len(batches), mine) for kl in batch]
    return statistics.fmean(per_answer) if per_answer else None


def _kl_per_position(models: list, ids: torch.Tensor, mask: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """KL(first || second model) of the next-token distributions at the `predicted` positions [N], float32.
    With plain output heads (`logprobs._plain_output_head`), the heads run on those positions alone, in chunks
    of HEAD_CHUNK; otherwise from the models' full logits."""
    heads = [_plain_output_head(m) for m in models]
    if all(h is not None for h in heads):
        states = [m(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1).hidden_states[-1][:, :-1][predicted]
                  for m in models]
        dtype = torch.get_autocast_dtype(ids.device.type) if torch.is_autocast_enabled(ids.device.type) else heads[0].weight.dtype
        out = []
        for s in range(0, states[0].size(0), HEAD_CHUNK):
            p, q = (torch.log_softmax((h[s : s + HEAD_CHUNK].to(dtype) @ head.weight.to(dtype).t()).float(), -1)
                    for h, head in zip(states, heads))
            out.append((p.exp() * (p - q)).sum(-1))
        return torch.cat(out) if out else torch.zeros(0)
    p, q = (torch.log_softmax(m(input_ids=ids, attention_mask=mask).logits[:, :-1][predicted].float(), -1) for m in models)
    return (p.exp() * (p - q)).sum(-1)
