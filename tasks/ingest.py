"""Crawl and convert as Prefect tasks: thin wrappers that log a summary and record the stage."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sd_core.ingest.browser import BrowserError, ListingDeadlineError
from sd_core.ingest.convert import ConvertConfig, convert_dataset, stage_key
from sd_core.ingest.crawl import DownloadsFailed, Listing, download_new, refresh_listing
from sd_core.ingest.hf_dataset import MissingDatasetsPackage
from sd_core.ingest.ledger import LedgerError
from sd_core.ingest.settings import CrawlConfig
from sd_core.ingest.source import ingest_source, source_summary
from sd_core.ingest.source_config import SourceConfig
from sd_core.store.catalog import Catalog
from sd_core.store.files import stable_hash
from sd_core.store.records import StageResult, Timer, record_stage


def _browser_failed(task, task_run, state) -> bool:  # type: ignore[no-untyped-def]
    """Retry a browser that failed to start or answer; not a listing that ran out of its whole deadline
    (a retry would take as long again)."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, BrowserError) and not isinstance(error, ListingDeadlineError)


@task(name="list-site", retries=2, retry_delay_seconds=5, retry_condition_fn=_browser_failed,
      cache_policy=NO_CACHE)
def list_site_task(cfg: CrawlConfig, data_dir: Path, progress: bool = True, full: bool = False) -> Path:
    """Walk the listing in headless Chromium (partially on a refresh, fully with ``full``); hand on the path
    of the saved listing. A listing that cannot be trusted raises, and the saved one is kept."""
    catalog = Catalog(data_dir)
    listing = refresh_listing(cfg, catalog, full=full, progress=progress)
    log = get_run_logger()
    walk = listing.walk
    log.info("%s walk (%s): read %d pages of %s, stopped at %s; %d items listed (%d unique URLs)", walk.kind,
             walk.why, walk.pages, cfg.listing_url(cfg.start_page), walk.ended, len(listing.items),
             len(listing.unique_urls))
    if walk.cut:
        log.warning("the listing walk was cut: %s; what it listed is downloaded", walk.cut)
    return catalog.listing_json


def _download_retryable(task, task_run, state) -> bool:  # type: ignore[no-untyped-def]
    """Not a run whose downloads all failed (they are recorded, each waits for its back-off: a retry now would
    find nothing to fetch and pass), nor a ledger that cannot be used."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, (DownloadsFailed, LedgerError))


@task(name="download-images", retries=1, retry_delay_seconds=5, retry_condition_fn=_download_retryable,
      cache_policy=NO_CACHE)
def download_task(
    cfg: CrawlConfig, data_dir: Path, listing_path: Path, progress: bool = True, force: bool = False
) -> StageResult:
    """Fetch the listed URLs the ledger has not seen; record the crawl stage."""
    catalog = Catalog(data_dir)
    listing = Listing.load(listing_path)
    with Timer() as t:
        summary = download_new(cfg, catalog, listing, progress=progress, force=force)
    result = record_stage(
        catalog, "crawl",
        key=stable_hash({"tag": listing.tag, "urls": sorted(listing.unique_urls)}),
        summary={**listing.walk_summary(), **summary.as_dict()},
        seconds=listing.seconds + t.seconds,
        ran=summary.gets > 0,
    )
    get_run_logger().info(result.line())
    return result


def _ingest_retryable(task, task_run, state) -> bool:  # type: ignore[no-untyped-def]
    """As a download, and never a source that cannot be read (a missing folder, a list without its URL
    column: the same again in 5 s) or a missing extra."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, (DownloadsFailed, LedgerError, ValueError, MissingDatasetsPackage))


@task(name="ingest-source", retries=1, retry_delay_seconds=5, retry_condition_fn=_ingest_retryable,
      cache_policy=NO_CACHE)
def ingest_source_task(
    source: SourceConfig, cfg: CrawlConfig, data_dir: Path, progress: bool = True, force: bool = False
) -> StageResult:
    """The crawl stage for a folder, a dataset or a URL list: read (download) what is new, list everything;
    record the stage."""
    catalog = Catalog(data_dir)
    with Timer() as t:
        listing, summary = ingest_source(source, cfg, catalog, progress=progress, force=force)
    result = record_stage(
        catalog, "crawl",
        key=stable_hash({"source": source.kind, "tag": listing.tag, "urls": sorted(listing.unique_urls)}),
        summary={**source_summary(source, listing), **summary.as_dict()},
        seconds=t.seconds,
        ran=summary.gets > 0,
    )
    get_run_logger().info(result.line())
    return result


@task(name="convert", cache_policy=NO_CACHE)
def convert_task(cfg: ConvertConfig, data_dir: Path, progress: bool = True, force: bool = False) -> StageResult:
    """Bring the JPEG dataset and metadata.csv up to date with the crawl ledger."""
    catalog = Catalog(data_dir)
    with Timer() as t:
        summary = convert_dataset(cfg, catalog, progress=progress, force=force)
    result = record_stage(
        catalog, "convert", key=stage_key(cfg, catalog), summary=summary.as_dict(), seconds=t.seconds,
        ran=summary.reused < summary.images or summary.relisted + summary.set_aside > 0,
    )
    get_run_logger().info(result.line())
    return result
