"""The legacy /v1/completions API as evaluation harnesses use it, and chat log-probabilities, via the openai client.

Log-probabilities are checked against a plain forward pass of the model: the log-softmax of its raw logits.
"""

from __future__ import annotations

import math

import openai
import pytest
import torch

import seekmoe
from seekmoe.inference import Engine
from test_server import KEY, raw, start, stop
from test_inference_tokenizer import make_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"), max_position_embeddings=256)


@pytest.fixture(scope="module")
def server(model_dir):
    # a small prefill budget: prompts here take several chunks, which must not change any log-probability
    server, thread = start(Engine.from_pretrained(model_dir, max_batch_size=4, max_prefill_tokens=5), api_key=KEY)
    yield server
    stop(server, thread)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(model_dir):
    return seekmoe.from_pretrained(model_dir).eval()


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of the raw logits of one plain forward: [len(ids), vocab]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_every_prompt_form_gets_one_choice_per_prompt_in_order(client, server):
    tok = server.engine.tokenizer
    texts = ["def f(x):", "import os", "class A:"]
    greedy = dict(model="tiny", max_tokens=4, temperature=0)
    one = [client.completions.create(prompt=t, **greedy).choices[0].text for t in texts]
    for prompt in (texts, [tok.encode(t) for t in texts]):
        out = client.completions.create(prompt=prompt, **greedy)
        assert [c.index for c in out.choices] == [0, 1, 2]
        assert [c.text for c in out.choices] == one
    single_ids = client.completions.create(prompt=tok.encode(texts[1]), **greedy)
    assert [c.text for c in single_ids.choices] == [one[1]]
    assert out.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)


def test_echo_with_max_tokens_0_scores_the_prompt_like_a_forward_pass(client, server, model):
    text = "def main(argv):\n    return json.dumps(argv)"
    ids = server.engine.tokenizer.encode(text)
    out = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=3)
    choice = out.choices[0]
    assert choice.text == text and out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = forward_logprobs(model, ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(expected[i - 1, ids[i]].item(), abs=1e-5)
        top = expected[i - 1].topk(3)
        assert sorted(lp.top_logprobs[i].values(), reverse=True)[:3] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < len(text)
    last = server.engine.tokenizer.pieces(ids)[-1]
    assert text[lp.text_offset[-1]:] == last


def test_generated_logprobs_are_the_models_not_the_samplers(client, server, model):
    """With temperature and top-k the sampler's distribution differs; the reported logprobs must not."""
    prompt_ids = server.engine.tokenizer.encode("for i in range(")
    out = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=5, temperature=1.7, top_p=0.5,
                                    seed=3, logprobs=2, echo=True, extra_body={"top_k": 3})
    lp = out.choices[0].logprobs
    generated = len(lp.tokens) - len(prompt_ids)
    assert generated == out.usage.completion_tokens > 0
    full = prompt_ids + _generated_ids(server, out)
    expected = forward_logprobs(model, full)
    for i in range(1, len(full)):
        assert lp.token_logprobs[i] == pytest.approx(expected[i - 1, full[i]].item(), abs=1e-5)
    assert all(len(t) <= 3 for t in lp.top_logprobs[1:])  # 2 alternatives + the sampled token


def _generated_ids(server, out) -> list[int]:
    """The completion's token ids, read back from the token strings the server reported (distinct per id)."""
    tok = server.engine.tokenizer
    vocab = {tok.token_text(i): i for i in range(server.engine.config.vocab_size)}
    tokens = out.choices[0].logprobs.tokens[-out.usage.completion_tokens:]
    return [vocab[t] for t in tokens]


def test_streamed_logprobs_equal_the_unstreamed_ones(client):
    args = dict(model="tiny", prompt="x = [", max_tokens=6, temperature=0, logprobs=1)
    whole = client.completions.create(**args).choices[0].logprobs
    chunks = [c for c in client.completions.create(stream=True, **args) if c.choices and c.choices[0].logprobs]
    streamed = [lp for c in chunks for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.token_logprobs, abs=1e-6)


def test_chat_logprobs_follow_openais_shape(client, server):
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the argmax
        assert isinstance(entry.bytes, list)
    assert math.fsum(math.exp(t.logprob) for t in content[0].top_logprobs) <= 1 + 1e-6
    status, answer = raw(server, "POST", "/v1/chat/completions",
                         {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2})
    assert status == 400 and answer["error"]["param"] == "top_logprobs"


def test_prompt_plus_max_tokens_beyond_the_context_is_a_400(server):
    status, answer = raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 1000})
    assert status == 400 and answer["error"]["param"] == "max_tokens"
    assert answer["error"]["code"] == "context_length_exceeded"
