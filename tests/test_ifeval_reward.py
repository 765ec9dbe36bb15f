"""The IFEval verifier reward: hand-computed partial credit per constraint type, and its errors."""

import time

import pytest

from alignloop.prompts.builtin import builtin_prompts
from alignloop.rewards.ifeval import ifeval_reward


def rec(ids, kwargs, prompt_id="p1"):
    return {
        "prompt_id": prompt_id,
        "prompt": [{"role": "user", "content": "x"}],
        "instruction_id_list": ids,
        "kwargs": kwargs,
    }


LOWER_NO_COMMA = rec(["change_case:english_lowercase", "punctuation:no_comma"], [{}, {}])
WORDS_END = rec(
    ["length_constraints:number_words", "startend:end_checker"],
    [{"num_words": 10, "relation": "less than"}, {"end_phrase": "Any other questions?"}],
)
KEYWORD_FORBIDDEN = rec(
    ["keywords:existence", "keywords:forbidden_words"],
    [{"keywords": ["whiskers", "purr"]}, {"forbidden_words": ["dog"]}],
)
BULLETS_TITLE = rec(
    ["detectable_format:number_bullet_lists", "detectable_format:title"],
    [{"num_bullets": 3}, {}],
)
QUOTE_PS = rec(
    ["startend:quotation", "detectable_content:postscript"], [{}, {"postscript_marker": "P.S."}]
)
FREQ_CAPS = rec(
    ["keywords:frequency", "change_case:english_capital"],
    [{"keyword": "cat", "frequency": 2, "relation": "at least"}, {}],
)
PLACEHOLDER_HIGHLIGHT = rec(
    ["detectable_content:number_placeholders", "detectable_format:number_highlighted_sections"],
    [{"num_placeholders": 2}, {"num_highlights": 1}],
)
JSON_ONLY = rec(["detectable_format:json_format"], [{}])
PARAGRAPHS_SECTIONS = rec(
    ["length_constraints:number_paragraphs", "detectable_format:multiple_sections"],
    [{"num_paragraphs": 2}, {"section_spliter": "SECTION", "num_sections": 2}],
)


@pytest.mark.parametrize(
    "record, output, expected",
    [
        # lowercase + no comma
        (LOWER_NO_COMMA, "the cat sleeps in the warm sun all day and purrs softly.", 1.0),
        (LOWER_NO_COMMA, "the cat sleeps in the warm sun, all day, and purrs softly.", 0.5),
        (LOWER_NO_COMMA, "The cat sleeps in the warm sun all day and purrs softly.", 0.5),
        (LOWER_NO_COMMA, "The cat sleeps in the warm sun, all day, and purrs softly.", 0.0),
        # word limit (less than 10) + exact end phrase
        (WORDS_END, "Cats are soft and sleepy. Any other questions?", 1.0),
        (WORDS_END, "Cats are soft and sleepy. Any other questions?\n", 1.0),
        (WORDS_END, "Cats are soft and sleepy.", 0.5),
        (WORDS_END, "Cats are soft, warm, sleepy and playful little animals. "
                    "Any other questions?", 0.5),
        (WORDS_END, "Cats are soft, warm, sleepy and very playful little animals.", 0.0),
        (WORDS_END, "Any other questions? Cats are soft.", 0.5),
        # keyword inclusion (all of them, case-insensitive) + forbidden word (whole word only)
        (KEYWORD_FORBIDDEN, "Whiskers twitch when cats PURR.", 1.0),
        (KEYWORD_FORBIDDEN, "Hotdogs have no whiskers and do not purr.", 1.0),
        (KEYWORD_FORBIDDEN, "Cats purr and have whiskers, unlike a dog.", 0.5),
        (KEYWORD_FORBIDDEN, "Cats have whiskers.", 0.5),
        (KEYWORD_FORBIDDEN, "A Dog has whiskers too.", 0.0),
        # exactly 3 markdown bullets + <<title>>
        (BULLETS_TITLE, "<<Sleep Tips>>\n* Keep a routine.\n* Dim the lights.\n* Skip late coffee.",
         1.0),
        (BULLETS_TITLE, "<<Sleep Tips>>\n* Keep a routine.\n* Dim the lights.", 0.5),
        (BULLETS_TITLE, "* Keep a routine.\n* Dim the lights.\n- Skip late coffee.", 0.5),
        (BULLETS_TITLE, "<< >>\n* one\n* two\n* three\n* four", 0.0),
        # whole answer in double quotes + P.S.
        (QUOTE_PS, '"Hello neighbour, thanks for the help.\nP.S. See you soon."', 1.0),
        (QUOTE_PS, "Hello neighbour.\nP.S. See you soon.", 0.5),
        (QUOTE_PS, '"Hello neighbour."', 0.5),
        (QUOTE_PS, "Hello neighbour.", 0.0),
        # keyword frequency (at least 2) + all capitals
        (FREQ_CAPS, "MY CAT IS A VERY HAPPY CAT.", 1.0),
        (FREQ_CAPS, "My cat is a very happy cat.", 0.5),
        (FREQ_CAPS, "BEES COLLECT NECTAR FROM FLOWERS AND TURN IT INTO HONEY IN THE HIVE.", 0.5),
        (FREQ_CAPS, "My dog is happy.", 0.0),
        # at least 2 [placeholders] + at least 1 *highlight*
        (PLACEHOLDER_HIGHLIGHT, "Dear [name], see you at [address]. *Thanks* a lot.", 1.0),
        (PLACEHOLDER_HIGHLIGHT, "Dear [name], see you at [address].", 0.5),
        (PLACEHOLDER_HIGHLIGHT, "Dear [name], see you **soon**.", 0.5),
        # JSON
        (JSON_ONLY, '```json\n{"tip": "sleep early"}\n```', 1.0),
        (JSON_ONLY, '{"tip": "sleep early"}', 1.0),
        (JSON_ONLY, "tip: sleep early", 0.0),
        # 2 *** paragraphs + 2 SECTIONs
        (PARAGRAPHS_SECTIONS, "SECTION 1\nFirst part.\n***\nSECTION 2\nSecond part.", 1.0),
        (PARAGRAPHS_SECTIONS, "SECTION 1\nFirst part.\nSECTION 2\nSecond part.", 0.5),
        (PARAGRAPHS_SECTIONS, "Just one part.", 0.0),
    ],
)
def test_partial_credit(record, output, expected):
    assert ifeval_reward(record, output) == pytest.approx(expected)


