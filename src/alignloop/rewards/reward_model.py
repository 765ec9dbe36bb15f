"""A trained reward model as a labeler: any `AutoModelForSequenceClassification` folder scores each
(prompt, output) conversation.

Why it is built this way:
- The conversation is rendered with the reward model's own tokenizer and chat template, never the
  policy's: a reward model only means something on the text format it was trained on.
- Which number is the reward depends on how the model was trained. A one-label head (TRL, OpenRLHF) gives
  one logit; HALOs' two-label Bradley-Terry checkpoints give the reward as `logits[:, 1]`; multi-objective
  models in the ArmoRM style return an output with a `.score` (the reward) and `.rewards` (one column per
  objective). `head: auto` picks from `config.num_labels` and the output; `single` or `two_label` override it.
- A folder that is not a sequence classifier (a causal LM, say) is refused with a clear error rather than
  loaded with a freshly initialised, random head - which transformers would otherwise do with a warning.
- Scoring is batched with the samples sorted by length, so each batch pads to a similar length; scores come
  back in input order. Padding is on the right with an attention mask, and the pad id is the one the model's
  config names, because sequence-classification heads read the logit of the last non-pad token.
- A conversation longer than `max_length` tokens loses tokens from the left of the prompt (a leading BOS is
  kept), so the output - the thing being judged - survives whole where it fits; such a record is flagged
  `rm_truncated: true`.
- Distributed labeling (`torchrun -m alignloop label ... --reward-model PATH`) gives each process a strided
  shard; the scored records are gathered and merged in input order, so the file equals a one-process run.
"""

from __future__ import annotations

import math

import torch

from ..logprobs import pad_right
from ..models import DTYPES, ModelError, inference_device, resolve_model_path
from . import Score

HEADS = ("auto", "single", "two_label")


# ------------------------------------------------------------------------------------------- loading

def _looks_like_a_classifier(config) -> bool:
    """What config.json says the checkpoint is. No `architectures` at all: let the weights decide."""
    architectures = list(getattr(config, "architectures", None) or [])
    auto_map = getattr(config, "auto_map", None) or {}
    return (not architectures or "AutoModelForSequenceClassification" in auto_map
            or any("ForSequenceClassification" in a or "RewardModel" in a for a in architectures))


def load_reward_model(path: str, dtype: str = "bfloat16", trust_remote_code: bool = False):
    """(model, tokenizer, pad id) for a reward-model folder, or a one-line ModelError (a ValueError) that
    names the path and what is wrong with it."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    try:
        folder = resolve_model_path(path)
    except ModelError as e:
        raise ModelError(f"reward {e}") from None  # "reward model path X: no such model folder"
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        hint = "" if trust_remote_code else "; if it ships its own modelling code, set trust_remote_code"
        raise ModelError(f"reward model {path}: cannot read its config ({str(e).splitlines()[0]}){hint}") from None
    if not _looks_like_a_classifier(config):
        raise ModelError(f"reward model {path}: not a sequence classifier (config.json architectures: "
                         f"{', '.join(config.architectures)}); a reward model needs a sequence-classification head")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"reward model {path}: cannot load it as a sequence classifier ({str(e).splitlines()[0]})") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would have filled them with random numbers
        raise ModelError(f"reward model {path}: the checkpoint lacks {', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''}, which would be random numbers; is it a trained reward model?")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"reward model {path}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None

    # the head pools at the last token that is not the config's pad id, so padding must use exactly that id
    text_config = model.config.get_text_config()
    pad_id = text_config.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ModelError(f"reward model {path}: neither the model nor the tokenizer names a pad or eos token")
        text_config.pad_token_id = model.config.pad_token_id = pad_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = pad_id
    return model.eval(), tokenizer, pad_id


def check_head(head: str, num_labels: int, path: str) -> str:
    """The head setting, refused early when it cannot work with this model."""
    if head not in HEADS:
        raise ModelError(f"reward model {path}: head '{head}' is not one of {', '.join(HEADS)}")
    if head == "two_label" and num_labels < 2:
        raise ModelError(f"reward model {path}: head 'two_label' reads logits[:, 1], but the model has {num_labels} label")
    return head


# ----------------------------------------------------------------------------------------- rendering

def render_for_rm(tokenizer, prompt, output: str) -> str:
    """The conversation as the reward model reads it: its own chat template applied to the prompt turns plus
    {"role": "assistant", "content": output}. A tokenizer without a chat template gets a plain rendering,
    one `Role: text` line per turn ("User: ...\\nAssistant: ..."), which is what such models usually saw."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    turns = turns + [{"role": "assistant", "content": output}]
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(turns, tokenize=False)
    return "\n".join(f"{t['role'].capitalize()}: {t['content']}" for t in turns)


def encode_for_rm(tokenizer, prompt, output: str, max_length: int) -> tuple[list[int], bool]:
    """(token ids, truncated). A chat template writes its own special tokens, so none are added to its text;
    the plain rendering gets the tokenizer's usual ones (a BOS, say). Too long: tokens are dropped from the
    left, which takes the prompt first and the output only when it alone is too long; a leading BOS stays."""
    text = render_for_rm(tokenizer, prompt, output)
    ids = tokenizer(text, add_special_tokens=not tokenizer.chat_template)["input_ids"]
    if len(ids) <= max_length:
        return list(ids), False
    keep_bos = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    head = [ids[0]] if keep_bos else []
    return head + list(ids[len(ids) - (max_length - len(head)):]), True


