"""Listing pages through a real headless Chromium driven by Selenium.

Image loading is switched off in the browser: the crawler only reads each image's URL
and title from the rendered DOM, and the downloader fetches every unique URL exactly once.

Nothing here can block for ever: page loads and scripts have the browser's own timeouts
(``page_timeout_s``), every call to chromedriver has an HTTP timeout (``command_timeout_s``), and
:class:`Browser` kills chromedriver and the whole browser when the listing's deadline passes
(``listing_deadline_s``), so whatever call was waiting on them returns with an error.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from sd_core.ingest.settings import CrawlConfig
from sd_core.runtime.process import child_popen_kw

BASE_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--blink-settings=imagesEnabled=false",
    "--window-size=1280,1024",
)

# One round trip: every item's image URL (resolved against the page) and title.
_EXTRACT_JS = """
const [itemSel, imgSel, urlAttr, titleAttr] = arguments;
const out = [];
for (const item of document.querySelectorAll(itemSel)) {
  const img = item.querySelector(imgSel);
  if (!img) continue;
  const raw = img.getAttribute(urlAttr);
  if (!raw) continue;
  let url;
  try { url = new URL(raw, document.baseURI).href; } catch (e) { continue; }
  const title = img.getAttribute(titleAttr) || img.getAttribute('alt') || '';
  out.push([url, title.trim()]);
}
return [location.origin, out];
"""

_STATE_JS = """
const [containerSel, itemSel] = arguments;
return [document.readyState, document.querySelector(containerSel) !== null,
        document.querySelectorAll(itemSel).length];
"""


class BrowserError(RuntimeError):
    """Chromium or chromedriver could not be started or stopped answering."""


class ListingDeadlineError(BrowserError):
    """The listing did not finish within ``listing_deadline_s`` (the browser was killed)."""


class SiteUnreachable(BrowserError):
    """A listing page could not be loaded at all (refused, no such host, TLS, ...); one line naming the URL."""


# Chromium's network error codes (net/base/net_error_list.h in Chromium's source), in words
_NET_ERRORS = {
    "ERR_CONNECTION_REFUSED": "connection refused",
    "ERR_NAME_NOT_RESOLVED": "host not found",
    "ERR_NAME_RESOLUTION_FAILED": "host not found",
    "ERR_ADDRESS_UNREACHABLE": "address unreachable",
    "ERR_INTERNET_DISCONNECTED": "no network",
    "ERR_CONNECTION_TIMED_OUT": "timed out connecting",
    "ERR_TIMED_OUT": "timed out",
    "ERR_CONNECTION_RESET": "connection reset",
    "ERR_CONNECTION_CLOSED": "connection closed by the server",
    "ERR_EMPTY_RESPONSE": "empty answer from the server",
    "ERR_SSL_PROTOCOL_ERROR": "TLS error",
    "ERR_CERT_AUTHORITY_INVALID": "TLS certificate not trusted",
    "ERR_CERT_COMMON_NAME_INVALID": "TLS certificate for another host",
    "ERR_CERT_DATE_INVALID": "TLS certificate expired",
    "ERR_TOO_MANY_REDIRECTS": "too many redirects",
    "ERR_UNSAFE_PORT": "port refused by the browser as unsafe",
}


_ERROR_PAGE_JS = """
return document.documentURI.startsWith("chrome-error://")
  ? ((document.querySelector(".error-code") || {}).textContent || "ERR_FAILED") : null;
