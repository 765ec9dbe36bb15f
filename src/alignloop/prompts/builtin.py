"""The built-in instruction-following prompt set of the embedded default run.

`builtin_prompts(split)` returns deterministic prompt records: an everyday task ("Describe a cat.")
crossed with one or two IFEval-style constraints ("Answer with less than 40 words.", "Do not use any
commas in your response."). Each record carries the IFEval `instruction_id_list` and the aligned
`kwargs` that `alignloop.rewards.ifeval.ifeval_reward` checks:

    {"prompt_id": "ifc-train-0001",
     "prompt": [{"role": "user", "content": "Describe a cat. Answer with less than 40 words."}],
     "instruction_id_list": ["length_constraints:number_words"],
     "kwargs": [{"num_words": 40, "relation": "less than"}]}

Design (the policy is a ~135M model writing at most 256 new tokens):
- only checkers that work offline (no nltk data: `length_constraints:number_sentences` and
  `change_case:capital_word_frequency` need nltk's punkt and are never used) and that a short answer
  can satisfy (no "at least 300 words", no response language, no repeat-the-prompt);
- a mix of easy constraints (word limit, include a topical keyword) and harder ones (all capitals,
  JSON, exact bullet count) so the untrained policy scores neither ~0 nor ~1;
- "train" (400 prompts) draws its tasks from `_TASKS` and phrases each constraint the way IFEval
  does; "heldout" (100 prompts) measures constraint following on requests the run never trained
  on: its tasks come from `_HELDOUT_TASKS` (other topics, no task shared with `_TASKS`) and every
  constraint family the train split uses is asked for in new sentences (same meaning, same IFEval
  checker and kwargs; parameter values such as word limits and end phrases differ a little). Each
  builder below keeps its train and held-out phrasings side by side in a {"train": ..., "heldout":
  ...} table, and `_PHRASINGS` lists the tables per instruction id for the tests;
- both splits use the same constraint weights and pairing rules; in "heldout" the first constraint
  of each prompt is allotted by quota from those weights (shuffled), so every constraint type
  appears in it although 100 random draws would sometimes miss a rare one.

Everything is generated from code with a private `random.Random(seed)`; global RNG state is untouched
and every call returns the same, freshly built records.
"""

from __future__ import annotations

import random

__all__ = ["SPLITS", "CONSTRAINT_TYPES", "builtin_prompts"]

SPLITS = ("train", "heldout")
_SPLIT_SIZES = {"train": 400, "heldout": 100}
_SPLIT_SEEDS = {"train": 20250101, "heldout": 20250202}

# The train split's tasks: (task text, keywords to include (topical, likely but not certain), words
# to forbid (words an answer would naturally use)). Keywords/forbidden words are plain lowercase
# letters only: the IFEval checkers use them as regular expressions.
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

