"""The data-directory lock: two runs on one data directory cannot interleave."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class DataDirBusy(RuntimeError):
    """Another emoji-sd run holds the data directory."""


@contextmanager
def data_dir_lock(data_dir: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``data_dir`` for the duration of a run.

    Two runs on one data directory would race on the ledger and the dataset;
    the second one stops with a clear message (or waits, with ``wait=True``).
    The lock is released by the OS if the process dies.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
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
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
