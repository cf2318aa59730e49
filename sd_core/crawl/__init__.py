"""Crawl stage: list a tag's pages in a browser, then download each new image URL once."""

from sd_core.crawl.browser import BrowserError, PageListing, make_driver, read_page, walk_listing
from sd_core.crawl.fetch import Fetcher, FetchResult
from sd_core.crawl.ledger import Ledger
from sd_core.crawl.run import Listing, download_new, list_site

__all__ = [
    "BrowserError",
    "PageListing",
    "make_driver",
    "read_page",
    "walk_listing",
    "Fetcher",
    "FetchResult",
    "Ledger",
    "Listing",
    "download_new",
    "list_site",
]
