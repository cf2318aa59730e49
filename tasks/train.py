"""The train stage as a Prefect task."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sd_core.encode.stage import EncodeStageConfig, resolve
from sd_core.store.catalog import Catalog
from sd_core.store.records import StageResult, Timer, record_stage
from sd_core.training.config import TrainStageConfig
from sd_core.training.stage import run_training, stage_key


@task(name="train", cache_policy=NO_CACHE)
def train_task(cfg: TrainStageConfig, enc: EncodeStageConfig, data_dir: Path, progress: bool = True,
               force: bool = False) -> StageResult:
    """Train (or resume, or continue on a grown dataset) unless this exact run is done."""
    catalog = Catalog(data_dir)
    enc = resolve(enc, catalog)
    with Timer() as t:
        summary = run_training(cfg, enc, catalog, force=force, progress=progress)
    status = summary.pop("status")
    result = record_stage(catalog, "train", key=stage_key(cfg, enc, catalog), summary=summary,
                          seconds=t.seconds, ran=status == "ran")
    get_run_logger().info(result.line())
    return result
