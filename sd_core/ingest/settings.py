"""Crawl settings: where to crawl and how politely. Selectors default to the discords.com layout."""

from __future__ import annotations

from pydantic import Field, field_validator

from sd_core.common.strict import StrictModel


class CrawlConfig(StrictModel):
    """Where to crawl and how politely. Selectors default to the discords.com layout."""

    base_url: str = "https://discords.com"
    tag: str = "Blobs"
    listing_path: str = "/emoji-list/tag/{tag}?page={page}"
    container_selector: str = "div.FS5UE28h.container"
    item_selector: str = "div.LQY5mtmC div.aLnnpRah.text-center"
    image_selector: str = "div.Mw1EAtrx img, img"
    url_attribute: str = "src"
    title_attribute: str = "title"
    start_page: int = Field(1, ge=1)
    max_pages: int | None = Field(None, ge=1)
    page_timeout_s: float = Field(20.0, gt=0, description="longest wait for a page's items to render")
    empty_page_settle_s: float = Field(
        3.0, gt=0, description="a loaded page still without items after this long is the end of the listing"
    )
    page_delay_s: float = Field(0.0, ge=0, description="pause between listing pages (politeness)")
    chromium_path: str = "/usr/bin/chromium"
    chromedriver_path: str = "/usr/bin/chromedriver"
    browser_args: tuple[str, ...] = ()
    user_agent: str | None = None
    download_workers: int = Field(8, ge=1, le=64)
    max_requests_per_second: float = Field(10.0, ge=0, description="per host; 0 disables the limit")
    retries: int = Field(3, ge=0, le=10, description="retries of 5xx, 429 and timeouts; 404 is never retried")
    backoff_s: float = Field(0.5, ge=0)
    timeout_s: float = Field(20.0, gt=0)
    max_image_bytes: int = Field(20_000_000, gt=0)
    retry_gone: bool = Field(False, description="fetch again URLs that answered 404/410 in an earlier run")

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("listing_path")
    @classmethod
    def _listing_path(cls, v: str) -> str:
        if "{page}" not in v:
            raise ValueError("must contain {page}")
        return v

    def listing_url(self, page: int) -> str:
        return self.base_url + self.listing_path.format(tag=self.tag, page=page)
