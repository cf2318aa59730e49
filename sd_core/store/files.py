"""Small filesystem helpers: atomic writes, JSON files and content hashes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status);
    elsewhere set and restored at once, under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_checksum(path: Path) -> dict[str, Any]:
    """A file's size and SHA-256, as manifests record them (``{"bytes": ..., "sha256": ...}``)."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def matches_checksum(path: Path, want: dict[str, Any]) -> bool:
    """Whether a file still has the size and SHA-256 recorded in ``want`` (the size is checked first)."""
    return Path(path).stat().st_size == want["bytes"] and sha256_file(path) == want["sha256"]


def stable_hash(obj: Any) -> str:
    """Hash of a JSON-serialisable object, independent of dict ordering."""
    return sha256_text(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str))[:16]


class DamagedFileError(RuntimeError):
    """A state file that does not read (truncated, garbled, empty, or failing its checksum). The message is
    one line that names the file and says what to do."""

    def __init__(self, path: Path, why: str, todo: str = "") -> None:
        self.path, self.why, self.todo = Path(path), why, todo
        super().__init__(f"{path} is damaged ({why})" + (f": {todo}" if todo else ""))


def json_problem(path: Path) -> tuple[Any, str | None]:
    """``(data, None)`` for a JSON file that reads, ``(None, None)`` for a missing one and ``(None, why)`` for
    one that exists but does not read (empty, truncated, not JSON, not UTF-8, unreadable)."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as e:
        return None, f"unreadable: {e.strerror if isinstance(e, OSError) else 'not UTF-8 text'}"
    if not text.strip():
        return None, "empty"
    try:
        return json.loads(text), None
    except ValueError as e:
        return None, f"not valid JSON: {e}"


def read_state_json(path: Path, *, todo: str = "", kind: type = dict) -> Any:
    """A JSON state file's content, None when it does not exist; :class:`DamagedFileError` (naming the file,
    saying ``todo``) when it exists but is empty, truncated, garbled or not a JSON ``kind``."""
    data, why = json_problem(path)
    if why is None and data is not None and not isinstance(data, kind):
        why = f"a JSON {type(data).__name__}, not an object"
    if why is not None:
        raise DamagedFileError(path, why, todo)
    return data


@contextmanager
def names_file(path: Path) -> Iterator[None]:
    """Errors of writing ``path`` name it: an ``OSError`` without a file name (a failed ``write``/``fsync``: disk
    full, quota, file size limit) is raised again with ``path`` in it, as is a writer library's error that
    reports the OS error only in its text (safetensors: ``I/O error: No space left on device (os error 28)``)."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    except Exception as e:  # noqa: BLE001  (re-raised unchanged unless it reports an OS error in its text)
        text = str(e)
        code = re.search(r"\(os error (\d+)\)|Os \{ code: (\d+)", text)  # how Rust writers (safetensors) say it
        if code is not None:
            number = int(code.group(1) or code.group(2))
            raise OSError(number, os.strerror(number), str(path)) from e
        if "No space left on device" in text:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``.

    A reader never sees a half-written file, and a run killed mid-write leaves
    only a ``.tmp`` file that the next write replaces. The file gets the mode a plain ``open()``
    would give it (0o666 less the umask: 0644 under the usual umask 022), not mkstemp's 0600.
    """
    path = Path(path)
    with names_file(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~current_umask())
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` atomically unless ``path`` already holds exactly it; True when it wrote. A file that
    did not change keeps its inode and mtime (tools that watch or sync the data directory see no change)."""
    data = text.encode("utf-8")
    try:
        if os.stat(path).st_size == len(data) and Path(path).read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    atomic_write_bytes(path, data)
    return True


def atomic_write_json(path: Path, obj: Any, *, compact: bool = False) -> None:
    """``obj`` as JSON, indented; ``compact``: on one line, for state files that grow with the collection
    (Python's C encoder writes them ~10x faster than its indenting one)."""
    if compact:
        atomic_write_text(path, json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str) + "\n")
    else:
        atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def json_checksum(obj: dict[str, Any], field: str = "checksum") -> str:
    """SHA-256 of a record's content without its own ``field`` (canonical JSON: sorted keys, no spaces)."""
    body = {k: v for k, v in obj.items() if k != field}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
                          ).hexdigest()


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except FileNotFoundError:
        return default


def sweep_temp_files(folder: Path) -> int:
    """Remove temp files (``.*.tmp``) left by writes a killed run did not finish, anywhere under ``folder``;
    returns how many. One ``os.walk`` that compares names only (no ``stat`` per file)."""
    removed = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if len(name) > 4 and name[0] == "." and name.endswith(".tmp"):
                Path(root, name).unlink(missing_ok=True)
                removed += 1
    return removed
