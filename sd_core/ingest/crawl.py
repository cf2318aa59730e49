"""The two halves of the crawl stage, each usable on its own: listing, then downloading.

Both stop cleanly on Ctrl-C or SIGTERM: the browser is quit, pending downloads are cancelled and every
download that finished is recorded. Both have deadlines (``listing_deadline_s``, ``download_deadline_s``).
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from sd_core.ingest.browser import Browser, ListingDeadlineError, walk_listing
from sd_core.ingest.fetch import Fetcher, FetchResult
from sd_core.ingest.interrupt import sigterm_raises
from sd_core.ingest.ledger import RETRIED_LATER, Ledger, UrlState
from sd_core.ingest.settings import CrawlConfig
from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_bytes, atomic_write_json, read_json, sweep_temp_files

# After Ctrl-C, how long downloads in flight get to notice (their sockets are shut at once).
_CANCEL_GRACE_S = 5.0


@dataclass(frozen=True)
class Listing:
    """What the site lists now: (url, title, page) in listing order, possibly with repeats.
    ``origins``: where the listing pages were served from (after any redirect the browser followed)."""

    tag: str
    pages: int
    items: tuple[tuple[str, str, int], ...]
    seconds: float = 0.0
    origins: tuple[str, ...] = ()

    @property
    def unique_urls(self) -> list[str]:
        return list(dict.fromkeys(u for u, _, _ in self.items))

    def save(self, path: Path) -> None:
        atomic_write_json(path, {"tag": self.tag, "pages": self.pages, "seconds": round(self.seconds, 3),
                                 "origins": list(self.origins), "items": [list(i) for i in self.items]})

    @classmethod
    def load(cls, path: Path) -> "Listing":
        data = read_json(path)
        if data is None:
            raise FileNotFoundError(f"no listing at {path}: run the crawl stage first")
        items = tuple((u, t, int(p)) for u, t, p in data["items"])
        return cls(data["tag"], data["pages"], items, data.get("seconds", 0.0), tuple(data.get("origins", ())))


def list_site(cfg: CrawlConfig, *, progress: bool = True) -> Listing:
    """Walk the tag's listing pages in headless Chromium and collect every item.

    Everything, browser start and quit included, must finish within ``listing_deadline_s``; past it the
    browser is killed and :class:`ListingDeadlineError` raised.
    """
    items: list[tuple[str, str, int]] = []
    origins: dict[str, None] = {}
    pages = 0
    start = time.perf_counter()
    deadline = time.monotonic() + cfg.listing_deadline_s
    with sigterm_raises():
        browser = Browser(cfg, deadline)
        with browser as driver:
            bar = tqdm(desc=f"listing {cfg.tag}", unit="page", disable=not progress)
            try:
                for listing in walk_listing(cfg, driver, deadline):
                    pages += 1
                    items.extend((u, t, listing.page) for u, t in listing.items)
                    if listing.origin.startswith(("http://", "https://")):
                        origins.setdefault(listing.origin)
                    bar.update(1)
                    bar.set_postfix(items=len(items))
            except ListingDeadlineError:
                raise
            except Exception:
                # A call cut off by the deadline (the browser was killed under it) or a wait shortened by it.
                if browser.killed or time.monotonic() >= deadline:
                    raise browser.deadline_error(f"after {pages} page(s)") from None
                raise
            finally:
                bar.close()
    return Listing(tag=cfg.tag, pages=pages, items=tuple(items), seconds=time.perf_counter() - start,
                   origins=tuple(origins))


@dataclass
class DownloadSummary:
    listed: int = 0
    unique_urls: int = 0
    already_known: int = 0
    deferred: int = 0  # failed earlier, waiting for their back-off (part of already_known)
    downloaded: int = 0
    new_images: int = 0
    duplicates: int = 0
    gets: int = 0
    failed: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _needs_fetch(state: UrlState | None, cfg: CrawlConfig, force: bool, now: datetime) -> bool:
    if force or state is None or state.status is None:
        return True
    if state.status in RETRIED_LATER:
        return state.due(now)
    if state.status == "refused":  # checked again against this run's policy (costs no request to others)
        return True
    return state.status == "gone" and cfg.retry_gone


def _reason(res: FetchResult) -> str:
    if res.http_status is not None and res.http_status != 200:
        return f"HTTP {res.http_status}"
    return (res.error or "error").split(":")[0]


class _Recorder:
    """Records each fetch as it finishes (main thread), and adds the images to the ledger in order.

    ``order`` is the run's URLs oldest first: those being fetched and those fetched by an earlier run
    that was stopped before their turn. An image is added to ``images`` (which numbers it) only when
    every URL before it in ``order`` has been recorded, so numbering never depends on which download
    finished first, nor on whether the run was interrupted and resumed.
    """

    def __init__(self, cfg: CrawlConfig, catalog: Catalog, ledger: Ledger, summary: DownloadSummary,
                 order: list[str], fetching: set[str]) -> None:
        self.cfg, self.catalog, self.ledger, self.summary = cfg, catalog, ledger, summary
        self.order, self.fetching = order, fetching
        self.outcome: dict[str, str] = {}
        self.failed: Counter[str] = Counter()
        self._next = 0

    def record(self, res: FetchResult) -> None:
        if res.status == "cancelled" or res.url in self.outcome:
            return
        self.summary.gets += res.attempts
        md5 = res.md5
        if res.status == "ok" and md5 is not None:
            path = self.catalog.raw_path(md5)
            if not path.exists():
                atomic_write_bytes(path, res.body or b"")
            self.summary.downloaded += 1
        else:
            self.failed[_reason(res)] += 1
        self.ledger.record_fetch(
            res.url,
            res.status,
            attempts=res.attempts,
            http_status=res.http_status,
            md5=md5,
            size=len(res.body) if res.body is not None else None,
            content_type=res.content_type,
            error=res.error,
            backoff_s=self.cfg.failed_backoff_s,
            backoff_max_s=self.cfg.failed_backoff_max_s,
        )
        self.outcome[res.url] = res.status
        self.promote_ready()

    def promote_ready(self) -> None:
        while self._next < len(self.order):
            url = self.order[self._next]
            if url in self.fetching:
                status = self.outcome.get(url)
                if status is None:
                    return  # still in flight (or cancelled): later URLs wait for it
                if status != "ok":
                    self._next += 1
                    continue
            new = self.ledger.promote(url)
            if new is not None:
                self.summary.new_images += int(new)
                self.summary.duplicates += int(not new)
            self._next += 1


def download_new(
    cfg: CrawlConfig, catalog: Catalog, listing: Listing, *, progress: bool = True, force: bool = False
) -> DownloadSummary:
    """Download every listed URL the ledger has not fetched yet; store new content by md5.

    A URL fetched (or found gone) in an earlier run is not requested again (unless ``force``);
    a URL that failed is tried again once its back-off has passed; a refused one is checked again
    against this run's host policy. Bytes equal to an
    image already stored under another URL are recorded as a duplicate and not stored twice.
    Each download is recorded as soon as it finishes. On Ctrl-C or SIGTERM the downloads not started
    are cancelled, those in flight stopped, and every finished one recorded before the exception
    propagates.
    """
    summary = DownloadSummary(listed=len(listing.items))
    urls = listing.unique_urls
    summary.unique_urls = len(urls)
    sweep_temp_files(catalog.root)
    with sigterm_raises(), Ledger(catalog.ledger_db) as ledger:
        ledger.note_listed(list(listing.items), listing.tag)
        states = ledger.states(urls)
        now = datetime.now(timezone.utc)
        # Oldest first (the listing is newest first): sequence numbers, and so file names, then
        # come out the same whether the site was crawled in one go or refreshed as it grew.
        todo = [u for u in reversed(urls) if _needs_fetch(states.get(u), cfg, force, now)]
        summary.already_known = len(urls) - len(todo)
        summary.deferred = sum(
            1 for u in urls
            if (st := states.get(u)) is not None and st.status in RETRIED_LATER and not st.due(now) and not force
        )
        fetching = set(todo)
        leftover = ledger.unpromoted()
        listed = set(urls)
        waiting = set(leftover)
        order = [u for u in reversed(urls) if u in fetching or u in waiting]
        order += [u for u in leftover if u not in listed]
        recorder = _Recorder(cfg, catalog, ledger, summary, order, fetching)
        recorder.promote_ready()
        if todo:
            _fetch_all(cfg, listing, todo, recorder, progress)
        summary.failed = dict(recorder.failed)
    return summary


def _fetch_all(cfg: CrawlConfig, listing: Listing, todo: list[str], recorder: _Recorder, progress: bool) -> None:
    fetcher = Fetcher(cfg, listing.origins)
    pool = ThreadPoolExecutor(max_workers=cfg.download_workers, thread_name_prefix="download")
    bar = tqdm(total=len(todo), desc="downloading", unit="img", disable=not progress)
    futures: list[Future[FetchResult]] = [pool.submit(fetcher.fetch, u) for u in todo]
    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                recorder.record(fut.result())
                bar.update(1)
    except BaseException:
        # Ctrl-C, SIGTERM or an error: stop everything in flight, keep what finished.
        fetcher.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        wait(futures, timeout=_CANCEL_GRACE_S)
        for fut in futures:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                recorder.record(fut.result())
        raise
    finally:
        bar.close()
        pool.shutdown(wait=False, cancel_futures=True)
        fetcher.close()


def listing_summary(listing: Listing) -> dict[str, object]:
    return {"tag": listing.tag, "pages": listing.pages, "listed": len(listing.items),
            "unique_urls": len(listing.unique_urls)}
