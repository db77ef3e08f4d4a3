"""Training checkpoints on disk: one format for any number of processes, written atomically, verified by a manifest
of checksums, pruned to the newest K, and nothing left behind by a writer that was killed.

One checkpoint, `OUT/checkpoints/step-NNNNNNNN/`:
- `dcp/`: model weights (router biases included) and AdamW's state in torch.distributed.checkpoint format, each
  process writing its own shards (see sharded_checkpoint.py); a checkpoint of N processes resumes at any number;
- `config.json` (the model), `tokenizer.json`, `optimizer.json` (AdamW's parameter groups, by parameter name);
- `rng.safetensors`: torch's CPU (and CUDA) generator states; `trainer_state.json`: step, data position, config;
- `manifest.json`, written last: every other file's size and SHA-256.
It is written under a temporary name (`.tmp-step-NNNNNNNN`), every file fsynced, then renamed into place, so a
checkpoint exists complete or not at all; one that fails its manifest is skipped, never loaded. Every temporary
name a killed writer can leave (ours and `save_pretrained`'s) starts with a dot and is removed by
`remove_temporaries` when a run starts. Checkpoints of the older single-process format (a Hugging Face folder plus
`optimizer.safetensors`) still resume (legacy_checkpoint.py). Hugging Face folders are written for `final/`, every
`save_hf_every` steps (`OUT/hf/step-NNNNNNNN/`) and by `seekmoe export`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_WEIGHTS = {"model.safetensors", "model.safetensors.index.json", "dcp/.metadata"}


class CheckpointWarning(UserWarning):
    """A checkpoint on disk is incomplete or corrupted and was skipped."""


def checkpoint_dir(out: Path, step: int) -> Path:
    """The folder of the checkpoint taken after optimizer step `step`."""
    return Path(out) / "checkpoints" / f"step-{step:08d}"


def step_of(directory: Path) -> int:
    """The optimizer step a checkpoint folder `step-NNNNNNNN` was taken after."""
    return int(_STEP_DIR.match(Path(directory).name).group(1))


# ----------------------------------------------------------------------------------------------- writing atomically
def write_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Run write(tmp) into a fresh temporary sibling folder, add a manifest, fsync everything and rename the folder
    to `final` (replacing an older one of that name)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    publish(tmp, final)


def publish(tmp: Path, final: Path) -> None:
    """Write tmp's manifest (fsyncing every file and folder), then rename `tmp` to `final`."""
    write_manifest(tmp)
    from ..checkpoint import swap_folder

    swap_folder(tmp, final)
    _fsync(final.parent)


