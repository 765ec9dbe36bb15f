"""The built-in IFEval-style prompt set: sizes, determinism, disjoint splits (tasks, topics and
constraint phrasings), valid checkers, and held-out constraints that the checker judges as asked."""

import collections
import difflib
import random
import re

import pytest

from alignloop.prompts.builtin import (
    _BUILDERS,
    _END_PHRASES,
    _HELDOUT_TASKS,
    _PHRASINGS,
    _TASKS,
    CONSTRAINT_TYPES,
    SPLITS,
    _first_constraint_quota,
    builtin_prompts,
)
from alignloop.rewards.ifeval import instructions_followed

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


def _task_of(record, tasks):
    content = record["prompt"][0]["content"]
    found = [t[0] for t in tasks if content.startswith(t[0] + " ")]
    assert len(found) == 1, (record["prompt_id"], found)
    return found[0]


def test_splits_are_disjoint(splits):
    train, heldout = splits["train"], splits["heldout"]
    train_texts = {r["prompt"][0]["content"] for r in train}
    heldout_texts = {r["prompt"][0]["content"] for r in heldout}
    assert len(train_texts) == 400  # no duplicate prompts within a split
    assert len(heldout_texts) == 100
    assert not train_texts & heldout_texts
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in heldout}

    # The task lists share no task, and each split draws all of its own list and nothing else.
    assert not {t[0] for t in _TASKS} & {t[0] for t in _HELDOUT_TASKS}
    assert 25 <= len(_HELDOUT_TASKS) <= 30
    assert {_task_of(r, _TASKS) for r in train} == {t[0] for t in _TASKS}
    assert {_task_of(r, _HELDOUT_TASKS) for r in heldout} == {t[0] for t in _HELDOUT_TASKS}
    assert not any(r["prompt"][0]["content"].startswith(t[0]) for r in heldout for t in _TASKS)


# Words that say what kind of request a task is, not what it is about.
_GENERIC_WORDS = set(
    "a an the to of for on in at with and or your you how what why is are does do give write "
    "describe explain short tips advice note message about from some someone simple first new"
    .split()
)


def _topic_words(task_text):
    return {w for w in re.findall(r"[a-z]+", task_text.lower()) if w not in _GENERIC_WORDS}


def test_heldout_topics_are_new():
    for held in _HELDOUT_TASKS:
        held_words = _topic_words(held[0])
        for train in _TASKS:
            shared = held_words & _topic_words(train[0])
            # At most one incidental word in common ("works", "morning"), never the topic itself.
            assert len(shared) <= 1, (held[0], train[0], shared)
            assert len(shared) / len(held_words | _topic_words(train[0])) < 0.4, (held[0], train[0])
    for text, keywords, forbidden in _TASKS + _HELDOUT_TASKS:
        assert len(keywords) == 3 and len(forbidden) == 2, text
        # The checkers use these as regular expressions.
        assert all(re.fullmatch("[a-z]+", w) for w in keywords + forbidden), text


def test_constraint_mix(splits):
    used_train = collections.Counter(
        i for r in splits["train"] for i in r["instruction_id_list"]
    )
    used_heldout = collections.Counter(
        i for r in splits["heldout"] for i in r["instruction_id_list"]
    )
    assert set(used_train) == set(CONSTRAINT_TYPES)
    # Held-out covers every constraint type the train split uses. Guaranteed by construction, not
    # by luck of the seed: the held-out prompts' first constraints are allotted by quota from the
    # weights, at least one per type (`_first_constraint_quota`); the first id of each record is
    # its quota slot.
    assert set(used_heldout) == set(used_train)
    firsts = collections.Counter(r["instruction_id_list"][0] for r in splits["heldout"])
    assert set(firsts) == set(CONSTRAINT_TYPES)
    assert not set(used_train) & NEEDS_DOWNLOADED_DATA
    # Both single- and two-constraint prompts occur.
    sizes = collections.Counter(len(r["instruction_id_list"]) for r in splits["train"])
    assert sizes[1] > 50 and sizes[2] > 150


