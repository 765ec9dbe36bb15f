"""Each stage verb runs alone on the contract files, through the real `alignloop` program."""

import json
import subprocess
import sys

import pytest

from alignloop.cli import EXIT_BAD_INPUT, EXIT_NOTHING_TO_DO
from alignloop.records import read_records


def alignloop(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "alignloop", "--no-progress", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("verb, option", [("run", "--set"), ("sample", "--max-new-tokens"), ("label", "--function"),
                                           ("feedback", "--mode"), ("train", "--loss"), ("train-rm", "--base")])
def test_help_for_every_verb(verb, option):
    result = alignloop(verb, "--help")
    assert result.returncode == 0 and result.stdout.startswith(f"usage: alignloop {verb} ") and option in result.stdout


def test_stages_chain_on_contract_files(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_id": "a", "prompt": "say hi"}\n{"prompt_id": "b", "prompt": "say bye"}\n')
    samples, scored, feedback, ckpt = (tmp_path / n for n in ("samples.jsonl", "scored.jsonl", "feedback.jsonl", "ckpt"))

    r = alignloop("sample", prompts, "--out", samples, "--policy", tiny_model, "--n", 4, "--max-new-tokens", 8, "--dtype", "float32",
                  "--backend", "hf")
    assert r.returncode == 0, r.stderr
    rows = read_records(samples)
    assert [(s["prompt_id"], s["sample_id"]) for s in rows] == [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 0), ("b", 1), ("b", 2), ("b", 3)]
    assert all(s["finish_reason"] in ("stop", "length") and s["num_tokens"] <= 8 for s in rows)

    r = alignloop("label", samples, "--out", scored, "--function", "toy_rewards:lowercase_fraction")
    assert r.returncode == 0, r.stderr
    assert all(isinstance(s["reward"], float) for s in read_records(scored))

    r = alignloop("feedback", scored, "--out", feedback, "--type", "pairwise", "--mode", "max")
    assert r.returncode == 0, r.stderr
    pairs = read_records(feedback)
    assert pairs and all(p["type"] == "pairwise_feedback" for p in pairs)

    r = alignloop("train", feedback, "--out", ckpt, "--policy", tiny_model, "--batch-size", 2, "--mixed-precision", "no")
    assert r.returncode == 0, r.stderr
    assert (ckpt / "model.safetensors").exists() and (ckpt / "training_state" / "optimizer.safetensors").exists()


def test_label_failures_are_null_never_zero(tmp_path):
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps({"prompt_id": "a", "sample_id": i, "prompt": "x", "output": o}) + "\n"
                               for i, o in enumerate(["short", "this output is far too long for the toy judge to score"])))
    r = alignloop("label", samples, "--out", tmp_path / "o.jsonl", "--function", "toy_rewards:fails_on_long_outputs")
    assert r.returncode == 0, r.stderr
    a, b = read_records(tmp_path / "o.jsonl")
    assert a["reward"] == 1.0 and "label_error" not in a
    assert b["reward"] is None and b["label_error"] == "RuntimeError: too long to judge"


def test_bad_input_is_one_line_naming_file_line_field_and_writes_nothing(tmp_path):
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"prompt_id": "a", "prompt": "x", "output": "y"}\n{"prompt_id": "a", "prompt": "x"}\n')
    out = tmp_path / "o.jsonl"
    r = alignloop("label", samples, "--out", out)
    assert r.returncode == EXIT_BAD_INPUT
    assert r.stderr.strip() == f"alignloop: error: {samples}:2: missing field 'output'"
    assert not out.exists()

    scored = tmp_path / "scored.jsonl"
    scored.write_text('{"prompt_id": "a", "prompt": "x", "output": "y", "reward": "high"}\n')
    r = alignloop("feedback", scored, "--out", out)
    assert r.returncode == EXIT_BAD_INPUT and f"{scored}:1" in r.stderr and "reward" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()

    r = alignloop("sample", scored, "--out", out, "--policy", tmp_path / "no-such-model")
    assert r.returncode == EXIT_BAD_INPUT and "no-such-model: no such model folder" in r.stderr

    r = alignloop("label", samples, "--out", out, "--function", "nowhere:fn")
    assert r.returncode == EXIT_BAD_INPUT and "cannot import module 'nowhere'" in r.stderr


def test_nothing_to_do_has_its_own_exit_code(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = alignloop("sample", empty, "--out", tmp_path / "o.jsonl")
    assert r.returncode == EXIT_NOTHING_TO_DO and "no prompts" in r.stderr


def test_run_with_a_bad_config_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("optim:\n  lr: fast\n")
    r = alignloop("run", config)
    assert r.returncode == EXIT_BAD_INPUT
    assert r.stderr.strip().startswith(f"alignloop: error: {config}: optim.lr:")