def write_manifest(folder: Path) -> None:
    """Write `folder/manifest.json` (every file's size and SHA-256, subfolders included), fsyncing each file, the
    manifest and the folders, so that a verified manifest means a complete folder."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        _fsync(path)
    (folder / MANIFEST).write_text(json.dumps({"files": files, "written_at": time.time()}, indent=2) + "\n")
    _fsync(folder / MANIFEST)
    for sub in sorted(p for p in folder.rglob("*") if p.is_dir()):
        _fsync(sub)
    _fsync(folder)


def remove_temporaries(out: Path) -> list[Path]:
    """Remove what killed writers left under `out`: every dot-name in `checkpoints/` and `hf/`, and `.tmp-*`,
    `..tmp-*` and `.NAME.saving-*` in `out` itself. A `.old-NAME` (swap_folder's copy between its two renames) is
    put back as NAME when NAME is missing, removed otherwise. Returns what was removed."""
    out = Path(out)
    removed = []
    for folder, everything in ((out, False), (out / "checkpoints", True), (out / "hf", True)):
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            name = entry.name
            if name.startswith(".old-"):
                if not (folder / name[len(".old-"):]).exists():
                    os.rename(entry, folder / name[len(".old-"):])
                    continue
            elif not (everything and name.startswith(".")) and not (
                    name.startswith((".tmp-", "..tmp-")) or (name.startswith(".") and ".saving-" in name)):
                continue
            _remove(entry)
            removed.append(entry)
    return removed


# ------------------------------------------------------------------------------------------------------ one format
def save_checkpoint(out: Path, step: int, model, optimizer: torch.optim.Optimizer, tokenizer, model_config,
                    state: dict, keep: int, rank: int = 0, barrier: Callable[[], None] = lambda: None) -> Path:
    """Every process calls this: write the checkpoint of `step` (each process its own DCP shards, the first the
    rest), publish it atomically, and keep the newest `keep` complete checkpoints."""
    from .sharded_checkpoint import DCP_DIR, optimizer_groups, save_dcp_state

    final = checkpoint_dir(out, step)
    tmp = final.parent / f".tmp-{final.name}"  # the same name on every rank: they all write into it
    if rank == 0:
        for stale in final.parent.glob(".tmp-*") if final.parent.is_dir() else []:  # a killed writer's
            _remove(stale)
        tmp.mkdir(parents=True)
    barrier()
    save_dcp_state(tmp / DCP_DIR, model, optimizer)
    groups = optimizer_groups(model, optimizer)  # every rank: the names are the same everywhere
    if rank == 0:
        model_config.save(tmp)
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "optimizer.json").write_text(json.dumps(groups, indent=2) + "\n")
        save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2) + "\n")
        publish(tmp, final)
        prune_checkpoints(out, keep, final)
    barrier()
    return final


def load_checkpoint(directory: Path, model, optimizer: torch.optim.Optimizer) -> dict:
    """Every process calls this: restore model weights, router biases, optimizer and RNG states from a checkpoint
    written by any number of processes, in either format; returns trainer_state."""
    from safetensors.torch import load_file

    from .legacy_checkpoint import is_legacy, load_legacy_state
    from .sharded_checkpoint import load_dcp_state

    directory = Path(directory)
    if is_legacy(directory):
        load_legacy_state(directory, model, optimizer)
    else:
        load_dcp_state(directory, model, optimizer)
    rng = load_file(str(directory / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))
    return json.loads((directory / "trainer_state.json").read_text())


def save_model_folder(folder: Path, model, model_config, tokenizer, rank: int = 0, distributed: bool = False) -> None:
    """Every process calls this: write the model as one Hugging Face folder (config, safetensors, tokenizer files),
    gathered from every process's shards, atomically, by the first process."""
    from ..inference.tokenizer import write_tokenizer_files
    from ..parallel import consolidated_model

    if distributed:
        model = consolidated_model(model, model_config, rank)  # collective
    if rank != 0:
        return

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        write_tokenizer_files(tokenizer, tmp, model_config.max_position_embeddings)

    write_atomically(Path(folder), write)


# ---------------------------------------------------------------------------------------------- finding and pruning
def scan_checkpoints(out: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under `out` that passes its manifest (None if none does), and every newer one that
    does not, with what is wrong with it (incomplete temporaries included), newest first."""
    folder = Path(out) / "checkpoints"
    broken = [(stale, "incomplete (its writer stopped before finishing)")
              for stale in (sorted(folder.glob(".tmp-step-*"), reverse=True) if folder.is_dir() else [])]
    for directory in _step_dirs(out):
        problem = verify_checkpoint(directory)
        if problem is None:
            return directory, broken
        broken.append((directory, problem))
    return None, broken


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint under `out` that passes its manifest; each one that does not is skipped with a
    CheckpointWarning saying why."""
    newest, broken = scan_checkpoints(out)
    for directory, problem in broken:
        warnings.warn(f"skipping checkpoint {directory}: {problem}", CheckpointWarning, stacklevel=2)
    return newest


def verify_checkpoint(directory: Path) -> str | None:
    """None if the manifest lists the checkpoint's files and every one matches; otherwise what is wrong."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest.json (incomplete)"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "manifest.json is not valid JSON (corrupted)"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) and isinstance(v.get("bytes"), int)
                                              and isinstance(v.get("sha256"), str) for v in files.values()):
        return "manifest.json is malformed (expected {'files': {name: {'bytes', 'sha256'}}})"
    if "trainer_state.json" not in files or not _WEIGHTS & set(files):
        return "manifest.json lists no model weights or trainer state (incomplete or corrupted)"
    for name, expected in files.items():
        path = directory / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            return f"manifest.json names {name!r}, outside the checkpoint (corrupted)"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum (corrupted)"
    return None


def prune_checkpoints(out: Path, keep: int, just_written: Path) -> None:
    """Delete all but the newest `keep` verified checkpoints, never `just_written`."""
    complete = [d for d in _step_dirs(out) if d != just_written and verify_checkpoint(d) is None]
    for old in complete[max(keep - 1, 0):]:
        shutil.rmtree(old, ignore_errors=True)


def set_aside_newer_checkpoints(out: Path, resumed: Path | None) -> list[Path]:
    """Move checkpoints newer than the one a run resumes from (incomplete or corrupted ones, since the newest good
    one is resumed) to `checkpoints/set-aside/`, so that pruning never weighs them against the new ones. Nothing is
    deleted. Returns their new paths."""
    step = step_of(resumed) if resumed is not None else 0
    moved = []
    for directory in _step_dirs(out):
        if step_of(directory) > step:
            target = directory.parent / "set-aside" / f"{directory.name}-{int(time.time())}"
            target.parent.mkdir(exist_ok=True)
            os.rename(directory, target)
            moved.append(target)
    return moved


def _rng_tensors() -> dict:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return out


def _step_dirs(out: Path) -> list[Path]:
    """Checkpoint folders under `out`, newest first."""
    folder = Path(out) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((d for d in folder.iterdir() if d.is_dir() and _STEP_DIR.match(d.name)), reverse=True)


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