def test_first_constraint_quota():
    weights = [w for _, w in _BUILDERS]
    for size in (len(_BUILDERS), 40, 100, 137, 400):
        slots = _first_constraint_quota(random.Random(size), size)
        assert len(slots) == size
        counts = collections.Counter(slots)
        assert set(counts) == set(range(len(_BUILDERS)))  # every type at least once
        for i, w in enumerate(weights):  # and otherwise its weight's share, rounded
            assert abs(counts[i] - size * w / sum(weights)) < 1 or counts[i] == 1, (size, i)
    with pytest.raises(ValueError):
        _first_constraint_quota(random.Random(0), len(_BUILDERS) - 1)


# What each template placeholder stands for in a rendered prompt.
_PLACEHOLDER_PATTERNS = {
    "n": r"\d+",
    "amount": r"\d+ [a-z]+",
    "words": r'"[a-z]+"(?:(?:, | and )"[a-z]+")*',
    "word": r"[a-z]+",
    "phrase": r'[^"\n]+',
}


def _templates(split):
    """(instruction id, template) for every constraint phrasing of `split`."""
    return [(iid, t) for iid, tables in _PHRASINGS.items() for table in tables for t in table[split]]


def _template_regex(template):
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ..., literal
    assert all(name in _PLACEHOLDER_PATTERNS for name in parts[1::2]), template
    return re.compile("".join(
        re.escape(part) if i % 2 == 0 else _PLACEHOLDER_PATTERNS[part] for i, part in enumerate(parts)
    ))


def test_phrasing_tables():
    assert set(_PHRASINGS) == set(CONSTRAINT_TYPES)
    for iid, tables in _PHRASINGS.items():
        for table in tables:
            assert set(table) == set(SPLITS)
            assert len(table["heldout"]) >= min(2, len(table["train"])) >= 1, iid
            for split in SPLITS:
                assert len(set(table[split])) == len(table[split]), iid
    assert not set(_END_PHRASES["train"]) & set(_END_PHRASES["heldout"])


def test_heldout_phrasings_are_new_sentences():
    train, heldout = _templates("train"), _templates("heldout")
    for held_iid, held in heldout:
        for train_iid, tr in train:
            assert held != tr
            # Not a near-copy either (swapping "answer" for "reply" would score ~0.9).
            ratio = difflib.SequenceMatcher(None, held.lower(), tr.lower()).ratio()
            assert ratio < 0.8, (held, tr, ratio)


def test_constraint_sentences_come_from_their_own_split(splits):
    """Every prompt is its task followed by one phrasing per instruction, all from its own split's
    templates; no template of the other split occurs in it. Reusing a train sentence in the held-out
    tables (or the reverse) fails here as soon as a prompt draws it."""
    compiled = {split: [(iid, t, _template_regex(t)) for iid, t in _templates(split)]
                for split in SPLITS}
    used = {split: set() for split in SPLITS}
    for split, records in splits.items():
        other = "heldout" if split == "train" else "train"
        tasks = _TASKS if split == "train" else _HELDOUT_TASKS
        for r in records:
            content = r["prompt"][0]["content"]
            for iid, t, rx in compiled[other]:
                assert not rx.search(content), (r["prompt_id"], other, t)
            spans = []
            for iid in r["instruction_id_list"]:
                matches = [(m, t) for i, t, rx in compiled[split] if i == iid
                           for m in [rx.search(content)] if m]
                assert matches, (r["prompt_id"], iid)
                m, t = max(matches, key=lambda mt: mt[0].end() - mt[0].start())
                spans.append(m.span())
                used[split].add(t)
            spans.sort()
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), r["prompt_id"]
            rest = content
            for start, end in reversed(spans):
                rest = rest[:start] + rest[end:]
            assert " ".join(rest.split()) == _task_of(r, tasks), r["prompt_id"]
    # So the check above covers every train sentence: each one occurs in some train prompt.
    assert used["train"] == {t for _, t in _templates("train")}
    assert len(used["heldout"]) >= 0.8 * len(_templates("heldout"))


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
        lower = text.lower()
        for iid, kw in zip(r["instruction_id_list"], r["kwargs"]):
            if iid == "length_constraints:number_words":
                assert kw["relation"] == "less than"
                assert f"{kw['num_words']} words" in text
            elif iid == "keywords:existence" or iid == "keywords:forbidden_words":
                for w in kw.get("keywords", kw.get("forbidden_words", [])):
                    assert f'"{w}"' in text
            elif iid == "keywords:frequency":
                assert f'"{kw["keyword"]}"' in text and f" {kw['frequency']} " in text
            elif iid == "startend:end_checker":
                assert f'"{kw["end_phrase"]}"' in text
            elif iid == "detectable_format:number_bullet_lists":
                assert f"exactly {kw['num_bullets']} " in text
                assert '"* "' in text or "\n* " in text  # markdown "* " bullets
            elif iid == "detectable_content:postscript":
                assert "P.S." in text
            elif iid == "detectable_format:title":
                assert "double angular brackets" in text and re.search(r"<<[a-z ]+>>", text)
            elif iid == "detectable_format:multiple_sections":
                assert kw["section_spliter"] == "SECTION" and "SECTION 1" in text
                assert re.search(rf"\b{kw['num_sections']} (?:numbered )?sections\b", text)
            elif iid == "length_constraints:number_paragraphs":
                assert "***" in text and f"{kw['num_paragraphs']} paragraphs" in text
            elif iid == "detectable_content:number_placeholders":
                assert "square brackets" in text
            elif iid == "detectable_format:number_highlighted_sections":
                assert "markdown" in text or "asterisks" in text
            elif iid == "detectable_format:json_format":
                assert "JSON" in text
            elif iid == "startend:quotation":
                assert "double quot" in lower
            elif iid == "change_case:english_lowercase":
                assert "lowercase" in lower or "no uppercase letters" in lower
            elif iid == "change_case:english_capital":
                assert "capital" in lower or "uppercase" in lower
            elif iid == "punctuation:no_comma":
                assert "comma" in lower


