"""The train stage as a Prefect task."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from sd_core.encode.stage import EncodeStageConfig
from sd_core.store.catalog import Catalog
from sd_core.store.records import StageResult
from sd_core.training.config import TrainStageConfig
from sd_core.training.metrics import Progress
from sd_core.training.stage import train_stage


class PrefectProgress:
    """Training progress where a scheduled run's user looks: a progress artifact on the flow run, updated as
    steps complete, and a log line every ``lines``-th of the run (or every ``every_s`` seconds)."""

    def __init__(self, *, lines: int = 20, every_s: float = 60.0) -> None:
        self.log = get_run_logger()
        self.artifact = create_progress_artifact(0.0, key="emoji-sd-train-progress",
                                                 description="training steps done, in percent")
        self.lines, self.every_s = lines, every_s
        self.last_pct, self.last_line, self.last_step = 0.0, time.monotonic(), 0

    def __call__(self, p: Progress) -> None:
        pct = round(100.0 * p.step / max(p.total, 1), 1)
        if pct - self.last_pct >= 1.0 or p.step == p.total:
            update_progress_artifact(self.artifact, pct)
            self.last_pct = pct
        stride = max(1, p.total // self.lines)
        due = p.step // stride != self.last_step // stride or time.monotonic() - self.last_line >= self.every_s
        if due or p.step == p.total or p.val_loss is not None:
            held = "" if p.ema_val_loss is None else f", held-out loss {p.val_loss:.4f} (EMA {p.ema_val_loss:.4f})"
            self.log.info("train step %d/%d: loss %.4f, lr %.2e%s, %.0f s", p.step, p.total, p.loss, p.lr, held,
                          p.seconds)
            self.last_line = time.monotonic()
        self.last_step = p.step


@task(name="train", cache_policy=NO_CACHE)
def train_task(cfg: TrainStageConfig, enc: EncodeStageConfig, data_dir: Path, progress: bool = True,
               force: bool = False) -> StageResult:
    """Train (or resume, or continue on a grown dataset) unless this exact run is done."""
    result = train_stage(cfg, enc, Catalog(data_dir), force=force, progress=progress, callbacks=[PrefectProgress()])
    assert result is not None  # the flow runs in the main process
    get_run_logger().info(result.line())
    return result
