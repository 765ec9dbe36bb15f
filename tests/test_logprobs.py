"""Response log-probs (`alignloop.logprobs`) on a tiny random Llama with the real SmolLM2 tokenizer: the packed
rows and the output head applied at response positions give the numbers and gradients of the textbook way
(a padded row per response, the model's full logits, log_softmax), which is written out here."""

import pytest
import torch

import alignloop.logprobs as logprobs
from alignloop.logprobs import response_logps, sequence_logps
from alignloop.models import encode_prompt, encode_response, load_causal_lm, load_tokenizer

PROMPT = [{"role": "user", "content": "Say hi in lowercase."}]


def textbook_logps(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Each response token's log-prob from the model's full logits on prompt + response alone."""
    logits = model(torch.tensor([prompt + response])).logits[0].float().log_softmax(-1)
    return torch.stack([logits[len(prompt) + k - 1, t] for k, t in enumerate(response)]) if response else logits.new_zeros(0)


def examples(seed: int = 0):
    """Four prompts of different lengths with 1 to 3 responses each, one of them empty: ragged on purpose."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(0, 40000, (n,), generator=g).tolist()  # noqa: E731
    prompts = [ids(n) for n in (12, 3, 30, 7)]
    responses = [[ids(9), ids(4)], [ids(25)], [ids(5), ids(0), ids(17)], [ids(1), ids(11)]]
    return prompts, responses


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return grads


def test_sequence_logps_sum_only_response_tokens(tiny_model):
    """Checked against a token-by-token log_softmax written out by hand."""
    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model).eval()
    prompt, response = encode_prompt(tok, PROMPT), encode_response(tok, "hi there")
    short = encode_response(tok, "hi")
    with torch.no_grad():
        logps, lengths = sequence_logps(model, [prompt, prompt], [response, short], tok.pad_token_id)
        expected = textbook_logps(model, prompt, response).sum()
    assert lengths.tolist() == [len(response), len(short)]
    assert logps[0].item() == pytest.approx(expected.item(), abs=1e-4)
    assert response[-1] == tok.eos_token_id  # the end-of-turn token is trained on


@pytest.mark.parametrize("chunk, multiple", [(1024, 1), (7, 1), (1024, 64)])
def test_packed_rows_give_the_textbook_logps_and_gradients(tiny_model, monkeypatch, chunk, multiple):
    """Every response of a prompt in one row, the head applied at response positions only (in chunks of 7
    positions, too, so that chunk boundaries fall inside responses; and with the rows padded from 52 to 64
    positions, as on a GPU): each token's log-prob, and the gradient of a weighted sum of them, equal the
    textbook computation, one forward per response, in float32."""
    monkeypatch.setattr(logprobs, "HEAD_CHUNK", chunk)
    monkeypatch.setattr(logprobs, "WIDTH_MULTIPLE", {"cpu": multiple})
    model = load_causal_lm(tiny_model).train()
    assert logprobs._plain_output_head(model) is not None  # the packed path is the one under test
    prompts, responses = examples()
    weights = torch.linspace(-1.0, 1.0, 3)

    logps, mask = response_logps(model, prompts, responses, pad_id=0)
    assert logps.shape == mask.shape == (4, 3, 25)
    (logps * weights[:, None]).sum().backward()
    packed = gradients(model)

    total = 0.0
    for b, (prompt, rs) in enumerate(zip(prompts, responses)):
        for s, r in enumerate(rs):
            expected = textbook_logps(model, prompt, r)
            assert mask[b, s].tolist() == [True] * len(r) + [False] * (25 - len(r))
            assert torch.allclose(logps[b, s, : len(r)], expected, atol=1e-5), (b, s)
            total = total + weights[s] * expected.sum()
        assert not mask[b, len(rs):].any()
    total.backward()
    textbook = gradients(model)
    for name, grad in textbook.items():  # float32 sums in another order: relative to the tensor's largest entry
        assert (packed[name] - grad).abs().max() <= 2e-5 * grad.abs().max(), name


def test_models_the_packed_path_would_get_wrong_take_the_textbook_path(tiny_model):
    """Logit soft-capping (Gemma 2) or an attention that cannot take a custom mask: the plain path, same numbers."""
    model = load_causal_lm(tiny_model).eval()
    prompts, responses = examples(seed=1)
    with torch.no_grad():
        packed, _ = response_logps(model, prompts, responses, pad_id=0)
        model.config.final_logit_softcapping = 30.0  # Llama ignores it; the check must not
        assert logprobs._plain_output_head(model) is None
        model.config.final_logit_softcapping = None
        model.config._attn_implementation = "eager"
        assert logprobs._plain_output_head(model) is None
        plain, mask = response_logps(model, prompts, responses, pad_id=0)
    assert torch.allclose(packed, plain, atol=1e-5)
    assert mask.sum().item() == sum(len(r) for rs in responses for r in rs)


def test_bf16_autocast_keeps_the_head_in_bfloat16_and_the_softmax_in_float32(tiny_model):
    """Under bf16 autocast the packed head multiplies in bfloat16 as the model's own head would: its log-probs
    are those of the textbook path under the same autocast, to bfloat16's precision, and are float32."""
    model = load_causal_lm(tiny_model).eval()
    prompts, responses = examples(seed=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logps, mask = response_logps(model, prompts, responses, pad_id=0)
        expected = torch.cat([textbook_logps(model, p, r) for p, rs in zip(prompts, responses) for r in rs])
    assert logps.dtype == torch.float32
    assert torch.allclose(logps[mask], expected, rtol=2e-2, atol=5e-2)
