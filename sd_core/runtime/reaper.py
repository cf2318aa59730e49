"""The reaper: child processes of a run never outlive it.

A run starts processes of its own: Prefect's temporary server (uvicorn), chromedriver and its Chromium
processes, Dask workers. However the run ends (an exception, SIGTERM, SIGKILL), they end with it:

* :func:`guard_children` starts a small watcher (the *reaper*, :func:`main` of this module) in a
  session of its own. Every half second it records each descendant of the run (pid, start time, process
  group) and writes them to the data directory's run file. When the run's process is gone (its pipe to the
  reaper closes, or it no longer exists), the reaper sends SIGTERM to whichever of them still run, and
  SIGKILL to those still there after a grace period.
* The helpers a run starts itself (chromedriver) get a process group of their own and the parent-death
  signal: :func:`sd_core.runtime.process.child_popen_kw`.
* :func:`reap_dead_run` is called by the next run (holding the data-dir lock) for the case where the reaper
  was killed too: it stops what the run file names, if that run's process is gone.

A process is named by its pid *and* start time (:class:`sd_core.runtime.process.Proc`), and a process
group's members are only signalled when they started after the run did, so a pid reused by an unrelated
process is never signalled.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Iterator

import psutil

from sd_core.runtime.process import CLK_TCK, Proc, started
from sd_core.store.files import atomic_write_json, read_json

POLL_S = 0.5
GRACE_S = 3.0


# --- finding and stopping ----------------------------------------------------------------------


def _group_members(pgids: set[int], since: Proc, protect: set[int]) -> list[psutil.Process]:
    """Processes in ``pgids`` that started no earlier than the process ``since`` (so: after the run began)."""
    if not pgids:
        return []
    found = []
    for p in psutil.process_iter(["create_time", "status"]):
        try:
            if p.pid in protect or p.info["status"] == psutil.STATUS_ZOMBIE or os.getpgid(p.pid) not in pgids:
                continue
            if since.start is not None:
                after = started(p) + 0.5 / CLK_TCK >= since.start
            else:
                after = (p.info["create_time"] or 0) + 0.01 >= since.create_time
            if after:
                found.append(p)
        except (psutil.NoSuchProcess, ProcessLookupError, psutil.AccessDenied):
            pass
    return found


def stop_processes(procs: Iterable[psutil.Process], grace_s: float = GRACE_S) -> int:
    """SIGTERM, then SIGKILL after ``grace_s`` for those still running; returns how many were signalled."""
    targets = []
    for p in procs:
        try:
            p.terminate()  # psutil refuses a pid that was reused since ``p`` was made
            targets.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    _, alive = psutil.wait_procs(targets, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return len(targets)


def _protected() -> set[int]:
    """This process and its ancestors: never signalled."""
    me = psutil.Process()
    return {me.pid, *(p.pid for p in me.parents())}


def _proc(d: dict[str, Any]) -> Proc:
    """A :class:`Proc` read back from a run file."""
    start = d.get("start")
    return Proc(int(d["pid"]), float(d["create_time"]), int(d.get("pgid", 0)), d.get("name", ""),
                None if start is None else float(start))


def _leftovers(record: dict[str, Any], protect: set[int]) -> list[psutil.Process]:
    """What a run record names that still runs: recorded processes (same start time) and the members of
    the process groups the run created that started after the run did."""
    owner = _proc(record.get("owner") or {"pid": 0, "create_time": time.time(), "pgid": 0})
    own_groups = {int(g) for g in record.get("owner_groups", [])}
    found: dict[int, psutil.Process] = {}
    groups: set[int] = set()
    for c in record.get("children", []):
        proc = _proc(c)
        if proc.pgid not in own_groups:
            groups.add(proc.pgid)
        p = proc.live()
        if p is not None and p.pid not in protect:
            found[p.pid] = p
    for p in _group_members(groups - own_groups, owner, protect):
        found.setdefault(p.pid, p)
    return list(found.values())


def reap_dead_run(run_file: Path, grace_s: float = GRACE_S) -> int:
    """Stop what an earlier run left behind, when that run's process is gone; returns how many."""
    record = read_json(Path(run_file))
    if not isinstance(record, dict) or not isinstance(record.get("owner"), dict):
        return 0
    if _proc(record["owner"]).live() is not None:
        return 0  # that run is still going
    return stop_processes(_leftovers(record, _protected()), grace_s)


