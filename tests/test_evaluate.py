"""The held-out evaluation's KL to the reference (`alignloop.stages.evaluate`), against a plain per-sequence
computation on a real (tiny) model."""

import pytest
import torch

from alignloop.models import encode_prompt, encode_response, load_causal_lm, load_tokenizer
from alignloop.stages.evaluate import kl_along_answers


@pytest.fixture(scope="module")
def perturbed_model(tiny_model, tmp_path_factory):
    """The tiny model with noise added to every weight: a policy that has moved from its reference."""
    model = load_causal_lm(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("perturbed")
    model.save_pretrained(folder, safe_serialization=True)
    load_tokenizer(tiny_model).save_pretrained(folder)
    return str(folder)


def test_kl_along_answers_matches_a_per_sequence_computation(tiny_model, perturbed_model):
    answers = [{"prompt": [{"role": "user", "content": text}], "output": out}
               for text, out in [("Say hi.", "hi there"), ("Count to three, please, slowly.", "one, two, three"),
                                 ("?", "A much longer answer that goes on for a while, with words.")]]
    tokenizer = load_tokenizer(tiny_model)
    policy, reference = load_causal_lm(perturbed_model).eval(), load_causal_lm(tiny_model).eval()
    expected = []
    with torch.no_grad():
        for a in answers:  # one unpadded sequence at a time, the full next-token distributions
            prompt, answer = encode_prompt(tokenizer, a["prompt"]), encode_response(tokenizer, a["output"])
            ids = torch.tensor([prompt + answer])
            p = torch.log_softmax(policy(ids).logits[0, len(prompt) - 1 : -1].float(), -1)
            q = torch.log_softmax(reference(ids).logits[0, len(prompt) - 1 : -1].float(), -1)
            expected.append(float((p.exp() * (p - q)).sum()))
    assert min(expected) > 0
    got = kl_along_answers(answers, perturbed_model, tiny_model, batch_size=2, bf16_autocast=False)
    assert got == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    assert kl_along_answers(answers, tiny_model, tiny_model, batch_size=2, bf16_autocast=False) == pytest.approx(0.0, abs=1e-6)
