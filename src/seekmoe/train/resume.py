"""Where a run in OUT starts: a fresh run, the newest intact checkpoint (`resume`), or, when nothing intact is
left, a refusal that touches nothing, unless the user asked to start over (`resume="or-start"`), in which case the
old run is moved aside whole, never overwritten.

Every process calls `plan_start` (it only reads); the first process then carries the plan out with `prepare_out`.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .checkpointing import CheckpointWarning, remove_temporaries, scan_checkpoints, set_aside_newer_checkpoints

PREVIOUS_PREFIX = "previous-run-"


@dataclass
class StartPlan:
    """What a run starts from and what must change in OUT first."""

    checkpoint: Path | None = None  # the checkpoint to resume from; None: step 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # newer checkpoints that are not intact
    move_aside: bool = False  # nothing intact to resume: the old run goes to OUT/previous-run-TIME/ first


def plan_start(out: Path, resume: bool | str) -> StartPlan:
    """The plan for a run into `out`. `resume` is False (a fresh run: refused where checkpoints exist), True (the
    newest intact checkpoint; step 0 in an empty or new folder; refused when the folder holds a run but nothing
    intact) or "or-start" (the same, but starting over with the old run moved aside instead of refusing).
    Raises ValueError with one line naming what was found."""
    out = Path(out)
    checkpoints = out / "checkpoints"
    if not resume:
        if checkpoints.is_dir() and any(checkpoints.iterdir()):
            raise ValueError(f"{out} already holds checkpoints: pass --resume to continue that run, or choose "
                             f"another --out")
        return StartPlan()
    newest, broken = scan_checkpoints(out)
    if newest is not None:
        for directory, problem in broken:
            warnings.warn(f"skipping checkpoint {directory}: {problem}", CheckpointWarning, stacklevel=2)
        return StartPlan(newest, broken)
    old_run = sorted(p.name for p in out.iterdir() if not p.name.startswith(PREVIOUS_PREFIX)) if out.is_dir() else []
    if not old_run:
        return StartPlan()
    found = "; ".join(f"{p.relative_to(out)}: {problem}" for p, problem in broken) or \
        f"no checkpoint, only {', '.join(old_run[:6])}{', ...' if len(old_run) > 6 else ''}"
    if resume != "or-start":
        raise ValueError(f"--resume: nothing intact to resume in {out} ({found}); nothing was changed: pass "
                         f"--resume-or-start to move this run aside into {out}/{PREVIOUS_PREFIX}TIME/ and start "
                         f"over, or choose another --out")
    return StartPlan(skipped=broken, move_aside=True)


def prepare_out(out: Path, plan: StartPlan) -> list[str]:
    """Carry the plan out (first process only): move the old run aside or the broken newer checkpoints out of the
    way, and remove every temporary a killed writer left. Returns what was done, one line each, to print."""
    out = Path(out)
    done = []
    if plan.move_aside:
        target = out / f"{PREVIOUS_PREFIX}{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        n = 0
        while target.exists():  # two starts within a second
            n += 1
            target = target.with_name(f"{target.name.split('.')[0]}.{n}")
        target.mkdir()
        for entry in sorted(out.iterdir()):
            if not entry.name.startswith(PREVIOUS_PREFIX):
                os.rename(entry, target / entry.name)
        broken = ", ".join(f"{p.name} ({problem})" for p, problem in plan.skipped) or "no checkpoint"
        done.append(f"nothing intact to resume in {out} ({broken}): moved that run to {target}; starting from step 0")
    elif plan.checkpoint is not None:
        for moved in set_aside_newer_checkpoints(out, plan.checkpoint):
            done.append(f"set aside {moved.name}: newer than the checkpoint resumed from, and not complete")
    for removed in remove_temporaries(out):
        done.append(f"removed {removed}: left by a writer that was stopped before finishing")
    return done
