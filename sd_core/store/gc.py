"""Garbage in a data directory: what no current key refers to, found from the keys that are still live.

This module only knows the storage layout; which keys are live (the current configuration's latent and
text keys, the caption settings' digest, the ledger's images, the runs to keep) is worked out above it
(:func:`sd_core.status.find_garbage`) and handed in. A :class:`Garbage` lists every path it would remove with
its size; :func:`remove_garbage` removes them. Tensor shards that mix live and dead entries are rewritten:
the live entries go to a new shard (written atomically, as every shard), then the old one is removed and
the index is rebuilt from the shards, so a gc killed halfway leaves a store that still reads. A folder is
removed by renaming it aside first (``.trash-<name>-<id>``, one atomic step), then deleting that: a gc killed
meanwhile leaves no half-deleted run folder, only a trash folder that the next gc finishes deleting.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from sd_core.store.catalog import Catalog

_SHARD_RE = re.compile(r"^shard-\d{6,}\.safetensors$")
_ENTRY_RE = re.compile(r"^[0-9a-f]{32}$")
LOCK_NAME = ".emoji-sd.lock"


def is_leftover(name: str) -> bool:
    """Names that killed writes leave: atomic-write temp files (``.x.tmp``), staging and trash folders of
    exports, checkpoints and the VAE (``.tmp-*``, ``.trash-*``, ``.name.partial-*``)."""
    return name.startswith(".") and name != LOCK_NAME and (
        name.endswith(".tmp") or name.startswith((".tmp-", ".trash-")) or ".partial-" in name)


def size_of(path: Path, seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes of a file, or of every file under a folder (hard links counted once; symbolic links to folders
    not followed); 0 when absent. One ``scandir`` per folder and one ``lstat`` per file."""
    seen = set() if seen is None else seen
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        if (st.st_dev, st.st_ino) in seen:
            return 0
        seen.add((st.st_dev, st.st_ino))
        return st.st_size
    total, folders = 0, [os.fspath(path)]
    while folders:
        try:
            entries = os.scandir(folders.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir():  # a link to a folder is neither descended nor counted, as os.walk does
                        if not entry.is_symlink():
                            folders.append(entry.path)
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
    return total


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@dataclass(frozen=True)
class Removal:
    path: Path
    bytes: int
    why: str


@dataclass(frozen=True)
class ShardRewrite:
    """A shard that holds live and dead entries: its live entries move to a new shard."""

    store: Path
    shard: Path
    live_keys: tuple[Mapping[str, object], ...]
    entries: int
    bytes: int  # estimated bytes freed: the shard's size times its dead share


@dataclass
class Garbage:
    root: Path
    removals: list[Removal] = field(default_factory=list)
    rewrites: list[ShardRewrite] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # what was left alone, and why

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.removals) + sum(r.bytes for r in self.rewrites)

    def lines(self) -> list[str]:
        def rel(p: Path) -> str:
            try:
                return str(p.relative_to(self.root))
            except ValueError:
                return str(p)

        out = [f"{human(r.bytes):>9}  {rel(r.path)}  ({r.why})" for r in self.removals]
        out += [f"{human(r.bytes):>9}  {rel(r.shard)}  (rewritten with its {len(r.live_keys)} live of "
                f"{r.entries} entries)" for r in self.rewrites]
        out += [f"     kept  {k}" for k in self.kept]
        return out


# --- finding --------------------------------------------------------------------------------------


