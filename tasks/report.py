"""The run's report as a Prefect task: report.html, and the stage table as a flow-run artifact."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from sd_core.report.page import report_figures, stages_markdown, write_report
from sd_core.store.catalog import Catalog
from sd_core.store.records import StageResult


@task(name="report", cache_policy=NO_CACHE)
def report_task(data_dir: Path, results: list[StageResult]) -> Path:
    """Write report.html: stages, dataset with captions, VAE reconstructions, loss curve, samples."""
    catalog = Catalog(data_dir)
    path = write_report(catalog, results, figures=report_figures(catalog))
    create_markdown_artifact(stages_markdown(catalog, results), key="emoji-sd-stages",
                             description=f"what each stage of the pipeline did in {catalog.root}")
    get_run_logger().info("report: %s", path)
    return path
