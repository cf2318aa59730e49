"""Stopping cleanly: SIGTERM turned into ``SystemExit`` in the main thread while a crawl runs.

Ctrl-C (SIGINT) already raises ``KeyboardInterrupt`` in the main thread. SIGTERM (``kill``, a scheduler
stopping a job) by default ends the process on the spot: no ``finally`` runs, so the browser and its
driver are left running and a download in flight is not recorded. Inside :func:`sigterm_raises` it
raises ``SystemExit(143)`` instead, so both signals unwind the same way: pending downloads are cancelled,
finished ones recorded, the browser quit.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(SIGTERM_EXIT_CODE)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``SystemExit`` in the main thread.

    Only where the process still has the default SIGTERM action and this is the main thread: a handler
    someone else installed (an orchestrator's) is left alone, and only the main thread may set one.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_system_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
