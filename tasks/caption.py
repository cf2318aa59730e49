"""The caption stage as Prefect tasks: split the work into batches, caption each (fanned out on the flow's
task runner), then write the caption columns."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sd_core.caption.config import CaptionConfig
from sd_core.caption.stage import (
    CaptionJob,
    CaptionSummary,
    caption_jobs,
    finish_captions,
    caption_batches,
    release_captioners,
    shared_captioner,
    stage_key,
)
from sd_core.store.catalog import Catalog
from sd_core.store.records import StageResult, record_stage
from tasks.fanout import FanOut


@task(name="caption-batches", cache_policy=NO_CACHE)
def caption_batches_task(cfg: CaptionConfig, data_dir: Path, force: bool = False) -> FanOut:
    """Batches of images without a caption under this setting."""
    fanout = FanOut(caption_batches(cfg, Catalog(data_dir), force=force))
    get_run_logger().info("%d images to caption in %d batches", fanout.items, len(fanout.batches))
    return fanout


@task(name="caption-batch", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def caption_batch_task(jobs: list[CaptionJob], cfg: CaptionConfig, data_dir: Path) -> int:
    """Caption one batch with this worker's captioner (loaded once per process); returns model calls."""
    return caption_jobs(cfg, Catalog(data_dir), jobs, shared_captioner(cfg))


@task(name="caption-finish", cache_policy=NO_CACHE)
def caption_finish_task(cfg: CaptionConfig, data_dir: Path, fanout: FanOut, calls: list[int]) -> StageResult:
    """Fill metadata.csv's caption columns from the log and record the stage."""
    catalog = Catalog(data_dir)
    release_captioners()  # the batches run here (sequential runner) are done: free Qwen before encode and train
    summary = finish_captions(cfg, catalog, CaptionSummary(captioned=fanout.items, model_calls=sum(calls)))
    result = record_stage(catalog, "caption", key=stage_key(cfg, catalog), summary=summary.as_dict(),
                          seconds=time.time() - fanout.started,
                          ran=summary.captioned > 0 or summary.prompts_changed > 0)
    get_run_logger().info(result.line())
    return result
