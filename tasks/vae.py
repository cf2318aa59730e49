"""The vae stage as a Prefect task."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sd_core.store.catalog import Catalog
from sd_core.store.records import StageResult, Timer, record_stage
from sd_core.vae.stage import ensure_vae, stage_key
from sd_core.vae.train import VAETrainConfig


@task(name="vae", cache_policy=NO_CACHE)
def vae_task(cfg: VAETrainConfig, data_dir: Path, progress: bool = True, force: bool = False) -> StageResult:
    """Train the dataset's own VAE once (the offline default); later runs reuse it."""
    catalog = Catalog(data_dir)
    with Timer() as t:
        trained, metrics = ensure_vae(cfg, catalog, force=force, progress=progress)
    summary = {k: metrics[k] for k in ("steps", "train_images", "heldout_psnr_db", "heldout_colours_kept", "seconds") if k in metrics}
    result = record_stage(catalog, "vae", key=stage_key(cfg), summary=summary, seconds=t.seconds, ran=trained)
    get_run_logger().info(result.line())
    return result
