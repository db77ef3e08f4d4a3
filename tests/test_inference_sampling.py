"""The sampler: greedy, temperature, top-k, top-p, repetition penalty, seeds and parameter validation."""

import pytest
import torch

from seekmoe.inference.sampling import (SamplingParams, greedy_tokens, next_token_probs, sample,
                                       token_logprobs)

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


def test_a_tiny_temperature_is_greedy_not_nan():
    for t in (1e-45, 1e-30, 1e-6):
        probs = next_token_probs(LOGITS, SamplingParams(temperature=t), [])
        assert probs.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_the_top_token_survives_any_top_p():
    for p in (1e-300, 1e-45, 1e-8):
        probs = next_token_probs(LOGITS, SamplingParams(top_p=p), [])
        assert probs.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_extreme_logits_and_penalties_never_give_nan():
    huge = torch.tensor([3e38, -3e38, float("inf"), 1.0])
    for params in (SamplingParams(repetition_penalty=0.01), SamplingParams(temperature=1e-4, top_k=2),
                   SamplingParams(frequency_penalty=2.0, presence_penalty=-2.0)):
        probs = next_token_probs(huge, params, [0, 1, 2], [2, 2])
        assert torch.isfinite(probs).all() and probs.sum().item() == pytest.approx(1.0)
        sample(probs, torch.Generator())
    with pytest.raises(ValueError, match="repetition_penalty=1e-300"):
        SamplingParams(repetition_penalty=1e-300)
    with pytest.raises(ValueError, match="seed="):
        SamplingParams(seed=2**64)


def test_frequency_and_presence_penalties_follow_openai():
    params = SamplingParams(temperature=0, frequency_penalty=0.6, presence_penalty=0.0)
    assert next_token_probs(LOGITS, params, [0, 0], [0, 0]).argmax().item() == 1  # 2.0 - 2 * 0.6 < 1.0


def test_token_logprobs_are_the_log_softmax_of_the_raw_logits():
    logits = torch.stack([LOGITS, LOGITS.flip(0)])
    (a, b) = token_logprobs(logits, [1, 4], 2)
    expected = LOGITS.log_softmax(0)
    assert a.logprob == pytest.approx(expected[1].item()) and b.logprob == pytest.approx(expected[0].item())
    assert [t for t, _ in a.top] == [0, 1] and [t for t, _ in b.top] == [4, 3]


def test_greedy_tokens_pick_what_greedy_sampling_picks_even_for_non_finite_logits():
    """The decode fast path for greedy requests without penalties (greedy_tokens) against the distribution that
    sampling builds: NaN never wins, +inf ties go to the first, all -inf gives token 0."""
    nan, inf = float("nan"), float("inf")
    cases = [torch.randn(50), torch.tensor([nan, 1.0, 3.0, nan]), torch.tensor([1.0, inf, 2.0, inf]),
             torch.tensor([-inf, -inf, -inf]), torch.tensor([nan, nan, -inf]), torch.tensor([2.0, 2.0, 1.0]),
             torch.randn(50).to(torch.bfloat16)]
    params = SamplingParams(temperature=0)
    assert params.plain_greedy and not SamplingParams(temperature=0, repetition_penalty=1.2).plain_greedy
    for logits in cases:
        want = sample(next_token_probs(logits, params, [1, 2]), torch.Generator())
        assert greedy_tokens(logits).item() == want, logits
    batch = torch.randn(3, 4, 50)
    assert greedy_tokens(batch).tolist() == batch.argmax(-1).tolist()
