"""The emoji-sd pipeline flow: stages wired in order, each handing the next paths on disk."""

from dataclasses import dataclass
from typing import Callable

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import unmapped

from sd_core.config import STAGES, PipelineConfig, Stage
from sd_core.encode.stage import uses_trained_vae
from sd_core.runtime.running import run_stage
from sd_core.store.catalog import Catalog
from sd_core.store.lock import data_dir_lock
from sd_core.store.records import StageFailed, StageResult, select_stages, skipped_stage
from tasks.caption import caption_batch_task, caption_batches_task, caption_finish_task
from tasks.encode import encode_batch_task, encode_finish_task, encode_jobs_task
from tasks.eval import eval_task
from tasks.fanout import gather
from tasks.ingest import convert_task, download_task, ingest_source_task, list_site_task
from tasks.report import report_task
from tasks.sample import sample_task
from tasks.train import train_task
from tasks.vae import vae_task


@dataclass(frozen=True)
class RunOptions:
    progress: bool = True
    promote: bool = False
    full_listing: bool = False


Runner = Callable[[PipelineConfig, RunOptions, bool], StageResult]  # (config, options, forced) -> record


def _crawl(cfg: PipelineConfig, opts: RunOptions, force: bool) -> StageResult:
    if cfg.source.kind != "site":  # a folder, a dataset or a URL list
        return ingest_source_task(cfg.source, cfg.crawl, cfg.data_dir, opts.progress, force)
    listing = list_site_task(cfg.crawl, cfg.data_dir, opts.progress, opts.full_listing)
    return download_task(cfg.crawl, cfg.data_dir, listing, opts.progress, force)


def _caption(cfg: PipelineConfig, opts: RunOptions, force: bool) -> StageResult:
    fanout = caption_batches_task(cfg.caption, cfg.data_dir, force)
    futures = caption_batch_task.map(fanout.batches, unmapped(cfg.caption), unmapped(cfg.data_dir))
    calls = gather(futures, desc="caption", progress=opts.progress)
    return caption_finish_task(cfg.caption, cfg.data_dir, fanout, calls)


def _vae(cfg: PipelineConfig, opts: RunOptions, force: bool) -> StageResult:
    if not uses_trained_vae(cfg.encode):
        return skipped_stage(Catalog(cfg.data_dir), "vae", f"pretrained VAE {cfg.encode.vae.model_id}")
    return vae_task(cfg.vae, cfg.data_dir, opts.progress, force)


def _encode(cfg: PipelineConfig, opts: RunOptions, force: bool) -> StageResult:
    fanout = encode_jobs_task(cfg.encode, cfg.data_dir, force)
    futures = encode_batch_task.map(fanout.batches, unmapped(cfg.encode), unmapped(cfg.data_dir))
    results = gather(futures, desc="encode", progress=opts.progress)
    return encode_finish_task(cfg.encode, cfg.data_dir, fanout, results)


def _eval(cfg: PipelineConfig, opts: RunOptions, force: bool) -> StageResult:
    return eval_task(cfg.eval, cfg.caption, cfg.data_dir, cfg.train.val_fraction, cfg.train.split_seed, force,
                     opts.promote)


RUNNERS: dict[str, Runner] = {
    "crawl": _crawl,
    "convert": lambda cfg, opts, force: convert_task(cfg.convert, cfg.data_dir, opts.progress, force),
    "caption": _caption,
    "vae": _vae,
    "encode": _encode,
    "train": lambda cfg, opts, force: train_task(cfg.train, cfg.encode, cfg.data_dir, opts.progress, force),
    "eval": _eval,
    "sample": lambda cfg, opts, force: sample_task(cfg.sample, cfg.data_dir, force),
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
    promote: bool = False,
    full_listing: bool = False,
) -> list[StageResult]:
    """Run the selected stages in order: all, ``start``..``until``, or ``only`` one.

    Stages in ``force`` ignore their caches. Stages before the selection are reported as skipped. ``promote``
    makes the evaluated run the champion even when it scores worse than the current one. ``full_listing``
    walks the whole listing even where a refresh would stop at known pages.

    A stage that raises is recorded as failed with its reason, the later stages are not run, the report is
    still written, and the flow then fails (:class:`StageFailed`, one line), so a scheduled run ends Failed.
    """
    selected = select_stages(STAGES, until=until, start=start, only=only)
    first = STAGES.index(selected[0])
    catalog = Catalog(config.data_dir)
    opts = RunOptions(progress, promote, full_listing)
    failed: StageResult | None = None
    errors: list[Exception] = []  # what the failed stage raised: the cause `--debug` shows

    def attempt(stage: Stage) -> StageResult:
        try:
            return RUNNERS[stage](config, opts, stage in (force or []))
        except Exception as e:
            errors.append(e)
            raise

    with data_dir_lock(config.data_dir, wait=wait_for_lock):
        results = [skipped_stage(catalog, s, "not selected") for s in STAGES[:first]]
        for stage in selected:
            if failed is not None:
                results.append(skipped_stage(catalog, stage, f"not run: {failed.stage} failed"))
                continue
            result = run_stage(catalog, stage, lambda: attempt(stage))
            results.append(result)
            if result.status == "failed":
                failed = result
                get_run_logger().error(result.line())
        results += [skipped_stage(catalog, s, "not selected") for s in STAGES[STAGES.index(selected[-1]) + 1:]]
        if failed is None:
            report_task(config.data_dir, results)
            return results
        try:
            report = report_task(config.data_dir, results)
        except Exception as e:  # noqa: BLE001 - the stage's failure is what the run ends with
            get_run_logger().error("the report could not be written: %s", e)
            report = None
    raise StageFailed(failed, report) from (errors[-1] if errors else None)
