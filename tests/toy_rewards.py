"""Reward functions for tests on tiny random models, whose gibberish almost never meets an IFEval
constraint; these give every sample a distinct score, so pairs form."""


def lowercase_fraction(prompt_record: dict, output: str) -> float:
    letters = [c for c in output if c.isalpha()]
    return sum(c.islower() for c in letters) / len(letters) if letters else 0.0


def fails_on_long_outputs(prompt_record: dict, output: str) -> float:
    if len(output) > 40:
        raise RuntimeError("too long to judge")
    return lowercase_fraction(prompt_record, output)
