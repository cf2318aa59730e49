"""Self-describing training checkpoints: tensors in safetensors, everything else in JSON.

A checkpoint folder ``checkpoint-{step:07d}/`` holds

* ``config.json``        the full training config (enough to rebuild the model)
* ``model.safetensors``  trainable weights; ``ema.safetensors`` their EMA
* ``optimizer.safetensors`` + ``optimizer.json``  optimizer tensors / scalars and param groups
* ``scheduler.json``     LR schedule state
* ``trainer_state.json`` step, epoch, position in the epoch's order, data seed, elapsed time
* ``rng-rank{r}.safetensors``  every RNG state of process ``r`` as uint8 tensors
* ``checksums.json``     size and SHA-256 of every file above, checked when the checkpoint is loaded

It is written under a temporary name and renamed when complete; ``latest`` (a text file beside the
folders, replaced atomically) names the newest complete one. :func:`usable_checkpoint` falls back to the
previous checkpoint when the newest is damaged, naming the file. Nothing here is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sd_core.store.files import atomic_write_text, file_checksum, matches_checksum, names_file

__all__ = [
    "Checkpoint",
    "checkpoint_name",
    "staging_folder",
    "begin_checkpoint",
    "write_rng",
    "write_checkpoint_files",
    "commit_checkpoint",
    "adopt_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "optimizer_state_to_files",
    "optimizer_state_from_files",
]

PREFIX = "checkpoint-"
LATEST = "latest"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def staging_folder(root: Path, step: int) -> Path:
    """Where the checkpoint for ``step`` is written before it is renamed into place."""
    return Path(root) / f".tmp-{checkpoint_name(step)}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with names_file(path):  # a full disk names the file
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))
        _fsync_path(path)


def _save_json(path: Path, obj: Any) -> None:
    with names_file(path):
        path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _fsync_path(path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text("utf-8"))


def optimizer_state_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a ``torch.optim`` state dict into tensors (``state.{param}.{key}``) and JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    meta = {"param_groups": state["param_groups"], "scalars": scalars, "param_ids": [str(p) for p in state["state"]]}
    return tensors, meta


def _tuples(group: dict[str, Any]) -> dict[str, Any]:
    return {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in group.items()}


def optimizer_state_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_state_to_files` (a state dict ``load_state_dict`` accepts)."""
    state: dict[int, dict[str, Any]] = {int(p): {} for p in meta["param_ids"]}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state[int(pid)][key] = value
    for pid, scal in meta["scalars"].items():
        state[int(pid)].update(scal)
    return {"state": state, "param_groups": [_tuples(g) for g in meta["param_groups"]]}