def leftovers(root: Path) -> list[Removal]:
    """Temp files and staging/trash folders anywhere under ``root`` (not descending into them)."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs):
            if is_leftover(name):
                why = "left by an unfinished removal" if name.startswith(".trash-") else "left by an unfinished write"
                out.append(Removal(Path(dirpath) / name, size_of(Path(dirpath) / name), why))
        dirs[:] = [d for d in dirs if not is_leftover(d)]
        for name in sorted(files):
            if is_leftover(name):
                out.append(Removal(Path(dirpath) / name, size_of(Path(dirpath) / name), "left by an unfinished write"))
    return out


def _shard_entry_ids(path: Path) -> list[str] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # damaged: safetensors raises its own error types
        return None
    return [k for k in meta if _ENTRY_RE.match(k)]


def stale_shards(store_root: Path, live_keys: Iterable[Mapping[str, object]]) -> tuple[list[Removal], list[ShardRewrite]]:
    """Shards of the tensor store at ``store_root`` with no live entry (removed) or some (rewritten).

    An entry is live when its key is in ``live_keys`` and the store's index points at this copy of it
    (an older copy of a key stored again later is dead)."""
    from sd_core.store.tensors import TensorStore

    shards_dir = Path(store_root) / "shards"
    damaged = Path(store_root) / "damaged"  # shards moved aside when their checksums failed; already recomputed
    moved_aside = [Removal(p, size_of(p), "a damaged shard, moved aside (its entries were computed again)")
                   for p in sorted(damaged.iterdir())] if damaged.is_dir() else []
    if not shards_dir.is_dir():
        return moved_aside, []
    store = TensorStore(store_root, sweep=False)  # finding removes nothing
    # by_stat: a shard verified before and untouched since is not read again
    where = store.keys_by_shard(list(live_keys), by_stat=True)
    removals, rewrites = moved_aside, []
    for path in sorted(p for p in shards_dir.iterdir() if _SHARD_RE.match(p.name)):
        size = size_of(path)
        live = where.get(path.name, [])
        ids = _shard_entry_ids(path)
        if ids is None:
            removals.append(Removal(path, size, "unreadable shard"))
        elif not live:
            removals.append(Removal(path, size, f"none of its {len(ids)} entries is a current key"))
        elif len(live) < len(ids):
            rewrites.append(ShardRewrite(Path(store_root), path, tuple(live), len(ids),
                                         size * (len(ids) - len(live)) // len(ids)))
    return removals, rewrites


def stale_caption_logs(captions_dir: Path, digest: str) -> list[Removal]:
    """Caption logs (and their key files) of other caption settings than ``digest``."""
    if not Path(captions_dir).is_dir():
        return []
    return [Removal(p, size_of(p), "caption log of other caption settings")
            for p in sorted(Path(captions_dir).iterdir())
            if p.is_file() and not p.name.startswith(f"{digest}.") and not is_leftover(p.name)]


def stale_raw(raw_dir: Path, live_md5s: set[str]) -> list[Removal]:
    """Downloaded bytes (``raw/xx/<md5>``) of no image in the ledger."""
    out = []
    if not Path(raw_dir).is_dir():
        return out
    for sub in sorted(Path(raw_dir).iterdir()):
        if not sub.is_dir():
            continue
        for p in sorted(sub.iterdir()):
            if p.name not in live_md5s and not is_leftover(p.name):
                out.append(Removal(p, size_of(p), "bytes of no image in the ledger"))
    return out


def pointed_runs(catalog: Catalog) -> dict[str, str]:
    """Runs that a pointer file names (``models/unet/latest.json``, and any other ``{"run": ...}`` JSON
    beside it or in ``models/``, e.g. a champion pointer): run name → the pointer's name."""
    out: dict[str, str] = {}
    for folder in (catalog.train_dir, catalog.train_dir.parent):
        for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                data = json.loads(f.read_text("utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and isinstance(data.get("run"), str):
                out.setdefault(data["run"], f.name)
    return out


def run_started(run: Path) -> float:
    """When a run folder's run (re)started: its ``plan.json`` is written then (the folder's own time otherwise)."""
    plan = run / "plan.json"
    return (plan if plan.exists() else run).stat().st_mtime


def stale_runs(catalog: Catalog, keep: Mapping[str, str] | set[str], keep_newest: int = 0,
               complete: Callable[[Path], bool] | None = None) -> tuple[list[Removal], list[str]]:
    """Training runs (``models/unet/run-*``) other than those a pointer names (``latest.json``, see
    :func:`pointed_runs`), those in ``keep`` (run name → why, or a set of the current settings' runs) and
    the ``keep_newest`` most recent runs with a complete export
    (``complete(run)``; by default a ``model/`` folder): a folder whose run or removal was cut short never
    counts as one of those kept. Nothing is removed when ``latest.json`` does not read."""
    complete = complete or (lambda run: (run / "model").is_dir())
    runs = sorted((p for p in catalog.train_dir.glob("run-*") if p.is_dir()), key=run_started, reverse=True)
    if not runs:
        return [], []
    if catalog.latest_run() is None:
        return [], [f"{len(runs)} training runs: {catalog.latest_run_json.name} does not name the latest"]
    pointed = pointed_runs(catalog)
    whole = [p for p in runs if complete(p)]
    newest = {p.name for p in whole[:keep_newest]}
    kept, removals = [], []
    for p in runs:
        rel = p.relative_to(catalog.root)
        if p.name in pointed:
            kept.append(f"{rel}  (named by {pointed[p.name]})")
        elif p.name in keep:
            why = keep[p.name] if isinstance(keep, Mapping) else "the current settings' run"
            kept.append(f"{rel}  ({why})")
        elif p.name in newest:
            kept.append(f"{rel}  (one of the {keep_newest} newest)")
        elif p not in whole:
            removals.append(Removal(p, size_of(p), "training run without a complete export (cut short)"))
        else:
            removals.append(Removal(p, size_of(p), "training run no key refers to"))
    return removals, kept


# --- applying ---------------------------------------------------------------------------------


def remove_aside(path: Path) -> None:
    """Remove a file, or a folder crash-safely: renamed aside first (``.trash-<name>-<id>``, which
    :func:`is_leftover` knows), then deleted, so it is either whole or gone, and a removal killed halfway is
    finished by the next gc."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        if not is_leftover(path.name):
            trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
            os.replace(path, trash)
            path = trash
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)



def remove_garbage(garbage: Garbage) -> int:
    """Remove what ``garbage`` lists and rewrite its mixed shards; returns the bytes freed (as listed)."""
    from sd_core.store.tensors import TensorStore

    stores = {r.store for r in garbage.rewrites} | {r.path.parent.parent for r in garbage.removals
                                                 if _SHARD_RE.match(r.path.name)}
    for rw in garbage.rewrites:
        store = TensorStore(rw.store)
        entries = store.read_many(list(rw.live_keys))
        store.put(list(zip(rw.live_keys, entries)))  # a new shard, and the index points there
        rw.shard.unlink(missing_ok=True)
    for r in sorted(garbage.removals, key=lambda r: len(r.path.parts), reverse=True):
        remove_aside(r.path)
    for root in stores:
        TensorStore(root).rebuild_index()
    return garbage.bytes


def sizes(paths: Sequence[Path]) -> int:
    """Bytes on disk of ``paths`` together (hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    return sum(size_of(p, seen) for p in paths)
