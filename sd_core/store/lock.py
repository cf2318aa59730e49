"""The data-directory lock: two runs on one data directory cannot interleave."""

from __future__ import annotations

import fcntl
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class DataDirBusy(RuntimeError):
    """Another emoji-sd run holds the data directory."""


class NotADataDir(ValueError):
    """The data directory's path names something that is not a directory."""


# Data dirs this process holds: the CLI takes the lock before Prefect starts, and the flow's own
# check inside the same process then passes (flock would refuse a second descriptor of this process).
_held: dict[Path, int] = {}
_held_guard = threading.Lock()


def check_data_dir(data_dir: Path) -> Path:
    """``data_dir`` as a Path; refused, naming it, when it exists and is not a directory."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise NotADataDir(f"data_dir = {data_dir} is a file, not a directory")
    return data_dir


@contextmanager
def data_dir_lock(data_dir: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``data_dir`` for the duration of a run.

    Two runs on one data directory would race on the ledger and the dataset;
    the second one stops with a clear message (or waits, with ``wait=True``).
    The lock is released by the OS if the process dies. Within one process the lock is re-entrant:
    a block inside another one on the same directory passes at once.
    """
    data_dir = check_data_dir(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    key = data_dir.resolve()
    with _held_guard:
        nested = key in _held
        if nested:
            _held[key] += 1
    if nested:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    lock_path = data_dir / ".emoji-sd.lock"
    with open(lock_path, "a+") as fh:
        flags = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
        try:
            fcntl.flock(fh, flags)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise DataDirBusy(
                f"{data_dir} is in use by another emoji-sd run ({holder}); "
                "wait for it to finish or pass --wait-for-lock"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        with _held_guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _held_guard:
                del _held[key]
            fcntl.flock(fh, fcntl.LOCK_UN)
