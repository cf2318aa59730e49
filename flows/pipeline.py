"""The emoji-sd pipeline flow: stages wired in order, each handing the next paths on disk."""

from typing import Callable

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import unmapped

from sd_core.config import STAGES, PipelineConfig, Stage
from sd_core.encode.stage import uses_trained_vae
from sd_core.store.catalog import Catalog
from sd_core.store.lock import data_dir_lock
from sd_core.store.records import StageResult, select_stages, skipped_stage
from tasks.caption import caption_batch_task, caption_finish_task, caption_plan_task
from tasks.encode import encode_batch_task, encode_finish_task, encode_plan_task
from tasks.fanout import gather
from tasks.ingest import convert_task, download_task, list_site_task
from tasks.report import report_task
from tasks.sample import sample_task
from tasks.train import train_task
from tasks.vae import vae_task

Runner = Callable[[PipelineConfig, bool, bool], StageResult]


def _crawl(cfg: PipelineConfig, progress: bool, force: bool) -> StageResult:
    listing = list_site_task(cfg.crawl, cfg.data_dir, progress)
    return download_task(cfg.crawl, cfg.data_dir, listing, progress, force)


def _caption(cfg: PipelineConfig, progress: bool, force: bool) -> StageResult:
    plan = caption_plan_task(cfg.caption, cfg.data_dir, force)
    futures = caption_batch_task.map(plan.batches, unmapped(cfg.caption), unmapped(cfg.data_dir))
    calls = gather(futures, desc="caption", progress=progress)
    return caption_finish_task(cfg.caption, cfg.data_dir, plan, calls)


def _vae(cfg: PipelineConfig, progress: bool, force: bool) -> StageResult:
    if not uses_trained_vae(cfg.encode):
        return skipped_stage(Catalog(cfg.data_dir), "vae", f"pretrained VAE {cfg.encode.vae.model_id}")
    return vae_task(cfg.vae, cfg.data_dir, progress, force)


def _encode(cfg: PipelineConfig, progress: bool, force: bool) -> StageResult:
    plan = encode_plan_task(cfg.encode, cfg.data_dir, force)
    futures = encode_batch_task.map(plan.batches, unmapped(cfg.encode), unmapped(cfg.data_dir))
    results = gather(futures, desc="encode", progress=progress)
    return encode_finish_task(cfg.encode, cfg.data_dir, plan, results)


RUNNERS: dict[str, Runner] = {
    "crawl": _crawl,
    "convert": lambda cfg, progress, force: convert_task(cfg.convert, cfg.data_dir, progress, force),
    "caption": _caption,
    "vae": _vae,
    "encode": _encode,
    "train": lambda cfg, progress, force: train_task(cfg.train, cfg.encode, cfg.data_dir, progress, force),
    "sample": lambda cfg, progress, force: sample_task(cfg.sample, cfg.data_dir, force),
}
if tuple(RUNNERS) != STAGES:
    raise RuntimeError(f"pipeline wiring {tuple(RUNNERS)} does not match the stages {STAGES}")


# One batch at a time by default; `emoji-sd run --task-runner dask` fans batches out to Dask workers.
@flow(name="emoji-sd-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=1))
def pipeline(
    config: PipelineConfig,
    until: Stage | None = None,
    start: Stage | None = None,
    only: Stage | None = None,
    force: list[Stage] | None = None,
    progress: bool = True,
    wait_for_lock: bool = False,
) -> list[StageResult]:
    """Run the selected stages in order: all, ``start``..``until``, or ``only`` one.

    Stages in ``force`` ignore their caches. Stages before the selection are reported as skipped.
    """
    selected = select_stages(STAGES, until=until, start=start, only=only)
    first = STAGES.index(selected[0])
    catalog = Catalog(config.data_dir)
    with data_dir_lock(config.data_dir, wait=wait_for_lock):
        results = [skipped_stage(catalog, s, "not selected") for s in STAGES[:first]]
        for stage in selected:
            results.append(RUNNERS[stage](config, progress, stage in (force or [])))
        results += [skipped_stage(catalog, s, "not selected") for s in STAGES[STAGES.index(selected[-1]) + 1:]]
        report_task(config.data_dir, results)
    return results