# The held-out split's tasks: everyday requests on topics that `_TASKS` does not touch, in the same
# format (keywords and forbidden words are plain lowercase letters).
_HELDOUT_TASKS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("Describe a visit to an art museum.", ("paintings", "gallery", "quiet"), ("museum", "art")),
    ("Explain how to change a flat tyre.", ("jack", "spare", "bolts"), ("tyre", "wheel")),
    ("Write a simple recipe for vegetable soup.", ("carrots", "onion", "simmer"),
     ("soup", "vegetables")),
    ("Write a short message to your landlord about a leaking tap.", ("kitchen", "repair", "soon"),
     ("tap", "leak")),
    ("Explain what a battery does.", ("energy", "charge", "power"), ("battery", "electricity")),
    ("Describe a train journey through the countryside.", ("window", "fields", "tracks"),
     ("train", "journey")),
    ("Give tips for looking after a pet goldfish.", ("tank", "food", "clean"), ("fish", "water")),
    ("Explain how a candle burns.", ("wax", "wick", "flame"), ("candle", "fire")),
    ("Write a short note asking a colleague to cover your shift on Friday.",
     ("swap", "favor", "thanks"), ("shift", "cover")),
    ("Describe a hot air balloon ride.", ("basket", "floating", "view"), ("balloon", "air")),
    ("Give tips for taking good photos with a phone.", ("light", "steady", "angle"),
     ("photo", "camera")),
    ("Explain what a lighthouse is for.", ("ships", "coast", "lamp"), ("lighthouse", "light")),
    ("Write a short message to a hotel asking for a late checkout.", ("room", "noon", "flight"),
     ("hotel", "checkout")),
    ("Describe a football match from the stands.", ("crowd", "goal", "cheering"),
     ("football", "game")),
    ("Explain how a compass works.", ("needle", "north", "magnetic"), ("compass", "direction")),
    ("Give advice to someone who has just moved to a new town.", ("neighbors", "clubs", "explore"),
     ("town", "new")),
    ("Describe an old wooden rowing boat.", ("paint", "harbor", "oars"), ("boat", "wood")),
    ("Explain why bread dough rises.", ("yeast", "bubbles", "gas"), ("bread", "dough")),
    ("Write a short advert selling an old sofa.", ("cushions", "cheap", "pickup"),
     ("sofa", "sale")),
    ("Describe a campfire on a summer evening.", ("sparks", "smoke", "marshmallows"),
     ("fire", "warm")),
    ("Give tips for visiting a zoo with young children.", ("animals", "snacks", "map"),
     ("zoo", "kids")),
    ("Explain how a thermometer measures temperature.", ("degrees", "scale", "liquid"),
     ("thermometer", "temperature")),
    ("Write a short postcard from a holiday in the mountains.", ("hiking", "view", "wish"),
     ("mountains", "holiday")),
    ("Describe a bakery early in the morning.", ("oven", "smell", "loaves"),
     ("bakery", "bread")),
    ("Give advice on keeping a tidy desk.", ("drawers", "papers", "daily"), ("desk", "clean")),
    ("Explain what an elevator does.", ("floors", "cable", "buttons"), ("elevator", "building")),
    ("Write a short message inviting friends to a board game night.",
     ("snacks", "dice", "saturday"), ("game", "night")),
    ("Describe the sound of a violin.", ("strings", "bow", "music"), ("violin", "sound")),
    ("Give tips for staying safe while swimming in a lake.", ("lifeguard", "deep", "buddy"),
     ("swim", "water")),
)

def _quote_list(words: list[str]) -> str:
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _one_of(rng: random.Random, options: tuple[str, ...]) -> str:
    """`rng.choice(options)`, but a single option is taken without a draw (`rng.choice` would
    still consume randomness), so the train split draws exactly as it did with one phrasing."""
    return options[0] if len(options) == 1 else rng.choice(options)


# Each builder: (rng, task, split) -> (instruction id, kwargs for build_description, constraint
# text). A builder draws from `rng` in the same order whatever the split, and picks its sentence
# from a {"train": ..., "heldout": ...} table right above it; the held-out sentences say the same
# thing as the train ones in other words. Placeholders: {n} a number, {amount} a counted noun
# ("2 sections"), {words} a quoted word list, {word} a bare word, {phrase} an end phrase.
_NO_COMMA = {
    "train": (
        "In your entire response, refrain from the use of any commas.",
        "Do not use any commas in your response.",
        "Avoid using commas anywhere in your answer.",
    ),
    "heldout": (
        "Write your reply without a single comma.",
        "Commas are not allowed anywhere in what you write.",
    ),
}


def _no_comma(rng, task, split):
    text = rng.choice(_NO_COMMA[split])
    return "punctuation:no_comma", {}, text


_LOWERCASE = {
    "train": (
        "Your entire response should be in English, and in all lowercase letters. "
        "No capital letters are allowed.",
        "Write your whole answer in English using only lowercase letters. No capital letters.",
        "Please respond in all lowercase letters; capital letters are not allowed.",
    ),
    "heldout": (
        "Reply in English with no uppercase letters at all, not even at the start of a sentence.",
        "Every letter of your English reply must be a small (lowercase) letter.",
    ),
}


