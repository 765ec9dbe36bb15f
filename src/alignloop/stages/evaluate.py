"""Stage 5, eval: greedy answers to held-out prompts (scored by the run's labeler, in the loop), and what a
round is judged by: mean rewards with 95% intervals, the paired change and the win rate against the SFT
model's answers to the same prompts, the answers' lengths, and the KL to the reference along them."""

from __future__ import annotations

import math
import statistics

import torch

from .. import distributed
from ..logprobs import HEAD_CHUNK, _plain_output_head, pad_sequences
from ..models import encode_prompt, encode_response, inference_device, load_causal_lm, load_tokenizer
from ..sampling import Sampler
from .sample import sample_records


def heldout_samples(policy: str, prompts: list[dict], sampler: Sampler, round_index: int, seed: int,
                    progress: str | None = "held-out", generator: str | None = None) -> list[dict]:
    """One greedy answer per held-out prompt, from the run's sampler (the loop scores them with its labeler)."""
    return sample_records(prompts, policy, sampler, n=1, round_index=round_index, seed=seed, generator=generator,
                          progress=progress, greedy=True)


def mean_reward(scored: list[dict]) -> float | None:
    rewards = [r["reward"] for r in scored if r.get("reward") is not None]
    return sum(rewards) / len(rewards) if rewards else None


def _t_central_probability(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with `df` degrees of freedom, by the closed-form series for whole df
    (Abramowitz and Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    term, total = 1.0, 1.0
    if df % 2 == 0:  # sin(theta) * (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ...), df/2 terms
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    for k in range(1, (df - 1) // 2):  # 2/pi * (theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ...))
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))


def _t_quantile_975(df: int) -> float:
    """Student t's 97.5% quantile, the half-width factor of a 95% interval, by bisection on the exact CDF."""
    low, high = 0.0, 1000.0
    for _ in range(80):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_central_probability(mid, df) < 0.95 else (low, mid)
    return (low + high) / 2


def mean_with_interval(values: list[float]) -> dict:
    """{n, mean, ci95}: the mean with its 95% t interval (None where fewer than two values)."""
    n = len(values)
    if n < 2:
        return {"n": n, "mean": values[0] if values else None, "ci95": None}
    mean = statistics.fmean(values)
    half = _t_quantile_975(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return {"n": n, "mean": mean, "ci95": [mean - half, mean + half]}


def reward_interval(scored: list[dict]) -> list[float] | None:
    """The 95% interval of the mean reward of the scored records."""
    return mean_with_interval([r["reward"] for r in scored if r.get("reward") is not None])["ci95"]


def _paired(before: list[dict], after: list[dict], key) -> list[tuple[float, float]]:
    """(before, after) rewards, `key(record)`, of the prompts scored in both."""
    a = {r["prompt_id"]: key(r) for r in before if key(r) is not None}
    b = {r["prompt_id"]: key(r) for r in after if key(r) is not None}
    return [(a[k], b[k]) for k in a if k in b]


def paired_difference(before: list[dict], after: list[dict], key=lambda r: r.get("reward")) -> dict:
    """Mean of after-minus-before reward over the prompts scored in both, with a 95% t interval."""
    return mean_with_interval([b - a for a, b in _paired(before, after, key)])


def win_rate(before: list[dict], after: list[dict], key=lambda r: r.get("reward")) -> dict:
    """How often `after`'s answer scores above `before`'s to the same prompt (a tie counts half), over the
    prompts scored in both, with a 95% t interval: 0.5 is no change."""
    return mean_with_interval([1.0 if b > a else 0.5 if b == a else 0.0 for a, b in _paired(before, after, key)])


def length_stats(records: list[dict]) -> dict:
    """Mean answer length in tokens (as the sampler counted them) and in words, and the share of answers cut
    at the sampler's `max_new_tokens`."""
    if not records:
        return {"tokens": None, "words": None, "truncated": None}
    tokens = [r["num_tokens"] for r in records if r.get("num_tokens") is not None]
    return {"tokens": statistics.fmean(tokens) if tokens else None,
            "words": statistics.fmean(len(r["output"].split()) for r in records),
            "truncated": sum(r.get("finish_reason") == "length" for r in records) / len(records)}


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
