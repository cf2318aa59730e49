"""One process: who it is (pid *and* start time), and how the helper processes a run starts are set up.

A pid alone does not name a process: once it has ended, the kernel may give its pid to another one. A
process is therefore named by its pid and its start time (:class:`Proc`, :func:`started`), as the reaper's
run file and a stage's running marker record it. Start times are counted from boot (the kernel's clock
ticks), not read off the wall clock: psutil's ``create_time()`` adds the boot time the kernel derives from
the wall clock, which moves by a second when the clock is stepped or slewed across a second boundary (NTP, a
VM's clock sync), and a run lasts hours.

:func:`child_popen_kw` (and :func:`new_group_dying_with_parent`, its ``preexec_fn``) are for the helpers a
run starts itself (chromedriver): a process group of their own, so Chromium's processes, which chromedriver
starts, can be found and stopped together; and the parent-death signal, so the child itself ends with the
thread that started it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

_PR_SET_PDEATHSIG = 1
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def started(p: psutil.Process) -> float:
    """When ``p`` started, in seconds since boot (Linux: ``starttime`` of ``/proc/<pid>/stat``, which no
    clock change moves); elsewhere psutil's wall-clock ``create_time()``. Compare only values of this
    function with each other."""
    if sys.platform.startswith("linux"):
        try:
            stat = Path(f"/proc/{p.pid}/stat").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            raise psutil.NoSuchProcess(p.pid) from None
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses; starttime is field 22
        return int(stat[stat.rindex(b")") + 2:].split()[19]) / CLK_TCK
    return p.create_time()


def same_start(a: float, b: float) -> bool:
    """Whether two :func:`started` values are one process's (they are whole clock ticks)."""
    return abs(a - b) < 0.5 / CLK_TCK


@dataclass(frozen=True)
class Proc:
    """One process, identified by pid and start time (``start``: :func:`started`; ``create_time``, the
    wall-clock time, is kept for people reading the run file)."""

    pid: int
    create_time: float
    pgid: int
    name: str = ""
    start: float | None = None  # None in run files written before it was recorded

    @classmethod
    def of(cls, p: psutil.Process) -> "Proc":
        with p.oneshot():
            return cls(p.pid, p.create_time(), os.getpgid(p.pid), p.name(), started(p))

    def live(self) -> psutil.Process | None:
        """The process if it still runs (same pid, same start time, not a zombie)."""
        try:
            p = psutil.Process(self.pid)
            if self.start is not None:
                same = same_start(started(p), self.start)
            else:
                same = abs(p.create_time() - self.create_time) <= 0.01
            if not same or p.status() == psutil.STATUS_ZOMBIE:
                return None
            return p
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            return None


# --- children we start ourselves ---------------------------------------------------------------

_libc: Any = None


def _prctl() -> Any:
    global _libc
    if _libc is None:  # loaded before any fork: nothing is looked up in the child
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc.prctl


def new_group_dying_with_parent(sig: int = signal.SIGTERM) -> Any:
    """A ``preexec_fn`` (Linux): the child gets the parent-death signal ``sig``; pass it with
    ``start_new_session=True`` so the child and what it starts form a process group of their own.

    The signal comes when the *thread* that started the child ends, so start such children from the
    thread that also stops them.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl, parent = _prctl(), os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: stop now
            os.kill(os.getpid(), sig)

    return preexec


def child_popen_kw() -> dict[str, Any]:
    """``subprocess.Popen`` arguments for a helper process of a run (e.g. Selenium's ``popen_kw``): its own
    process group, and, when started from the main thread, the parent-death signal. (From another thread
    the signal would come when that thread ends, which may be before the child is done with; there the
    reaper of :func:`sd_core.runtime.reaper.guard_children` alone stops it.)"""
    kw: dict[str, Any] = {"start_new_session": True}
    preexec = new_group_dying_with_parent() if threading.current_thread() is threading.main_thread() else None
    if preexec is not None:
        kw["preexec_fn"] = preexec
    return kw