def _lowercase(rng, task, split):
    text = rng.choice(_LOWERCASE[split])
    return "change_case:english_lowercase", {}, text


_CAPITALS = {
    "train": (
        "Your entire response should be in English, and in all capital letters.",
        "Write your whole answer in English using only CAPITAL LETTERS.",
        "Please respond in all capital letters.",
    ),
    "heldout": (
        "Reply in English and type every letter in uppercase.",
        "Every letter of your English reply must be an uppercase letter, with no small letters.",
    ),
}


def _capitals(rng, task, split):
    text = rng.choice(_CAPITALS[split])
    return "change_case:english_capital", {}, text


_WORD_LIMITS = {"train": (20, 30, 40, 50, 60), "heldout": (25, 35, 45, 55, 70)}
_WORD_LIMIT = {
    "train": (
        "Answer with less than {n} words.",
        "Your response should contain less than {n} words.",
        "Keep your answer under {n} words.",
    ),
    "heldout": (
        "Use fewer than {n} words in total.",
        "Your reply must be shorter than {n} words.",
        "Stay below {n} words.",
    ),
}


def _word_limit(rng, task, split):
    n = rng.choice(_WORD_LIMITS[split])
    text = rng.choice(_WORD_LIMIT[split]).format(n=n)
    return "length_constraints:number_words", {"num_words": n, "relation": "less than"}, text


_KEYWORD_ONE = {
    "train": (
        "Include the keyword {words} in your response.",
        "Make sure to use the word {words} in your answer.",
        "Your response must contain the word {words}.",
    ),
    "heldout": (
        "Mention {words} somewhere in your reply.",
        "Work the word {words} into what you write.",
        "The word {words} has to appear in your reply.",
    ),
}
_KEYWORDS_MANY = {
    "train": (
        "Include the keywords {words} in the response.",
        "Make sure to use the words {words} in your answer.",
    ),
    "heldout": (
        "Mention both {words} somewhere in your reply.",
        "Your reply has to use each of the words {words}.",
    ),
}


def _include_keywords(rng, task, split):
    k = 1 if rng.random() < 0.6 else 2
    words = sorted(rng.sample(list(task[1]), k))
    table = _KEYWORD_ONE if k == 1 else _KEYWORDS_MANY
    text = rng.choice(table[split]).format(words=_quote_list(words))
    return "keywords:existence", {"keywords": words}, text


_FORBIDDEN_ONE = {
    "train": (
        "Do not include the word {words} in your response.",
        "Do not use the word {words} anywhere in your answer.",
        "Avoid the word {words} in your response.",
    ),
    "heldout": (
        "The word {words} must not appear in your reply.",
        "Write your reply without ever using the word {words}.",
        "Leave the word {words} out of what you write.",
    ),
}
_FORBIDDEN_MANY = {
    "train": (
        "Do not include the keywords {words} in the response.",
        "Do not use the words {words} anywhere in your answer.",
    ),
    "heldout": (
        "Neither of the words {words} may appear in your reply.",
        "Write your reply without using any of these words: {words}.",
    ),
}


def _forbidden_words(rng, task, split):
    k = 1 if rng.random() < 0.6 else 2
    words = sorted(rng.sample(list(task[2]), k))
    table = _FORBIDDEN_ONE if k == 1 else _FORBIDDEN_MANY
    text = rng.choice(table[split]).format(words=_quote_list(words))
    return "keywords:forbidden_words", {"forbidden_words": words}, text


_KEYWORD_FREQUENCY = {
    "train": (
        'In your response, the word "{word}" should appear at least {n} times.',
        'Use the word "{word}" at least {n} times in your answer.',
    ),
    "heldout": (
        'Repeat the word "{word}" {n} or more times in your reply.',
        'Your reply needs the word "{word}" no fewer than {n} times.',
    ),
}


