"""Server metrics in the Prometheus text exposition format: requests, tokens, latency, queue, MTP acceptance."""

from __future__ import annotations

import threading
from collections import Counter

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Thread-safe counters and gauges; `render()` is what GET /metrics answers."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.latency_buckets = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.decode_steps = 0
        self.batched_rows = 0  # requests summed over steps: batched_rows / decode_steps is the mean batch
        self.max_batch = 0
        self.drafted = 0
        self.accepted = 0
        self.queue_depth = 0
        self.running = 0
        self.connections_evicted = 0  # idle connections closed to make room under --max-connections

    def request_done(self, endpoint: str, status: int) -> None:
        """Count one answered HTTP request."""
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def completion_done(self, seconds: float, prompt: int, generated: int, drafted: int, accepted: int) -> None:
        """Add a finished completion's latency and token counts."""
        with self._lock:
            self.latency_sum += seconds
            self.latency_count += 1
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self.latency_buckets[i] += 1
            self.prompt_tokens += prompt
            self.generation_tokens += generated
            self.drafted += drafted
            self.accepted += accepted

    def connection_evicted(self) -> None:
        """Count one idle connection closed to make room."""
        with self._lock:
            self.connections_evicted += 1

    def step(self, batch: int, queue_depth: int, running: int) -> None:
        """Record one engine step over `batch` requests."""
        with self._lock:
            self.decode_steps += 1
            self.batched_rows += batch
            self.max_batch = max(self.max_batch, batch)
            self.queue_depth, self.running = queue_depth, running

    def render(self) -> str:
        """The Prometheus exposition text."""
        with self._lock:
            lines = ["# HELP seekmoe_requests_total HTTP requests answered, by endpoint and status.",
                     "# TYPE seekmoe_requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'seekmoe_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            lines += _metric("seekmoe_prompt_tokens_total", "counter", "Prompt tokens processed.", self.prompt_tokens)
            lines += _metric("seekmoe_generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens)
            lines += ["# HELP seekmoe_request_latency_seconds Time from a completion request to its last token.",
                      "# TYPE seekmoe_request_latency_seconds histogram"]
            for bound, n in zip(LATENCY_BUCKETS, self.latency_buckets):  # already cumulative: le = at most
                lines.append(f'seekmoe_request_latency_seconds_bucket{{le="{bound}"}} {n}')
            lines += [f'seekmoe_request_latency_seconds_bucket{{le="+Inf"}} {self.latency_count}',
                      f"seekmoe_request_latency_seconds_sum {self.latency_sum:.6f}",
                      f"seekmoe_request_latency_seconds_count {self.latency_count}"]
            lines += _metric("seekmoe_queue_depth", "gauge", "Requests waiting for a slot.", self.queue_depth)
            lines += _metric("seekmoe_running_requests", "gauge", "Requests being decoded.", self.running)
            lines += _metric("seekmoe_engine_steps_total", "counter", "Engine steps (one batched forward each).",
                             self.decode_steps)
            lines += _metric("seekmoe_batched_requests_total", "counter",
                             "Requests summed over engine steps (divided by steps: the mean batch).", self.batched_rows)
            lines += _metric("seekmoe_max_batch", "gauge", "Largest batch one step has decoded.", self.max_batch)
            lines += _metric("seekmoe_spec_drafted_tokens_total", "counter", "MTP draft tokens verified.",
                             self.drafted)
            lines += _metric("seekmoe_spec_accepted_tokens_total", "counter", "MTP draft tokens accepted.",
                             self.accepted)
            lines += _metric("seekmoe_connections_evicted_total", "counter",
                             "Idle connections closed to make room for new ones (--max-connections).",
                             self.connections_evicted)
            rate = self.accepted / self.drafted if self.drafted else 0.0
            lines += _metric("seekmoe_spec_acceptance_rate", "gauge", "Accepted / drafted MTP tokens.", f"{rate:.6f}")
        return "\n".join(lines) + "\n"


def _metric(name: str, kind: str, help_text: str, value) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