# Per instruction family: an answer that follows it and one that does not, given the record's kwargs.
_SENTENCE = "the museum was quiet and the paintings were lovely to look at for a long time."
_ANSWERS = {
    "detectable_format:title": (
        lambda kw: "<<A Quiet Morning>>\nThe day started slowly.",
        lambda kw: "A Quiet Morning\nThe day started slowly.",
    ),
    "detectable_format:number_bullet_lists": (
        lambda kw: "\n".join(f"* Point number {i}." for i in range(kw["num_bullets"])),
        lambda kw: "\n".join(f"* Point number {i}." for i in range(kw["num_bullets"] + 1)),
    ),
    "startend:end_checker": (
        lambda kw: f"Here is my short answer. {kw['end_phrase']}",
        lambda kw: f"{kw['end_phrase']} Here is my short answer.",
    ),
    "change_case:english_lowercase": (lambda kw: _SENTENCE, lambda kw: _SENTENCE.capitalize()),
    "change_case:english_capital": (lambda kw: _SENTENCE.upper(), lambda kw: _SENTENCE.capitalize()),
    "length_constraints:number_words": (
        lambda kw: " ".join(["word"] * (kw["num_words"] - 1)),
        lambda kw: " ".join(["word"] * kw["num_words"]),
    ),
    "detectable_content:postscript": (
        lambda kw: "Thanks for the help.\nP.S. See you soon.",
        lambda kw: "Thanks for the help. See you soon.",
    ),
    "detectable_format:multiple_sections": (
        lambda kw: "\n".join(f"SECTION {i + 1}\nPart {i + 1}." for i in range(kw["num_sections"])),
        lambda kw: "\n".join(f"Part {i + 1}." for i in range(kw["num_sections"])),
    ),
    "length_constraints:number_paragraphs": (
        lambda kw: "\n***\n".join(f"Part {i + 1}." for i in range(kw["num_paragraphs"])),
        lambda kw: "\n\n".join(f"Part {i + 1}." for i in range(kw["num_paragraphs"])),
    ),
    "startend:quotation": (lambda kw: '"All of it is quoted."', lambda kw: "None of it is quoted."),
    "detectable_format:json_format": (lambda kw: '{"answer": "yes"}', lambda kw: "answer: yes"),
    "punctuation:no_comma": (lambda kw: "No commas here at all.", lambda kw: "Well, one comma."),
    "keywords:existence": (
        lambda kw: " and ".join(kw["keywords"]) + " are here.",
        lambda kw: "Nothing relevant is here.",
    ),
    "keywords:forbidden_words": (
        lambda kw: "Nothing relevant is here.",
        lambda kw: kw["forbidden_words"][-1] + " is here.",
    ),
    "keywords:frequency": (
        lambda kw: " ".join([kw["keyword"]] * kw["frequency"]),
        lambda kw: " ".join([kw["keyword"]] * (kw["frequency"] - 1)) + " only.",
    ),
    "detectable_content:number_placeholders": (
        lambda kw: "Meet me at " + " and ".join(["[place]"] * kw["num_placeholders"]) + ".",
        lambda kw: "Meet me at the usual place.",
    ),
    "detectable_format:number_highlighted_sections": (
        lambda kw: " ".join(["*key idea*"] * kw["num_highlights"]),
        lambda kw: "No emphasis anywhere.",
    ),
}


