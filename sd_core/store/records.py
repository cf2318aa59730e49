"""Stage records: what each stage did last, under which key, so reruns can say "reused".

A stage that raised is recorded apart, as ``<stage>.failed.json`` (status ``failed``, its one-line reason in
``summary["reason"]``), so its last good record (and its key) stays what reuse and ``status`` compare with;
the next success removes it. ``summary["alert"]``, set by any stage, is shown at the top of the report."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Sequence

from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_json, json_problem, read_json

log = logging.getLogger(__name__)

StageStatus = Literal["ran", "reused", "skipped", "failed"]


@dataclass(frozen=True)
class StageResult:
    stage: str
    status: StageStatus
    key: str
    summary: dict[str, Any]
    seconds: float
    finished_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def line(self) -> str:
        if self.status == "failed":
            return f"{self.stage}: failed after {self.seconds:.1f}s: {self.summary.get('reason', '')}"
        details = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"  # the record keeps every digit
                            for k, v in self.summary.items() if v not in ({}, None))
        return f"{self.stage}: {self.status} in {self.seconds:.1f}s ({details})"

    def alerts(self) -> list[str]:
        """What a reader must see first: why the stage failed, or the alert it raised while it ran."""
        if self.status == "failed":
            return [f"{self.stage} failed: {self.summary.get('reason', '')}"]
        alert = self.summary.get("alert")
        return [f"{self.stage}: {alert}"] if alert else []


class StageFailed(RuntimeError):
    """A stage of the pipeline raised; the run's report and ``status`` show why. The message is one line."""

    def __init__(self, result: StageResult, report: Path | None = None) -> None:
        where = f" (report: {report})" if report is not None else ""
        super().__init__(f"{result.alerts()[0]}{where}")
        self.result = result


def one_line(text: str) -> str:
    """A message on one line: ``head:\n  a\n  b`` becomes ``head: a; b``."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {'; '.join(lines[1:])}"
    return "; ".join(lines)


def failure_reason(error: BaseException) -> str:
    """An error as one line: its message (the exception's name where it has none, or where the message
    alone would not say what kind of error it is)."""
    message = one_line(str(error))
    if not message:
        return type(error).__name__
    if isinstance(error, (OSError, KeyError, AttributeError, TypeError, AssertionError)):
        return f"{type(error).__name__}: {message}"
    return message


def failure_manifest(catalog: Catalog, stage: str) -> Path:
    return catalog.stage_manifest(stage).with_name(f"{stage}.failed.json")


def record_failure(catalog: Catalog, stage: str, error: BaseException, seconds: float) -> StageResult:
    """Record that ``stage`` raised ``error`` (beside its last good record, which stays) and return it."""
    last = load_stage(catalog, stage)
    result = StageResult(stage=stage, status="failed", key=last.key if last else "",
                         summary={"reason": failure_reason(error), "error": type(error).__name__},
                         seconds=seconds)
    atomic_write_json(failure_manifest(catalog, stage), asdict(result))
    return result


def load_failure(catalog: Catalog, stage: str) -> StageResult | None:
    """The stage's last failure, when it failed after its last good record (None otherwise)."""
    try:
        data = read_json(failure_manifest(catalog, stage))
        failed = StageResult(**data) if data else None
    except (ValueError, TypeError):  # a damaged failure record says no more than that the stage failed
        failed = StageResult(stage, "failed", "", {"reason": f"{failure_manifest(catalog, stage)} is damaged"}, 0.0)
    return failed


def save_stage(catalog: Catalog, result: StageResult) -> None:
    atomic_write_json(catalog.stage_manifest(result.stage), asdict(result))
    failure_manifest(catalog, result.stage).unlink(missing_ok=True)


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


def _read_stage(path: Path) -> tuple[StageResult | None, str | None]:
    """The record at ``path`` (None when there is none) and, when the file exists but is no record, why."""
    data, why = json_problem(path)
    if why is not None or data is None:
        return None, why
    try:
        return StageResult(**data), None
    except TypeError:
        return None, "not a stage record"


def stage_record_problem(catalog: Catalog, stage: str) -> tuple[Path, str] | None:
    """The stage's record file and what is wrong with it, when it exists but does not read as a record."""
    path = catalog.stage_manifest(stage)
    _, why = _read_stage(path)
    return None if why is None else (path, why)


def load_stage(catalog: Catalog, stage: str, *, warn: bool = True) -> StageResult | None:
    """What ``stage`` did last, None when it never ran. A damaged record (empty, truncated, garbled) counts as
    none, with a warning naming it; the stage's next run rewrites it."""
    path = catalog.stage_manifest(stage)
    record, why = _read_stage(path)
    if why is not None and warn:
        log.warning("%s is damaged (%s); ignored: the stage's next run rewrites it", path, why)
    return record


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
