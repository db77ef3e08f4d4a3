"""A user's reward function in its own process, so that whatever it does ends as one clear error, not the run.

A reward file is code we did not write: it may hang (a completion that loops forever in a code task), call
`sys.exit()` or `os._exit()`, crash the interpreter, or print. In-process, a hang would stall the run forever and
an exit would end it with that exit status and no message. So `RewardWorker` runs the file in a child Python
(this module run as a script, by path: it imports only the standard library, so it starts in tens of
milliseconds and never imports torch) and asks it for one reward at a time over a pipe, one JSON object a line;
a call that takes longer than `timeout` seconds kills the child. Every failure is a `RewardError` (a ValueError,
so `seekmoe rl` ends with one line and exit status 2); the reward's own traceback goes to stderr.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import weakref
from pathlib import Path

MAX_ABS_REWARD = 1e6  # rewards beyond this are a bug (1e308 overflows a group's std to inf), not a signal


class RewardError(ValueError):
    """The reward function failed: raised, exited, hung, or returned something that is not a usable reward."""


def check_reward(value, prompt: str) -> float:
    """`value` as a float; RewardError unless it is a real number with |value| <= MAX_ABS_REWARD (NaN and +-inf
    included: one of them makes every advantage of its group NaN)."""
    if not isinstance(value, (int, float)):  # a bool is an int: True counts as 1
        raise RewardError(f"the task's reward({prompt[:40]!r}, ...) returned {repr(value)[:80]}: expected a number")
    if not (abs(value) <= MAX_ABS_REWARD):  # false for NaN too; an int of any size compares without overflow
        raise RewardError(f"the task's reward({prompt[:40]!r}, ...) returned {value!r}: expected a finite number "
                          f"with |reward| <= {MAX_ABS_REWARD:g}")
    return float(value)


class RewardWorker:
    """`reward(prompt, completion)` of a Python file, computed in a child process with a per-call timeout."""

    def __init__(self, reward_file: str | Path, timeout: float = 30.0):
        self.reward_file, self.timeout = Path(reward_file), timeout
        self._proc: subprocess.Popen | None = None
        self._buffer = b""
        self._start()

    def _start(self) -> None:
        self._proc = subprocess.Popen([sys.executable, "-u", __file__, str(self.reward_file)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
        self._buffer = b""
        self._finalizer = weakref.finalize(self, _kill, self._proc)
        self._answer(f"loading {self.reward_file}")  # the file is loaded (or why not), within the timeout

    def __call__(self, prompt: str, completion: str) -> float:
        if self._proc is None:  # killed after an earlier failure
            self._start()
        line = json.dumps({"prompt": prompt, "completion": completion}) + "\n"
        try:
            self._proc.stdin.write(line.encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it has died: reading says how
        answer = self._answer(f"reward({prompt[:40]!r}, ...)")
        if "not_a_number" in answer:
            raise RewardError(f"the task's reward({prompt[:40]!r}, ...) returned {answer['not_a_number']}: expected "
                              f"a number")
        return check_reward(answer["reward"], prompt)

    def _answer(self, what: str) -> dict:
        deadline = time.monotonic() + self.timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.close()
                raise RewardError(f"the task's {what} did not return within reward_timeout={self.timeout:g} s "
                                  f"(set reward_timeout= higher if it needs longer)")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                code = self._proc.wait()
                self.close()
                raise RewardError(f"the task's {what} ended its worker process (exit status {code}): a reward "
                                  f"function must return a number, not exit")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer = json.loads(line)
        if "error" in answer:
            self.close()
            raise RewardError(f"the task's {what} failed: {answer['error']}")
        return answer

    def close(self) -> None:
        """Stop the child process (it is started again by the next call)."""
        if self._proc is not None:
            self._finalizer()
            self._proc = None


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        stream.close()


def _serve(reward_file: str) -> None:
    """The child: load the file, then answer one {"prompt", "completion"} line with one {"reward"} line."""
    import importlib.util
    import numbers
    import traceback

    # The answers go to the original stdout; whatever the reward code prints goes to stderr instead.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(**answer) -> None:
        answers.write(json.dumps(answer) + "\n")
        answers.flush()

    def guarded(call):
        try:
            return call(), None
        except SystemExit as e:
            return None, f"it called sys.exit({e.code!r})"
        except BaseException as e:  # noqa: BLE001 - the user's code: report anything, keep no traceback here
            traceback.print_exc()
            return None, f"{type(e).__name__}: {e}"

    def load():
        spec = importlib.util.spec_from_file_location(f"seekmoe_user_task_{Path(reward_file).stem}", reward_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, "reward", None)):
            raise ValueError("it defines no reward(prompt, completion) function")
        return module.reward

    reward, error = guarded(load)
    if error is not None:
        return reply(error=f"loading it: {error}")
    reply(ready=True)
    for line in sys.stdin:
        request = json.loads(line)
        value, error = guarded(lambda: reward(request["prompt"], request["completion"]))
        if error is not None:
            reply(error=error)
        elif not isinstance(value, numbers.Real):
            reply(not_a_number=repr(value)[:80])
        else:  # numpy's numbers too; json writes inf and nan as Infinity and NaN, which the parent reads back
            reply(reward=value if isinstance(value, int) else float(value))


if __name__ == "__main__":
    _serve(sys.argv[1])
