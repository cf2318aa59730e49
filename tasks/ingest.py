"""Crawl and convert as Prefect tasks: thin wrappers that log a summary and record the stage."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sd_core.ingest.browser import BrowserError, ListingDeadlineError
from sd_core.ingest.convert import ConvertConfig, convert_dataset, stage_key
from sd_core.ingest.crawl import DownloadsFailed, Listing, download_new, list_site
from sd_core.ingest.ledger import LedgerError
from sd_core.ingest.settings import CrawlConfig
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
def list_site_task(cfg: CrawlConfig, data_dir: Path, progress: bool = True) -> Path:
    """Walk the listing in headless Chromium; hand on the path of the saved listing."""
    catalog = Catalog(data_dir)
    listing = list_site(cfg, progress=progress)
    listing.save(catalog.listing_json)
    log = get_run_logger()
    log.info("listed %d items (%d unique URLs) on %d pages of %s", len(listing.items),
             len(listing.unique_urls), listing.pages, cfg.listing_url(cfg.start_page))
    if not listing.items:
        log.warning("page %d showed no items: check crawl.item_selector and crawl.image_selector", cfg.start_page)
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
        summary={"pages": listing.pages, **summary.as_dict()},
        seconds=listing.seconds + t.seconds,
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
        ran=summary.reused < summary.images,
    )
    get_run_logger().info(result.line())
    return result
