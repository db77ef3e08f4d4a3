"""The server's decode loop: one background thread owns the engine and batches every admitted request.

HTTP handler threads `submit` requests and read their events from a queue; the loop admits waiting requests into
free engine slots before every step, so new requests join the running batch at the next decode step.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections import deque

from ..inference.engine import Engine, Event, Request
from .metrics import Metrics


class QueueFull(Exception):
    """Raised by `submit` when `max_queue` requests are already waiting for a slot."""


class Scheduler:
    """Continuous batching over an `Engine`, with a bounded waiting queue."""

    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int = 64):
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self._waiting: deque[Request] = deque()
        self._outputs: dict[int, queue.Queue] = {}  # request id -> its events (None once it has failed)
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="seekmoe-decode", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=10)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def submit(self, request: Request) -> queue.Queue:
        """Queue a request; returns the queue its `Event`s arrive on (None after a failure). Raises QueueFull."""
        out: queue.Queue = queue.Queue()
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (the queue holds {self.max_queue})")
            self._outputs[request.id] = out
            self._waiting.append(request)
            self._cond.notify()
        return out

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._waiting and not self.engine.active:
                    self._cond.wait()
                if self._stopped:
                    return
                admitted = []
                while self._waiting and self.engine.has_capacity:
                    admitted.append(self._waiting.popleft())
                depth = len(self._waiting)
            for r in admitted:
                if r.cancelled:
                    self._finish(r)
                    continue
                try:
                    self.engine.add(r)
                except ValueError:  # the handler checks prompts first; this is a safety net
                    self._fail(r)
                    continue
                if r.done:  # max_tokens 0
                    self._deliver(Event(r, [], "", True))
            batch = self.engine.active
            try:
                events = self.engine.step()
            except Exception:  # a bug or OOM must not take the server down: fail what was running
                traceback.print_exc()
                for r in self.engine.requests:
                    r.cancelled = True
                    self._fail(r)
                self.engine.step()  # releases the cancelled slots without a forward
                continue
            if batch:
                self.metrics.step(batch, depth, self.engine.active)
            for event in events:
                self._deliver(event)

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away): it leaves the queue, or its slot is freed at the next step."""
        request.cancelled = True
        with self._cond:
            self._outputs.pop(request.id, None)
            self._cond.notify()

    def _deliver(self, event: Event) -> None:
        out = self._outputs.get(event.request.id)
        if out is not None:
            out.put(event)
        if event.finished:
            self._finish(event.request)

    def _finish(self, request: Request) -> None:
        with self._cond:
            self._outputs.pop(request.id, None)

    def _fail(self, request: Request) -> None:
        """Tell a request's handler it failed (it reads None)."""
        with self._cond:
            out = self._outputs.pop(request.id, None)
        if out is not None:
            out.put(None)
