"""Listing pages through a real headless Chromium driven by Selenium.

Image loading is switched off in the browser: the crawler only reads each image's URL
and title from the rendered DOM, and the downloader fetches every unique URL exactly once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from sd_core.ingest.settings import CrawlConfig
from sd_core.store.children import child_popen_kw

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
return out;
"""

_STATE_JS = """
const [containerSel, itemSel] = arguments;
return [document.readyState, document.querySelector(containerSel) !== null,
        document.querySelectorAll(itemSel).length];
"""


class BrowserError(RuntimeError):
    """Chromium or chromedriver could not be started or stopped answering."""


@dataclass(frozen=True)
class PageListing:
    page: int
    url: str
    items: tuple[tuple[str, str], ...]  # (absolute image URL, title)


def check_browser(cfg: CrawlConfig) -> None:
    """Fail early, naming the field, when the configured browser or driver is missing."""
    for label, p in (("chromium_path", cfg.chromium_path), ("chromedriver_path", cfg.chromedriver_path)):
        if not Path(p).exists():
            raise FileNotFoundError(
                f"crawl.{label} = {p} does not exist; install Debian's chromium and chromium-driver "
                "or point the config at your browser and driver"
            )


def make_driver(cfg: CrawlConfig) -> webdriver.Chrome:
    """Start headless Chromium through the configured chromedriver (never downloads a driver)."""
    check_browser(cfg)
    opts = webdriver.ChromeOptions()
    opts.binary_location = cfg.chromium_path
    for arg in (*BASE_ARGS, *cfg.browser_args):
        opts.add_argument(arg)
    if cfg.user_agent:
        opts.add_argument(f"--user-agent={cfg.user_agent}")
    opts.add_experimental_option("prefs", {"profile.managed_default_content_settings.images": 2})
    try:
        # chromedriver and the Chromium it starts in a process group of their own; the driver gets the
        # parent-death signal, so a killed run does not leave it behind (see sd_core.store.children)
        service = Service(executable_path=cfg.chromedriver_path, popen_kw=child_popen_kw())
        driver = webdriver.Chrome(service=service, options=opts)
    except WebDriverException as e:
        raise BrowserError(f"could not start Chromium: {e.msg or e}") from e
    driver.set_page_load_timeout(cfg.page_timeout_s)
    return driver


def read_page(driver: webdriver.Chrome, cfg: CrawlConfig, page: int) -> PageListing:
    """Load one listing page and wait until its JavaScript has rendered the items.

    A page that finished loading and still shows no item after ``empty_page_settle_s``
    is empty (the end of the listing). Items are read once their count is stable.
    """
    url = cfg.listing_url(page)
    try:
        driver.get(url)
    except TimeoutException:
        raise BrowserError(f"listing page {url} did not load within {cfg.page_timeout_s}s") from None
    loaded_at: float | None = None
    last_count = -1

    def rendered(d: webdriver.Chrome) -> bool:
        nonlocal loaded_at, last_count
        ready, _container, count = d.execute_script(_STATE_JS, cfg.container_selector, cfg.item_selector)
        if count > 0:
            stable = count == last_count
            last_count = count
            return stable
        if ready == "complete":
            loaded_at = loaded_at or time.monotonic()
            return time.monotonic() - loaded_at >= cfg.empty_page_settle_s
        return False

    try:
        WebDriverWait(driver, cfg.page_timeout_s, poll_frequency=0.1).until(rendered)
    except TimeoutException:
        raise BrowserError(
            f"listing page {url} rendered no stable item list within {cfg.page_timeout_s}s"
        ) from None
    items = driver.execute_script(
        _EXTRACT_JS, cfg.item_selector, cfg.image_selector, cfg.url_attribute, cfg.title_attribute
    )
    return PageListing(page=page, url=url, items=tuple((u, t) for u, t in items))


def walk_listing(cfg: CrawlConfig, driver: webdriver.Chrome) -> Iterator[PageListing]:
    """Yield listing pages from ``start_page`` until a page has no items, repeats the previous
    page exactly (a site that clamps page numbers), or ``max_pages`` is reached."""
    page = cfg.start_page
    previous: tuple[tuple[str, str], ...] | None = None
    while cfg.max_pages is None or page < cfg.start_page + cfg.max_pages:
        listing = read_page(driver, cfg, page)
        if not listing.items or listing.items == previous:
            return
        yield listing
        previous = listing.items
        page += 1
        if cfg.page_delay_s:
            time.sleep(cfg.page_delay_s)
