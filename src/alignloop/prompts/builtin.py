"""The built-in instruction-following prompt set of the embedded default run.

`builtin_prompts(split)` returns deterministic prompt records: an everyday task ("Describe a cat.")
crossed with one or two IFEval-style constraints phrased the way IFEval phrases them ("Answer with less
than 40 words.", "Do not use any commas in your response."). Each record carries the IFEval
`instruction_id_list` and the aligned `kwargs` that `alignloop.rewards.ifeval.ifeval_reward` checks:

    {"prompt_id": "ifc-train-0001",
     "prompt": [{"role": "user", "content": "Describe a cat. Answer with less than 40 words."}],
     "instruction_id_list": ["length_constraints:number_words"],
     "kwargs": [{"num_words": 40, "relation": "less than"}]}

Design (the policy is a ~135M model writing at most ~128 new tokens):
- only checkers that work offline (no nltk data: `length_constraints:number_sentences` and
  `change_case:capital_word_frequency` need nltk's punkt and are never used) and that a short answer
  can satisfy (no "at least 300 words", no response language, no repeat-the-prompt);
- a mix of easy constraints (word limit, include a topical keyword) and harder ones (all capitals,
  JSON, exact bullet count) so the untrained policy scores neither ~0 nor ~1;
- the "train" and "heldout" splits use the same constraint types and the same sampling distribution
  but disjoint tasks, so held-out reward measures constraint following on unseen requests.

Everything is generated from code with a private `random.Random(seed)`; global RNG state is untouched
and every call returns the same, freshly built records.
"""

from __future__ import annotations

import random

__all__ = ["SPLITS", "CONSTRAINT_TYPES", "builtin_prompts"]

SPLITS = ("train", "heldout")
_SPLIT_SIZES = {"train": 400, "heldout": 100}
_SPLIT_SEEDS = {"train": 20250101, "heldout": 20250202}
_HELDOUT_EVERY = 5  # every 5th task (index % 5 == 4) is held out

