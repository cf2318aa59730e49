"""The two halves of the crawl stage, each usable on its own: listing, then downloading.

Both stop cleanly on Ctrl-C or SIGTERM: the browser is quit, pending downloads are cancelled and every
download that finished is recorded. Both have deadlines (``listing_deadline_s``, ``download_deadline_s``).

A refresh of a newest-first site walks only the listing's first pages, until pages it already knows
(:func:`refresh_listing`); every ``full_walk_every`` it walks the whole listing (docs/refresh.md).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from sd_core.ingest.browser import Browser, ListingDeadlineError, walk_listing
from sd_core.ingest.convert import not_an_image
from sd_core.ingest.fetch import Fetcher, FetchResult
from sd_core.ingest.ledger import RETRIED_LATER, Ledger, UrlState
from sd_core.ingest.recover import NOT_AN_IMAGE_REASONS, convert_items, open_ledger, quarantine_verdicts
from sd_core.ingest.settings import CrawlConfig, origin_of
from sd_core.runtime.signals import sigterm_raises
from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_bytes, atomic_write_json, read_json, sweep_temp_files

# After Ctrl-C, how long downloads in flight get to notice (their sockets are shut at once).
_CANCEL_GRACE_S = 5.0


WalkKind = Literal["full", "partial"]
END_OF_LISTING = "the end of the listing"


class ListingError(RuntimeError):
    """The listing cannot be trusted (its first page shows no items, or it shrank by more than
    ``crawl.max_shrink``); the last listing is kept."""


@dataclass(frozen=True)
class Walk:
    """How one listing walk went: which kind and why, how far it read and why it ended."""

    kind: WalkKind = "full"
    why: str = ""
    pages: int = 0  # pages read
    ended: str = END_OF_LISTING  # why it stopped reading pages
    cut: str | None = None  # set when the deadline or the page limit ended it before the listing's end
    at: str = ""  # when it ran (UTC, ISO 8601)

    @property
    def complete(self) -> bool:
        """It read every page up to the listing's end."""
        return self.cut is None and self.ended == END_OF_LISTING


@dataclass(frozen=True)
class Listing:
    """What the site lists now: (url, title, page) in listing order, possibly with repeats.
    ``origins``: where the listing pages were served from (after any redirect the browser followed).

    ``walk``: the walk that produced it. After a partial or cut walk, the items it did not reach are those
    of the previous listing, merged after the walked ones: an item removed from an unwalked page stays
    listed until the next complete walk. ``full_walk_at``: when the last complete walk ran (None: never).

    ``kind``: the source that listed it (``site``, or ``folder``, ``dataset``, ``urls``: see
    :mod:`sd_core.ingest.source`); ``captions``: item id -> the caption the source gives it (the site gives
    none). The dataset holds the images of the listed items only (:mod:`sd_core.ingest.membership`)."""

    tag: str
    pages: int
    items: tuple[tuple[str, str, int], ...]
    seconds: float = 0.0
    origins: tuple[str, ...] = ()
    base_url: str = ""
    walk: Walk = field(default_factory=Walk)
    full_walk_at: str | None = None
    kind: str = "site"
    captions: dict[str, str] = field(default_factory=dict)
    walked: int | None = None  # how many of ``items`` (the first ones) the walk read; None: all of them

    @property
    def unique_urls(self) -> list[str]:
        return list(dict.fromkeys(u for u, _, _ in self.items))

    def save(self, path: Path) -> None:
        source = {} if self.kind == "site" else {"kind": self.kind}
        captions = {"captions": self.captions} if self.captions else {}
        atomic_write_json(path, {"tag": self.tag, "base_url": self.base_url, "pages": self.pages,
                                 "seconds": round(self.seconds, 3), "origins": list(self.origins),
                                 "walk": asdict(self.walk), "full_walk_at": self.full_walk_at, **source,
                                 "walked_items": self.walked, "items": [list(i) for i in self.items], **captions},
                         compact=True)

    @classmethod
    def load(cls, path: Path) -> "Listing":
        """The saved listing; ValueError naming the file when it is damaged. A file written before walks were
        recorded reads as a walk of unknown age (the next refresh walks the whole listing)."""
        try:
            data = read_json(path)
        except ValueError as e:  # not JSON (json.JSONDecodeError, UnicodeDecodeError)
            raise ValueError(f"{path} is damaged ({e}); delete it and the next crawl walks the whole listing") from None
        if data is None:
            raise FileNotFoundError(f"no listing at {path}: run the crawl stage first")
        try:
            items = tuple((str(u), str(t), int(p)) for u, t, p in data["items"])
            walk = Walk(**data["walk"]) if data.get("walk") else Walk()
            captions = {str(k): str(v) for k, v in (data.get("captions") or {}).items()}
            walked = data.get("walked_items")
            return cls(data["tag"], int(data["pages"]), items, float(data.get("seconds", 0.0)),
                       tuple(data.get("origins", ())), data.get("base_url", ""), walk, data.get("full_walk_at"),
                       str(data.get("kind", "site")), captions, None if walked is None else int(walked))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}); delete it and the next crawl walks "
                             "the whole listing") from None

    def same_listing(self, cfg: CrawlConfig) -> bool:
        """Whether this listing was read from the tag and site ``cfg`` lists (a listing saved before the site
        was recorded matches on the tag; another source's listing never does)."""
        return self.kind == "site" and self.tag == cfg.tag and self.base_url in ("", cfg.base_url)

    def walk_summary(self) -> dict[str, object]:
        """The walk for the crawl stage's record: kind and why, pages read, why it ended, and an alert if cut."""
        w = self.walk
        out: dict[str, object] = {"walk": w.kind, "walk_why": w.why, "pages": w.pages, "walk_ended": w.ended}
        if w.cut:
            out["alert"] = f"the listing walk was cut: {w.cut}; what it listed was downloaded"
        return out


