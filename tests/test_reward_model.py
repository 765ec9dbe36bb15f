"""The reward-model labeler on tiny randomly initialised Llama sequence classifiers with the real SmolLM2
tokenizer: which logit is the reward, the RM's own chat template, batching, left truncation, refusals, the
config, and a real two-process torchrun run of the CLI against a one-process run."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alignloop.config import ConfigError, dump_config, load_config
from alignloop.rewards import make_labeler
from alignloop.rewards.reward_model import RewardModelLabeler, encode_for_rm, render_for_rm, rewards_from_output
from alignloop.stages.label import label_records
from conftest import launcher_problem, torchrun

RM_TEMPLATE = "{% for m in messages %}[[{{ m['role'] | upper }}]] {{ m['content'] }}\n{% endfor %}"

PROMPTS = ["Hi.", "Name a colour.", "Write two sentences about the sea, and keep them short please.",
           "Explain, step by step and in plain words, why the sky looks blue on a clear day at noon."]
OUTPUTS = ["Blue.", "Hello there, friend!", "The sea is wide. It is deep and cold and full of fish and stories.",
           "ok", "Light from the sun scatters off air molecules; blue light scatters most, so the sky looks blue."]


def samples(n: int = 11) -> list[dict]:
    """Varied lengths, some multi-turn, as sample records."""
    records = []
    for i in range(n):
        prompt = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] * (1 + i % 3)}]
        if i % 4 == 3:
            prompt = [{"role": "system", "content": "Be brief."}, *prompt]
        records.append({"prompt_id": f"p{i // 2}", "sample_id": i % 2, "prompt": prompt,
                        "output": OUTPUTS[i % len(OUTPUTS)] * (1 + i % 2), "round": 0, "generator": "tiny"})
    return records


def build_rm(folder: Path, tokenizer, num_labels: int, pad_token_id) -> str:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(num_labels)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, num_labels=num_labels, pad_token_id=pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # random init gives near-zero logits; make the scores clearly differ per input
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def rm_single(tmp_path_factory, smollm2_path) -> str:
    """One-label head; its tokenizer has a different chat template and no pad token, and the model config no
    pad id, so the labeler must set both from eos."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.chat_template = RM_TEMPLATE
    tokenizer.pad_token = None
    return build_rm(tmp_path_factory.mktemp("rm-single"), tokenizer, 1, None)


