"""Stopping cleanly: SIGTERM and SIGINT unwind a run like an exception, so every ``finally`` and ``with`` exit
runs (the browser quits, downloads in flight are cancelled and finished ones recorded, the demo site and Dask
stop, Prefect's temporary server stops at exit).

By default SIGTERM (``kill``, a scheduler stopping a job) ends the process on the spot: no ``finally`` runs.

* :func:`signals_unwind` is what the CLI wraps a whole command in: SIGTERM and SIGINT raise
  :class:`Interrupted` in the main thread; a second one exits at once (what the run started is then stopped
  by its reaper, :mod:`sd_core.runtime.reaper`). :func:`stop_reason` gives the exit code and words for it.
* :func:`sigterm_raises` is for library code run without the CLI (a crawl called from Python, a Prefect
  worker): SIGTERM raises ``SystemExit(143)``, so it unwinds as Ctrl-C's ``KeyboardInterrupt`` does; a
  handler someone else installed (the CLI's, an orchestrator's) is left alone.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT, raised in the main thread by :func:`signals_unwind`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def signals_unwind() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT raise :class:`Interrupted` in the main thread; a second one
    exits at once with ``128 + signum``. Outside the main thread (an embedding application) nothing is
    changed: only the main thread may set handlers."""
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if received:
            os._exit(128 + signum)
        received.append(signum)
        raise Interrupted(signum)

    try:
        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: leave its handlers alone
        yield
        return
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def stop_reason(e: BaseException) -> tuple[int, str]:
    """The exit code (``128 + signum``) and words (``stopped by SIGTERM``) for a run stopped by a signal:
    :class:`Interrupted`, a plain ``KeyboardInterrupt`` (SIGINT), or an exception that carries the signal as
    ``signal`` (Prefect's ``TerminationSignal``)."""
    signum = int(getattr(e, "signum", getattr(e, "signal", signal.SIGINT)))
    return 128 + signum, f"stopped by {signal.Signals(signum).name}"


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(SIGTERM_EXIT_CODE)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``SystemExit(143)`` in the main thread.

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