# ------------------------------------------------------------------------------------------- reading

def objective_names(config, count: int) -> list[str]:
    """Names of a multi-objective model's reward columns: config.id2label when it names them (not the
    LABEL_i placeholders transformers makes up), else obj_0, obj_1, ..."""
    id2label = getattr(config, "id2label", None) or {}
    names = [id2label.get(i, id2label.get(str(i))) for i in range(count)]
    if all(isinstance(n, str) and n and n != f"LABEL_{i}" for i, n in enumerate(names)) and len(set(names)) == count:
        return names
    return [f"obj_{i}" for i in range(count)]


def rewards_from_output(output, head: str, config, path: str = "") -> tuple[torch.Tensor, list[dict] | None]:
    """(rewards [batch], per-objective rewards per row or None) from a forward pass's output.
    Under `auto`, an output with a `.score` (ArmoRM style) gives the reward from it and its `.rewards`
    columns as the objectives; otherwise one logit is the reward and two give `logits[:, 1]`. An explicit
    head always reads the logits: `single` the first, `two_label` the second."""
    score = getattr(output, "score", None)
    if head == "auto" and torch.is_tensor(score):
        rewards = score.float().reshape(score.shape[0], -1)[:, 0]
        objectives = getattr(output, "rewards", None)
        if not torch.is_tensor(objectives):
            return rewards, None
        objectives = objectives.float().reshape(objectives.shape[0], -1)
        names = objective_names(config, objectives.shape[1])
        return rewards, [dict(zip(names, row.tolist())) for row in objectives]
    logits = output.logits.float()
    if head == "auto":
        head = {1: "single", 2: "two_label"}.get(logits.shape[-1])
        if head is None:
            raise ModelError(f"reward model {path}: {logits.shape[-1]} labels and no .score in its output; "
                             "set head to single (first logit) or two_label (second logit)")
    return (logits[:, 0] if head == "single" else logits[:, 1]), None


# ------------------------------------------------------------------------------------------- labeler

class RewardModelLabeler:
    """Scores (prompt record, output) pairs with a sequence-classification reward model; see the module
    docstring. `score` takes any number of items and runs them in length-sorted batches of `batch_size`."""

    def __init__(self, path: str, head: str = "auto", dtype: str = "bfloat16", max_length: int = 1024,
                 batch_size: int = 64, trust_remote_code: bool = False, device=None, sort_by_length: bool = True):
        self.name = f"reward_model:{path}"
        self.path = path
        self.model, self.tokenizer, self.pad_id = load_reward_model(path, dtype, trust_remote_code)
        self.head = check_head(head, self.model.config.num_labels, path)
        self.max_length = max_length
        self.batch_size = batch_size
        self.sort_by_length = sort_by_length  # off only to measure what sorting buys (the benchmark)
        self.device = torch.device(device) if device is not None else inference_device()
        self.model.to(self.device)
        self.stats: dict[str, float] = {}

    def reset_stats(self) -> None:
        pass  # nothing to count

    @classmethod
    def from_config(cls, config, device=None) -> "RewardModelLabeler":
        return cls(config.path, head=config.head, dtype=config.dtype, max_length=config.max_length,
                   batch_size=config.batch_size, trust_remote_code=config.trust_remote_code, device=device)

    def encode(self, record: dict, output: str) -> tuple[list[int], bool]:
        return encode_for_rm(self.tokenizer, record["prompt"], output, self.max_length)

    def score(self, items: list[tuple[dict, str]]) -> list[Score]:
        """Scores in input order. A sample that cannot be rendered (a template that refuses its turns) or
        gets a non-finite reward fails alone, with the reason."""
        scores: list[Score | None] = [None] * len(items)
        encoded = {}
        for i, (record, output) in enumerate(items):
            try:
                encoded[i] = self.encode(record, output)
            except Exception as e:  # one odd conversation must not sink the batch
                scores[i] = Score(None, f"reward model cannot render the conversation: {type(e).__name__}: {e}")
        order = sorted(encoded, key=lambda i: -len(encoded[i][0])) if self.sort_by_length else list(encoded)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            rewards, objectives = self._forward([encoded[i][0] for i in batch])
            for row, i in enumerate(batch):
                scores[i] = self._to_score(rewards[row], objectives[row] if objectives else None, encoded[i][1])
        return scores

    @torch.inference_mode()
    def _forward(self, sequences: list[list[int]]) -> tuple[list[float], list[dict] | None]:
        input_ids, attention_mask = pad_right(sequences, self.pad_id)
        output = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        rewards, objectives = rewards_from_output(output, self.head, self.model.config, self.path)
        return rewards.cpu().tolist(), objectives

    @staticmethod
    def _to_score(reward: float, objectives: dict | None, truncated: bool) -> Score:
        extra = {"rm_truncated": True} if truncated else {}
        if not math.isfinite(reward):
            return Score(None, f"reward model returned {reward}", extra=extra)
        return Score(float(reward), rewards=objectives, extra=extra)