"""


def load_page(driver: webdriver.Chrome, url: str, cfg: CrawlConfig) -> None:
    """``driver.get(url)``; a page that does not load raises one line naming the URL and the field.

    chromedriver raises for some network errors (with its stack frames in the message) and shows Chromium's
    own error page for others (a port Chromium deems unsafe): both become :class:`SiteUnreachable`, whose
    chained exception keeps the frames for ``--debug``.
    """
    try:
        driver.get(url)
    except TimeoutException:
        raise BrowserError(f"listing page {url} did not load within {cfg.page_timeout_s}s") from None
    except WebDriverException as e:
        raise _unreachable(url, cfg, e.msg or str(e)) from e
    code = driver.execute_script(_ERROR_PAGE_JS)
    if code:
        raise _unreachable(url, cfg, f"net::{code.strip()}")


def _unreachable(url: str, cfg: CrawlConfig, text: str) -> SiteUnreachable:
    code = re.search(r"net::(ERR_[A-Z_]+)", text)
    if code:
        what = f"{_NET_ERRORS.get(code.group(1), code.group(1).lower().replace('_', ' '))} ({code.group(0)})"
    else:
        what = (text.strip().splitlines() or ["unknown error"])[0][:200]
    return SiteUnreachable(f"listing page {url} could not be loaded: {what}; check crawl.base_url = {cfg.base_url}")


@dataclass(frozen=True)
class PageListing:
    page: int
    url: str
    items: tuple[tuple[str, str], ...]  # (absolute image URL, title)
    origin: str = ""  # the origin the page was finally served from (after any redirect)
    container: bool = True  # whether the page had an element matching crawl.container_selector


def check_browser(cfg: CrawlConfig) -> None:
    """Fail early, naming the field, when the configured browser or driver is missing."""
    for label, p in (("chromium_path", cfg.chromium_path), ("chromedriver_path", cfg.chromedriver_path)):
        if not Path(p).exists():
            raise FileNotFoundError(
                f"crawl.{label} = {p} does not exist; install Debian's chromium and chromium-driver "
                "or point the config at your browser and driver"
            )


def make_driver(cfg: CrawlConfig, service: Service | None = None) -> webdriver.Chrome:
    """Start headless Chromium through the configured chromedriver (never downloads a driver)."""
    check_browser(cfg)
    opts = webdriver.ChromeOptions()
    opts.binary_location = cfg.chromium_path
    for arg in (*BASE_ARGS, *cfg.browser_args):
        opts.add_argument(arg)
    if cfg.user_agent:
        opts.add_argument(f"--user-agent={cfg.user_agent}")
    opts.add_experimental_option("prefs", {"profile.managed_default_content_settings.images": 2})
    # chromedriver and the Chromium it starts in a process group of their own; the driver gets the
    # parent-death signal, so a killed run does not leave it behind (see sd_core.runtime.process)
    service = service or Service(executable_path=cfg.chromedriver_path, popen_kw=child_popen_kw())
    try:
        driver = webdriver.Chrome(service=service, options=opts)
    except WebDriverException as e:
        raise BrowserError(f"could not start Chromium: {e.msg or e}") from e
    client = getattr(driver.command_executor, "client_config", None)
    if client is not None:  # each call to chromedriver waits at most this long for its answer
        client.timeout = cfg.command_timeout_s
    driver.set_page_load_timeout(cfg.page_timeout_s)
    driver.set_script_timeout(cfg.page_timeout_s)
    return driver


def _stat(pid: int) -> list[bytes] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...); None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :].split()


def process_tree(pid: int) -> dict[int, int]:
    """``pid`` and every process below it, as pid → start time (which tells a reused pid apart).
    Read from /proc (Linux); empty where there is none."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return {}
    for p in entries:
        fields = _stat(p)
        if fields is not None and fields[0] != b"Z":
            children.setdefault(int(fields[1]), []).append(p)
            starts[p] = int(fields[19])
    out: dict[int, int] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        if p in starts:
            out[p] = starts[p]
            todo.extend(children.get(p, []))
    return out