def _keyword_frequency(rng, task, split):
    word = rng.choice(task[1])
    n = rng.choice((2, 3))
    text = rng.choice(_KEYWORD_FREQUENCY[split]).format(word=word, n=n)
    return ("keywords:frequency",
            {"keyword": word, "frequency": n, "relation": "at least"}, text)


_BULLET_COUNTS = {"train": (2, 3, 4), "heldout": (2, 3, 5)}
_BULLETS = {
    "train": (
        "Your answer must contain exactly {n} bullet points. Use the markdown bullet points "
        "such as:\n* This is point 1.\n* This is point 2",
        "Your answer must contain exactly {n} bullet points in markdown format, "
        "each starting with \"* \".",
        "Answer with exactly {n} markdown bullet points (lines starting with \"* \") and "
        "nothing else.",
    ),
    "heldout": (
        "Format your reply as a markdown list of exactly {n} items, one per line, each line "
        "beginning with \"* \".",
        "Give exactly {n} points as a markdown list, for example:\n* first point\n* second point",
    ),
}


def _bullets(rng, task, split):
    n = rng.choice(_BULLET_COUNTS[split])
    text = rng.choice(_BULLETS[split]).format(n=n)
    return "detectable_format:number_bullet_lists", {"num_bullets": n}, text


_END_PHRASES = {
    "train": (
        "Any other questions?",
        "Is there anything else I can help with?",
        "Have a great day!",
        "That is all.",
        "Thanks for reading.",
        "Hope this helps!",
    ),
    "heldout": (
        "Let me know if you need more.",
        "Take care!",
        "Good luck!",
        "See you soon.",
        "That covers it.",
    ),
}
_END_PHRASE = {
    "train": (
        'Finish your response with this exact phrase "{phrase}". No other words should follow '
        'this phrase.',
        'End your answer with the exact phrase "{phrase}", and write nothing after it.',
    ),
    "heldout": (
        'The very last words of your reply must be "{phrase}", written exactly like that.',
        'Close your reply with "{phrase}" word for word and add nothing after it.',
    ),
}


def _end_phrase(rng, task, split):
    phrase = rng.choice(_END_PHRASES[split])
    text = rng.choice(_END_PHRASE[split]).format(phrase=phrase)
    return "startend:end_checker", {"end_phrase": phrase}, text


_QUOTATION = {
    "train": (
        "Wrap your entire response with double quotation marks.",
        "Put your whole answer inside double quotation marks.",
    ),
    "heldout": (
        "Enclose all of your reply in double quotes, from its first character to its last.",
        'Your reply should begin and end with a double quote character (").',
    ),
}


def _quotation(rng, task, split):
    text = rng.choice(_QUOTATION[split])
    return "startend:quotation", {}, text


_TITLE = {
    "train": (
        "Your answer must contain a title, wrapped in double angular brackets, such as "
        "<<poem of joy>>.",
        "Give your answer a title wrapped in double angular brackets, like <<my title>>.",
    ),
    "heldout": (
        "Start with a title inside double angular brackets, for example <<a quiet morning>>.",
        "Put a title between double angular brackets, as in <<the big day>>, at the top of "
        "your reply.",
    ),
}


def _title(rng, task, split):
    text = rng.choice(_TITLE[split])
    return "detectable_format:title", {}, text


_POSTSCRIPT = {
    "train": (
        "At the end of your response, please explicitly add a postscript starting with P.S.",
        "Add a postscript starting with P.S. at the end of your answer.",
    ),
    "heldout": (
        "After the main part of your reply, add a short note that begins with P.S.",
        "Finish with a postscript, introduced by the letters P.S.",
    ),
}


def _postscript(rng, task, split):
    text = rng.choice(_POSTSCRIPT[split])
    return "detectable_content:postscript", {"postscript_marker": "P.S."}, text


