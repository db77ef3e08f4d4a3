"""Progress of long work: a live bar on a terminal, a log line every so often anywhere else.

A tqdm bar redraws itself with carriage returns; written to a file or a pipe (CI, a cluster job's log) every redraw
becomes a line of its own, hundreds of kilobytes for a few minutes of training. So `show_progress` returns a tqdm bar
only when its stream is a terminal, and otherwise a `LogProgress` with the same methods that writes one plain line
at each `every`-th fraction of the work, and at least every `interval_s` seconds while work moves.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm

LOG_FRACTION = 0.05  # a line every 5% of the work: 20 lines per run
LOG_INTERVAL_S = 60.0  # and at least one a minute on long work


class LogProgress:
    """tqdm's update / set_postfix / close, written as occasional log lines: `desc 120/1500 (8%) 3.1 step/s k=v`."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, stream: TextIO | None = None,
                 every: float = LOG_FRACTION, interval_s: float = LOG_INTERVAL_S):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = stream or sys.stderr
        self.step = max(1, int(total * every)) if total else None  # updates between lines
        self.interval_s = interval_s
        self.postfix: dict[str, str] = {}
        self._start = self._last_time = time.monotonic()
        self._start_n = self._last_n = initial
        self._closed = False

    def update(self, n: int = 1) -> None:
        """Count `n` more units of work; write a line when a step of the work or the interval has passed."""
        self.n += n
        now = time.monotonic()
        due_by_count = self.step is not None and self.n // self.step > self._last_n // self.step
        if due_by_count or now - self._last_time >= self.interval_s or (self.total and self.n >= self.total):
            self._write(now)

    def set_postfix(self, **values) -> None:
        """Values shown at the end of the next line (loss, speed, ...)."""
        self.postfix = {k: str(v) for k, v in values.items()}

    def close(self) -> None:
        """Write a last line if work moved since the previous one."""
        if not self._closed and self.n != self._last_n:
            self._write(time.monotonic())
        self._closed = True

    def _write(self, now: float) -> None:
        count = _megabytes if self.unit == "B" else str  # bytes read as MB, as tqdm's unit_scale shows them
        done = (f"{count(self.n)}/{count(self.total)} ({100 * self.n / self.total:.0f}%)" if self.total
                else count(self.n))
        elapsed = now - self._start
        per_s = (self.n - self._start_n) / elapsed if elapsed > 0 else None
        rate = "" if per_s is None else (f" {count(per_s)}/s" if self.unit == "B" else f" {per_s:.3g} {self.unit}/s")
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc} {done}{rate}{extra}", file=self.stream, flush=True)
        self._last_time, self._last_n = now, self.n


def _megabytes(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


class _Off:
    """A progress object that shows nothing."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


def show_progress(total: int | None, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
             stream: TextIO | None = None):
    """A progress display for `total` units of work: a tqdm bar on a terminal, LogProgress lines elsewhere,
    nothing when not `enabled`."""
    if not enabled:
        return _Off()
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
    return LogProgress(total, desc, unit, initial=initial, stream=stream)
