"""What the server owes everyone when some clients hog it: idle sockets cannot lock out /health or an
authenticated request, the request cap spares /health, streams cut by a shutdown end with an error event and
[DONE], and a short request is answered while another client's long one runs (counted in engine steps)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from seekmoe.inference import Engine, SamplingParams
from seekmoe.inference.engine import Request
from seekmoe.serve.metrics import Metrics
from seekmoe.serve.scheduler import Scheduler
from test_inference_tokenizer import make_model_dir
from test_server import KEY, raw, start, stop, wait_until


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"), max_position_embeddings=256)


def complete(server, timeout: float = 10, **fields):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=timeout)
    conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "def f(", "max_tokens": 4,
                                                        **fields}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_idle_and_half_sent_sockets_do_not_lock_out_health_or_authenticated_requests(model_dir):
    server, thread = start(Engine.from_pretrained(model_dir, max_batch_size=2), api_key=KEY, max_connections=8)
    address = server.server_address[:2]
    idle = [socket.create_connection(address) for _ in range(30)]
    half = [socket.create_connection(address) for _ in range(10)]
    for s in half:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")  # an unauthenticated head, unfinished
    try:
        for _ in range(3):  # each request's connection evicts the oldest idle ones; it is served at once
            assert raw(server, "GET", "/health", key=None) == (200, {"status": "ok"})
            status, answer = complete(server)
            assert status == 200 and answer["choices"][0]["finish_reason"] == "length"
        closed = 0  # eviction is synchronous with each new connection: no need to wait for it
        for s in idle + half:
            s.settimeout(0.2)
            try:
                closed += s.recv(100) == b""
            except (socket.timeout, ConnectionError):
                pass
        assert closed >= 30  # the server closed them rather than holding 40 sockets against a cap of 8
        assert server.metrics.connections_evicted >= 30
    finally:
        for s in idle + half:
            s.close()
        stop(server, thread)


def test_the_request_cap_answers_503_but_never_to_health(model_dir):
    server, thread = start(Engine.from_pretrained(model_dir, max_batch_size=2), api_key=KEY, max_connections=2)
    streams = []
    try:
        for _ in range(2):  # two long streams are the two requests the cap allows
            status, response = raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "stream": True,
                                                                       "max_tokens": 200, "ignore_eos": True},
                                   stream=True)
            assert status == 200
            response.fp.readline()
            streams.append(response)
        status, answer = complete(server)
        assert status == 503 and "2 requests are already being handled" in answer["error"]["message"]
        assert raw(server, "GET", "/health", key=None) == (200, {"status": "ok"})
    finally:
        for response in streams:
            response.close()
        stop(server, thread)


def slow_steps(engine: Engine, seconds: float) -> None:
    """Make every engine step take at least `seconds` (a stream that outlasts the graceful-shutdown time)."""
    step = engine.step

    def slow():
        time.sleep(seconds)
        return step()

    engine.step = slow


def test_streams_cut_by_the_shutdown_deadline_end_with_an_error_event_and_done(model_dir):
    engine = Engine.from_pretrained(model_dir, max_batch_size=1)
    slow_steps(engine, 0.05)  # 200 tokens: 10 s, far past the 1 s of graceful shutdown
    server, thread = start(engine, graceful_shutdown_s=1)
    status, response = raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "stream": True,
                                                               "max_tokens": 200, "ignore_eos": True},
                           key=None, stream=True)
    assert status == 200
    while not response.fp.readline().startswith(b"data: "):
        pass
    waiting = {}  # a non-streamed request queued behind the stream (the only slot) gets a 503, not a cut
    waiter = threading.Thread(target=lambda: waiting.update(answer=raw(server, "POST", "/v1/completions", {
        "model": "tiny", "prompt": "q", "max_tokens": 4}, key=None)))
    waiter.start()
    assert wait_until(lambda: server.scheduler.queue_depth == 1, 10)
    stopper = threading.Thread(target=stop, args=(server, thread))
    stopper.start()
    rest = response.fp.read()
    stopper.join(timeout=30)
    waiter.join(timeout=30)
    events = [line[6:] for line in rest.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "graceful-shutdown time ran out" in error["message"]
    status, answer = waiting["answer"]
    assert status == 503 and "shutting down" in answer["error"]["message"]


def test_a_short_request_is_served_while_another_clients_long_one_runs(model_dir):
    """One submission of 6 prompts x 60 tokens, then one of 4 tokens, on 2 slots prefilling 8 tokens a step:
    first come first served, the short one waited for all six (about 50 steps); now it takes the first free slot
    and is prefilled at once."""
    engine = Engine.from_pretrained(model_dir, max_batch_size=2, max_prefill_tokens=8)
    scheduler = Scheduler(engine, Metrics())
    steps = [0]
    step = engine.step

    def counted():
        steps[0] += 1
        return step()

    engine.step = counted
    finished: dict[int, int] = {}  # request id -> the step its last event came from

    def deliver(event):
        if event.finished:
            finished[event.request.id] = steps[0]

    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    long = [Request([5 + i] * 60, params) for i in range(6)]
    short = Request([7, 8, 9, 10], params)
    scheduler.submit(long, deliver)
    scheduler.submit([short], deliver)
    scheduler.start()
    try:
        assert wait_until(lambda: len(finished) == 7, 60)
    finally:
        scheduler.stop()
    first_free = min(finished[r.id] for r in long)  # the first slot the long submission gave back
    assert finished[short.id] - first_free <= 5, (finished[short.id], first_free)  # 1 prefill + 3 decode steps
    assert finished[short.id] < max(finished[r.id] for r in long) - 10


def test_the_engine_prefills_a_short_prompt_at_once_beside_a_long_one_and_the_long_one_keeps_going(model_dir):
    engine = Engine.from_pretrained(model_dir, max_batch_size=2, max_prefill_tokens=8)
    params = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)
    long = engine.add(Request(list(range(5, 45)), params))
    engine.step()  # the long prompt alone gets the whole budget
    assert long.prefilled == 8
    short = engine.add(Request([7, 8, 9, 10], params))
    steps = 0
    while not short.done:
        before = long.prefilled
        engine.step()
        steps += 1
        assert long.prefilled - before >= 4  # the oldest keeps its share (8 / 2) while the short one runs
    assert steps == 3  # prefill + first token, then two decode steps: it never waited for the 40-token prefill
    while not long.done:
        engine.step()
    alone = Engine.from_pretrained(model_dir, max_batch_size=1)
    assert short.output_ids == alone.generate([[7, 8, 9, 10]], params)[0].output_ids
    assert long.output_ids == alone.generate([list(range(5, 45))], params)[0].output_ids
