"""Training checkpoints: written atomically, verified by a manifest of checksums, pruned to the newest K.

One checkpoint, `OUT/checkpoints/step-NNNNNNNN/`:
- `config.json`, `model.safetensors`: the model in Hugging Face DeepSeek layout (router biases included, fp32);
- `tokenizer.json`;
- `optimizer.safetensors` + `optimizer.json`: AdamW's moments and step counts, and its parameter groups;
- `rng.safetensors`: torch's CPU (and CUDA) generator states;
- `trainer_state.json`: the step, learning rate, data position, training config and bookkeeping;
- `manifest.json`, written last: every other file's size and SHA-256.
It is written into a temporary folder, each file fsynced, then renamed into place, so a checkpoint either exists
complete or not at all; one that fails its manifest is skipped with a CheckpointWarning, never loaded.
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
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# Tests set this to "STEP:SECONDS" to make the writer of checkpoint STEP pause halfway, so they can kill it there.
PAUSE_ENV = "SEEKMOE_TEST_CHECKPOINT_PAUSE"


class CheckpointWarning(UserWarning):
    """A checkpoint on disk is incomplete or corrupted and was skipped."""


def checkpoint_dir(out: Path, step: int) -> Path:
    """The folder of the checkpoint taken after optimizer step `step`."""
    return Path(out) / "checkpoints" / f"step-{step:08d}"


def write_atomically(final: Path, write: Callable[[Path], None], pause_at: int | None = None) -> None:
    """Run write(tmp) into a fresh temporary sibling folder, add a manifest, fsync everything and rename the folder
    to `final` (replacing an older one of that name)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    _maybe_pause(pause_at)
    write_manifest(tmp)
    swap_into_place(tmp, final)


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


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the folder `tmp` to `final` without a moment where no complete `final` exists (see swap_folder)."""
    from ..checkpoint import swap_folder

    swap_folder(tmp, final)
    _fsync(final.parent)


def save_checkpoint(out: Path, step: int, model, tokenizer, optimizer: torch.optim.Optimizer, state: dict,
                    keep: int) -> Path:
    """Write the training checkpoint of `step` and delete all but the newest `keep` complete ones."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save(str(tmp / "tokenizer.json"))
        tensors, groups = _optimizer_to_files(optimizer, model)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(groups, indent=2) + "\n")
        save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2) + "\n")

    final = checkpoint_dir(out, step)
    for stale in final.parent.glob(".tmp-*"):  # left by a killed writer; never a checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    write_atomically(final, write, pause_at=step)
    prune_checkpoints(out, keep, final)
    return final


def prune_checkpoints(out: Path, keep: int, just_written: Path) -> None:
    """Delete all but the newest `keep` verified checkpoints, never `just_written`."""
    complete = [d for d in _step_dirs(out) if d != just_written and verify_checkpoint(d) is None]
    for old in complete[max(keep - 1, 0):]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint under `out` that passes its manifest; each one that does not is skipped with a
    CheckpointWarning saying why."""
    folder = Path(out) / "checkpoints"
    for stale in sorted(folder.glob(".tmp-*")) if folder.is_dir() else []:
        warnings.warn(f"skipping {stale}: an incomplete checkpoint (its writer stopped before finishing)",
                      CheckpointWarning, stacklevel=2)
    for directory in _step_dirs(out):
        problem = verify_checkpoint(directory)
        if problem is None:
            return directory
        warnings.warn(f"skipping checkpoint {directory}: {problem}", CheckpointWarning, stacklevel=2)
    return None


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
    weights = {"model.safetensors", "model.safetensors.index.json", "dcp/.metadata"}
    if "trainer_state.json" not in files or not weights & set(files):
        return "manifest.json lists no model weights or trainer state (incomplete or corrupted)"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum (corrupted)"
    return None


def set_aside_newer_checkpoints(out: Path, resumed: Path | None) -> list[Path]:
    """Move checkpoints newer than the one a run resumes from (incomplete or corrupted ones, since the newest good
    one is resumed) to `checkpoints/set-aside/`, so that pruning never weighs them against the new ones. Nothing is
    deleted. Returns their new paths."""
    step = int(_STEP_DIR.match(resumed.name).group(1)) if resumed is not None else 0
    moved = []
    for directory in _step_dirs(out):
        if int(_STEP_DIR.match(directory.name).group(1)) > step:
            target = directory.parent / "set-aside" / f"{directory.name}-{int(time.time())}"
            target.parent.mkdir(exist_ok=True)
            os.rename(directory, target)
            moved.append(target)
    return moved


def load_checkpoint(directory: Path, model, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model weights, router biases, optimizer and RNG states from `directory`; returns trainer_state."""
    from ..checkpoint import from_pretrained

    loaded = from_pretrained(directory, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tensors = load_file(str(directory / "optimizer.safetensors"))
    groups = json.loads((directory / "optimizer.json").read_text())
    _optimizer_from_files(optimizer, model, tensors, groups)
    rng = load_file(str(directory / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))
    return json.loads((directory / "trainer_state.json").read_text())


def _optimizer_to_files(optimizer: torch.optim.Optimizer, model) -> tuple[dict, dict]:
    """Optimizer state as safetensors entries `{param name}.{exp_avg|exp_avg_sq|step}` and JSON groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    index_to_name = {}
    for group, live in zip(sd["param_groups"], optimizer.param_groups):
        for i, p in zip(group["params"], live["params"]):
            index_to_name[i] = names[id(p)]
    tensors = {f"{index_to_name[i]}.{k}": v.detach().contiguous()
               for i, st in sd["state"].items() for k, v in st.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index_to_name[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def _optimizer_from_files(optimizer: torch.optim.Optimizer, model, tensors: dict, saved: dict) -> None:
    names = [[n for n in g["params"]] for g in saved["param_groups"]]
    live = {id(p): n for n, p in model.named_parameters()}
    current = [[live[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    if names != current:
        raise ValueError("the checkpoint's optimizer covers different parameters than this model: resume with the "
                         "same model configuration")
    index = {}
    state = {}
    for i, name in enumerate(n for group in names for n in group):
        index[name] = i
        entry = {k[len(name) + 1:]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        if entry:
            state[i] = entry
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in saved["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


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


def _maybe_pause(step: int | None) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if spec and step is not None:
        at, _, seconds = spec.partition(":")
        if int(at) == step:
            print(f"checkpoint {step}: pausing mid-write for {seconds}s ({PAUSE_ENV})", flush=True)
            time.sleep(float(seconds))
