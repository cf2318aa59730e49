"""The train and sample stages as Prefect tasks."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from sd_core.catalog import Catalog
from sd_core.encode_stage import EncodeStageConfig, resolve
from sd_core.model_stages import TrainStageConfig, run_sampling, run_training, sample_key, train_key
from sd_core.sampling import SampleConfig
from sd_core.stages import StageResult, Timer, record_stage


@task(name="train", cache_policy=NO_CACHE)
def train_task(cfg: TrainStageConfig, enc: EncodeStageConfig, data_dir: Path, progress: bool = True,
               force: bool = False) -> StageResult:
    """Train (or resume, or continue on a grown dataset) unless this exact run is done."""
    catalog = Catalog(data_dir)
    enc = resolve(enc, catalog)
    with Timer() as t:
        summary = run_training(cfg, enc, catalog, force=force, progress=progress)
    status = summary.pop("status")
    result = record_stage(catalog, "train", key=train_key(cfg, enc, catalog), summary=summary,
                          seconds=t.seconds, ran=status == "ran")
    get_run_logger().info(result.line())
    return result


@task(name="sample", cache_policy=NO_CACHE)
def sample_task(cfg: SampleConfig, data_dir: Path, force: bool = False) -> StageResult:
    """Sample grids from the latest trained model."""
    catalog = Catalog(data_dir)
    with Timer() as t:
        summary = run_sampling(cfg, catalog, force=force)
    status = summary.pop("status")
    result = record_stage(catalog, "sample", key=sample_key(cfg, catalog), summary=summary, seconds=t.seconds,
                          ran=status == "ran")
    get_run_logger().info(result.line())
    return result


@task(name="report", cache_policy=NO_CACHE)
def report_task(data_dir: Path, results: list[StageResult]) -> Path:
    """Write report.html: stages, dataset with captions, VAE reconstructions, loss curve, samples."""
    from sd_core.model_stages import report_figures
    from sd_core.report import stages_markdown, write_report

    catalog = Catalog(data_dir)
    path = write_report(catalog, results, figures=report_figures(catalog))
    create_markdown_artifact(stages_markdown(catalog, results), key="emoji-sd-stages",
                             description=f"what each stage of the pipeline did in {catalog.root}")
    get_run_logger().info("report: %s", path)
    return path