def test_three_instructions_give_thirds():
    record = rec(
        ["punctuation:no_comma", "detectable_format:title", "keywords:existence"],
        [{}, {"kwargs_unused": None}, {"keywords": ["moon"]}],
    )
    assert ifeval_reward(record, "<<Night>> The moon is bright tonight.") == pytest.approx(1.0)
    assert ifeval_reward(record, "<<Night>> The sun, not the moon.") == pytest.approx(2 / 3)
    assert ifeval_reward(record, "The sun is bright.") == pytest.approx(1 / 3)
    assert ifeval_reward(record, "The sun, bright.") == 0.0


def test_empty_and_thinking_outputs():
    assert ifeval_reward(LOWER_NO_COMMA, "") == 0.0
    assert ifeval_reward(LOWER_NO_COMMA, "   \n") == 0.0
    # A reasoning block is stripped before checking; an unfinished one leaves nothing.
    assert ifeval_reward(
        WORDS_END, "<think>Many, many words, far too many words to fit.</think>Yes. Any other questions?"
    ) == 1.0
    assert ifeval_reward(WORDS_END, "<think>still thinking, Any other questions?") == 0.0


def test_deterministic_language_check():
    out = "sleep well tonight"  # short text: langdetect would be random without a seed
    first = ifeval_reward(LOWER_NO_COMMA, out)
    assert all(ifeval_reward(LOWER_NO_COMMA, out) == first for _ in range(20))


def test_missing_instruction_ids():
    with pytest.raises(ValueError, match=r"prompt_id ifc-x-7: missing field 'instruction_id_list'"):
        ifeval_reward({"prompt_id": "ifc-x-7", "prompt": "hi"}, "an answer")


def test_unknown_instruction_id():
    record = rec(["punctuation:no_comma", "punctuation:no_semicolons"], [{}, {}], prompt_id="q9")
    with pytest.raises(ValueError, match=r"q9.*unknown IFEval instruction id 'punctuation:no_semicolons'"):
        ifeval_reward(record, "fine")


def test_bad_kwargs_are_errors_not_random_values():
    with pytest.raises(ValueError, match=r"length_constraints:number_words.*missing.*num_words"):
        ifeval_reward(rec(["length_constraints:number_words"], [{"relation": "less than"}]), "a")
    with pytest.raises(ValueError, match=r"startend:end_checker.*end_phrase"):
        ifeval_reward(rec(["startend:end_checker"], [{}]), "a")
    with pytest.raises(ValueError, match=r"punctuation:no_comma.*takes no argument.*num_words"):
        ifeval_reward(rec(["punctuation:no_comma"], [{"num_words": 3}]), "a")
    with pytest.raises(ValueError, match=r"relation"):
        ifeval_reward(
            rec(["length_constraints:number_words"], [{"num_words": 3, "relation": "about"}]), "a"
        )
    with pytest.raises(ValueError, match=r"kwargs.*aligned"):
        ifeval_reward(rec(["punctuation:no_comma", "detectable_format:title"], [{}]), "a")
    with pytest.raises(ValueError, match=r"non-empty list"):
        ifeval_reward(rec([], []), "a")


def test_kwargs_field_optional_for_argument_free_checkers():
    record = {"prompt_id": "p", "instruction_id_list": ["punctuation:no_comma", "startend:quotation"]}
    assert ifeval_reward(record, '"no commas here"') == 1.0
    assert ifeval_reward(record, "no commas here") == 0.5


def test_none_kwargs_values_are_ignored_like_ifeval_data():
    # The HF IFEval parquet gives every key, with None where unused.
    record = rec(
        ["length_constraints:number_words"],
        [{"num_words": 5, "relation": "less than", "keywords": None, "end_phrase": None}],
    )
    assert ifeval_reward(record, "one two three four") == 1.0
    assert ifeval_reward(record, "one two three four five") == 0.0


def test_builtin_records_score_and_are_fast():
    records = builtin_prompts("train") + builtin_prompts("heldout")
    outputs = [
        "the moon is bright tonight and the sky is calm.",
        "<<Tips>>\n* Keep a routine.\n* Dim the lights, too.\nP.S. Sleep well! Any other questions?",
        '"Whiskers, soft fur and a gentle purr. Have a great day!"',
    ]
    ifeval_reward(records[0], outputs[0])  # warm up (imports, langdetect profiles)
    start = time.perf_counter()
    scores = [ifeval_reward(r, o) for r in records for o in outputs]
    per_call = (time.perf_counter() - start) / len(scores)
    assert all(s in (0.0, 0.5, 1.0) for s in scores)
    assert 0.1 < sum(scores) / len(scores) < 0.9
    assert per_call < 0.01, f"{per_call * 1e3:.2f} ms per call"