# (task text, keywords to include (topical, likely but not certain), words to forbid (words an
# answer would naturally use)). Keywords/forbidden words are plain lowercase letters only: the
# IFEval checkers use them as regular expressions.
_TASKS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("Write a short note to your neighbour asking them to water your plants while you are away.",
     ("weekend", "thank", "key"), ("water", "please")),
    ("Describe a cat.", ("whiskers", "purr", "soft"), ("cat", "fur")),
    ("Give some tips for sleeping better.", ("routine", "dark", "caffeine"), ("sleep", "bed")),
    ("Explain what a rainbow is.", ("light", "colors", "sky"), ("rain", "sun")),
    ("Write a thank-you message to a friend who helped you move house.",
     ("boxes", "grateful", "pizza"), ("thank", "help")),
    ("Describe your ideal weekend.", ("relax", "friends", "morning"), ("weekend", "fun")),
    ("Explain how to make a cup of tea.", ("kettle", "minutes", "milk"), ("tea", "water")),
    ("Give advice to someone starting their first job.", ("questions", "team", "learn"),
     ("work", "job")),
    ("Write a short poem about the ocean.", ("waves", "blue", "shore"), ("ocean", "sea")),
    ("Describe a busy city street in the morning.", ("traffic", "coffee", "noise"),
     ("street", "people")),
    ("Explain why people should drink enough water.", ("body", "energy", "healthy"),
     ("water", "drink")),
    ("Write a short review of a pizza restaurant.", ("cheese", "service", "crust"),
     ("pizza", "delicious")),
    ("Give tips for keeping a houseplant alive.", ("sunlight", "soil", "leaves"),
     ("water", "plant")),
    ("Explain how a bicycle works.", ("pedals", "chain", "wheels"), ("bike", "bicycle")),
    ("Write a birthday message for your grandmother.", ("love", "wishes", "cake"),
     ("birthday", "happy")),
    ("Describe what autumn feels like.", ("leaves", "cool", "orange"), ("autumn", "fall")),
    ("Give tips for studying for an exam.", ("notes", "breaks", "schedule"),
     ("study", "exam")),
    ("Explain what the moon is.", ("orbit", "earth", "night"), ("moon", "sky")),
    ("Write a short invitation to a picnic in the park.", ("sandwiches", "saturday", "blanket"),
     ("picnic", "park")),
    ("Describe a dog playing in the snow.", ("tail", "cold", "jump"), ("dog", "snow")),
    ("Give advice on saving money.", ("budget", "goal", "spending"), ("money", "save")),
    ("Explain why exercise is good for you.", ("heart", "muscles", "mood"),
     ("exercise", "health")),
    ("Write a short story about a lost key.", ("door", "pocket", "finally"), ("key", "lost")),
    ("Describe your favourite breakfast.", ("eggs", "toast", "coffee"),
     ("breakfast", "delicious")),
    ("Give tips for a long car trip.", ("snacks", "music", "stops"), ("car", "drive")),
    ("Explain how bees make honey.", ("nectar", "flowers", "hive"), ("bees", "honey")),
    ("Write an apology note to a friend for missing their party.", ("sorry", "forgive", "next"),
     ("party", "apologize")),
    ("Describe a thunderstorm.", ("lightning", "loud", "clouds"), ("storm", "rain")),
    ("Give tips for learning a new language.", ("practice", "words", "daily"),
     ("language", "learn")),
    ("Explain what clouds are made of.", ("droplets", "vapor", "air"), ("water", "cloud")),
    ("Write a short product description for a reusable water bottle.",
     ("durable", "leak", "planet"), ("bottle", "water")),
    ("Describe a walk in the forest.", ("trees", "birds", "quiet"), ("forest", "walk")),
    ("Give tips for cooking pasta.", ("salt", "boil", "sauce"), ("pasta", "water")),
    ("Explain why the sky is blue.", ("light", "scatter", "air"), ("blue", "sun")),
    ("Write a short welcome message for a new coworker.", ("team", "lunch", "glad"),
     ("welcome", "new")),
    ("Describe a library.", ("books", "quiet", "shelves"), ("library", "read")),
    ("Give advice for a first day at school.", ("friends", "teacher", "smile"),
     ("school", "first")),
    ("Explain how to plant a tree.", ("hole", "roots", "soil"), ("tree", "water")),
    ("Write a note reminding your roommate to take out the trash.",
     ("tonight", "bin", "thanks"), ("trash", "please")),
    ("Describe the taste of a lemon.", ("sour", "fresh", "juice"), ("lemon", "taste")),
    ("Give tips for staying calm before a test.", ("breathe", "relax", "sleep"),
     ("calm", "test")),
    ("Explain what a volcano is.", ("lava", "mountain", "eruption"), ("volcano", "hot")),
    ("Write a short message congratulating a friend on a new job.",
     ("proud", "success", "celebrate"), ("congratulations", "job")),
    ("Describe a sunset at the beach.", ("orange", "waves", "sand"), ("sun", "beach")),
    ("Give tips for keeping a kitchen clean.", ("dishes", "counter", "sponge"),
     ("clean", "kitchen")),
    ("Explain why leaves change color in autumn.", ("chlorophyll", "yellow", "trees"),
     ("leaves", "autumn")),
    ("Write a short notice about an umbrella you found on the bus.",
     ("owner", "contact", "black"), ("umbrella", "found")),
    ("Describe a farmers market.", ("vegetables", "stalls", "fresh"), ("market", "food")),
    ("Give tips for writing a good email.", ("subject", "short", "polite"),
     ("email", "clear")),
    ("Explain what a map is used for.", ("directions", "places", "travel"), ("map", "find")),
    ("Write a short letter to your future self.", ("hope", "remember", "dreams"),
     ("future", "you")),
    ("Describe a rainy afternoon at home.", ("window", "blanket", "tea"), ("rain", "home")),
    ("Give tips for running your first race.", ("pace", "shoes", "stretch"),
     ("run", "race")),
    ("Explain how a fridge keeps food cold.", ("heat", "coolant", "inside"),
     ("cold", "food")),
    ("Write a short speech to thank a teacher.", ("patience", "lessons", "inspired"),
     ("thank", "teacher")),
    ("Describe a snowman.", ("carrot", "scarf", "winter"), ("snow", "snowman")),
    ("Give tips for packing a suitcase.", ("roll", "list", "shoes"), ("pack", "clothes")),
    ("Explain why we have seasons.", ("tilt", "orbit", "summer"), ("earth", "sun")),
    ("Write a short note thanking your mail carrier.", ("letters", "weather", "kind"),
     ("thank", "mail")),
    ("Describe an apple tree in spring.", ("blossoms", "pink", "bees"), ("apple", "tree")),
)

