"""What a run reports per step: `OUT/metrics.jsonl` (one JSON object a step) and, when tensorboard is installed,
TensorBoard event files under `OUT/tensorboard/`."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends one record per step. The file is never rewritten in place: a resumed run whose file holds records
    past the step it resumes from (or a torn line) writes the records it keeps to a new file and renames it over the
    old one, so a kill at any moment leaves one complete file, the old or the new."""

    def __init__(self, out: Path, resume_step: int | None = None):
        self.path = Path(out) / METRICS_FILE
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = [r for r in read_metrics(out) if r["step"] <= resume_step]
            text = self.path.read_text(errors="replace")
            lines = [line for line in text.splitlines() if line.strip()]
            # Records past the resumed step, or a torn line (even one that parses): a new file replaces the old.
            if len(kept) != len(lines) or (text and not text.endswith("\n")):
                _replace_atomically(self.path, kept)
        self._file = self.path.open("a")
        self._tb = _tensorboard_writer(Path(out) / "tensorboard")

    def write(self, record: dict) -> None:
        """Append one step's record (and its numbers to TensorBoard)."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(out: Path) -> list[dict]:
    """The records of `OUT/metrics.jsonl`, in step order."""
    path = Path(out) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {out}: is it a `seekmoe train --out` folder?")
    records = []
    lines = path.read_text(errors="replace").splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no step")
        except ValueError:
            # A torn last line (power loss mid-write), or a damaged one: dropped, with a warning naming it.
            warnings.warn(f"{path}:{n}: dropping a malformed metrics line ({line[:60]!r}"
                          f"{'...' if len(line) > 60 else ''})", stacklevel=2)
            continue
        records.append(record)
    return records


def _replace_atomically(path: Path, records: list[dict]) -> None:
    """Write `records` to a temporary sibling (`.tmp-` names are removed when a run starts), fsync it, and rename it
    over `path`."""
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    with tmp.open("w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(directory))