_PLACEHOLDERS = {
    "train": (
        "The response must contain at least {amount} represented by square brackets, such as "
        "[address].",
        "Include at least {amount} in square brackets, such as [name].",
    ),
    "heldout": (
        "Leave at least {amount} for details to be filled in later, written in square "
        "brackets like [date].",
        "Your reply needs {amount} or more, each one a word inside square brackets, for "
        "example [city].",
    ),
}


def _placeholders(rng, task, split):
    n = rng.choice((1, 2))
    text = rng.choice(_PLACEHOLDERS[split]).format(amount=_plural(n, "placeholder"))
    return "detectable_content:number_placeholders", {"num_placeholders": n}, text


_HIGHLIGHTS = {
    "train": (
        "Highlight at least {amount} in your answer with markdown, i.e. *highlighted section*.",
        "Highlight at least {amount} of your answer with markdown, like *this part*.",
    ),
    "heldout": (
        "Emphasize at least {amount} of your reply by wrapping it in single asterisks, "
        "as in *key idea*.",
        "Mark at least {amount} as important using markdown italics, written *like so*.",
    ),
}


def _highlights(rng, task, split):
    n = rng.choice((1, 2))
    text = rng.choice(_HIGHLIGHTS[split]).format(amount=_plural(n, "section"))
    return "detectable_format:number_highlighted_sections", {"num_highlights": n}, text


_JSON = {
    "train": (
        "Entire output should be wrapped in JSON format. You can use markdown ticks such "
        "as ```.",
        "Format your entire answer as valid JSON.",
    ),
    "heldout": (
        "Reply only with JSON: the whole output must parse as one JSON value.",
        "Give all of your reply as a JSON object; a ``` code block around it is fine.",
    ),
}


def _json(rng, task, split):
    text = rng.choice(_JSON[split])
    return "detectable_format:json_format", {}, text


_PARAGRAPHS = {
    "train": (
        "There should be {n} paragraphs. Paragraphs are separated with the markdown "
        "divider: ***",
    ),
    "heldout": (
        "Write {n} paragraphs, and put the markdown divider *** on its own line between them.",
        "Split your reply into {n} paragraphs with a line holding only *** between each pair.",
    ),
}


def _paragraphs(rng, task, split):
    n = 2
    text = _one_of(rng, _PARAGRAPHS[split]).format(n=n)
    return "length_constraints:number_paragraphs", {"num_paragraphs": n}, text


_SECTIONS = {
    "train": (
        "Your response must have {n} sections. Mark the beginning of each section with "
        "SECTION X, such as:\nSECTION 1\n[content of section 1]\nSECTION 2\n"
        "[content of section 2]",
    ),
    "heldout": (
        "Organize your reply into {n} sections, and begin each one with its label on its "
        "own line: SECTION 1, SECTION 2 and so on.",
        "Break your reply into {n} numbered sections, each headed by a line that reads "
        "SECTION followed by its number (SECTION 1 for the first).",
    ),
}


def _sections(rng, task, split):
    n = 2
    text = _one_of(rng, _SECTIONS[split]).format(n=n)
    return ("detectable_format:multiple_sections",
            {"section_spliter": "SECTION", "num_sections": n}, text)


# The phrasing tables of each instruction id (the tests check that the splits never share one).
_PHRASINGS = {
    "punctuation:no_comma": (_NO_COMMA,),
    "change_case:english_lowercase": (_LOWERCASE,),
    "change_case:english_capital": (_CAPITALS,),
    "length_constraints:number_words": (_WORD_LIMIT,),
    "keywords:existence": (_KEYWORD_ONE, _KEYWORDS_MANY),
    "keywords:forbidden_words": (_FORBIDDEN_ONE, _FORBIDDEN_MANY),
    "keywords:frequency": (_KEYWORD_FREQUENCY,),
    "detectable_format:number_bullet_lists": (_BULLETS,),
    "startend:end_checker": (_END_PHRASE,),
    "startend:quotation": (_QUOTATION,),
    "detectable_format:title": (_TITLE,),
    "detectable_content:postscript": (_POSTSCRIPT,),
    "detectable_content:number_placeholders": (_PLACEHOLDERS,),
    "detectable_format:number_highlighted_sections": (_HIGHLIGHTS,),
    "detectable_format:json_format": (_JSON,),
    "length_constraints:number_paragraphs": (_PARAGRAPHS,),
    "detectable_format:multiple_sections": (_SECTIONS,),
}


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
    return builder(random.Random(0), _TASKS[0], "train")[0]