_END_PHRASES = (
    "Any other questions?",
    "Is there anything else I can help with?",
    "Have a great day!",
    "That is all.",
    "Thanks for reading.",
    "Hope this helps!",
)


def _quote_list(words: list[str]) -> str:
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# Each builder: (rng, task) -> (instruction id, kwargs for build_description, constraint text).
def _no_comma(rng, task):
    text = rng.choice((
        "In your entire response, refrain from the use of any commas.",
        "Do not use any commas in your response.",
        "Avoid using commas anywhere in your answer.",
    ))
    return "punctuation:no_comma", {}, text


def _lowercase(rng, task):
    text = rng.choice((
        "Your entire response should be in English, and in all lowercase letters. "
        "No capital letters are allowed.",
        "Write your whole answer in English using only lowercase letters. No capital letters.",
        "Please respond in all lowercase letters; capital letters are not allowed.",
    ))
    return "change_case:english_lowercase", {}, text


def _capitals(rng, task):
    text = rng.choice((
        "Your entire response should be in English, and in all capital letters.",
        "Write your whole answer in English using only CAPITAL LETTERS.",
        "Please respond in all capital letters.",
    ))
    return "change_case:english_capital", {}, text


def _word_limit(rng, task):
    n = rng.choice((20, 30, 40, 50, 60))
    text = rng.choice((
        "Answer with less than {n} words.",
        "Your response should contain less than {n} words.",
        "Keep your answer under {n} words.",
    )).format(n=n)
    return "length_constraints:number_words", {"num_words": n, "relation": "less than"}, text


def _include_keywords(rng, task):
    k = 1 if rng.random() < 0.6 else 2
    words = sorted(rng.sample(list(task[1]), k))
    if k == 1:
        text = rng.choice((
            'Include the keyword {w} in your response.',
            'Make sure to use the word {w} in your answer.',
            'Your response must contain the word {w}.',
        )).format(w=_quote_list(words))
    else:
        text = rng.choice((
            'Include the keywords {w} in the response.',
            'Make sure to use the words {w} in your answer.',
        )).format(w=_quote_list(words))
    return "keywords:existence", {"keywords": words}, text


def _forbidden_words(rng, task):
    k = 1 if rng.random() < 0.6 else 2
    words = sorted(rng.sample(list(task[2]), k))
    if k == 1:
        text = rng.choice((
            'Do not include the word {w} in your response.',
            'Do not use the word {w} anywhere in your answer.',
            'Avoid the word {w} in your response.',
        )).format(w=_quote_list(words))
    else:
        text = rng.choice((
            'Do not include the keywords {w} in the response.',
            'Do not use the words {w} anywhere in your answer.',
        )).format(w=_quote_list(words))
    return "keywords:forbidden_words", {"forbidden_words": words}, text


def _keyword_frequency(rng, task):
    word = rng.choice(task[1])
    n = rng.choice((2, 3))
    text = rng.choice((
        'In your response, the word "{w}" should appear at least {n} times.',
        'Use the word "{w}" at least {n} times in your answer.',
    )).format(w=word, n=n)
    return ("keywords:frequency",
            {"keyword": word, "frequency": n, "relation": "at least"}, text)


def _bullets(rng, task):
    n = rng.choice((2, 3, 4))
    text = rng.choice((
        "Your answer must contain exactly {n} bullet points. Use the markdown bullet points "
        "such as:\n* This is point 1.\n* This is point 2",
        "Your answer must contain exactly {n} bullet points in markdown format, "
        "each starting with \"* \".",
        "Answer with exactly {n} markdown bullet points (lines starting with \"* \") and "
        "nothing else.",
    )).format(n=n)
    return "detectable_format:number_bullet_lists", {"num_bullets": n}, text


