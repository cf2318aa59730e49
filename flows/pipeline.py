"""The emoji-sd pipeline flow: stages wired in order, each handing the next a path."""

from __future__ import annotations

from prefect import flow

from sd_core.config import STAGES, PipelineConfig, Stage
from sd_core.fsio import data_dir_lock
from sd_core.stages import StageResult
from tasks.ingest import convert_task, download_task, list_site_task


@flow(name="emoji-sd-pipeline")
def pipeline(
    config: PipelineConfig, until: Stage = STAGES[-1], progress: bool = True, wait_for_lock: bool = False
) -> list[StageResult]:
    """Run the stages from crawl up to and including ``until``."""
    last = STAGES.index(until)
    results: list[StageResult] = []
    with data_dir_lock(config.data_dir, wait=wait_for_lock):
        listing = list_site_task(config.crawl, config.data_dir, progress)
        results.append(download_task(config.crawl, config.data_dir, listing, progress))
        if last >= STAGES.index("convert"):
            results.append(convert_task(config.convert, config.data_dir, progress))
    return results
