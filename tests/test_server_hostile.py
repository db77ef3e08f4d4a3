"""The server under hostile or unlucky traffic: each case found by the review of issue 9 has a regression test,
plus schema fuzzing, many concurrent streams with disconnects, and draining on shutdown."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seekmoe.inference import Engine
from seekmoe.serve import server as server_module
from test_inference_tokenizer import make_model_dir
from test_server import KEY, metric, raw, start, stop, wait_until


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"), max_position_embeddings=256)


@pytest.fixture(scope="module")
def server(model_dir):
    server, thread = start(Engine.from_pretrained(model_dir, max_batch_size=8, max_prefill_tokens=16), api_key=KEY,
                           max_queue=64)
    yield server
    stop(server, thread)


def complete(server, **fields):
    return raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "def f(", "max_tokens": 4, **fields})


def healthy_and_idle(server) -> bool:
    return raw(server, "GET", "/health")[0] == 200 and metric(server, "seekmoe_running_requests") == 0 \
        and server.engine.active == 0 and len(server.engine.free_slots) == server.engine.cache.batch_size


def test_tiny_temperature_and_top_p_are_greedy_not_nan(server):
    greedy = complete(server, temperature=0)[1]["choices"][0]["text"]
    for fields in ({"temperature": 1e-45}, {"top_p": 1e-300}, {"temperature": 1e-45, "top_p": 1e-300}):
        status, answer = complete(server, **fields)
        assert status == 200, answer
        if "temperature" in fields:
            assert answer["choices"][0]["text"] == greedy
    assert healthy_and_idle(server)


@pytest.mark.parametrize("fields, param", [
    ({"repetition_penalty": 1e-300}, "repetition_penalty"), ({"seed": 2**64}, "seed"), ({"max_tokens": True}, "max_tokens"),
    ({"stop": ["x"] * 80_000}, "stop"), ({"stop": "y" * 10_000}, "stop"), ({"temperature": float("1e400")}, None),
    ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"), ({"prompt": [-1]}, "prompt"), ({"n": 2}, "n"),
    ({"logprobs": 100}, "logprobs"), ({"prompt": "x" * 900_000}, "prompt"),
])
def test_hostile_fields_are_400s_naming_the_field(server, fields, param):
    status, answer = complete(server, **fields)
    assert status == 400, answer
    assert param is None or answer["error"]["param"] == param
    assert "Traceback" not in answer["error"]["message"] and len(answer["error"]["message"]) < 2000


@pytest.mark.parametrize("body", [
    b'{"model": "tiny", "prompt": "\\ud800"}',  # a lone surrogate
    b'{"model": "tiny", "prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}",  # beyond Python's int parsing limit
    b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than the recursion limit
    b'{"model": "tiny", "prompt": "a", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b"\xff\xfe not utf-8",
    b"null",
])
def test_malformed_bodies_are_400s_without_internal_text(server, body):
    status, answer = raw(server, "POST", "/v1/completions", body)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    assert healthy_and_idle(server)


def test_oversized_and_chunked_bodies(server):
    with socket.create_connection(server.server_address[:2]) as sock:  # answered before the body is sent
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                     b"Content-Length: %d\r\n\r\n" % (KEY.encode(), 2 << 20))
        (answer,) = read_responses(sock, 1)
    assert answer.startswith(b"HTTP/1.1 413")
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    body = json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 2}).encode()
    conn.request("POST", "/v1/completions", body=iter([body[:10], body[10:]]),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                 encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["choices"]
    conn.close()


def read_responses(sock: socket.socket, count: int) -> list[bytes]:
    """The raw bytes of `count` responses on one connection (Content-Length framed)."""
    data, out = b"", []
    sock.settimeout(10)
    while len(out) < count:
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, data = data.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(data) < length:
            data += sock.recv(65536)
        out.append(head + b"\r\n\r\n" + data[:length])
        data = data[length:]
    return out


@pytest.mark.parametrize("first", [b"POST /v1/models HTTP/1.1", b"POST /v1/nothing HTTP/1.1", b"PUT /health HTTP/1.1"])
def test_an_error_answer_reads_the_body_so_it_is_not_the_next_request(server, first):
    """401/404/405 bodies must not be parsed as the next request on a keep-alive connection (smuggling)."""
    smuggled = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(server.server_address[:2]) as sock:
        sock.sendall(first + b"\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled
                     + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first_answer, second = read_responses(sock, 2)
    assert first_answer.split(b" ")[1] in (b"401", b"404", b"405")
    assert second.startswith(b"HTTP/1.1 200") and second.endswith(b'{"status":"ok"}')


def test_half_sent_requests_are_dropped_and_others_are_served(server, monkeypatch):
    monkeypatch.setattr(server_module.TimedH11Protocol, "header_timeout_s", 0.5)
    socks = [socket.create_connection(server.server_address[:2]) for _ in range(20)]
    try:
        for s in socks:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        assert complete(server)[0] == 200
        for s in socks:
            s.settimeout(5)
            assert s.recv(100) == b""  # the server closed it
    finally:
        for s in socks:
            s.close()


def test_a_failing_engine_step_fails_only_its_requests_and_frees_their_slots(model_dir):
    server, thread = start(Engine.from_pretrained(model_dir, max_batch_size=2), max_queue=4)
    engine, failures = server.engine, [0]
    forward = engine._forward

    def flaky(requests, ids, **kwargs):
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("injected")
        return forward(requests, ids, **kwargs)

    engine._forward = flaky
    try:
        failures[0] = 1
        status, answer = complete(server)
        assert status == 500 and "injected" not in answer["error"]["message"]
        assert healthy_and_idle(server) and complete(server)[0] == 200
        failures[0] = 10**6  # a broken engine: every step fails
        assert complete(server)[0] == 500
        for _ in range(3):
            complete(server)
        assert raw(server, "GET", "/health")[0] == 503
        failures[0] = 0
        assert complete(server)[0] == 200 and healthy_and_idle(server)
    finally:
        stop(server, thread)


def test_health_reports_a_wedged_step(server):
    server.scheduler._step_started = time.monotonic() - 10 * server.scheduler.wedged_after
    try:
        status, answer = raw(server, "GET", "/health")
        assert status == 503 and "running for over" in answer["reason"]
    finally:
        server.scheduler._step_started = None


def test_a_non_streaming_client_that_disconnects_frees_its_slot(server):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 200,
                                                        "ignore_eos": True}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert wait_until(lambda: server.engine.active == 1, 10)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert wait_until(lambda: server.engine.active == 0, 10)
    assert healthy_and_idle(server)


def stream_events(server, max_tokens: int, drop_after: int | None = None) -> list[bytes]:
    """The SSE lines of one streamed completion; closes the connection after `drop_after` events if given."""
    status, response = raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "stream": True,
                                                               "max_tokens": max_tokens, "ignore_eos": True},
                           stream=True)
    assert status == 200
    lines = []
    while True:
        line = response.fp.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            lines.append(line.strip())
            if drop_after is not None and len(lines) >= drop_after:
                response.close()
                break
    return lines


def test_64_concurrent_streams_with_a_quarter_disconnecting(server):
    results: dict[int, list[bytes]] = {}
    errors = []

    def client(i: int) -> None:
        try:
            results[i] = stream_events(server, 24, drop_after=3 if i % 4 == 0 else None)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 64
    for i, lines in results.items():
        if i % 4:
            assert lines[-1] == b"data: [DONE]"
            assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert wait_until(lambda: server.engine.active == 0 and server.scheduler.queue_depth == 0, 20)
    assert healthy_and_idle(server)


def test_shutdown_drains_streams_with_done(model_dir):
    server, thread = start(Engine.from_pretrained(model_dir, max_batch_size=2))
    status, response = raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "stream": True,
                                                               "max_tokens": 200, "ignore_eos": True},
                           key=None, stream=True)
    assert status == 200
    while not response.fp.readline().startswith(b"data: "):  # the stream has begun (chunked framing lines)
        pass
    stopper = threading.Thread(target=stop, args=(server, thread))
    stopper.start()
    rest = response.fp.read()  # raw, until the server closes the connection
    stopper.join(timeout=60)
    assert b'"finish_reason":"length"' in rest and b"data: [DONE]" in rest


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                       max_size=4), max_leaves=8)
FIELDS = {"prompt": st.text(max_size=30) | st.lists(st.integers(-2, 600), max_size=5) | JSON,
          "max_tokens": st.integers(-2, 6) | JSON, "temperature": st.floats(allow_nan=False) | JSON,
          "top_p": st.floats(allow_nan=False) | JSON, "logprobs": st.integers(-1, 25) | JSON, "echo": JSON,
          "stop": st.lists(st.text(max_size=5), max_size=3) | JSON, "seed": st.integers() | JSON, "stream": JSON,
          "n": JSON, "repetition_penalty": st.floats(allow_nan=False) | JSON, "top_k": JSON,
          "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "x"]),
                                                      "content": st.text(max_size=10)}), max_size=2) | JSON}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(chat=st.booleans(), body=st.fixed_dictionaries({"model": st.just("tiny")},
                                                      optional=FIELDS))
def test_fuzzed_requests_never_get_a_5xx(server, chat, body):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    status, answer = raw(server, "POST", path, body)
    assert status < 500, (body, answer)


def test_after_fuzzing_the_server_is_healthy_and_idle(server):
    assert wait_until(lambda: server.engine.active == 0, 20) and healthy_and_idle(server)
