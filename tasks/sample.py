"""The sample stage as a Prefect task."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sd_core.sample.config import SampleConfig
from sd_core.sample.stage import run_sampling, stage_key
from sd_core.store.catalog import Catalog
from sd_core.store.records import StageResult, Timer, record_stage


@task(name="sample", cache_policy=NO_CACHE)
def sample_task(cfg: SampleConfig, data_dir: Path, force: bool = False) -> StageResult:
    """Sample grids from the trained model."""
    catalog = Catalog(data_dir)
    with Timer() as t:
        summary = run_sampling(cfg, catalog, force=force)
    status = summary.pop("status")
    result = record_stage(catalog, "sample", key=stage_key(cfg, catalog), summary=summary, seconds=t.seconds,
                          ran=status == "ran")
    get_run_logger().info(result.line())
    return result
