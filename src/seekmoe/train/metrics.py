"""What a run reports per step: `OUT/metrics.jsonl` (one JSON object a step) and, when tensorboard is installed,
TensorBoard event files under `OUT/tensorboard/`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends one record per step; a resumed run first drops the records after the step it resumes from, so the
    file reads as one uninterrupted run."""

    def __init__(self, out: Path, resume_step: int | None = None):
        self.path = Path(out) / METRICS_FILE
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = [json.dumps(r) for r in read_metrics(out) if r["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
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


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(directory))
