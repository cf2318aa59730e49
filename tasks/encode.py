"""The encode stage as Prefect tasks: split the work into jobs (one shard of items each), encode each (fanned
out on the flow's task runner; every worker process loads each model once), then record the stage."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sd_core.encode.encoders import EncodeSummary, release_shared_models
from sd_core.encode.stage import (
    EncodeJob,
    EncodeStageConfig,
    merge_summaries,
    encode_jobs,
    resolve,
    run_encode_job,
    stage_key,
)
from sd_core.store.catalog import Catalog
from sd_core.store.records import StageResult, record_stage
from tasks.fanout import FanOut


@task(name="encode-jobs", cache_policy=NO_CACHE)
def encode_jobs_task(cfg: EncodeStageConfig, data_dir: Path, force: bool = False) -> FanOut:
    """Jobs of images without latents and captions without text states (model ids resolved)."""
    fanout = FanOut(encode_jobs(resolve(cfg, Catalog(data_dir)), Catalog(data_dir), force=force))
    get_run_logger().info("%d images and captions to encode in %d jobs of up to %d", fanout.items, len(fanout.batches),
                          cfg.shard_size)
    return fanout


@task(name="encode-batch", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def encode_batch_task(job: EncodeJob, cfg: EncodeStageConfig, data_dir: Path) -> EncodeSummary:
    """Encode one job into one shard with this worker's models (loaded once per process)."""
    return run_encode_job(resolve(cfg, Catalog(data_dir)), Catalog(data_dir), job)


@task(name="encode-finish", cache_policy=NO_CACHE)
def encode_finish_task(cfg: EncodeStageConfig, data_dir: Path, fanout: FanOut, results: list[EncodeSummary]
                       ) -> StageResult:
    catalog = Catalog(data_dir)
    release_shared_models()  # the jobs run here (sequential runner) are done: free the encoders before training
    summary = merge_summaries(fanout.batches, results)
    result = record_stage(catalog, "encode", key=stage_key(resolve(cfg, catalog), catalog), summary=summary,
                          seconds=time.time() - fanout.started, ran=bool(fanout.batches))
    get_run_logger().info(result.line())
    if summary["image_failures"]:
        get_run_logger().warning("%d images could not be read for encoding", summary["image_failures"])
    return result