def begin_checkpoint(root: Path, step: int) -> Path:
    """Create (afresh) the temporary folder a checkpoint for ``step`` is written into."""
    tmp = staging_folder(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rng(tmp: Path, rank: int, states: dict[str, torch.Tensor]) -> None:
    """Write one process's RNG states (uint8 tensors) into the checkpoint being built."""
    _save_tensors(Path(tmp) / f"rng-rank{rank}.safetensors", states)


def write_checkpoint_files(
    tmp: Path,
    *,
    config: dict[str, Any],
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None,
    optimizer: dict[str, Any] | None,
    scheduler: dict[str, Any] | None,
    trainer_state: dict[str, Any],
) -> None:
    """Write everything but the RNG files into the temporary folder ``tmp``."""
    tmp = Path(tmp)
    _save_json(tmp / "config.json", config)
    _save_tensors(tmp / "model.safetensors", model)
    if ema is not None:
        _save_tensors(tmp / "ema.safetensors", ema)
    if optimizer is not None:
        tensors, meta = optimizer_state_to_files(optimizer)
        _save_tensors(tmp / "optimizer.safetensors", tensors)
        _save_json(tmp / "optimizer.json", meta)
    if scheduler is not None:
        _save_json(tmp / "scheduler.json", scheduler)
    _save_json(tmp / "trainer_state.json", trainer_state)


CHECKSUMS = "checksums.json"


class CheckpointError(ValueError):
    """A checkpoint folder is damaged or incomplete; the message names the file."""


def verify_checkpoint(folder: Path) -> None:
    """Raise :class:`CheckpointError` naming the first file that is missing, truncated or altered."""
    folder = Path(folder)
    try:
        sums = _read_json(folder / CHECKSUMS)
    except (FileNotFoundError, ValueError):
        raise CheckpointError(f"{folder / CHECKSUMS} is missing or unreadable") from None
    for name, want in sums.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if not matches_checksum(path, want):
            raise CheckpointError(f"{path} is damaged (its size or checksum differs from {CHECKSUMS})")


def commit_checkpoint(root: Path, step: int, keep_last: int | None) -> Path:
    """Seal the finished temporary folder (checksums), rename it into place, point ``latest`` at it, prune."""
    root = Path(root)
    tmp, final = staging_folder(root, step), root / checkpoint_name(step)
    sums = {p.name: file_checksum(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    _save_json(tmp / CHECKSUMS, sums)
    _fsync_path(tmp)
    if final.exists():  # an earlier run got this far before crashing; this one replaces it
        trash = root / f".trash-{final.name}"
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash)
    else:
        tmp.rename(final)
    _fsync_path(root)
    atomic_write_text(root / LATEST, final.name + "\n")
    if keep_last is not None:
        for old in list_checkpoints(root)[:-keep_last]:
            if old != final:
                shutil.rmtree(old)
    return final


def adopt_checkpoint(source: Path, root: Path) -> Path:
    """Make the checkpoint folder ``source`` (another run folder's) the latest checkpoint under ``root``, so a
    run resumes from it. Its files are hard-linked where the file system allows (checkpoint files are never
    changed in place, only replaced or removed with their folder), else copied; resuming checks them."""
    source, root = Path(source), Path(root)
    step = load_step(source)
    tmp, final = staging_folder(root, step), root / checkpoint_name(step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in sorted(p for p in source.iterdir() if p.is_file()):
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_path(root)
    atomic_write_text(root / LATEST, final.name + "\n")
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: Path) -> Path | None:
    """The folder ``latest`` names, or None when there is no checkpoint yet."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    folder = Path(root) / pointer.read_text("utf-8").strip()
    if not (folder / "trainer_state.json").exists():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which is missing or incomplete")
    return folder


def usable_checkpoint(root: Path, log: Any = None, *, move_aside: bool = True) -> Path | None:
    """The newest checkpoint under ``root`` that verifies. A damaged one is moved aside (``.damaged-…``, unless
    ``move_aside`` is off) with a warning naming the file, and the previous one is tried; None when none is left."""
    for folder in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(folder)
            return folder
        except CheckpointError as e:
            if not move_aside:
                continue
            aside = folder.with_name(f".damaged-{folder.name}")
            shutil.rmtree(aside, ignore_errors=True)
            folder.rename(aside)
            if log is not None:
                log.warning("checkpoint %s is not usable (%s); moved to %s, falling back to the previous one",
                            folder.name, e, aside.name)
    return None


def load_step(folder: Path) -> int:
    """The step a checkpoint folder was saved at."""
    return int(_read_json(Path(folder) / "trainer_state.json")["step"])


@dataclass
class Checkpoint:
    """Everything a checkpoint folder holds, loaded onto the CPU."""

    folder: Path
    config: dict[str, Any]
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    trainer_state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"])

    def rng(self, rank: int = 0) -> dict[str, torch.Tensor]:
        path = self.folder / f"rng-rank{rank}.safetensors"
        if not path.exists():
            raise FileNotFoundError(
                f"{self.folder} has no RNG state for process {rank}; resume with the same number of processes"
            )
        return load_file(str(path))


def load_checkpoint(folder: Path) -> Checkpoint:
    """Read a checkpoint folder (safetensors + JSON only), after checking its checksums."""
    folder = Path(folder)
    verify_checkpoint(folder)
    opt = None
    if (folder / "optimizer.json").exists():
        opt = optimizer_state_from_files(load_file(str(folder / "optimizer.safetensors")), _read_json(folder / "optimizer.json"))
    return Checkpoint(
        folder=folder,
        config=_read_json(folder / "config.json"),
        model=load_file(str(folder / "model.safetensors")),
        ema=load_file(str(folder / "ema.safetensors")) if (folder / "ema.safetensors").exists() else None,
        optimizer=opt,
        scheduler=_read_json(folder / "scheduler.json") if (folder / "scheduler.json").exists() else None,
        trainer_state=_read_json(folder / "trainer_state.json"),
    )