# --- the reaper ---------------------------------------------------------------------------------

RELEASE = b"r"  # the owner's guarded block ended: stop recording, keep watching until the owner exits


def _record(owner: Proc, reaper: int, seen: dict[int, Proc], owner_groups: set[int]) -> dict[str, Any]:
    return {"owner": asdict(owner), "reaper": reaper, "owner_groups": sorted(owner_groups),
            "children": [asdict(p) for p in seen.values()]}


def watch(owner_pid: int, run_file: Path | None, *, wake_fd: int = 0, poll_s: float = POLL_S,
          grace_s: float = GRACE_S) -> int:
    """The reaper's loop: record the owner's descendants until the owner releases it (its guarded block
    ended), then wait until the owner process is gone and stop what it recorded that still runs.

    ``wake_fd`` is the read end of a pipe the owner holds open until it exits: end-of-file says the owner
    exited (the owner's liveness is also checked, in case a forked child inherited the pipe).
    Returns how many processes were signalled at the end.
    """
    try:
        owner = Proc.of(psutil.Process(owner_pid))
    except psutil.NoSuchProcess:
        return 0
    me = os.getpid()
    owner_groups = {owner.pgid, os.getpgid(0)}  # never stopped as groups: the owner's shell job, ours
    seen: dict[int, Proc] = {}
    written: dict[str, Any] | None = None
    recording = True
    while True:
        ready, _, _ = select.select([wake_fd], [], [], poll_s if recording else 4 * poll_s)
        if ready:
            data = os.read(wake_fd, 64)
            if not data:
                break
            recording = recording and RELEASE not in data
        if owner.live() is None:
            break
        if not recording:
            continue
        try:
            kids = psutil.Process(owner.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for k in kids:
            if k.pid != me and k.pid not in seen:
                try:
                    seen[k.pid] = Proc.of(k)
                except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
                    pass
        record = _record(owner, me, seen, owner_groups)
        if run_file is not None and record != written:
            try:
                atomic_write_json(run_file, record)
                written = record
            except OSError:
                pass
    # the owner is gone
    protect = {me, *(p.pid for p in psutil.Process().parents())}
    return stop_processes(_leftovers(_record(owner, me, seen, owner_groups), protect), grace_s)


# the reaper imports this very module, wherever the running sd_core comes from
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_REAPER = "import sys; sys.path.insert(0, sys.argv[1]); from sd_core.runtime.reaper import main; sys.exit(main(sys.argv[2:]))"
_KEEP: list[Any] = []  # write ends of the reapers' pipes (and the reapers): open until this process exits


@contextmanager
def guard_children(run_file: Path | None = None) -> Iterator[subprocess.Popen]:
    """Within the block, every process this one starts (and what those start) is recorded by a reaper
    process, and stopped once this process has ended, however it ends.

    After the block the reaper records nothing new but waits for this process to exit: on a normal exit
    ``atexit`` handlers (Prefect's temporary server) stop theirs first, and the reaper stops what is left.
    ``run_file`` receives the record, for :func:`reap_dead_run` if the reaper is killed as well.
    """
    read_end, write_end = os.pipe()  # neither end is inherited by other children (PEP 446)
    try:
        reaper = subprocess.Popen(
            [sys.executable, "-c", _REAPER, _PACKAGE_ROOT, str(os.getpid()), str(run_file or "")],
            stdin=read_end, stdout=subprocess.DEVNULL, start_new_session=True, close_fds=True,
        )
    finally:
        os.close(read_end)
    _KEEP.append((write_end, reaper))
    try:
        yield reaper
    finally:
        try:
            os.write(write_end, RELEASE)
        except OSError:
            pass


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the owner's to handle
    watch(int(argv[0]), Path(argv[1]) if len(argv) > 1 and argv[1] else None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