def _end_phrase(rng, task):
    phrase = rng.choice(_END_PHRASES)
    text = rng.choice((
        'Finish your response with this exact phrase "{p}". No other words should follow '
        'this phrase.',
        'End your answer with the exact phrase "{p}", and write nothing after it.',
    )).format(p=phrase)
    return "startend:end_checker", {"end_phrase": phrase}, text


def _quotation(rng, task):
    text = rng.choice((
        "Wrap your entire response with double quotation marks.",
        "Put your whole answer inside double quotation marks.",
    ))
    return "startend:quotation", {}, text


def _title(rng, task):
    text = rng.choice((
        "Your answer must contain a title, wrapped in double angular brackets, such as "
        "<<poem of joy>>.",
        "Give your answer a title wrapped in double angular brackets, like <<my title>>.",
    ))
    return "detectable_format:title", {}, text


def _postscript(rng, task):
    text = rng.choice((
        "At the end of your response, please explicitly add a postscript starting with P.S.",
        "Add a postscript starting with P.S. at the end of your answer.",
    ))
    return "detectable_content:postscript", {"postscript_marker": "P.S."}, text


def _placeholders(rng, task):
    n = rng.choice((1, 2))
    text = rng.choice((
        "The response must contain at least {n} represented by square brackets, such as "
        "[address].",
        "Include at least {n} in square brackets, such as [name].",
    )).format(n=_plural(n, "placeholder"))
    return "detectable_content:number_placeholders", {"num_placeholders": n}, text


def _highlights(rng, task):
    n = rng.choice((1, 2))
    text = rng.choice((
        "Highlight at least {n} in your answer with markdown, i.e. *highlighted section*.",
        "Highlight at least {n} of your answer with markdown, like *this part*.",
    )).format(n=_plural(n, "section") if n > 1 else "1 section")
    return "detectable_format:number_highlighted_sections", {"num_highlights": n}, text


def _json(rng, task):
    text = rng.choice((
        "Entire output should be wrapped in JSON format. You can use markdown ticks such "
        "as ```.",
        "Format your entire answer as valid JSON.",
    ))
    return "detectable_format:json_format", {}, text


def _paragraphs(rng, task):
    n = 2
    text = ("There should be {n} paragraphs. Paragraphs are separated with the markdown "
            "divider: ***").format(n=n)
    return "length_constraints:number_paragraphs", {"num_paragraphs": n}, text


def _sections(rng, task):
    n = 2
    text = ("Your response must have {n} sections. Mark the beginning of each section with "
            "SECTION X, such as:\nSECTION 1\n[content of section 1]\nSECTION 2\n"
            "[content of section 2]").format(n=n)
    return ("detectable_format:multiple_sections",
            {"section_spliter": "SECTION", "num_sections": n}, text)


# (builder, weight). Weights favour constraints a tiny model can learn in a short answer; the
# rarer, harder ones keep headroom.
_BUILDERS = (
    (_word_limit, 12),
    (_include_keywords, 12),
    (_no_comma, 10),
    (_end_phrase, 10),
    (_lowercase, 9),
    (_title, 9),
    (_postscript, 9),
    (_bullets, 9),
    (_forbidden_words, 8),
    (_keyword_frequency, 6),
    (_quotation, 6),
    (_highlights, 6),
    (_placeholders, 5),
    (_capitals, 4),
    (_json, 3),
    (_paragraphs, 2),
    (_sections, 2),
)