@pytest.fixture(scope="module")
def rm_two(tmp_path_factory, smollm2_path) -> str:
    """Two-label head (HALOs' Bradley-Terry checkpoints), the SmolLM2 tokenizer and template as they are."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    return build_rm(tmp_path_factory.mktemp("rm-two"), tokenizer, 2, tokenizer.pad_token_id)


@functools.cache
def load_by_hand(path: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()


def direct_logits(path: str, record: dict, output: str) -> torch.Tensor:
    """The model run by hand on one conversation, rendered by apply_chat_template(tokenize=True)."""
    tokenizer, model = load_by_hand(path)
    turns = record["prompt"] + [{"role": "assistant", "content": output}]
    ids = tokenizer.apply_chat_template(turns, tokenize=True, return_dict=False)
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(ids)])).logits[0]


def test_one_label_head_is_the_logit(rm_single):
    labeler = RewardModelLabeler(rm_single, dtype="float32", batch_size=4)
    items = [(s, s["output"]) for s in samples(5)]
    scores = labeler.score(items)
    for (record, output), score in zip(items, scores):
        assert score.reward == pytest.approx(direct_logits(rm_single, record, output)[0].item(), abs=1e-5)
        assert score.rewards is None and score.extra == {}
    assert len({round(s.reward, 4) for s in scores}) == len(scores)  # the scores do depend on the input
    # the tokenizer had no pad token and the model no pad id: both now eos, so batches pool at the right token
    assert labeler.pad_id == labeler.tokenizer.eos_token_id == labeler.model.config.pad_token_id


def test_two_label_head_is_the_second_logit_and_can_be_overridden(rm_two, rm_single):
    items = [(s, s["output"]) for s in samples(4)]
    two = RewardModelLabeler(rm_two, dtype="float32", batch_size=3).score(items)
    first = RewardModelLabeler(rm_two, head="single", dtype="float32", batch_size=3).score(items)
    for (record, output), a, b in zip(items, two, first):
        logits = direct_logits(rm_two, record, output)
        assert a.reward == pytest.approx(logits[1].item(), abs=1e-5)
        assert b.reward == pytest.approx(logits[0].item(), abs=1e-5)
    with pytest.raises(ValueError, match="head 'two_label' reads logits\\[:, 1\\], but the model has 1 label"):
        RewardModelLabeler(rm_single, head="two_label")


def test_conversation_is_rendered_with_the_reward_models_template(rm_single, tiny_model):
    from transformers import AutoTokenizer

    record = {"prompt": [{"role": "user", "content": "Name a colour."}]}
    rm_tok, policy_tok = AutoTokenizer.from_pretrained(rm_single), AutoTokenizer.from_pretrained(tiny_model)
    text = render_for_rm(rm_tok, record["prompt"], "Blue.")
    assert text == "[[USER]] Name a colour.\n[[ASSISTANT]] Blue.\n"
    assert render_for_rm(policy_tok, record["prompt"], "Blue.").startswith("<|im_start|>system")  # the policy's differs
    labeler = RewardModelLabeler(rm_single, dtype="float32")
    ids, truncated = labeler.encode(record, "Blue.")
    assert not truncated
    assert rm_tok.decode(ids) == text  # the ids the model sees are the RM template's text
    assert "<|im_start|>" not in rm_tok.decode(ids)
    assert render_for_rm(rm_tok, "Name a colour.", "Blue.") == text  # a plain-string prompt is one user turn


def test_plain_rendering_without_a_chat_template(smollm2_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.chat_template = None
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert render_for_rm(tokenizer, turns, "Hello.") == "System: Be brief.\nUser: Hi?\nAssistant: Hello."


def test_batched_sorted_scores_equal_one_at_a_time(rm_single):
    items = [(s, s["output"]) for s in samples(11)]
    batched = RewardModelLabeler(rm_single, dtype="float32", batch_size=4)
    lengths = [len(batched.encode(r, o)[0]) for r, o in items]
    assert len(set(lengths)) > 4  # varied lengths, so batches really pad
    together = [s.reward for s in batched.score(items)]
    alone = [batched.score([item])[0].reward for item in items]
    unsorted = RewardModelLabeler(rm_single, dtype="float32", batch_size=4, sort_by_length=False)
    in_order = [s.reward for s in unsorted.score(items)]
    assert together == pytest.approx(alone, abs=1e-5)
    assert in_order == pytest.approx(alone, abs=1e-5)


def test_bfloat16_by_default_close_to_float32(rm_single):
    items = [(s, s["output"]) for s in samples(4)]
    bf16 = RewardModelLabeler(rm_single, batch_size=4)
    assert bf16.model.dtype == torch.bfloat16
    f32 = RewardModelLabeler(rm_single, dtype="float32", batch_size=4)
    for a, b in zip(bf16.score(items), f32.score(items)):
        assert a.reward == pytest.approx(b.reward, abs=0.1 + 0.05 * abs(b.reward))


def test_too_long_prompt_is_cut_on_the_left_and_flagged(rm_two):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(rm_two)
    long_record = {"prompt_id": "long", "prompt": [{"role": "user", "content": "blah " * 200}], "output": "The answer is 42."}
    short_record = {"prompt_id": "short", "prompt": [{"role": "user", "content": "Hi."}], "output": "Hello."}
    full = tokenizer.apply_chat_template(long_record["prompt"] + [{"role": "assistant", "content": "The answer is 42."}],
                                         tokenize=True, return_dict=False)
    ids, truncated = encode_for_rm(tokenizer, long_record["prompt"], long_record["output"], max_length=40)
    assert truncated and len(ids) == 40 and len(full) > 40
    assert ids[0] == full[0] == tokenizer.bos_token_id  # the leading BOS stays
    assert ids[1:] == list(full[-39:])  # the rest is the end: the whole output and the tail of the prompt
    assert "The answer is 42." in tokenizer.decode(ids)

    labeler = RewardModelLabeler(rm_two, dtype="float32", max_length=40)
    scored, counts = label_records([long_record, short_record], labeler, progress=None)
    assert counts == {"scored": 2, "failed": 0}
    assert scored[0]["rm_truncated"] is True and "rm_truncated" not in scored[1]


def test_missing_folder_and_causal_lm_are_refused(tmp_path, tiny_model):
    with pytest.raises(ValueError, match=r"reward model path .*nope: no such model folder") as e:
        RewardModelLabeler(str(tmp_path / "nope"))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"reward model .*: not a sequence classifier \(config.json architectures: "
                                         r"LlamaForCausalLM\)") as e:
        RewardModelLabeler(tiny_model)
    assert tiny_model in str(e.value) and "\n" not in str(e.value)
    # a causal LM whose config claims a classifier: the head would be random, so it is refused too
    disguised = tmp_path / "disguised"
    shutil.copytree(tiny_model, disguised)
    config = json.loads((disguised / "config.json").read_text())
    (disguised / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(ValueError, match=r"the checkpoint lacks score.weight, which would be random numbers"):
        RewardModelLabeler(str(disguised))


def test_label_verb_refuses_a_causal_lm_in_one_line(tmp_path, tiny_model):
    (tmp_path / "s.jsonl").write_text('{"prompt_id": "a", "prompt": "x", "output": "y"}\n')
    r = subprocess.run([sys.executable, "-m", "alignloop", "label", str(tmp_path / "s.jsonl"), "--out",
                        str(tmp_path / "o.jsonl"), "--reward-model", tiny_model], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (f"alignloop: error: reward model {tiny_model}: not a sequence classifier (config.json "
                                "architectures: LlamaForCausalLM); a reward model needs a sequence-classification head")
    assert not (tmp_path / "o.jsonl").exists()


def test_multi_objective_output_gives_score_and_named_objectives():
    from transformers import PretrainedConfig

    output = SimpleNamespace(score=torch.tensor([[0.5], [-1.0]]), rewards=torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
                             logits=torch.zeros(2, 2))
    named = PretrainedConfig(id2label={0: "helpfulness", 1: "safety"})
    rewards, objectives = rewards_from_output(output, "auto", named)
    assert rewards.tolist() == [0.5, -1.0]
    assert objectives == [{"helpfulness": 1.0, "safety": 2.0}, {"helpfulness": 3.0, "safety": 4.0}]
    _, objectives = rewards_from_output(output, "auto", PretrainedConfig(num_labels=2))  # LABEL_0, LABEL_1: no names
    assert objectives[0] == {"obj_0": 1.0, "obj_1": 2.0}
    rewards, objectives = rewards_from_output(output, "two_label", named)  # an explicit head reads the logits
    assert rewards.tolist() == [0.0, 0.0] and objectives is None
    with pytest.raises(ValueError, match="3 labels and no .score"):
        rewards_from_output(SimpleNamespace(logits=torch.zeros(1, 3)), "auto", named)


def test_config_keys_and_saved_config(tmp_path, rm_two):
    config = load_config(None, ["labeler.kind=reward_model", f"labeler.path={rm_two}", "labeler.dtype=float32",
                                "labeler.batch_size=8"])
    text = dump_config(config)
    labeler_section = text.split("labeler:\n")[1].split("feedback:")[0]
    assert labeler_section == (f"  kind: reward_model\n  batch_size: 8\n  path: {rm_two}\n  head: auto\n  dtype: float32\n"
                               "  max_length: 1024\n  trust_remote_code: false\n")
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(tmp_path / "c.yaml") == config
    labeler = make_labeler(config.labeler)
    assert isinstance(labeler, RewardModelLabeler) and labeler.batch_size == 8 and labeler.model.dtype == torch.float32
    with pytest.raises(ConfigError, match="kind 'reward_model' needs 'path'"):
        load_config(None, ["labeler.kind=reward_model"])
    with pytest.raises(ConfigError, match="labeler.head"):
        load_config(None, ["labeler.kind=reward_model", "labeler.path=x", "labeler.head=three"])
    # other kinds save what they always saved
    assert "labeler:\n  kind: callable\n  function: alignloop.rewards.ifeval:ifeval_reward\n  batch_size: 64\nfeedback:" in dump_config(load_config(None))
    judge = dump_config(load_config(None, ["labeler.kind=judge", "labeler.base_url=http://x/v1", "labeler.model=m"]))
    judge_section = judge.split("labeler:\n")[1].split("feedback:")[0]
    assert judge_section.endswith("  pairwise: false\n")
    assert not any(f"  {key}:" in judge_section for key in ("path", "head", "dtype", "max_length", "trust_remote_code"))


@pytest.mark.requires(launcher_problem())
def test_two_processes_write_what_one_process_writes(tmp_path, rm_single):
    """`torchrun --nproc_per_node 2 -m alignloop label ...`: each process scores a shard, the main process
    writes the merged file, and it equals a one-process run (a truncated sample included)."""
    records = samples(13)
    records[5]["prompt"] = [{"role": "user", "content": "word " * 300}]  # past --max-length: cut and flagged
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["-m", "alignloop", "--no-progress", "label", str(tmp_path / "samples.jsonl"), "--reward-model", rm_single,
            "--dtype", "float32", "--batch-size", "3", "--max-length", "160", "--out"]
    cpu_only = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # two CPU processes (gloo) even on a one-GPU machine
    two = subprocess.run([*torchrun(2), *args, str(tmp_path / "two.jsonl")], capture_output=True, text=True, timeout=600,
                         env=cpu_only)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote 13 scored samples") == 1  # only the main process writes
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one.jsonl")], capture_output=True, text=True, timeout=600,
                         env=cpu_only)
    assert one.returncode == 0, one.stderr[-3000:]

    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    one_records, two_records = read("one.jsonl"), read("two.jsonl")
    assert [r["prompt_id"] for r in two_records] == [r["prompt_id"] for r in records]  # input order
    for a, b in zip(one_records, two_records):
        assert {k: v for k, v in a.items() if k != "reward"} == {k: v for k, v in b.items() if k != "reward"}
        assert b["reward"] == pytest.approx(a["reward"], abs=1e-5)
    assert one_records[5]["rm_truncated"] is True and sum("rm_truncated" in r for r in one_records) == 1