@pytest.mark.parametrize("iid", sorted(_ANSWERS))
def test_heldout_checker_judges_compliant_and_noncompliant_answers(splits, iid):
    assert set(_ANSWERS) == set(CONSTRAINT_TYPES)
    records = [r for r in splits["heldout"] if iid in r["instruction_id_list"]]
    assert records
    good, bad = _ANSWERS[iid]
    for r in records:
        k = r["instruction_id_list"].index(iid)
        kw = r["kwargs"][k]
        assert instructions_followed(r, good(kw))[k], (r["prompt_id"], good(kw))
        assert not instructions_followed(r, bad(kw))[k], (r["prompt_id"], bad(kw))


def _compose_answer(record):
    """One hand-written answer that follows every instruction of `record`, or None when it has one
    this simple composer does not handle."""
    kw = dict(zip(record["instruction_id_list"], record["kwargs"]))
    handled = {
        "detectable_format:title", "keywords:existence", "punctuation:no_comma",
        "length_constraints:number_words", "startend:end_checker", "detectable_content:postscript",
        "detectable_content:number_placeholders", "detectable_format:number_highlighted_sections",
        "keywords:forbidden_words",
    }
    if not set(kw) <= handled:
        return None
    lines = []
    if "detectable_format:title" in kw:
        lines.append("<<My Answer>>")
    body = "Here it is"
    if "keywords:existence" in kw:
        body += " with " + " and ".join(kw["keywords:existence"]["keywords"])
    n = kw.get("detectable_content:number_placeholders", {}).get("num_placeholders", 0)
    body += "".join(" at [place]" for _ in range(n))
    n = kw.get("detectable_format:number_highlighted_sections", {}).get("num_highlights", 0)
    body += "".join(" *key idea*" for _ in range(n))
    lines.append(body + ".")
    if "detectable_content:postscript" in kw:
        lines.append("P.S. See you.")
    if "startend:end_checker" in kw:
        lines.append(kw["startend:end_checker"]["end_phrase"])
    return "\n".join(lines)


def test_heldout_records_with_a_fully_compliant_answer(splits):
    # Whole held-out prompts (both constraints at once), answered by hand: all instructions pass,
    # and an answer that ignores them passes none.
    checked = 0
    for r in splits["heldout"]:
        answer = _compose_answer(r)
        if answer is None:
            continue
        assert all(instructions_followed(r, answer)), (r["prompt_id"], answer)
        # 80 words with commas, the forbidden words, no title, keyword, marker or end phrase.
        kw = dict(zip(r["instruction_id_list"], r["kwargs"]))
        words = kw.get("keywords:forbidden_words", {}).get("forbidden_words", ["word"])
        bad = ", ".join((words * 80)[:80])
        assert not any(instructions_followed(r, bad)), r["prompt_id"]
        checked += 1
    assert checked >= 20


def test_known_record():
    first = builtin_prompts("train")[0]
    assert first["prompt_id"] == "ifc-train-0001"
    assert first["prompt"][0]["content"].startswith(
        "Write a short note to your neighbour asking them to water your plants"
    )
    first_heldout = builtin_prompts("heldout")[0]
    assert first_heldout["prompt_id"] == "ifc-heldout-0001"
    assert first_heldout["prompt"][0]["content"].startswith(_HELDOUT_TASKS[0][0] + " ")


@pytest.mark.parametrize("bad", ["test", "", "Train", "validation", None])
def test_bad_split(bad):
    with pytest.raises(ValueError) as e:
        builtin_prompts(bad)
    assert "train" in str(e.value) and "heldout" in str(e.value)
