"""MTP speculative decoding: greedy output identical to plain greedy, acceptance counted, sampling stays exact."""

from __future__ import annotations

import pytest
import torch

import seekmoe
from seekmoe import ModelConfig
from seekmoe.inference import Engine, SamplingParams
from hf_oracle import rel_error
from seekmoe.inference.speculative import verify

GREEDY = SamplingParams(max_new_tokens=16, temperature=0)
PROMPTS = [[0, 5, 6, 7, 8, 9, 10], [0, 40], [0, 3, 3, 3, 3, 3, 3, 3, 3], [0, 100, 200, 300]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return seekmoe.build_model(ModelConfig.preset("tiny")).eval()


@pytest.fixture(scope="module")
def model3():
    """Three MTP modules: drafts of depth 1 to 3."""
    torch.manual_seed(1)
    return seekmoe.build_model(ModelConfig.preset("tiny", num_nextn_predict_layers=3)).eval()


def plain(model, prompts, params=GREEDY):
    return [r.output_ids for r in Engine(model, max_batch_size=len(prompts)).generate(prompts, params)]


def test_speculative_greedy_equals_plain_greedy_in_a_batch(model):
    spec = Engine(model, max_batch_size=4, speculative="mtp").generate(PROMPTS, GREEDY)
    assert [r.output_ids for r in spec] == plain(model, PROMPTS)
    assert all(r.drafted > 0 for r in spec)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_multi_depth_speculative_greedy_equals_plain_greedy(model3, depth):
    spec = Engine(model3, max_batch_size=4, speculative="mtp", num_speculative_tokens=depth).generate(PROMPTS, GREEDY)
    assert [r.output_ids for r in spec] == plain(model3, PROMPTS)
    assert all(r.drafted > 0 for r in spec)


@pytest.mark.parametrize("depth", [1, 3])
def test_correct_drafts_are_accepted_and_give_depth_plus_one_tokens_per_forward(model3, depth, monkeypatch):
    """With the MTP modules replaced by an oracle that drafts plain greedy's next tokens, every draft is accepted."""
    params = SamplingParams(max_new_tokens=25, temperature=0)
    expected = dict(zip(map(tuple, PROMPTS), plain(model3, PROMPTS, params)))
    engine = Engine(model3, max_batch_size=4, speculative="mtp", num_speculative_tokens=depth)
    engine.drafter.fused = False  # draft through `_draft` every step, so that the oracle can stand in for it
    real_draft = engine._draft

    def oracle(hidden, rows, **kwargs):
        real_draft(hidden, rows, **kwargs)  # keeps the MTP caches in step
        for _, r, _ in rows:
            if not r.done:
                n = len(r.output_ids)
                r._drafts = (expected[tuple(r.prompt_ids)] + [0] * depth)[n: n + depth]

    monkeypatch.setattr(engine, "_draft", oracle)
    out = engine.generate(PROMPTS, params)
    assert [r.output_ids for r in out] == [expected[tuple(p)] for p in PROMPTS]
    for r in out:
        # 1 token from the prefill, then depth + 1 a forward (the last forward may run out of tokens to make).
        assert r.forwards - 1 == -(-(25 - 1) // (depth + 1))
        assert r.accepted >= r.drafted - depth


@torch.no_grad()
def reference_draft_logits(model, tokens: list[int], drafts: list[int]) -> list[torch.Tensor]:
    """The drafts' logits by definition, with no cache: the main model over the whole sequence t_0..t_{P+1}, then
    module k over positions 0..P fed t_{j+k} (the given drafts standing in for tokens not yet known), at P."""
    body = model.model
    P = len(tokens) - 2
    h = model(torch.tensor([tokens])).hidden_states[:, : P + 1]
    cos, sin = body.rotary_emb(torch.arange(P + 1))
    known, logits = list(tokens) + list(drafts), []
    for k, mtp in enumerate(body.mtp[: len(drafts)], start=1):
        h, _ = mtp(h, body.embed_tokens(torch.tensor([known[k: k + P + 1]])), cos, sin)
        logits.append(model.lm_head(mtp.shared_head["norm"](h[0, -1])))
    return logits


def test_cached_drafts_equal_the_drafts_recomputed_from_scratch(model3, monkeypatch):
    """Every step's draft logits, made incrementally over three trailing MTP caches, equal those of the whole
    sequence. Two of the prompts then have their drafts swapped for the right answers, so that the sequence advances
    by several tokens a step there and by one (rejected drafts) in the others."""
    params = SamplingParams(max_new_tokens=14, temperature=0)
    expected = dict(zip(map(tuple, PROMPTS), plain(model3, PROMPTS, params)))
    engine = Engine(model3, max_batch_size=4, speculative="mtp", max_prefill_tokens=5)
    engine.drafter.fused = False  # the drafts of the one-forward greedy step are checked against these below
    real_draft, real_mtp, logits, checked = engine._draft, engine.forwards.mtp, [], []

    def recording_mtp(*args):
        h, lg = real_mtp(*args)
        logits.append(lg)
        return h, lg

    def checking(hidden, rows, **kwargs):
        logits.clear()
        real_draft(hidden, rows, eager=False)  # through forwards.mtp, recorded
        running = [r for _, r, _ in rows if not r.done]
        for i, r in enumerate(running):
            if r.prefilled < len(r.prompt_ids):
                continue
            want = reference_draft_logits(model3, r.prompt_ids + r.output_ids, r._drafts)
            assert len(r._drafts) == 3 and all(rel_error(logits[k][i], want[k]) < 1e-5 for k in range(3))
            assert r._drafts == [int(lg[i].argmax()) for lg in logits]
            checked.append(r.drafted)
            if PROMPTS.index(r.prompt_ids) % 2 == 0:
                n = len(r.output_ids)
                r._drafts = (expected[tuple(r.prompt_ids)] + [0] * 3)[n: n + 3]

    monkeypatch.setattr(engine.forwards, "mtp", recording_mtp)
    monkeypatch.setattr(engine, "_draft", checking)
    out = engine.generate(PROMPTS, params)
    assert [r.output_ids for r in out] == [expected[tuple(p)] for p in PROMPTS]
    assert len(checked) > 10 and out[0].accepted > 6 and out[1].accepted < out[1].drafted


@pytest.fixture(scope="module")
def trained3():
    """A tiny model with three MTP modules, trained for a few steps on a cycle of 11 tokens: its drafts are right
    often enough, and wrong often enough, for every acceptance count to occur."""
    torch.manual_seed(1)
    model = seekmoe.build_model(ModelConfig.preset("tiny", num_nextn_predict_layers=3))
    cycle = torch.randperm(200)[:11] + 2
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(20):
        x = torch.stack([cycle.roll(-int(o)).repeat(6)[:64] for o in torch.randint(0, 11, (4,))])
        model(x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), cycle.tolist()


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_one_forward_greedy_steps_equal_verifying_and_drafting_apart(trained3, depth):
    """MTPDrafter.greedy_step (verify, accept and draft inside one forward) against the step-by-step path: the same
    tokens, drafts verified, drafts accepted and forwards for every request, with chunked prefill in the batch."""
    model, cycle = trained3
    prompts = [cycle[:5], cycle[3:4], cycle[2:9] + cycle[:6], [0, 5, 6]]
    params = SamplingParams(max_new_tokens=20, temperature=0)
    runs = []
    for fused in (False, True):
        engine = Engine(model, max_batch_size=4, speculative="mtp", num_speculative_tokens=depth,
                        max_prefill_tokens=5)
        engine.drafter.fused = fused
        runs.append([(r.output_ids, r.drafted, r.accepted, r.forwards) for r in engine.generate(prompts, params)])
    assert runs[1] == runs[0]
    assert [out for out, *_ in runs[1]] == plain(model, prompts, params)
    accepted = [a for _, _, a, _ in runs[1]]
    assert sum(accepted) > 10 and any(a < d for _, d, a, _ in runs[1])  # drafts both accepted and rejected


def test_num_speculative_tokens_is_checked(model3):
    with pytest.raises(ValueError, match="num_speculative_tokens=4.*3 MTP"):
        Engine(model3, speculative="mtp", num_speculative_tokens=4)
    with pytest.raises(ValueError, match="speculative is off"):
        Engine(model3, num_speculative_tokens=2)


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
