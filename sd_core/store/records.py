"""Stage records: what each stage did last, under which key, so reruns can say "reused"."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import psutil

from sd_core.store.catalog import Catalog
from sd_core.store.children import started
from sd_core.store.files import atomic_write_json, json_problem

log = logging.getLogger(__name__)

StageStatus = Literal["ran", "reused", "skipped"]


@dataclass(frozen=True)
class StageResult:
    stage: str
    status: StageStatus
    key: str
    summary: dict[str, Any]
    seconds: float
    finished_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def line(self) -> str:
        details = ", ".join(f"{k}={v}" for k, v in self.summary.items() if v not in ({}, None))
        return f"{self.stage}: {self.status} in {self.seconds:.1f}s ({details})"


def save_stage(catalog: Catalog, result: StageResult) -> None:
    atomic_write_json(catalog.stage_manifest(result.stage), asdict(result))
    legacy = catalog.legacy_stage_manifest(result.stage)
    if legacy.exists():
        legacy.unlink()
        try:
            legacy.parent.rmdir()
        except OSError:  # other stages' records are still there
            pass


def skipped_stage(catalog: Catalog, stage: str, why: str) -> StageResult:
    """A stage this run did not select: its last record, if any, marked as skipped."""
    last = load_stage(catalog, stage)
    return StageResult(stage=stage, status="skipped", key=last.key if last else "",
                       summary={"why": why, "last_run": last.finished_at if last else None}, seconds=0.0)


def record_stage(
    catalog: Catalog, stage: str, *, key: str, summary: dict[str, Any], seconds: float, ran: bool
) -> StageResult:
    """Save what a stage did (``ran`` when it computed anything, else ``reused``) and return it."""
    result = StageResult(stage=stage, status="ran" if ran else "reused", key=key, summary=summary, seconds=seconds)
    save_stage(catalog, result)
    return result


def running_marker(catalog: Catalog, stage: str) -> Path:
    return catalog.stage_manifest(stage).with_suffix(".running")


@contextmanager
def mark_running(catalog: Catalog, stage: str) -> Iterator[None]:
    """While a stage runs, ``state/stages/<stage>.running`` names the process; it is removed when the stage
    ends, ran or failed. One left behind by a killed process says the stage was interrupted."""
    me = psutil.Process()
    atomic_write_json(running_marker(catalog, stage), {
        "pid": me.pid, "started": started(me), "since": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    try:
        yield
    finally:
        running_marker(catalog, stage).unlink(missing_ok=True)


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


def stage_record_problem(catalog: Catalog, stage: str) -> tuple[Path, str] | None:
    """The stage's record file and what is wrong with it, when it exists but does not read as a record."""
    for path in (catalog.stage_manifest(stage), catalog.legacy_stage_manifest(stage)):
        data, why = json_problem(path)
        if why is None and data is None:
            continue
        if why is None:
            try:
                StageResult(**data)
                return None
            except TypeError:
                why = "not a stage record"
        return path, why
    return None


def load_stage(catalog: Catalog, stage: str, *, warn: bool = True) -> StageResult | None:
    """What ``stage`` did last, None when it never ran. A damaged record (empty, truncated, garbled) counts as
    none, with a warning naming it; the stage's next run rewrites it."""
    for path in (catalog.stage_manifest(stage), catalog.legacy_stage_manifest(stage)):
        data, why = json_problem(path)
        if why is None and data is None:
            continue
        if why is None:
            try:
                return StageResult(**data)
            except TypeError:
                why = "not a stage record"
        if warn:
            log.warning("%s is damaged (%s); ignored: the stage's next run rewrites it", path, why)
        return None
    return None


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def select_stages(
    stages: Sequence[str], *, until: str | None = None, start: str | None = None, only: str | None = None
) -> list[str]:
    """The stages a run executes: ``only`` one, or the range ``start``..``until`` (both inclusive)."""
    for name, value in (("until", until), ("from", start), ("only", only)):
        if value is not None and value not in stages:
            raise ValueError(f"--{name} {value!r} is not a stage; stages are {', '.join(stages)}")
    if only is not None:
        if start is not None or until is not None:
            raise ValueError("--only cannot be combined with --from or --until")
        return [only]
    lo = stages.index(start) if start else 0
    hi = stages.index(until) if until else len(stages) - 1
    if lo > hi:
        raise ValueError(f"--from {start} comes after --until {until}")
    return list(stages[lo : hi + 1])
