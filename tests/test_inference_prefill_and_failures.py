"""The engine's chunked prefill (a token budget per step) and its failure isolation."""

from __future__ import annotations

import pytest
import torch

import seekmoe
from seekmoe import ModelConfig
from seekmoe.inference import Engine, SamplingParams
from seekmoe.inference.engine import Request

GREEDY = SamplingParams(max_new_tokens=8, temperature=0)
PROMPTS = [[0] + list(range(5, 30)), [0, 40], [0] + [3] * 17]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return seekmoe.build_model(ModelConfig.preset("tiny", num_nextn_predict_layers=1)).eval()


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_chunked_prefill_gives_the_same_tokens_and_prompt_logprobs(model, speculative):
    params = SamplingParams(max_new_tokens=4, temperature=0, logprobs=2, prompt_logprobs=2)
    whole, chunked = (Engine(model, max_batch_size=3, speculative=speculative, max_prefill_tokens=budget)
                      .generate(PROMPTS, params) for budget in (4096, 4))
    for a, b in zip(whole, chunked):
        assert a.output_ids == b.output_ids
        assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
        assert [e.logprob for e in a.prompt_logprobs[1:]] == pytest.approx([e.logprob for e in b.prompt_logprobs[1:]],
                                                                           abs=1e-5)
        assert len(a.logprobs) == len(a.output_ids)


def test_a_long_prompt_does_not_stall_running_decodes(model):
    engine = Engine(model, max_batch_size=2, max_prefill_tokens=4)
    running = engine.add(Request(PROMPTS[1], SamplingParams(max_new_tokens=20, temperature=0)))
    engine.step()
    long = engine.add(Request(PROMPTS[0], GREEDY))
    steps = 0
    while not long.output_ids:
        events = engine.step()
        steps += 1
        assert any(e.request is running and e.token_ids for e in events)  # a token every step meanwhile
    assert steps == -(-len(PROMPTS[0]) // 4)


def test_prompt_logprobs_with_no_new_tokens_score_the_prompt(model):
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=0)
    (r,) = Engine(model, max_batch_size=1, max_prefill_tokens=5).generate([PROMPTS[0]], params)
    assert r.output_ids == [] and r.finish_reason == "length"
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([PROMPTS[0]])).logits[0], -1)
    expected = [logp[i - 1, PROMPTS[0][i]].item() for i in range(1, len(PROMPTS[0]))]
    assert [e.logprob for e in r.prompt_logprobs[1:]] == pytest.approx(expected, abs=1e-5)


def test_a_failing_forward_fails_only_its_requests_and_frees_their_slots(model):
    engine = Engine(model, max_batch_size=3)
    decoding = engine.add(Request(PROMPTS[1], GREEDY))
    engine.step()
    forward = engine._forward

    def fail_prefill(requests, ids, **kwargs):
        if decoding not in requests:
            raise RuntimeError("out of memory (injected)")
        return forward(requests, ids, **kwargs)

    engine._forward = fail_prefill
    new = engine.add(Request(PROMPTS[2], GREEDY))
    events = engine.step()
    assert new.finish_reason == "error" and "injected" in new.error
    assert any(e.request is new and e.finished for e in events)
    assert decoding.finish_reason is None and len(decoding.output_ids) == 2
    assert sorted(engine.free_slots + [decoding.slot]) == [0, 1, 2]
    engine._forward = forward
    while engine.active:
        engine.step()
    assert decoding.finish_reason == "length" and len(engine.free_slots) == 3


def test_fail_all_ends_every_request_and_frees_every_slot(model):
    engine = Engine(model, max_batch_size=2)
    requests = [engine.add(Request(p, GREEDY)) for p in PROMPTS[:2]]
    engine.step()
    events = engine.fail_all("broken")
    assert all(r.finish_reason == "error" for r in requests) and len(events) == 2
    assert engine.active == 0 and len(engine.free_slots) == 2
