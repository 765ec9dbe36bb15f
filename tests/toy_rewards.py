"""Reward functions for tests on tiny random models, whose gibberish almost never meets an IFEval
constraint; these give every sample a distinct score, so pairs form."""


def lowercase_fraction(prompt_record: dict, output: str) -> float:
    letters = [c for c in output if c.isalpha()]
    return sum(c.islower() for c in letters) / len(letters) if letters else 0.0


def fails_on_long_outputs(prompt_record: dict, output: str) -> float:
    if len(output) > 40:
        raise RuntimeError("too long to judge")
    return lowercase_fraction(prompt_record, output)


def distinct_fraction(prompt_record: dict, output: str) -> float:
    """The share of distinct tokens (words) in the output: high for a random model's varied gibberish, low once
    a model collapses into repeating itself, which a learning rate far too high does."""
    words = output.split()
    return len(set(words)) / len(words) if words else 0.0


# Held-out reward by round (-1: the SFT model): up, then down by more than the guard's tolerance, then up.
REWARD_BY_ROUND = {-1: 0.5, 0: 0.6, 1: 0.3, 2: 0.7}


def falls_in_round_1(prompt_record: dict, output: str) -> float:
    """A reward that rises in round 0 and falls in round 1 whatever the model does (samples carry their round),
    plus a hundredth of `lowercase_fraction` so that pairs form: a run that regresses on cue, to test the guard
    on a tiny model, whose outputs do not regress on cue."""
    return REWARD_BY_ROUND[prompt_record["round"]] + 0.01 * lowercase_fraction(prompt_record, output)
