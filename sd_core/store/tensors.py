"""Append-only cache of per-item tensors in safetensors shards, addressed by a key dict.

Layout under ``root``::

    index.json                      {"version": 1, "shards": [...], "entries": {entry id: shard name}}
    shards/shard-000001.safetensors tensors named "<entry id>/<name>"; metadata {entry id: key JSON}

An entry id is a hash of the key's canonical JSON. Every shard carries the full key of each
entry it holds, so the index can always be rebuilt from the shards and ``get`` verifies that
what it found was stored under exactly the key asked for. Shards are written once (temp file,
then rename) and never rewritten; a later ``put`` of the same key lands in a new shard and the
index points there. Reads open one shard at a time and load only the tensors asked for.

Every shard also carries a SHA-256 of each entry's tensor bytes (metadata ``checksums``). The first time a
process reads a shard's data it reads it whole and checks them; a shard that fails (bit rot, a same-size
overwrite, or no checksums at all) is moved to ``damaged/`` with a warning naming it, and its entries read
as missing, so the stage that owns the store computes them again.

Questions that read no tensor (``missing``/``shard_of`` with ``by_stat=True``: what to encode, ``status``,
``gc``) need not read every shard's data each run: the index records, per shard, the file's size, mtime, ctime
and inode when its data was last verified (``verified``; shards are never rewritten, so these change only
when something else touched the file). A shard whose stat still matches counts as intact; one that does not,
or was never recorded, is verified by reading it, as above. What such a look-up cannot see is a change that
keeps all four (silent media corruption): that is found when the data is read (training).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sd_core.store.files import atomic_write_text, read_json, sweep_temp_files

KeyValue = Union[str, int, float, bool, None]
Key = Mapping[str, KeyValue]
Tensors = dict[str, torch.Tensor]

log = logging.getLogger(__name__)

INDEX_VERSION = 1
_SHARD_RE = re.compile(r"^shard-(\d{6,})\.safetensors$")
_METADATA_CACHE = 128


_KEY_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)  # one encoder: ~2x faster
_KEY_VALUE_TYPES = frozenset({str, int, float, bool, type(None)})


def canonical_key(key: Key) -> str:
    """The key as compact JSON with sorted fields: what is hashed and stored."""
    if not all(k.__class__ is str and v.__class__ in _KEY_VALUE_TYPES for k, v in key.items()):
        for name, value in key.items():  # subclasses of the allowed types pass; anything else is named
            if not isinstance(name, str):
                raise TypeError(f"key field names must be str, got {name!r}")
            if value is not None and not isinstance(value, (str, int, float, bool)):
                raise TypeError(f"key field {name!r} must be str, int, float, bool or None, got {type(value).__name__}")
    return _KEY_JSON.encode(dict(key))


def entry_id(key: Key) -> str:
    """32 hex digits of the SHA-256 of the canonical key."""
    return hashlib.sha256(canonical_key(key).encode("utf-8")).hexdigest()[:32]


class TensorStore:
    """Per-item tensor entries in immutable safetensors shards with a rebuildable index."""

    def __init__(self, root: Path, *, shard_size: int = 256, sweep: bool = True, repair: bool = True) -> None:
        """``sweep`` removes temp files of killed writes; pass False where other processes of the
        same run may be writing to this store at the same moment. ``repair=False`` only reads: a damaged
        shard reads as missing but is left where it is (for ``status``)."""
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.root = Path(root)
        self.shard_size = shard_size
        self.repair = repair
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        if sweep:
            sweep_temp_files(self.root)
        self._metadata: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._verified: set[str] = set()
        self._index: dict[str, str] = {}
        self._indexed_shards: set[str] = set()
        self._stats: dict[str, list[int]] = {}  # shard -> its file's stat when its data was last verified
        self._stat_matched: set[str] = set()  # shards whose file had that stat when this process looked
        self._stats_changed = False
        self._load_index()

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    # --- index ------------------------------------------------------------------------------

    def _shard_files(self) -> list[str]:
        names = [p.name for p in self.shards_dir.iterdir() if _SHARD_RE.match(p.name)]
        return sorted(names, key=lambda n: int(_SHARD_RE.match(n).group(1)))  # type: ignore[union-attr]

    def _load_index(self) -> None:
        try:
            data = read_json(self.index_path)
        except (OSError, ValueError):
            data = None
        if not _valid_index(data):
            self.rebuild_index()
            return
        present = set(self._shard_files())
        indexed = set(data["shards"])
        if not indexed <= present or not set(data["entries"].values()) <= indexed:
            self.rebuild_index()
            return
        self._index = dict(data["entries"])
        self._indexed_shards = indexed
        stats = data.get("verified")
        if isinstance(stats, dict):
            self._stats = {n: v for n, v in stats.items() if n in indexed and isinstance(v, list)}
        unindexed = [n for n in self._shard_files() if n not in indexed]
        if unindexed:
            for name in unindexed:
                self._adopt(name)
            self._write_index()

    def _adopt(self, name: str) -> bool:
        """Point the index at every entry of shard ``name``; False when its header does not read."""
        meta = self._shard_metadata(name)
        if meta is None:
            return False
        for eid in meta:
            if _is_entry_id(eid):
                self._index[eid] = name
        self._indexed_shards.add(name)
        return True

    def rebuild_index(self) -> int:
        """Rebuild ``index.json`` from the shards' metadata (later shards win); returns the entry count."""
        self._index = {}
        self._indexed_shards = set()
        self._metadata.clear()
        for name in self._shard_files():
            self._adopt(name)
        self._write_index()
        return len(self._index)

    def _write_index(self) -> None:
        data = {"version": INDEX_VERSION, "shards": sorted(self._indexed_shards), "entries": self._index,
                "verified": {n: self._stats[n] for n in sorted(self._indexed_shards) if n in self._stats}}
        atomic_write_text(self.index_path, json.dumps(data, separators=(",", ":")) + "\n")
        self._stats_changed = False

    def _file_stat(self, name: str) -> list[int] | None:
        try:
            st = os.stat(self.shards_dir / name)
        except OSError:
            return None
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def _save_stats(self) -> None:
        """Write the index when this process verified shards it did not know to be intact (not read-only)."""
        if self._stats_changed and self.repair:
            self._write_index()

    def _shard_metadata(self, name: str) -> dict[str, str] | None:
        """The shard's header metadata (entry id → key JSON), from a small LRU cache."""
        if name in self._metadata:
            self._metadata.move_to_end(name)
            return self._metadata[name]
        try:
            with safe_open(self.shards_dir / name, framework="pt") as f:
                meta = dict(f.metadata() or {})
        except Exception:  # missing or damaged file: safetensors raises its own error types
            return None
        self._metadata[name] = meta
        while len(self._metadata) > _METADATA_CACHE:
            self._metadata.popitem(last=False)
        return meta

    # --- reads ------------------------------------------------------------------------------

    @property
    def damaged_dir(self) -> Path:
        return self.root / "damaged"

    def _locate(self, key: Key, by_stat: bool = False) -> tuple[str, str] | None:
        """(entry id, shard name) when the index holds ``key``, the shard's metadata confirms it and the shard's
        data matches its checksums (checked once per shard and process; with ``by_stat``, a shard whose file
        has the stat recorded when its data was last verified counts as checked)."""
        key_json = canonical_key(key)
        eid = hashlib.sha256(key_json.encode("utf-8")).hexdigest()[:32]  # entry_id(key)
        name = self._index.get(eid)
        if name is None:
            return None
        meta = self._shard_metadata(name)
        if meta is None or meta.get(eid) != key_json:
            return None
        if name not in self._verified:
            if by_stat and name in self._stat_matched:
                return eid, name
            if by_stat and name in self._stats and self._stats[name] == self._file_stat(name):
                self._stat_matched.add(name)  # one stat per shard and process
                return eid, name
            if not self._verify(name):
                return None
        return eid, name

    def _verify(self, name: str) -> bool:
        """Check every entry of shard ``name`` against its checksum; move it aside when one fails."""
        meta = self._shard_metadata(name) or {}
        problem = None
        try:
            sums = json.loads(meta["checksums"])
            with safe_open(self.shards_dir / name, framework="pt") as f:
                tensor_names: dict[str, list[str]] = {}  # entry id -> its tensors' names, listed once per shard
                for k in f.keys():
                    tensor_names.setdefault(k.partition("/")[0], []).append(k)
                for eid in (e for e in meta if _is_entry_id(e)):
                    entry = {k[len(eid) + 1 :]: f.get_tensor(k) for k in tensor_names.get(eid, ())}
                    if _digest(entry) != sums.get(eid):
                        problem = f"entry {eid} does not match its checksum"
                        break
        except KeyError:
            problem = "it has no checksums (written by an older emoji-sd)"
        except Exception as e:  # unreadable data: safetensors raises its own error types
            problem = f"its data does not read ({type(e).__name__})"
        if problem is None:
            self._verified.add(name)
            stat = self._file_stat(name)
            if stat is not None and self._stats.get(name) != stat:
                self._stats[name] = stat
                self._stats_changed = True
            return True
        if not self.repair:
            return False
        self.damaged_dir.mkdir(exist_ok=True)
        try:
            os.replace(self.shards_dir / name, self.damaged_dir / name)
        except FileNotFoundError:  # another process moved it first
            pass
        dropped = [e for e, n in self._index.items() if n == name]
        for e in dropped:
            del self._index[e]
        self._indexed_shards.discard(name)
        self._metadata.pop(name, None)
        self._stats.pop(name, None)
        self._write_index()
        log.warning("%s is damaged (%s): moved to %s; its %d entries will be computed again",
                    self.shards_dir / name, problem, self.damaged_dir, len(dropped))
        return False

    def contains(self, key: Key) -> bool:
        return self._locate(key) is not None

    def __contains__(self, key: Key) -> bool:
        return self.contains(key)

    def __len__(self) -> int:
        return len(self._index)

    def get(self, key: Key) -> Tensors | None:
        """The entry's tensors; None when absent or stored under a different key (the caller recomputes)."""
        found = self._locate(key)
        if found is None:
            return None
        eid, name = found
        try:
            with safe_open(self.shards_dir / name, framework="pt") as f:
                return _read_entry(f, eid)
        except Exception:  # a shard damaged after its header was read
            return None

    def shard_of(self, key: Key, *, by_stat: bool = False) -> str | None:
        """Name of the shard holding ``key`` (None when absent or stale); ``by_stat`` as in :meth:`missing`."""
        found = self._locate(key, by_stat)
        return None if found is None else found[1]

    def keys_by_shard(self, keys: Sequence[Key], *, by_stat: bool = False) -> dict[str, list[Key]]:
        """The keys present (as :meth:`missing` tells), each once, grouped by the shard that holds it."""
        out: dict[str, list[Key]] = {}
        seen: set[str] = set()
        for key in keys:
            found = self._locate(key, by_stat)
            if found is not None and found[0] not in seen:
                seen.add(found[0])
                out.setdefault(found[1], []).append(key)
        self._save_stats()
        return out

    def read_many(self, keys: Sequence[Key], names: Sequence[str] | None = None) -> list[Tensors]:
        """The entries of ``keys``, in order, opening each shard once (``names``: only these tensors).

        Raises ``KeyError`` naming the first key that is absent or stale, before anything is read.
        """
        where: dict[str, list[tuple[int, str]]] = {}
        for pos, key in enumerate(keys):
            found = self._locate(key)
            if found is None:
                raise KeyError(f"not in the store {self.root}: {canonical_key(key)}")
            where.setdefault(found[1], []).append((pos, found[0]))
        out: list[Tensors | None] = [None] * len(keys)
        for name, entries in where.items():
            with safe_open(self.shards_dir / name, framework="pt") as f:
                for pos, eid in entries:
                    out[pos] = ({t: f.get_tensor(f"{eid}/{t}") for t in names} if names is not None
                                else _read_entry(f, eid))
        self._save_stats()
        return out  # type: ignore[return-value]

    def missing(self, keys: Sequence[Key], *, by_stat: bool = False) -> list[int]:
        """Positions of the keys that ``get`` would answer None for.

        ``by_stat``: a shard verified before (its stat recorded in the index) whose file still has that stat
        counts as intact without reading its data (see the module's docstring): what planning, ``status`` and
        ``gc`` ask, at the cost of a ``stat`` per shard instead of a read of every cached byte."""
        out = [i for i, key in enumerate(keys) if self._locate(key, by_stat) is None]
        self._save_stats()
        return out

    def stats(self) -> dict[str, int]:
        """Shards, entries and bytes on disk."""
        files = self._shard_files()
        size = sum((self.shards_dir / n).stat().st_size for n in files)
        return {"shards": len(files), "entries": len(self._index), "bytes": size}

    # --- writes -----------------------------------------------------------------------------

    def put(self, entries: Sequence[tuple[Key, Tensors]]) -> None:
        """Write the entries into new shard(s) of at most ``shard_size`` entries, then the index.

        A key given twice keeps its last tensors. Nothing existing is rewritten.
        """
        unique: dict[str, tuple[str, Tensors]] = {}
        for key, tensors in entries:
            if not tensors:
                raise ValueError("an entry needs at least one tensor")
            for tname in tensors:
                if not isinstance(tname, str) or not tname or "/" in tname:
                    raise ValueError(f"tensor names must be non-empty strings without '/', got {tname!r}")
            eid = entry_id(key)
            unique.pop(eid, None)
            unique[eid] = (canonical_key(key), tensors)
        items = list(unique.items())
        if not items:
            return
        for start in range(0, len(items), self.shard_size):
            chunk = items[start : start + self.shard_size]
            name = self._write_shard(chunk)
            for eid, _ in chunk:
                self._index[eid] = name
            self._indexed_shards.add(name)
        self._write_index()

    def _next_shard_name(self) -> str:
        numbers = [int(m.group(1)) for n in os.listdir(self.shards_dir) if (m := _SHARD_RE.match(n))]
        return f"shard-{max(numbers, default=0) + 1:06d}.safetensors"

    def _write_shard(self, chunk: list[tuple[str, tuple[str, Tensors]]]) -> str:
        tensors: dict[str, torch.Tensor] = {}
        metadata: dict[str, str] = {"format": "pt"}
        sums: dict[str, str] = {}
        for eid, (key_json, entry) in chunk:
            metadata[eid] = key_json
            local = {tname: t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
                     for tname, t in entry.items()}
            sums[eid] = _digest(local)
            tensors.update({f"{eid}/{tname}": t for tname, t in local.items()})
        metadata["checksums"] = json.dumps(sums, separators=(",", ":"))
        tmp = self.shards_dir / f".shard.{uuid.uuid4().hex[:12]}.tmp"
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            name = self._claim_name(tmp)
        finally:
            tmp.unlink(missing_ok=True)
        self._metadata[name] = metadata
        self._verified.add(name)
        stat = self._file_stat(name)  # after the temp name is gone (its unlink moves the ctime)
        if stat is not None:
            self._stats[name] = stat
        return name

    def _claim_name(self, tmp: Path) -> str:
        """Give the finished temp file the next free shard name; an existing shard is never replaced."""
        while True:
            name = self._next_shard_name()
            try:
                os.link(tmp, self.shards_dir / name)
                return name
            except FileExistsError:
                continue
            except OSError:  # a filesystem without hard links
                if (self.shards_dir / name).exists():
                    continue
                os.replace(tmp, self.shards_dir / name)
                return name


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of an entry's tensors: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read_entry(f: object, eid: str) -> Tensors:
    prefix = eid + "/"
    return {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # type: ignore[attr-defined]


def _is_entry_id(name: str) -> bool:
    return len(name) == 32 and all(c in "0123456789abcdef" for c in name)


def _valid_index(data: object) -> bool:
    return (
        isinstance(data, dict)
        and data.get("version") == INDEX_VERSION
        and isinstance(data.get("shards"), list)
        and all(isinstance(n, str) for n in data["shards"])
        and isinstance(data.get("entries"), dict)
        and all(isinstance(n, str) for n in data["entries"].values())
    )
