"""The caption stage as a Prefect task."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sd_core.caption import CaptionConfig
from sd_core.caption_stage import caption_dataset, stage_key
from sd_core.catalog import Catalog
from sd_core.stages import StageResult, Timer, record_stage


@task(name="caption", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def caption_task(cfg: CaptionConfig, data_dir: Path, progress: bool = True, force: bool = False) -> StageResult:
    """Caption new images (a per-item cache keyed by md5 and captioner settings)."""
    catalog = Catalog(data_dir)
    with Timer() as t:
        summary = caption_dataset(cfg, catalog, progress=progress, force=force)
    result = record_stage(
        catalog, "caption", key=stage_key(cfg, catalog), summary=summary.as_dict(), seconds=t.seconds,
        ran=summary.captioned > 0,
    )
    get_run_logger().info(result.line())
    return result
