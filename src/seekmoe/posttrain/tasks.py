"""Tasks with verifiable rewards for RL: seeded built-in generators and a user's own reward function.

A task gives prompts (each one user turn, rendered through the chat template) and `reward(prompt, completion)`.
Built-in tasks also know each prompt's answer, so they can write SFT data that teaches the answer's format:
- `arithmetic`: chain sums like reasoning-gym's `chain_sum`, "Compute 7 + 3 - 5." -> "5";
- `reverse`: "Reverse the letters: abcd" -> "dcba".
A user task is a Python file defining `reward(prompt: str, completion: str) -> float` plus a JSONL file of prompts
(`{"prompt": "..."}` a line).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Protocol

from .reward_worker import RewardError, RewardWorker
from .sft_data import read_jsonl


class Task(Protocol):
    """What `seekmoe rl` needs of a task."""

    name: str

    def prompts(self, n: int, seed: int) -> list[str]:
        """n prompts drawn with `seed` (the same seed, the same prompts)."""
        ...

    def reward(self, prompt: str, completion: str) -> float:
        """The reward of `completion` for `prompt`."""
        ...


class ChainSum:
    """Sums and differences of `terms` integers in [0, max_value]; reward 1 for the exact result (the completion,
    stripped, must be that integer), else 0."""

    name = "arithmetic"
    _PROMPT = re.compile(r"^Compute (-?\d+(?: [+-] \d+)*)\.$")

    def __init__(self, terms: int = 3, max_value: int = 9):
        if terms < 2 or max_value < 1:
            raise ValueError(f"arithmetic task terms={terms}, max_value={max_value} is invalid: expected terms >= 2, "
                             f"max_value >= 1")
        self.terms, self.max_value = terms, max_value

    def prompts(self, n: int, seed: int) -> list[str]:
        rng = random.Random(f"arithmetic-{seed}")
        top = self.max_value
        out = []
        for _ in range(n):
            expr = str(rng.randint(0, top))
            for _ in range(self.terms - 1):
                expr += f" {rng.choice('+-')} {rng.randint(0, top)}"
            out.append(f"Compute {expr}.")
        return out

    def answer(self, prompt: str) -> str:
        """The exact result of the prompt's expression."""
        match = self._PROMPT.match(prompt)
        if match is None:
            raise ValueError(f"prompt {prompt!r} is not an arithmetic task prompt: expected 'Compute a + b - c.'")
        tokens = match.group(1).split()
        total = int(tokens[0])
        for op, value in zip(tokens[1::2], tokens[2::2]):
            total = total + int(value) if op == "+" else total - int(value)
        return str(total)

    def reward(self, prompt: str, completion: str) -> float:
        return 1.0 if completion.strip() == self.answer(prompt) else 0.0


class Reverse:
    """Reverse a string of `min_len`..`max_len` letters from `alphabet`; reward 1 for the exact reversal, else 0."""

    name = "reverse"
    _PROMPT = re.compile(r"^Reverse the letters: (\w+)$")

    def __init__(self, min_len: int = 3, max_len: int = 5, alphabet: str = "abcdefgh"):
        if not 1 <= min_len <= max_len:
            raise ValueError(f"reverse task min_len={min_len}, max_len={max_len} is invalid: expected "
                             f"1 <= min_len <= max_len")
        self.min_len, self.max_len, self.alphabet = min_len, max_len, alphabet

    def prompts(self, n: int, seed: int) -> list[str]:
        rng = random.Random(f"reverse-{seed}")
        return ["Reverse the letters: " + "".join(rng.choice(self.alphabet)
                                                  for _ in range(rng.randint(self.min_len, self.max_len)))
                for _ in range(n)]

    def answer(self, prompt: str) -> str:
        """The prompt's letters reversed."""
        match = self._PROMPT.match(prompt)
        if match is None:
            raise ValueError(f"prompt {prompt!r} is not a reverse task prompt: expected 'Reverse the letters: abc'")
        return match.group(1)[::-1]

    def reward(self, prompt: str, completion: str) -> float:
        return 1.0 if completion.strip() == self.answer(prompt) else 0.0


class UserTask:
    """A user's reward function (`reward(prompt, completion) -> float` in a Python file) over the prompts of a JSONL
    file; prompts are drawn from the file with replacement, seeded. The reward runs in a worker process
    (reward_worker.py): a call that outlasts `reward_timeout` seconds, exits, raises or returns a non-finite or
    absurd value is a RewardError."""

    def __init__(self, reward_file: str | Path, prompts_file: str | Path, reward_timeout: float = 30.0):
        reward_file = Path(reward_file)
        if not reward_file.is_file():
            raise FileNotFoundError(f"--task {reward_file}: no such file (expected a built-in task name, one of "
                                    f"{sorted(BUILTIN_TASKS)}, or a Python file defining reward(prompt, completion))")
        self.name = reward_file.stem
        records = read_jsonl(prompts_file)
        bad = next((r for r in records if not isinstance(r.get("prompt"), str)), None)
        if bad is not None or not records:
            raise ValueError(f"--prompts {prompts_file}: expected one {{\"prompt\": \"...\"}} object a line, got "
                             f"{str(bad)[:80] if bad else 'no records'}")
        self._prompts = [r["prompt"] for r in records]
        try:
            self._reward = RewardWorker(reward_file, reward_timeout)
        except RewardError as e:
            raise RewardError(f"--task {reward_file}: {e}") from None

    def prompts(self, n: int, seed: int) -> list[str]:
        rng = random.Random(f"{self.name}-{seed}")
        return [rng.choice(self._prompts) for _ in range(n)]

    def reward(self, prompt: str, completion: str) -> float:
        return self._reward(prompt, completion)


BUILTIN_TASKS = {"arithmetic": ChainSum, "reverse": Reverse}


def load_task(task: str, prompts_file: str | Path | None = None, options: dict | None = None,
              reward_timeout: float = 30.0) -> Task:
    """A built-in task by name (with its constructor's `options`), or a user task from a Python file and
    `prompts_file` (its reward calls limited to `reward_timeout` seconds each)."""
    if task in BUILTIN_TASKS:
        try:
            return BUILTIN_TASKS[task](**(options or {}))
        except TypeError:
            raise ValueError(f"task options {options} are invalid for task {task!r}: expected "
                             f"{BUILTIN_TASKS[task].__init__.__code__.co_varnames[1:]}") from None
    if prompts_file is None:
        raise ValueError(f"--task {task!r} is not a built-in task ({sorted(BUILTIN_TASKS)}): a Python file of "
                         f"reward(prompt, completion) also needs --prompts FILE.jsonl")
    return UserTask(task, prompts_file, reward_timeout)


def sft_records(task, n: int, seed: int) -> list[dict]:
    """n prompt/completion pairs of a built-in task with the correct answers (SFT data that teaches the format)."""
    return [{"prompt": p, "completion": task.answer(p)} for p in task.prompts(n, seed)]
