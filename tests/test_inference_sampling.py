"""The sampler: greedy, temperature, top-k, top-p, repetition penalty, seeds and parameter validation."""

import pytest
import torch

from seekmoe.inference.sampling import SamplingParams, next_token_probs, sample

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])


def test_greedy_is_one_hot_on_the_argmax():
    probs = next_token_probs(LOGITS, SamplingParams(temperature=0), [])
    assert probs.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert sample(probs, torch.Generator()) == 0


def test_top_k_keeps_only_the_k_likeliest_tokens():
    probs = next_token_probs(LOGITS, SamplingParams(top_k=2), [])
    assert (probs[2:] == 0).all() and probs[:2].sum().item() == pytest.approx(1.0)


def test_top_p_keeps_the_smallest_set_reaching_p():
    full = LOGITS.softmax(0)
    probs = next_token_probs(LOGITS, SamplingParams(top_p=float(full[0]) + 1e-3), [])
    assert (probs > 0).tolist() == [True, True, False, False, False]
    assert next_token_probs(LOGITS, SamplingParams(top_p=0.01), []).tolist()[0] == pytest.approx(1.0)


def test_repetition_penalty_makes_seen_tokens_less_likely():
    params = SamplingParams(temperature=0, repetition_penalty=4.0)
    assert next_token_probs(LOGITS, params, [0]).argmax().item() == 1  # 2.0 / 4 < 1.0
    negative = torch.tensor([-1.0, -1.5])
    assert next_token_probs(negative, params, [0]).argmax().item() == 1  # -1 * 4 < -1.5


def test_a_seed_makes_sampling_reproducible():
    params = SamplingParams(temperature=1.0, seed=7)
    probs = next_token_probs(torch.zeros(50), params, [])
    draws = [[sample(probs, g) for _ in range(20)] for g in (params.generator(), params.generator())]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


@pytest.mark.parametrize("field, value", [("max_new_tokens", -1), ("temperature", -0.5), ("top_p", 0.0),
                                          ("top_p", 1.5), ("top_k", -2), ("repetition_penalty", 0),
                                          ("stop", "END"), ("seed", 1.5)])
def test_invalid_sampling_parameters_name_the_value(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        SamplingParams(**{field: value})
