"""The two halves of the crawl stage, each usable on its own: listing, then downloading."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from sd_core.ingest.browser import make_driver, walk_listing
from sd_core.ingest.fetch import Fetcher, FetchResult
from sd_core.ingest.ledger import Ledger
from sd_core.ingest.settings import CrawlConfig
from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_bytes, atomic_write_json, read_json, sweep_temp_files


@dataclass(frozen=True)
class Listing:
    """What the site lists now: (url, title, page) in listing order, possibly with repeats."""

    tag: str
    pages: int
    items: tuple[tuple[str, str, int], ...]
    seconds: float = 0.0

    @property
    def unique_urls(self) -> list[str]:
        return list(dict.fromkeys(u for u, _, _ in self.items))

    def save(self, path: Path) -> None:
        atomic_write_json(path, {"tag": self.tag, "pages": self.pages, "seconds": round(self.seconds, 3),
                                 "items": [list(i) for i in self.items]})

    @classmethod
    def load(cls, path: Path) -> "Listing":
        data = read_json(path)
        if data is None:
            raise FileNotFoundError(f"no listing at {path}: run the crawl stage first")
        items = tuple((u, t, int(p)) for u, t, p in data["items"])
        return cls(data["tag"], data["pages"], items, data.get("seconds", 0.0))


def list_site(cfg: CrawlConfig, *, progress: bool = True) -> Listing:
    """Walk the tag's listing pages in headless Chromium and collect every item."""
    items: list[tuple[str, str, int]] = []
    pages = 0
    start = time.perf_counter()
    driver = make_driver(cfg)
    try:
        bar = tqdm(desc=f"listing {cfg.tag}", unit="page", disable=not progress)
        for listing in walk_listing(cfg, driver):
            pages += 1
            items.extend((u, t, listing.page) for u, t in listing.items)
            bar.update(1)
            bar.set_postfix(items=len(items))
        bar.close()
    finally:
        driver.quit()
    return Listing(tag=cfg.tag, pages=pages, items=tuple(items), seconds=time.perf_counter() - start)


@dataclass
class DownloadSummary:
    listed: int = 0
    unique_urls: int = 0
    already_known: int = 0
    downloaded: int = 0
    new_images: int = 0
    duplicates: int = 0
    gets: int = 0
    failed: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _needs_fetch(status: str | None, cfg: CrawlConfig, force: bool) -> bool:
    if force or status is None or status == "failed":
        return True
    return status == "gone" and cfg.retry_gone


def _reason(res: FetchResult) -> str:
    if res.http_status is not None and res.http_status != 200:
        return f"HTTP {res.http_status}"
    return (res.error or "error").split(":")[0]


def download_new(
    cfg: CrawlConfig, catalog: Catalog, listing: Listing, *, progress: bool = True, force: bool = False
) -> DownloadSummary:
    """Download every listed URL the ledger has not fetched yet; store new content by md5.

    A URL fetched (or found gone) in an earlier run is not requested again (unless ``force``);
    a URL that failed transiently is retried. Bytes equal to an image already stored under another
    URL are recorded as a duplicate and not stored twice.
    """
    summary = DownloadSummary(listed=len(listing.items))
    urls = listing.unique_urls
    summary.unique_urls = len(urls)
    failed: Counter[str] = Counter()
    sweep_temp_files(catalog.root)
    with Ledger(catalog.ledger_db) as ledger:
        ledger.note_listed(list(listing.items), listing.tag)
        known = ledger.statuses(urls)
        # Oldest first (the listing is newest first): sequence numbers, and so file names, then
        # come out the same whether the site was crawled in one go or refreshed as it grew.
        todo = [u for u in reversed(urls) if _needs_fetch(known.get(u), cfg, force)]
        summary.already_known = len(urls) - len(todo)
        fetcher = Fetcher(cfg)
        bar = tqdm(total=len(todo), desc="downloading", unit="img", disable=not progress or not todo)
        with ThreadPoolExecutor(max_workers=cfg.download_workers) as pool:
            for res in pool.map(fetcher.fetch, todo):  # concurrent fetches, recorded in order
                summary.gets += res.attempts
                md5 = res.md5
                if res.status == "ok" and md5 is not None:
                    path = catalog.raw_path(md5)
                    if not path.exists():
                        atomic_write_bytes(path, res.body or b"")
                    summary.downloaded += 1
                else:
                    failed[_reason(res)] += 1
                new = ledger.record_fetch(
                    res.url,
                    res.status,
                    attempts=res.attempts,
                    http_status=res.http_status,
                    md5=md5,
                    size=len(res.body) if res.body is not None else None,
                    content_type=res.content_type,
                    error=res.error,
                )
                if res.status == "ok":
                    summary.new_images += int(new)
                    summary.duplicates += int(not new)
                bar.update(1)
        bar.close()
        fetcher.close()
    summary.failed = dict(failed)
    return summary


def listing_summary(listing: Listing) -> dict[str, object]:
    return {"tag": listing.tag, "pages": listing.pages, "listed": len(listing.items),
            "unique_urls": len(listing.unique_urls)}
