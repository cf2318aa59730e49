"""The run's report as a Prefect task: report.html, and its headline and stage table as a flow-run artifact."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from sd_core.report.model import model_view
from sd_core.report.page import stages_markdown, write_report
from sd_core.store.catalog import Catalog
from sd_core.store.metadata import read_metadata
from sd_core.store.records import StageResult


@task(name="report", cache_policy=NO_CACHE)
def report_task(data_dir: Path, results: list[StageResult]) -> Path:
    """Write report.html (alerts, the served model with its pictures, figures and load code, prompt following,
    training and evaluation history, the dataset, the stages) and the same headline as the run's artifact."""
    catalog = Catalog(data_dir)
    rows = read_metadata(catalog)
    model = model_view(catalog, rows)  # the served model, verified once for the page and the artifact
    path = write_report(catalog, results, model=model, rows=rows)
    create_markdown_artifact(stages_markdown(catalog, results, model=model), key="emoji-sd-stages",
                             description=f"what each stage of the pipeline did in {catalog.root}")
    get_run_logger().info("report: %s", path)
    return path