# Pairs never put in one prompt: IFEval's own INSTRUCTION_CONFLICTS for these types (made
# symmetric), plus pairs that are satisfiable but contradictory-sounding or redundant.
_CONFLICTS = {
    frozenset(p)
    for p in (
        # from if_verifiable.ifeval.instructions_registry.INSTRUCTION_CONFLICTS
        ("change_case:english_lowercase", "change_case:english_capital"),
        ("startend:quotation", "detectable_format:title"),
        ("length_constraints:number_paragraphs", "detectable_format:multiple_sections"),
        ("detectable_format:multiple_sections", "detectable_format:number_highlighted_sections"),
        # ours
        ("keywords:existence", "keywords:frequency"),
        ("detectable_content:postscript", "startend:end_checker"),
        ("change_case:english_lowercase", "detectable_content:postscript"),
        ("change_case:english_lowercase", "startend:end_checker"),
        ("change_case:english_lowercase", "detectable_format:multiple_sections"),
        ("detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections"),
        ("detectable_format:number_bullet_lists", "length_constraints:number_paragraphs"),
        ("detectable_format:number_bullet_lists", "detectable_format:multiple_sections"),
    )
}
# JSON output conflicts with everything but keyword inclusion/exclusion (as in IFEval).
_JSON_OK = {"keywords:existence", "keywords:forbidden_words"}


def _compatible(a: str, b: str) -> bool:
    if a == b or frozenset((a, b)) in _CONFLICTS:
        return False
    if a == "detectable_format:json_format":
        return b in _JSON_OK
    if b == "detectable_format:json_format":
        return a in _JSON_OK
    return True


def _builder_id(builder) -> str:
    return builder(random.Random(0), _TASKS[0])[0]


_BUILDER_IDS = tuple(_builder_id(b) for b, _ in _BUILDERS)

# The IFEval instruction ids this prompt set uses.
CONSTRAINT_TYPES = _BUILDER_IDS


def _weighted_choice(rng: random.Random, indices: list[int]) -> int:
    weights = [_BUILDERS[i][1] for i in indices]
    return rng.choices(indices, weights=weights, k=1)[0]


def _make_record(rng: random.Random, task) -> tuple[str, list[str], list[dict]]:
    n_constraints = 1 if rng.random() < 0.35 else 2
    chosen = [_weighted_choice(rng, list(range(len(_BUILDERS))))]
    if n_constraints == 2:
        first = _BUILDER_IDS[chosen[0]]
        options = [i for i in range(len(_BUILDERS)) if _compatible(first, _BUILDER_IDS[i])]
        if options:
            chosen.append(_weighted_choice(rng, options))
    ids, kwargs, texts = [], [], []
    for i in chosen:
        iid, kw, text = _BUILDERS[i][0](rng, task)
        ids.append(iid)
        kwargs.append(kw)
        texts.append(text)
    # Constraints whose text ends in an example block ("* This is point 2", "***") go last.
    texts.sort(key=lambda t: "\n" in t or t.endswith("***"))
    content = " ".join([task[0], *texts])
    return content, ids, kwargs


def _split_tasks(split: str):
    if split == "heldout":
        return [t for i, t in enumerate(_TASKS) if i % _HELDOUT_EVERY == _HELDOUT_EVERY - 1]
    return [t for i, t in enumerate(_TASKS) if i % _HELDOUT_EVERY != _HELDOUT_EVERY - 1]


def builtin_prompts(split: str) -> list[dict]:
    """The built-in IFEval-style prompt records of `split` ("train": 400, "heldout": 100).

    Deterministic (a private seeded RNG), fresh lists on every call, disjoint tasks between splits.
    """
    if split not in _SPLIT_SIZES:
        raise ValueError(
            f"unknown builtin prompt split {split!r}; valid splits: {', '.join(SPLITS)}"
        )
    rng = random.Random(_SPLIT_SEEDS[split])
    tasks = _split_tasks(split)
    records: list[dict] = []
    seen: set[str] = set()
    for n in range(_SPLIT_SIZES[split]):
        task = tasks[n % len(tasks)]
        for _ in range(100):
            content, ids, kwargs = _make_record(rng, task)
            if content not in seen:
                break
        else:  # pragma: no cover - the space of combinations is far larger than the split
            raise RuntimeError(f"could not draw a new prompt for task {task[0]!r}")
        seen.add(content)
        records.append({
            "prompt_id": f"ifc-{split}-{n + 1:04d}",
            "prompt": [{"role": "user", "content": content}],
            "instruction_id_list": ids,
            "kwargs": kwargs,
        })
    return records
