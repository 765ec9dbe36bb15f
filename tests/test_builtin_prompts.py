"""The built-in IFEval-style prompt set: sizes, determinism, disjoint splits, valid checkers."""

import collections
import random

import pytest

from alignloop.prompts.builtin import CONSTRAINT_TYPES, SPLITS, builtin_prompts

# Checkers that need downloaded nltk data (punkt) and so must never be used offline.
NEEDS_DOWNLOADED_DATA = {
    "length_constraints:number_sentences",
    "change_case:capital_word_frequency",
}


@pytest.fixture(scope="module")
def registry():
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return INSTRUCTION_DICT


@pytest.fixture(scope="module")
def splits():
    return {split: builtin_prompts(split) for split in SPLITS}


def test_split_sizes(splits):
    assert SPLITS == ("train", "heldout")
    assert len(splits["train"]) == 400
    assert len(splits["heldout"]) == 100


def test_record_shape_and_ids(splits):
    for split, records in splits.items():
        ids = [r["prompt_id"] for r in records]
        assert ids[0] == f"ifc-{split}-0001"
        assert ids[-1] == f"ifc-{split}-{len(records):04d}"
        assert len(set(ids)) == len(ids)
        for r in records:
            assert set(r) == {"prompt_id", "prompt", "instruction_id_list", "kwargs"}
            assert len(r["prompt"]) == 1
            turn = r["prompt"][0]
            assert turn["role"] == "user"
            assert isinstance(turn["content"], str) and len(turn["content"]) > 20
            assert 1 <= len(r["instruction_id_list"]) <= 2
            assert len(r["kwargs"]) == len(r["instruction_id_list"])
            assert len(set(r["instruction_id_list"])) == len(r["instruction_id_list"])
            assert all(isinstance(kw, dict) for kw in r["kwargs"])


def test_deterministic_and_independent_of_global_rng():
    random.seed(1)
    first = builtin_prompts("train")
    random.seed(2)
    random.random()
    second = builtin_prompts("train")
    assert first == second
    assert builtin_prompts("heldout") == builtin_prompts("heldout")
    # Fresh objects each call: mutating one result does not leak into the next.
    first[0]["kwargs"].append({"x": 1})
    first[0]["prompt"][0]["content"] = "changed"
    third = builtin_prompts("train")
    assert third == second
    # Calling it does not move the global RNG.
    random.seed(3)
    expected = random.random()
    random.seed(3)
    builtin_prompts("train")
    assert random.random() == expected


def test_splits_are_disjoint(splits):
    train, heldout = splits["train"], splits["heldout"]
    train_texts = {r["prompt"][0]["content"] for r in train}
    heldout_texts = {r["prompt"][0]["content"] for r in heldout}
    assert len(train_texts) == 400  # no duplicate prompts within a split
    assert len(heldout_texts) == 100
    assert not train_texts & heldout_texts
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in heldout}

    # The splits use different tasks: the text before the first constraint sentence differs.
    def task_of(text):
        return text.split(". ")[0].split("? ")[0]

    train_tasks = {task_of(t) for t in train_texts}
    heldout_tasks = {task_of(t) for t in heldout_texts}
    assert not train_tasks & heldout_tasks
    assert len(train_tasks) + len(heldout_tasks) >= 40


def test_constraint_mix(splits):
    used_train = collections.Counter(
        i for r in splits["train"] for i in r["instruction_id_list"]
    )
    used_heldout = collections.Counter(
        i for r in splits["heldout"] for i in r["instruction_id_list"]
    )
    assert set(used_train) == set(CONSTRAINT_TYPES)
    assert set(used_heldout) <= set(used_train)
    assert len(used_heldout) >= 12
    assert not set(used_train) & NEEDS_DOWNLOADED_DATA
    # Both single- and two-constraint prompts occur.
    sizes = collections.Counter(len(r["instruction_id_list"]) for r in splits["train"])
    assert sizes[1] > 50 and sizes[2] > 150


def test_every_checker_builds_with_its_kwargs(splits, registry):
    for records in splits.values():
        for r in records:
            for iid, kw in zip(r["instruction_id_list"], r["kwargs"]):
                assert iid in registry, (r["prompt_id"], iid)
                checker = registry[iid](iid)
                checker.build_description(**kw)
                args = checker.get_instruction_args() or {}
                # Everything we pass is taken as given (no argument drawn at random).
                for k, v in kw.items():
                    want = sorted(v) if isinstance(v, list) else v
                    assert args[k] == want, (r["prompt_id"], iid, k)
                assert set(args) == set(kw), (r["prompt_id"], iid)


def test_constraint_text_matches_kwargs(splits):
    for r in splits["train"] + splits["heldout"]:
        text = r["prompt"][0]["content"]
        for iid, kw in zip(r["instruction_id_list"], r["kwargs"]):
            if iid == "length_constraints:number_words":
                assert kw["relation"] == "less than"
                assert f"{kw['num_words']} words" in text
            elif iid == "keywords:existence" or iid == "keywords:forbidden_words":
                for w in kw.get("keywords", kw.get("forbidden_words", [])):
                    assert f'"{w}"' in text
            elif iid == "startend:end_checker":
                assert f'"{kw["end_phrase"]}"' in text
            elif iid == "detectable_format:number_bullet_lists":
                assert f"exactly {kw['num_bullets']} " in text
            elif iid == "detectable_content:postscript":
                assert "P.S." in text


def test_known_record():
    first = builtin_prompts("train")[0]
    assert first["prompt_id"] == "ifc-train-0001"
    assert first["prompt"][0]["content"].startswith(
        "Write a short note to your neighbour asking them to water your plants"
    )


@pytest.mark.parametrize("bad", ["test", "", "Train", "validation", None])
def test_bad_split(bad):
    with pytest.raises(ValueError) as e:
        builtin_prompts(bad)
    assert "train" in str(e.value) and "heldout" in str(e.value)