_BUILDER_IDS = tuple(_builder_id(b) for b, _ in _BUILDERS)

# The IFEval instruction ids this prompt set uses.
CONSTRAINT_TYPES = _BUILDER_IDS


def _weighted_choice(rng: random.Random, indices: list[int]) -> int:
    weights = [_BUILDERS[i][1] for i in indices]
    return rng.choices(indices, weights=weights, k=1)[0]


def _first_constraint_quota(rng: random.Random, size: int) -> list[int]:
    """The first constraint (a `_BUILDERS` index) of each of `size` prompts, allotted by quota: each
    builder gets its weight's share of `size` (rounded by largest remainder; at least 1 each), in a
    shuffled order. Every constraint type so appears in the split, by construction."""
    total = sum(w for _, w in _BUILDERS)
    counts = [max(1, size * w // total) for _, w in _BUILDERS]
    spare = size - sum(counts)
    if spare < 0:
        raise ValueError(
            f"a split of {size} prompts cannot hold all {len(_BUILDERS)} constraint types"
        )
    # The spare slots go to the builders furthest below their share (size * weight / total).
    shortfall = [size * w - c * total for (_, w), c in zip(_BUILDERS, counts)]
    by_shortfall = sorted(range(len(_BUILDERS)), key=lambda i: -shortfall[i])
    for i in by_shortfall[:spare]:
        counts[i] += 1
    slots = [i for i, c in enumerate(counts) for _ in range(c)]
    rng.shuffle(slots)
    return slots


def _make_record(rng: random.Random, task, split: str,
                 first: int | None = None) -> tuple[str, list[str], list[dict]]:
    n_constraints = 1 if rng.random() < 0.35 else 2
    if first is None:
        first = _weighted_choice(rng, list(range(len(_BUILDERS))))
    chosen = [first]
    if n_constraints == 2:
        first_id = _BUILDER_IDS[first]
        options = [i for i in range(len(_BUILDERS)) if _compatible(first_id, _BUILDER_IDS[i])]
        if options:
            chosen.append(_weighted_choice(rng, options))
    ids, kwargs, texts = [], [], []
    for i in chosen:
        iid, kw, text = _BUILDERS[i][0](rng, task, split)
        ids.append(iid)
        kwargs.append(kw)
        texts.append(text)
    # Constraints whose text ends in an example block ("* This is point 2", "***") go last.
    texts.sort(key=lambda t: "\n" in t or t.endswith("***"))
    content = " ".join([task[0], *texts])
    return content, ids, kwargs


def builtin_prompts(split: str) -> list[dict]:
    """The built-in IFEval-style prompt records of `split` ("train": 400, "heldout": 100).

    Deterministic (a private seeded RNG), fresh lists on every call; the splits share no task and
    no constraint sentence.
    """
    if split not in _SPLIT_SIZES:
        raise ValueError(
            f"unknown builtin prompt split {split!r}; valid splits: {', '.join(SPLITS)}"
        )
    rng = random.Random(_SPLIT_SEEDS[split])
    size = _SPLIT_SIZES[split]
    tasks = _TASKS if split == "train" else _HELDOUT_TASKS
    # Train draws each prompt's first constraint by weight; heldout allots them by quota so that
    # its 100 prompts cover every constraint type (see `_first_constraint_quota`).
    firsts = _first_constraint_quota(rng, size) if split == "heldout" else [None] * size
    records: list[dict] = []
    seen: set[str] = set()
    for n in range(size):
        task = tasks[n % len(tasks)]
        for _ in range(100):
            content, ids, kwargs = _make_record(rng, task, split, firsts[n])
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
