"""The sample stage with the Hugging Face sampler, on the tiny random model."""

from alignloop.config import HFSamplerConfig
from alignloop.models import encode_prompt, load_tokenizer
from alignloop.sampling import Sampler
from alignloop.sampling.hf import _decode
from alignloop.stages.sample import sample_records

PROMPTS = [{"prompt_id": "a", "prompt": [{"role": "user", "content": "hello"}], "keep": 1},
           {"prompt_id": "b", "prompt": [{"role": "user", "content": "a much longer prompt than the first one"}]}]


def run(tiny_model, seed, n=3, **sampler):
    sampler = HFSamplerConfig(**{"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 10, "stop": [], "batch_size": 4,
                                 "dtype": "float32", **sampler})
    return sample_records(PROMPTS, tiny_model, Sampler(sampler, seed=0), n=n, round_index=2, seed=seed, progress=None)


def test_n_samples_per_prompt_seeded_and_carrying_prompt_fields(tiny_model):
    a, b, c = run(tiny_model, 0), run(tiny_model, 0), run(tiny_model, 1)
    assert [(r["prompt_id"], r["sample_id"]) for r in a] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    assert [r["output"] for r in a] == [r["output"] for r in b]  # same seed, same samples
    assert [r["output"] for r in a] != [r["output"] for r in c]
    assert a[0]["keep"] == 1 and a[0]["round"] == 2 and a[0]["generator"] == tiny_model
    tok = load_tokenizer(tiny_model)
    assert a[3]["prompt_tokens"] == len(encode_prompt(tok, PROMPTS[1]["prompt"]))
    assert all(r["num_tokens"] <= 10 and r["finish_reason"] in ("stop", "length") for r in a)


def test_greedy_is_deterministic_and_needs_n_1(tiny_model):
    one = run(tiny_model, 0, n=1, temperature=0.0)
    assert [r["output"] for r in one] == [r["output"] for r in run(tiny_model, 5, n=1, temperature=0.0)]
    import pytest

    with pytest.raises(ValueError, match="set n to 1"):
        run(tiny_model, 0, temperature=0.0)


def test_decode_cuts_at_eos_and_stop_strings(tiny_model):
    tok = load_tokenizer(tiny_model)
    ids = tok("one two three", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    assert _decode(tok, ids + [eos, 5, 6], [eos], [], 7) == {"output": "one two three", "finish_reason": "stop", "num_tokens": len(ids), "prompt_tokens": 7}
    assert _decode(tok, ids, [eos], [], 7)["finish_reason"] == "length"
    cut = _decode(tok, ids, [eos], [" two"], 7)
    assert cut["output"] == "one" and cut["finish_reason"] == "stop"
