"""The server's decode loop: one background thread owns the engine and batches every admitted request.

HTTP handlers (on the event loop) `submit` requests with a callback that receives their `Event`s on this thread;
the loop admits waiting requests into free engine slots before every step, so new requests join the running batch
at the next step. The engine knows nothing of HTTP, and this module nothing of the API's shapes.

Admission is round-robin over submissions (one HTTP request's prompts), not first come first served over prompts:
a request of 64 prompts used to hold a later one-prompt request until all 64 had run. Now the later one takes the
next free slot, and the engine prefills the shortest prompts first (engine.py), so it is answered while the big
one runs. Nothing is preempted: a slot frees when one of its requests ends.

A step that raises is answered by failing the requests it held (each gets a finished Event with finish_reason
"error") and freeing their slots; `health()` is false while steps keep failing, when the thread has died, or
when one step has been running for longer than `wedged_after` seconds.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable

from ..inference.engine import Engine, Event, Request
from .metrics import Metrics

BROKEN_AFTER_FAILURES = 3  # consecutive failed steps after which the engine is reported broken


class QueueFull(Exception):
    """Raised by `submit` when the requests would not fit in the waiting queue."""


class Scheduler:
    """Continuous batching over an `Engine`, with a bounded waiting queue."""

    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int = 64, wedged_after: float = 120.0):
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self.wedged_after = wedged_after
        self._waiting: deque[deque[Request]] = deque()  # per submission, served in turn (round-robin)
        self._depth = 0  # requests waiting, over every submission
        self._deliver_to: dict[int, Callable[[Event], None]] = {}  # request id -> its handler's callback
        self._cond = threading.Condition()
        self._stopped = False
        self._step_started: float | None = None  # monotonic time of the step under way, None between steps
        self._failures = 0  # consecutive failed steps
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="seekmoe-decode", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    @property
    def queue_depth(self) -> int:
        return self._depth

    def health(self) -> tuple[bool, str]:
        """(healthy, why not): false when the loop thread is dead, steps keep failing, or a step is stuck."""
        if not self._thread.is_alive():
            return False, "the decode loop is not running"
        if self._failures >= BROKEN_AFTER_FAILURES:
            return False, f"the last {self._failures} engine steps failed: {self.last_error}"
        started = self._step_started
        if started is not None and time.monotonic() - started > self.wedged_after:
            return False, f"an engine step has been running for over {self.wedged_after:.0f} s"
        return True, ""

    def submit(self, requests: list[Request], deliver: Callable[[Event], None]) -> None:
        """Queue requests (all or none); `deliver(event)` is called on the decode thread with each of their
        events, the last one finished. Raises QueueFull."""
        with self._cond:
            if self._depth + len(requests) > self.max_queue:
                raise QueueFull(f"{self._depth} requests are already waiting (the queue holds {self.max_queue})")
            for r in requests:
                self._deliver_to[r.id] = deliver
            if requests:
                self._waiting.append(deque(requests))
                self._depth += len(requests)
            self._cond.notify()

    def _next_waiting(self) -> Request:
        """The next request to admit: the first of the submission whose turn it is (then at the back of the line)."""
        turn = self._waiting.popleft()
        request = turn.popleft()
        if turn:
            self._waiting.append(turn)
        self._depth -= 1
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away): it leaves the queue, or its slot is freed at the next step."""
        request.cancelled = True
        with self._cond:
            self._deliver_to.pop(request.id, None)
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._waiting and not self.engine.active:
                    self._cond.wait()
                if self._stopped:
                    return
                admitted, free = [], len(self.engine.free_slots)
                while self._waiting and len(admitted) < free:
                    admitted.append(self._next_waiting())
                depth = self._depth
            events = []
            for r in admitted:
                if r.cancelled:
                    continue
                try:
                    self.engine.add(r)
                except Exception as e:  # the handler checks prompts first; this is a safety net
                    traceback.print_exc()
                    r.finish_reason, r.error = "error", f"{type(e).__name__}: {e}"
                    events.append(Event(r, [], "", True))
                    continue
                if r.done:  # max_tokens 0 without prompt log-probabilities
                    events.append(Event(r, [], "", True))
            batch = self.engine.active
            self._step_started = time.monotonic()
            try:
                events += self.engine.step()
            except Exception as e:  # a bug outside the engine's own guards: fail what it held, free every slot
                traceback.print_exc()
                events += self.engine.fail_all(f"{type(e).__name__}: {e}")
            finally:
                self._step_started = None
            errors = [e.request.error for e in events if e.request.finish_reason == "error"]
            if errors and len(errors) == len(events):  # nothing in this step succeeded
                self._failures += 1
                self.last_error = errors[0]
            elif events:
                self._failures = 0
            if batch:
                self.metrics.step(batch, depth, self.engine.active)
            for event in events:
                self._deliver(event)
            if self._failures:  # do not spin on a broken engine
                time.sleep(min(1.0, 0.05 * 2 ** self._failures))

    def _deliver(self, event: Event) -> None:
        with self._cond:
            deliver = (self._deliver_to.pop if event.finished else self._deliver_to.get)(event.request.id, None)
        if deliver is not None:
            try:
                deliver(event)
            except Exception:  # a closed event loop (shutdown) must not stop the decode loop
                traceback.print_exc()