def _selectors(cfg: CrawlConfig) -> str:
    return (f"crawl.container_selector = {cfg.container_selector!r}, crawl.item_selector = {cfg.item_selector!r}, "
            f"crawl.image_selector = {cfg.image_selector!r}")


def list_site(
    cfg: CrawlConfig,
    *,
    progress: bool = True,
    known: Callable[[list[str]], set[str]] | None = None,
    kind: WalkKind = "full",
    why: str = "",
    now: datetime | None = None,
) -> Listing:
    """Walk the tag's listing pages in headless Chromium and collect every item.

    With ``known`` (which of the given URLs the ledger knows), the walk stops after
    ``crawl.known_pages_to_stop`` pages in a row that hold only known URLs. It also stops at
    ``crawl.max_pages`` and when ``listing_deadline_s`` passes (the browser is then killed): the listing
    holds what was read, and its walk says it was cut.

    Raises :class:`ListingError` (naming the selectors and the page) when the first page shows no items, and
    :class:`ListingDeadlineError` when the deadline passes before a page was read.
    """
    items: list[tuple[str, str, int]] = []
    origins: dict[str, None] = {}
    pages, streak = 0, 0
    ended, cut = END_OF_LISTING, None
    start = time.perf_counter()
    deadline = time.monotonic() + cfg.listing_deadline_s
    with sigterm_raises():
        browser = Browser(cfg, deadline)
        try:
            with browser as driver:
                bar = tqdm(desc=f"listing {cfg.tag}", unit="page", disable=not progress)
                try:
                    for listing in walk_listing(cfg, driver, deadline):
                        if not listing.items:  # only ever the first page: later empty pages end the walk
                            found = "" if listing.container else " (no element matches crawl.container_selector)"
                            raise ListingError(
                                f"listing page {listing.url} shows no items{found}: check {_selectors(cfg)}; "
                                "the site's layout may have changed (the last listing is kept)"
                            )
                        pages += 1
                        items.extend((u, t, listing.page) for u, t in listing.items)
                        if listing.origin.startswith(("http://", "https://")):
                            origins.setdefault(listing.origin)
                        bar.update(1)
                        bar.set_postfix(items=len(items))
                        if known is not None:
                            urls = list(dict.fromkeys(u for u, _ in listing.items))
                            streak = streak + 1 if len(known(urls)) == len(urls) else 0
                            if streak >= cfg.known_pages_to_stop:
                                ended = (f"page {listing.page}: {streak} pages in a row held only URLs the ledger "
                                         f"knows (crawl.known_pages_to_stop = {cfg.known_pages_to_stop})")
                                break
                    else:
                        if pages >= cfg.max_pages:
                            ended = cut = f"the page limit crawl.max_pages = {cfg.max_pages} was reached"
                except (ListingDeadlineError, ListingError):
                    raise
                except Exception:
                    # A call cut off by the deadline (the browser was killed under it) or a wait shortened by it.
                    if browser.killed or time.monotonic() >= deadline:
                        raise browser.deadline_error(f"after {pages} page(s)") from None
                    raise
                finally:
                    bar.close()
        except ListingDeadlineError:
            if not pages:
                raise
            ended = cut = f"crawl.listing_deadline_s = {cfg.listing_deadline_s:g}s passed after {pages} page(s)"
    at = (now or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    return Listing(tag=cfg.tag, pages=pages, items=tuple(items), seconds=time.perf_counter() - start,
                   origins=tuple(origins), base_url=cfg.base_url, walk=Walk(kind, why, pages, ended, cut, at))


def choose_walk(cfg: CrawlConfig, previous: Listing | None, *, full: bool, now: datetime) -> tuple[WalkKind, str]:
    """Which walk a refresh runs, and why. Partial (stopping at known pages) only on a newest-first site, with
    a previous listing of the same tag and site whose last complete walk is younger than ``full_walk_every``."""
    if full:
        return "full", "asked for (--full-listing)"
    if not cfg.newest_first:
        return "full", "crawl.newest_first = false"
    if previous is None:
        return "full", "no previous listing"
    if not previous.same_listing(cfg):
        return "full", f"the previous listing is of another tag or site ({previous.tag} on {previous.base_url})"
    if previous.full_walk_at is None:
        return "full", "no complete walk recorded"
    age = now - datetime.fromisoformat(previous.full_walk_at)
    if age >= cfg.full_walk_every:
        return "full", (f"the last complete walk was {_age(age)} ago "
                        f"(crawl.full_walk_every = {_age(cfg.full_walk_every)})")
    return "partial", f"newest first; the last complete walk was {_age(age)} ago"


def _age(d: timedelta) -> str:
    s = d.total_seconds()
    return f"{s / 86400:.1f} days" if s >= 86400 else f"{s / 3600:.1f} h" if s >= 3600 else f"{s:.0f} s"


def settle_listing(cfg: CrawlConfig, walked: Listing, previous: Listing | None) -> Listing:
    """The listing to keep after a walk. A complete walk replaces the previous listing, unless it lists fewer
    unique URLs than that one by more than ``crawl.max_shrink`` (:class:`ListingError`). A partial or cut
    walk is merged with it: the walked items first, then the previous listing's items it did not reach."""
    if previous is not None and not previous.same_listing(cfg):
        previous = None
    if walked.walk.complete:
        if previous is not None:
            before, after = len(previous.unique_urls), len(walked.unique_urls)
            if after < before * (1 - cfg.max_shrink):
                raise ListingError(
                    f"the listing at {cfg.listing_url(cfg.start_page)} shrank from {before} to {after} unique "
                    f"URLs, by more than crawl.max_shrink = {cfg.max_shrink:g}; the last listing is kept (if the "
                    "site really removed them, run once with --set crawl.max_shrink=1)"
                )
        return replace(walked, full_walk_at=walked.walk.at)
    if previous is None:
        return walked
    seen = {u for u, _, _ in walked.items}
    rest = tuple(i for i in previous.items if i[0] not in seen)
    return replace(walked, items=walked.items + rest, full_walk_at=previous.full_walk_at, walked=len(walked.items))


def refresh_listing(
    cfg: CrawlConfig, catalog: Catalog, *, full: bool = False, now: datetime | None = None, progress: bool = True
) -> Listing:
    """Walk the listing (partially or fully, see :func:`choose_walk`), check it, merge it (see
    :func:`settle_listing`) and save it as ``state/listing.json``. ``now`` stands for the current time.
    On :class:`ListingError` the saved listing is left as it was."""
    now = now or datetime.now(timezone.utc)
    previous: Listing | None = None
    damaged = ""
    if catalog.listing_json.exists():
        try:
            previous = Listing.load(catalog.listing_json)
        except ValueError as e:
            damaged = f" ({e})"
    kind, why = choose_walk(cfg, previous, full=full, now=now)
    if kind == "partial" and not catalog.ledger_db.exists():
        kind, why = "full", "no ledger to tell known URLs"
    with ExitStack() as stack:
        known = None
        if kind == "partial":
            ledger = stack.enter_context(Ledger(catalog.ledger_db))

            def known(urls: list[str]) -> set[str]:
                return set(ledger.states(urls))

        walked = list_site(cfg, progress=progress, known=known, kind=kind, why=why + damaged, now=now)
    listing = settle_listing(cfg, walked, previous)
    listing.save(catalog.listing_json)
    return listing


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
    failed: dict[str, int] = field(default_factory=dict)  # this run's failed URLs, counted per reason
    retried_poisoned: int = 0  # URLs an earlier run took for an image or a duplicate of a bad one, fetched again
    ledger_rebuilt: str | None = None  # the damaged ledger was rebuilt (what, from what, where it went)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)

    def count_promoted(self, new: bool | None) -> None:
        """Count what ``Ledger.promote`` answered: a new image, a duplicate of one, or nothing (None)."""
        if new is not None:
            self.new_images += int(new)
            self.duplicates += int(not new)


class DownloadsFailed(RuntimeError):
    """The download half did nothing useful: every URL this run tried failed, or no image is left at all.
    The message is one line with the counts per reason; ``summary`` is the run's :class:`DownloadSummary`."""

    def __init__(self, message: str, summary: DownloadSummary) -> None:
        super().__init__(message)
        self.summary = summary


def _needs_fetch(state: UrlState | None, cfg: CrawlConfig, force: bool, now: datetime) -> bool:
    if force or state is None or state.status is None:
        return True
    if state.status in RETRIED_LATER:
        return state.due(now)
    if state.status == "refused":  # checked again against this run's policy (costs no request to others)
        return True
    return state.status == "gone" and cfg.retry_gone


def _reason(res: FetchResult) -> str:
    return reason_of(res.http_status, res.error)


def reason_of(http_status: int | None, error: str | None) -> str:
    """The reason a download failed, as counted in summaries: ``HTTP 503``, ``connection refused``, ``not an
    image (unidentified format)``, ``deadline``, ..."""
    if http_status is not None and http_status != 200:
        return f"HTTP {http_status}"
    return (error or "error").split(":")[0]


class _Recorder:
    """Records each fetch as it finishes (main thread), and adds the images to the ledger in order.

    ``order`` is the run's URLs oldest first: those being fetched and those fetched by an earlier run
    that was stopped before their turn. An image is added to ``images`` (which numbers it) only when
    every URL before it in ``order`` has been recorded, so numbering never depends on which download
    finished first, nor on whether the run was interrupted and resumed.
    """

    def __init__(self, cfg: CrawlConfig, catalog: Catalog, ledger: Ledger, summary: DownloadSummary,
                 order: list[str], fetching: set[str], quarantined: dict[str, str] | None = None) -> None:
        self.cfg, self.catalog, self.ledger, self.summary = cfg, catalog, ledger, summary
        self.order, self.fetching = order, fetching
        self.outcome: dict[str, str] = {}
        self.failed: Counter[str] = Counter()
        self.examples: dict[str, tuple[str, str]] = {}  # reason -> (a URL that failed so, its full error)
        self.retry_after: list[float] = []
        self._next = 0
        # Bytes convert quarantined (md5 -> (reason, the URL they were first fetched from)): the same bytes
        # from another URL are no duplicate of an image but a failure, tried again after its back-off.
        firsts = ledger.image_urls()
        self.quarantined = {m: (r, firsts[m]) for m, r in (quarantined or {}).items() if m in firsts}

    def record(self, res: FetchResult) -> None:
        if res.status == "cancelled" or res.url in self.outcome:
            return
        self.summary.gets += res.attempts
        md5 = res.md5
        bad = self.quarantined.get(md5 or "")
        if res.status == "ok" and bad is not None and bad[1] != res.url:
            res = replace(res, status="failed", body=None,
                          error=f"same bytes as a quarantined image: {bad[0]} (first fetched from {bad[1]})"[:300])
            md5 = None
        if res.status == "ok" and md5 is not None:
            path = self.catalog.raw_path(md5)
            if not path.exists():
                atomic_write_bytes(path, res.body or b"")
            self.summary.downloaded += 1
        else:
            self.failed[_reason(res)] += 1
            self.examples.setdefault(_reason(res), (res.url, res.error or _reason(res)))
            if res.retry_after_s:
                self.retry_after.append(res.retry_after_s)
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
            not_before_s=res.retry_after_s or 0.0,
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
            self.summary.count_promoted(self.ledger.promote(url))
            self._next += 1


def download_new(
    cfg: CrawlConfig, catalog: Catalog, listing: Listing, *, progress: bool = True, force: bool = False
) -> DownloadSummary:
    """Download every listed URL the ledger has not fetched yet; store new content by md5.

    A URL fetched (or found gone) in an earlier run is not requested again (unless ``force``);
    a URL that failed is tried again once its back-off has passed (and not before the time a 429/503's
    Retry-After asked for, up to ``max_retry_after_s``); a refused one is checked again
    against this run's host policy. A body that is no image (an HTML error page answered with 200, an
    empty body) is a failure, never an image. Bytes equal to an
    image already stored under another URL are recorded as a duplicate and not stored twice.
    Each download is recorded as soon as it finishes. On Ctrl-C or SIGTERM the downloads not started
    are cancelled, those in flight stopped, and every finished one recorded before the exception
    propagates.

    A ledger SQLite cannot read is rebuilt from the dataset first (:mod:`sd_core.ingest.recover`), and
    entries an earlier version poisoned are undone (:func:`heal_ledger`). Raises :class:`DownloadsFailed`,
    after recording everything, when the run did nothing useful (see :func:`_check_downloads`).
    """
    summary = DownloadSummary(listed=len(listing.items))
    urls = listing.unique_urls
    summary.unique_urls = len(urls)
    sweep_temp_files(catalog.root)
    with sigterm_raises():
        ledger, rebuilt = open_ledger(catalog)
    with sigterm_raises(), ledger:
        if rebuilt is not None:
            summary.ledger_rebuilt = rebuilt.line()
        ledger.note_listed(list(listing.items), listing.tag, seen=listing.walked)
        quarantined = quarantine_verdicts(catalog)
        summary.retried_poisoned = len(heal_ledger(ledger, catalog, quarantined))
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
        recorder = _Recorder(cfg, catalog, ledger, summary, order, fetching, quarantined)
        recorder.promote_ready()
        if todo:
            _fetch_all(cfg, listing, todo, recorder, progress)
        summary.failed = dict(recorder.failed)
        retries = {u for u in todo if (st := states.get(u)) is not None and st.status in ("failed", "gone", "refused")}
        _check_downloads(cfg, ledger, summary, urls, recorder, first_tries=len(set(recorder.outcome) - retries))
    return summary


def heal_ledger(ledger: Ledger, catalog: Catalog, quarantined: dict[str, str] | None = None) -> list[str]:
    """Undo what earlier versions, which did not check a body before taking it for an image, recorded: the URLs
    of an "image" that is none (an error page) and the URLs recorded as "duplicates" of a body convert
    quarantined become failed and due now. Returns those URLs (this run fetches them again).

    Which bytes are no image comes from convert's verdicts (``quarantined``: md5 -> reason) and, once per
    ledger written before the check existed, from reading the raw bytes of images convert has not seen.
    """
    quarantined = quarantine_verdicts(catalog) if quarantined is None else quarantined
    bad = {m: r for m, r in quarantined.items() if r.startswith(NOT_AN_IMAGE_REASONS)}
    if not ledger.content_checked:
        seen = convert_items(catalog)  # converted or quarantined: convert's verdict stands
        for md5 in ledger.image_urls():
            if md5 in seen:
                continue
            try:
                data = catalog.raw_path(md5).read_bytes()
            except OSError:
                continue  # convert will say
            why = not_an_image(data)
            if why is not None:
                bad[md5] = why
    retried = ledger.forget_images({m: f"{why} (an earlier run took it for an image)" for m, why in bad.items()})
    firsts = ledger.image_urls()
    retried += ledger.retry_duplicates({
        m: f"same bytes as a quarantined image: {why} (first fetched from {firsts[m]})"
        for m, why in quarantined.items() if m in firsts and m not in bad
    })
    if not ledger.content_checked:
        ledger.mark_content_checked()
    return retried


def _check_downloads(
    cfg: CrawlConfig, ledger: Ledger, summary: DownloadSummary, urls: list[str], recorder: "_Recorder",
    first_tries: int,
) -> None:
    """Raise :class:`DownloadsFailed` when the run did nothing useful:

    - it tried URLs for the first time (new ones, or all of them under ``force``) and not one download
      succeeded (a rerun that only tried again URLs that failed before, and failed again, is not a failure:
      its summary counts them), or
    - the ledger holds no image at all once the run is over (nothing to build a dataset from), whether this run
      tried anything or every listed URL waits for its back-off.

    A rerun with nothing to fetch, and a run with some successes, pass; their summary counts the failures.
    """
    tried = sum(recorder.failed.values()) + summary.downloaded
    no_image = bool(urls) and ledger.counts()["images"] == 0
    if not ((first_tries and tried and not summary.downloaded) or no_image):
        return
    parts: list[str] = []
    if tried and not summary.downloaded:
        n = f"{tried} URL{'s' * (tried != 1)} tried"
        if set(recorder.failed) == {"HTTP 429"}:
            parts.append(f"the site answered 429 Too Many Requests to every image ({n})")
        else:
            counts = ", ".join(f"{r}: {k}" for r, k in recorder.failed.most_common())
            parts.append(f"every download failed ({n}; {counts})")
        url, error = next(iter(recorder.examples.values()))
        parts.append(f"e.g. {error}" if url in error else f"e.g. {url}: {error}")
        failed_urls = [u for u, st in recorder.outcome.items() if st != "ok"]
    else:
        reasons: Counter[str] = Counter()
        listed = set(urls)
        for url, status, http_status, error in ledger.failures():
            if url in listed:
                reasons[reason_of(http_status, error)] += 1
        counts = ", ".join(f"{r}: {k}" for r, k in reasons.most_common())
        parts.append(f"no image downloaded yet: the {len(urls)} listed URLs failed in earlier runs ({counts})")
        failed_urls, url = urls, ""
    if recorder.retry_after:
        parts.append(f"the site asked to wait {max(recorder.retry_after):.0f}s (Retry-After, honoured up to "
                     f"crawl.max_retry_after_s = {cfg.max_retry_after_s:g}s)")
    when = ledger.next_try(failed_urls)
    if when is not None:
        parts.append(f"they are tried again from {when.isoformat(timespec='seconds')}")
    if url and _same_origin(url, cfg.base_url) and any(r in _NETWORK for r in recorder.failed):
        parts.append(f"check crawl.base_url = {cfg.base_url}")
    raise DownloadsFailed("; ".join(parts), summary)


_NETWORK = frozenset({"connection refused", "host not found", "network unreachable", "no route to host",
                      "timed out connecting", "timed out reading", "connection reset", "TLS error",
                      "connection closed by the server"})


def _same_origin(a: str, b: str) -> bool:
    try:
        return origin_of(a) == origin_of(b)
    except ValueError:
        return False


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
