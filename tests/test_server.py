"""The OpenAI-compatible server, driven by the official `openai` client and by raw HTTP for what it rejects."""

from __future__ import annotations

import http.client
import json
import threading
import time

import openai
import pytest

from seekmoe.inference import Engine, SamplingParams
from seekmoe.serve import make_server
from test_inference_tokenizer import make_model_dir

KEY = "test-key"


def start(engine: Engine, **kwargs):
    server = make_server(engine, "tiny", "127.0.0.1", 0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def stop(server, thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"), max_position_embeddings=4096)


@pytest.fixture(scope="module")
def server(model_dir):
    server, thread = start(Engine.from_pretrained(model_dir, max_batch_size=4, speculative="mtp"), api_key=KEY)
    yield server
    stop(server, thread)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def raw(server, method: str, path: str, body=None, key: str | None = KEY, stream: bool = False):
    """(status, parsed body or the response itself when stream=True) of one plain HTTP request."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    if stream:
        return response.status, response
    text = response.read().decode()
    conn.close()
    return response.status, (json.loads(text) if text.startswith("{") else text)


def metric(server, name: str) -> float:
    _, text = raw(server, "GET", "/metrics")
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert raw(server, "GET", "/health", key=None) == (200, {"status": "ok"})


def test_completion_with_usage_matches_the_engine(client, model_dir):
    out = client.completions.create(model="tiny", prompt="def main(", max_tokens=8, temperature=0)
    engine = Engine.from_pretrained(model_dir, max_batch_size=1)
    prompt_ids = engine.tokenizer.encode("def main(")
    (expected,) = engine.generate([prompt_ids], SamplingParams(max_new_tokens=8, temperature=0))
    assert out.choices[0].text == expected.text
    assert out.choices[0].finish_reason == expected.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt_ids), len(expected.output_ids))
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_completion(client):
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=6, temperature=0)
    assert out.choices[0].message.role == "assistant" and isinstance(out.choices[0].message.content, str)
    assert 0 < out.usage.completion_tokens <= 6


def test_streamed_completion_equals_the_unstreamed_one(client):
    args = dict(model="tiny", prompt="import os\n", max_tokens=10, temperature=0)
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(stream=True, **args))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens > 0


def test_streamed_chat_sends_deltas_and_usage(client):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason in ("length", "stop")


def test_concurrent_requests_share_decode_steps(client, server):
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(client.completions.create(
        model="tiny", prompt=f"x = {i}", max_tokens=40, temperature=0))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and metric(server, "seekmoe_max_batch") > 1


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),  # OpenAI: an unknown model is 404
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x " * 5000}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "bot", "content": "hi"}]}, 400, "messages"),
    ("/v1/nothing", {}, 404, None),
])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, client, path, body, status, param):
    got, answer = raw(server, "POST", path, body)
    assert got == status and answer["error"]["param"] == param and answer["error"]["message"]
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).choices


def test_requests_without_the_api_key_get_401(server):
    for key in (None, "wrong"):
        status, answer = raw(server, "GET", "/v1/models", key=key)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_metrics_count_requests_tokens_and_acceptance(client, server):
    client.completions.create(model="tiny", prompt="a", max_tokens=4)
    _, text = raw(server, "GET", "/metrics")
    for name in ("seekmoe_requests_total{", "seekmoe_generation_tokens_total", "seekmoe_request_latency_seconds_bucket",
                 "seekmoe_queue_depth", "seekmoe_spec_acceptance_rate"):
        assert name in text
    assert metric(server, "seekmoe_generation_tokens_total") > 0 and metric(server, "seekmoe_spec_drafted_tokens_total") > 0


def open_stream(server, max_tokens: int = 3000):
    status, response = raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "long", "stream": True,
                                                               "max_tokens": max_tokens, "temperature": 1.0,
                                                               "seed": 0}, stream=True)
    assert status == 200
    response.fp.readline()  # the first event has arrived: the request holds a slot
    return response


def wait_until(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_disconnects_mid_stream_frees_its_slot(model_dir):
    server, thread = start(Engine.from_pretrained(model_dir, max_batch_size=1))
    try:
        response = open_stream(server)
        assert server.engine.active == 1
        response.close()
        assert wait_until(lambda: server.engine.active == 0)
        assert server.metrics.generation_tokens == 0  # it was cancelled, not finished
    finally:
        stop(server, thread)


def test_a_full_queue_answers_503_and_recovers(model_dir):
    server, thread = start(Engine.from_pretrained(model_dir, max_batch_size=1), max_queue=1)
    try:
        running = open_stream(server)  # holds the only slot
        waiting = threading.Thread(target=lambda: raw(server, "POST", "/v1/completions",
                                                      {"model": "tiny", "prompt": "q", "max_tokens": 1}))
        waiting.start()
        assert wait_until(lambda: server.scheduler.queue_depth == 1)
        status, answer = raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "q", "max_tokens": 1})
        assert status == 503 and answer["error"]["type"] == "server_error"
        running.close()
        waiting.join(timeout=30)
        assert raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "q", "max_tokens": 1})[0] == 200
    finally:
        stop(server, thread)


def test_the_serve_command_reads_the_key_from_the_environment_and_stops_on_sigterm(model_dir):
    import os
    import re
    import signal
    import subprocess
    import sys

    env = dict(os.environ, SEEKMOE_API_KEY="env-key")
    launch = "import sys; from seekmoe.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", launch, "serve", "--model", str(model_dir), "--port", "0",
                             "--model-name", "tiny", "--compile", "off"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        host, port = re.search(r"http://([\d.]+):(\d+)", line).groups()

        class Address:
            server_address = (host, int(port))

        assert raw(Address, "GET", "/v1/models", key=None)[0] == 401
        assert raw(Address, "GET", "/v1/models", key="env-key")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_openapi_describes_the_request_schemas(server):
    status, spec = raw(server, "GET", "/openapi.json", key=None)
    assert status == 200
    schemas = spec["components"]["schemas"]
    assert {"prompt", "logprobs", "echo", "max_tokens"} <= set(schemas["CompletionRequest"]["properties"])
    assert "top_logprobs" in schemas["ChatCompletionRequest"]["properties"]
    assert "/v1/chat/completions" in spec["paths"]
