"""The vae and encode stages as Prefect tasks."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sd_core.catalog import Catalog
from sd_core.encode import EncodeSummary
from sd_core.encode_stage import (
    EncodeJob, EncodeStageConfig, merge_summaries, plan_encode, resolve, run_encode_job, stage_key,
)
from sd_core.model_stages import ensure_vae, vae_key
from sd_core.stages import StageResult, Timer, record_stage
from sd_core.vae_train import VAETrainConfig
from tasks.fanout import Plan


@task(name="vae", cache_policy=NO_CACHE)
def vae_task(cfg: VAETrainConfig, data_dir: Path, progress: bool = True, force: bool = False) -> StageResult:
    """Train the dataset's own VAE once (the offline default); later runs reuse it."""
    catalog = Catalog(data_dir)
    with Timer() as t:
        trained, metrics = ensure_vae(cfg, catalog, force=force, progress=progress)
    summary = {k: metrics[k] for k in ("steps", "train_images", "heldout_psnr_db", "seconds") if k in metrics}
    result = record_stage(catalog, "vae", key=vae_key(cfg), summary=summary, seconds=t.seconds, ran=trained)
    get_run_logger().info(result.line())
    return result


@task(name="encode-plan", cache_policy=NO_CACHE)
def encode_plan_task(cfg: EncodeStageConfig, data_dir: Path, force: bool = False) -> Plan:
    """Batches of images without latents and captions without text states (model ids resolved)."""
    plan = Plan(plan_encode(resolve(cfg, Catalog(data_dir)), Catalog(data_dir), force=force))
    get_run_logger().info("%d images and captions to encode in %d batches", plan.items, len(plan.batches))
    return plan


@task(name="encode-batch", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def encode_batch_task(job: EncodeJob, cfg: EncodeStageConfig, data_dir: Path) -> EncodeSummary:
    return run_encode_job(resolve(cfg, Catalog(data_dir)), Catalog(data_dir), job)


@task(name="encode-finish", cache_policy=NO_CACHE)
def encode_finish_task(cfg: EncodeStageConfig, data_dir: Path, plan: Plan, results: list[EncodeSummary]
                       ) -> StageResult:
    catalog = Catalog(data_dir)
    summary = merge_summaries(plan.batches, results)
    result = record_stage(catalog, "encode", key=stage_key(resolve(cfg, catalog), catalog), summary=summary,
                          seconds=time.time() - plan.started, ran=bool(plan.batches))
    get_run_logger().info(result.line())
    if summary["image_failures"]:
        get_run_logger().warning("%d images could not be read for encoding", summary["image_failures"])
    return result
