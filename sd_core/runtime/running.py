"""A stage while it runs: its running marker names the process that runs it, and :func:`run_stage` records
what the stage raised as its failure (``sd_core.store.records``).

``state/.stages/<stage>.running`` holds the pid and start time (:func:`sd_core.runtime.process.started`) of
the process running the stage; it is removed when the stage ends, ran or failed. One left behind by a killed
process says the stage was interrupted, also when its pid has since been given to another process."""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import psutil

from sd_core.runtime.process import started
from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_json, json_problem
from sd_core.store.records import StageResult, failure_manifest, record_failure


def running_marker(catalog: Catalog, stage: str) -> Path:
    return catalog.stage_manifest(stage).with_suffix(".running")


@contextmanager
def mark_running(catalog: Catalog, stage: str) -> Iterator[None]:
    """While a stage runs, ``state/.stages/<stage>.running`` names the process; it is removed when the stage
    ends, ran or failed. One left behind by a killed process says the stage was interrupted."""
    me = psutil.Process()
    atomic_write_json(running_marker(catalog, stage), {
        "pid": me.pid, "started": started(me), "since": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    try:
        yield
    finally:
        running_marker(catalog, stage).unlink(missing_ok=True)


def run_stage(catalog: Catalog, stage: str, run: Callable[[], StageResult]) -> StageResult:
    """Run one stage (marked running meanwhile). Any exception it raises is recorded as its failure and
    returned as a ``failed`` result; a success clears an earlier failure. Ctrl-C and SIGTERM propagate."""
    start = time.perf_counter()
    with mark_running(catalog, stage):
        try:
            result = run()
        except Exception as e:  # noqa: BLE001 - whatever a stage raises is its failure, recorded with its reason
            return record_failure(catalog, stage, e, time.perf_counter() - start)
    failure_manifest(catalog, stage).unlink(missing_ok=True)
    return result


def running_state(catalog: Catalog, stage: str) -> str | None:
    """'running' (its process is alive), 'interrupted' (its process is gone, or its pid now names another
    process, as after a reboot) or None (not marked)."""
    data, why = json_problem(running_marker(catalog, stage))
    if why is not None:
        return "interrupted"  # a marker cut short: the process that wrote it was killed while writing it
    if not data:
        return None
    try:
        proc = psutil.Process(int(data["pid"]))
        if "started" in data and abs(started(proc) - float(data["started"])) > 1e-3:
            return "interrupted"
    except (psutil.Error, ValueError, KeyError, TypeError):
        return "interrupted"
    return "running"
