"""MTP speculative decoding: greedy output identical to plain greedy, acceptance counted, sampling stays exact."""

from __future__ import annotations

import pytest
import torch

import seekmoe
from seekmoe import ModelConfig
from seekmoe.inference import Engine, SamplingParams
from seekmoe.inference.speculative import verify

GREEDY = SamplingParams(max_new_tokens=16, temperature=0)
PROMPTS = [[0, 5, 6, 7, 8, 9, 10], [0, 40], [0, 3, 3, 3, 3, 3, 3, 3, 3], [0, 100, 200, 300]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return seekmoe.build_model(ModelConfig.preset("tiny")).eval()


def plain(model, prompts, params=GREEDY):
    return [r.output_ids for r in Engine(model, max_batch_size=len(prompts)).generate(prompts, params)]


def test_speculative_greedy_equals_plain_greedy_in_a_batch(model):
    spec = Engine(model, max_batch_size=4, speculative="mtp").generate(PROMPTS, GREEDY)
    assert [r.output_ids for r in spec] == plain(model, PROMPTS)
    assert all(r.drafted > 0 for r in spec)


def test_correct_drafts_are_accepted_and_give_two_tokens_per_forward(model, monkeypatch):
    """With the MTP module replaced by an oracle that drafts plain greedy's next token, every draft is accepted."""
    expected = dict(zip(map(tuple, PROMPTS), plain(model, PROMPTS)))
    engine = Engine(model, max_batch_size=4, speculative="mtp")
    real_draft = engine._draft

    def oracle(hidden, rows):
        real_draft(hidden, rows)  # keeps the MTP cache in step
        for _, r, _ in rows:
            if not r.done:
                r._draft = expected[tuple(r.prompt_ids)][len(r.output_ids)]

    monkeypatch.setattr(engine, "_draft", oracle)
    out = engine.generate(PROMPTS, GREEDY)
    assert [r.output_ids for r in out] == [expected[tuple(p)] for p in PROMPTS]
    for r in out:
        assert r.accepted == r.drafted == r.forwards - 1
        assert len(r.output_ids) / r.forwards > 1.7  # 1 token from the prefill, then 2 a forward


def test_speculative_sampling_with_a_seed_is_reproducible_and_batch_independent(model):
    params = [SamplingParams(max_new_tokens=12, temperature=0.8, seed=s) for s in range(len(PROMPTS))]
    batched = Engine(model, max_batch_size=4, speculative="mtp").generate(PROMPTS, params)
    for p, sp, r in zip(PROMPTS, params, batched):
        assert Engine(model, max_batch_size=1, speculative="mtp").generate([p], sp)[0].output_ids == r.output_ids


def test_verification_samples_exactly_the_target_distribution():
    """Accept the draft with probability p(draft), else draw from p without it: overall, tokens follow p."""
    p = torch.tensor([0.5, 0.3, 0.2])
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([verify(p, 1, g)[1] for _ in range(8000)])
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(freq, p, atol=0.02)
    assert verify(torch.tensor([0.0, 1.0, 0.0]), 1, g) == (True, 1)
    assert verify(torch.tensor([0.0, 1.0, 0.0]), 2, g) == (False, 1)


def test_speculative_decoding_needs_an_mtp_module():
    model = seekmoe.build_model(ModelConfig.preset("tiny", num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        Engine(model, speculative="mtp")
    with pytest.raises(ValueError, match="speculative='medusa'"):
        Engine(model, speculative="medusa")