def _alive(pid: int, start: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != b"Z" and int(fields[19]) == start


def _kill(procs: dict[int, int], sig: int) -> None:
    for pid, start in procs.items():
        if _alive(pid, start):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


class Browser:
    """Headless Chromium for one listing, with a hard deadline.

    ``with Browser(cfg, deadline) as driver:`` starts chromedriver and Chromium. When ``deadline``
    (a ``time.monotonic()`` value) passes, a timer kills chromedriver and every process under it, so a
    call blocked on them (a hung driver, a browser that stopped answering) fails at once; the block then
    raises :class:`ListingDeadlineError`. Leaving the block quits the browser (killing it if quitting
    hangs or fails), also on Ctrl-C or SIGTERM.
    """

    QUIT_GRACE_S = 15.0

    def __init__(self, cfg: CrawlConfig, deadline: float) -> None:
        self.cfg = cfg
        self.deadline = deadline
        self.service = Service(executable_path=cfg.chromedriver_path, popen_kw=child_popen_kw())
        self.driver: webdriver.Chrome | None = None
        self.killed = False
        self._known: dict[int, int] = {}
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(max(at - time.monotonic(), 0.0), self.kill)
        self._timer.daemon = True
        self._timer.start()

    def _tree(self) -> dict[int, int]:
        """chromedriver and everything under it, plus the browser processes seen at start (Chromium
        outlives a chromedriver that died)."""
        process = getattr(self.service, "process", None)
        procs = {p: s for p, s in self._known.items() if _alive(p, s)}
        if process is not None:
            procs.update(process_tree(process.pid))
        return procs

    def kill(self) -> None:
        """Kill chromedriver and the browser: SIGTERM (Chromium then takes its helpers down), SIGKILL
        after two seconds for whatever is left."""
        with self._lock:
            self.killed = True
            procs = self._tree()
        _kill(procs, signal.SIGTERM)
        stop = time.monotonic() + 2.0
        while time.monotonic() < stop and any(_alive(p, s) for p, s in procs.items()):
            time.sleep(0.05)
        _kill({**procs, **self._tree()}, signal.SIGKILL)
        process = getattr(self.service, "process", None)
        if process is not None:
            try:
                process.wait(timeout=2)
            except Exception:  # noqa: BLE001 - it was SIGKILLed; reaping is best effort
                pass

    def __enter__(self) -> webdriver.Chrome:
        self._arm(self.deadline)
        try:
            self.driver = make_driver(self.cfg, self.service)
        except BaseException as e:
            timed_out = self.killed  # by the deadline's timer (the clean-up below may kill what is left, too)
            self._finish()
            # a signal (Ctrl-C, SIGTERM as Prefect's TerminationSignal or our Interrupted, SystemExit) is no deadline
            if timed_out and isinstance(e, Exception):
                raise self.deadline_error("starting the browser") from None
            raise
        with self._lock:
            self._known.update(self._tree())  # Chromium's pid, in case chromedriver dies before it
        return self.driver

    def __exit__(self, *exc: object) -> None:
        self._finish()

    def deadline_error(self, doing: str) -> ListingDeadlineError:
        return ListingDeadlineError(
            f"the listing did not finish within crawl.listing_deadline_s = {self.cfg.listing_deadline_s:g}s "
            f"({doing}); the browser was stopped"
        )

    def _finish(self) -> None:
        """Quit the driver within QUIT_GRACE_S, then make sure nothing of it is left running."""
        self._arm(time.monotonic() + self.QUIT_GRACE_S)
        try:
            if self.driver is not None and not self.killed:
                try:
                    self.driver.quit()
                except Exception:  # noqa: BLE001 - the driver may already be gone (Ctrl-C reaches it too)
                    pass
        finally:
            if self._timer is not None:
                self._timer.cancel()
            if self._tree():
                self.kill()


def read_page(
    driver: webdriver.Chrome, cfg: CrawlConfig, page: int, deadline: float | None = None
) -> PageListing:
    """Load one listing page and wait until its JavaScript has rendered the items.

    A page that finished loading and still shows no item after ``empty_page_settle_s``
    is empty (the end of the listing). Items are read once their count is stable.
    The wait ends at ``deadline`` (``time.monotonic()``) at the latest.
    """
    url = cfg.listing_url(page)
    wait_s = cfg.page_timeout_s
    if deadline is not None:
        wait_s = max(min(wait_s, deadline - time.monotonic()), 0.1)
    load_page(driver, url, cfg)
    loaded_at: float | None = None
    last_count = -1
    has_container = False

    def rendered(d: webdriver.Chrome) -> bool:
        nonlocal loaded_at, last_count, has_container
        ready, has_container, count = d.execute_script(_STATE_JS, cfg.container_selector, cfg.item_selector)
        if count > 0:
            stable = count == last_count
            last_count = count
            return stable
        if ready == "complete":
            loaded_at = loaded_at or time.monotonic()
            return time.monotonic() - loaded_at >= cfg.empty_page_settle_s
        return False

    try:
        WebDriverWait(driver, wait_s, poll_frequency=0.1).until(rendered)
    except TimeoutException:
        raise BrowserError(
            f"listing page {url} rendered no stable item list within {wait_s:g}s"
        ) from None
    origin, items = driver.execute_script(
        _EXTRACT_JS, cfg.item_selector, cfg.image_selector, cfg.url_attribute, cfg.title_attribute
    )
    return PageListing(page=page, url=url, items=tuple((u, t) for u, t in items), origin=origin,
                       container=bool(has_container))


def walk_listing(
    cfg: CrawlConfig, driver: webdriver.Chrome, deadline: float | None = None
) -> Iterator[PageListing]:
    """Yield listing pages from ``start_page`` until a page has no items, repeats the previous
    page exactly (a site that clamps page numbers), or ``max_pages`` is reached. An empty first page is
    yielded (with no items) so that the caller can tell it from the end of the listing.
    Raises :class:`ListingDeadlineError` when ``deadline`` (``time.monotonic()``) passes first."""
    page = cfg.start_page
    previous: tuple[tuple[str, str], ...] | None = None
    while page < cfg.start_page + cfg.max_pages:
        if deadline is not None and time.monotonic() >= deadline:
            raise ListingDeadlineError(
                f"the listing did not finish within crawl.listing_deadline_s = {cfg.listing_deadline_s:g}s "
                f"(stopped before page {page})"
            )
        listing = read_page(driver, cfg, page, deadline)
        if not listing.items and page == cfg.start_page:
            yield listing
            return
        if not listing.items or listing.items == previous:
            return
        yield listing
        previous = listing.items
        page += 1
        if cfg.page_delay_s:
            left = float("inf") if deadline is None else deadline - time.monotonic()
            time.sleep(max(min(cfg.page_delay_s, left), 0))
