"""The emoji-sd pipeline flow: stages wired in order, each handing the next paths on disk."""

from __future__ import annotations

from typing import Callable

from prefect import flow

from sd_core.config import STAGES, PipelineConfig, Stage
from sd_core.fsio import data_dir_lock
from sd_core.stages import StageResult
from tasks.caption import caption_task
from tasks.ingest import convert_task, download_task, list_site_task


def _crawl(cfg: PipelineConfig, progress: bool) -> StageResult:
    listing = list_site_task(cfg.crawl, cfg.data_dir, progress)
    return download_task(cfg.crawl, cfg.data_dir, listing, progress)


RUNNERS: dict[str, Callable[[PipelineConfig, bool], StageResult]] = {
    "crawl": _crawl,
    "convert": lambda cfg, progress: convert_task(cfg.convert, cfg.data_dir, progress),
    "caption": lambda cfg, progress: caption_task(cfg.caption, cfg.data_dir, progress),
}
assert tuple(RUNNERS) == STAGES


@flow(name="emoji-sd-pipeline")
def pipeline(
    config: PipelineConfig, until: Stage = STAGES[-1], progress: bool = True, wait_for_lock: bool = False
) -> list[StageResult]:
    """Run the stages from crawl up to and including ``until``."""
    with data_dir_lock(config.data_dir, wait=wait_for_lock):
        return [RUNNERS[stage](config, progress) for stage in STAGES[: STAGES.index(until) + 1]]
