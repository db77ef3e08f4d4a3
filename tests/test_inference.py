"""The engine's numerics: cached (absorbed) decoding equals recomputation, batching changes nothing."""

from __future__ import annotations

import pytest
import torch

import seekmoe
from seekmoe import ModelConfig
from seekmoe.inference import DecodeCache, Engine, SamplingParams
from seekmoe.inference.engine import Request
from hf_oracle import rel_error

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)
PROMPTS = [[0, 5, 6, 7, 8, 9, 10], [0, 40], [0, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3], [0, 100, 200, 300]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return seekmoe.build_model(ModelConfig.preset("tiny")).eval()


@pytest.fixture(scope="module")
def yarn_model():
    torch.manual_seed(1)
    config = ModelConfig.preset("tiny", q_lora_rank=None, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.707,
        "mscale_all_dim": 0.707})
    return seekmoe.build_model(config).eval()


@pytest.mark.parametrize("which", ["model", "yarn_model"])
@torch.no_grad()
def test_cached_decoding_matches_recomputing_the_whole_sequence_at_every_step(which, request):
    model = request.getfixturevalue(which)
    config = model.config
    cache = DecodeCache.for_model(model, 2, 64, torch.float32)
    # Two rows of different lengths in one batch, right-padded, each with its own positions.
    rows = [torch.randint(2, config.vocab_size, (n,)).tolist() for n in (9, 4)]
    step = cache.step([0, 1], [9, 4], 9)
    tokens = torch.tensor([rows[0], rows[1] + [0] * 5])
    logits = model(tokens, position_ids=step.positions, attn_mask=step.attn_mask, cache=cache.layers(step)).logits
    for i, n in enumerate((9, 4)):
        cache.commit(i, n)
        ref = model(torch.tensor([rows[i]])).logits[0]
        assert rel_error(logits[i, :n], ref) < 1e-4
    for _ in range(20):
        nxt = [int(logits[i, -1 if i == 0 or len(rows[i]) > 4 else 3].argmax()) for i in range(2)]
        for i in range(2):
            rows[i].append(nxt[i])
        step = cache.step([0, 1], [1, 1], 1)
        logits = model(torch.tensor(nxt)[:, None], position_ids=step.positions, attn_mask=step.attn_mask,
                       cache=cache.layers(step)).logits
        for i in range(2):
            cache.commit(i, 1)
            ref = model(torch.tensor([rows[i]])).logits[0, -1]
            assert rel_error(logits[i, 0], ref) < 1e-4


def test_cache_holds_only_the_latent_and_rope_key_per_layer_and_token(model):
    c = model.config
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        cache = DecodeCache.for_model(model, 3, 10, dtype)
        assert cache.bytes_per_token() == (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * size
        assert all(layer.keys() == {"c_kv", "k_pe"} for layer in cache.tensors)
        assert all(layer["c_kv"].shape[-1] == c.kv_lora_rank and layer["k_pe"].shape[-1] == c.qk_rope_head_dim
                   for layer in cache.tensors)


def alone(model, prompt, params=GREEDY, **kwargs):
    return Engine(model, max_batch_size=1, **kwargs).generate([prompt], params)[0].output_ids


def test_engine_greedy_output_equals_argmax_of_recomputed_logits(model):
    out = alone(model, PROMPTS[0])
    full = model(torch.tensor([PROMPTS[0] + out])).logits[0]
    assert full[len(PROMPTS[0]) - 1: -1].argmax(-1).tolist() == out


def test_a_batch_gives_each_request_the_same_tokens_as_running_alone(model):
    batched = Engine(model, max_batch_size=4).generate(PROMPTS, GREEDY)
    assert [r.output_ids for r in batched] == [alone(model, p) for p in PROMPTS]


def test_seeded_sampling_in_a_batch_matches_sampling_alone(model):
    params = [SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=s) for s in range(len(PROMPTS))]
    batched = Engine(model, max_batch_size=4).generate(PROMPTS, params)
    assert [r.output_ids for r in batched] == [alone(model, p, sp) for p, sp in zip(PROMPTS, params)]


def test_a_request_joining_mid_generation_gets_the_same_tokens(model):
    engine = Engine(model, max_batch_size=3)
    first = engine.add(Request(PROMPTS[0], GREEDY))
    for _ in range(5):
        engine.step()
    late = engine.add(Request(PROMPTS[2], GREEDY))
    while engine.active:
        engine.step()
    assert first.output_ids == alone(model, PROMPTS[0]) and late.output_ids == alone(model, PROMPTS[2])


def test_more_prompts_than_slots_are_queued_and_reuse_freed_slots(model):
    out = Engine(model, max_batch_size=2).generate(PROMPTS, GREEDY)
    assert [r.output_ids for r in out] == [alone(model, p) for p in PROMPTS]


def test_end_of_text_stops_generation_and_is_not_output(model):
    out = alone(model, PROMPTS[0])
    engine = Engine(model, max_batch_size=1)
    engine.eos_token_id = out[4]
    (r,) = engine.generate([PROMPTS[0]], GREEDY)
    assert r.output_ids == out[: out.index(out[4])] and r.finish_reason == "stop"
    ignoring = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    assert engine.generate([PROMPTS[0]], ignoring)[0].output_ids == out


def test_generation_stops_at_max_new_tokens_or_the_context_length(model):
    (r,) = Engine(model, max_batch_size=1).generate([PROMPTS[0]], SamplingParams(max_new_tokens=3, temperature=0))
    assert len(r.output_ids) == 3 and r.finish_reason == "length"
    (r,) = Engine(model, max_batch_size=1, max_seq_len=10).generate([PROMPTS[0]], GREEDY)
    assert len(PROMPTS[0]) + len(r.output_ids) == 10 and r.finish_reason == "length"


def test_a_prompt_that_does_not_fit_the_context_is_rejected(model):
    engine = Engine(model, max_batch_size=1, max_seq_len=8)
    with pytest.raises(ValueError, match="prompt has 8 tokens: expected fewer than the context length 8"):
        engine.add(Request(list(range(8))))
    with pytest.raises(ValueError, match="token id 9999"):
        engine.add(Request([0, 9999]))


def test_streaming_yields_the_tokens_one_step_at_a_time(model):
    events = list(Engine(model, max_batch_size=1).stream(PROMPTS[1], GREEDY))
    assert [t for e in events for t in e.token_ids] == alone(model, PROMPTS[1])
    assert all(len(e.token_ids) == 1 for e in events) and events[-1].finished
