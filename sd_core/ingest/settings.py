"""Crawl settings: where to crawl, how politely, and how long anything may take.
Selectors default to the discords.com layout."""

from __future__ import annotations

import unicodedata
from datetime import timedelta
from urllib.parse import quote, urlsplit

from pydantic import Field, field_validator, model_validator

from sd_core.common.config_base import StrictModel

# discords.com's listing shows its emoji through its own image proxy
# (`https://discords.com/_next/image?url=https%3A%2F%2Fcdn.discordapp.com%2Femojis%2F....png`, seen in the
# course's walk-through of the page), i.e. from the listing's origin; the bytes behind it live on Discord's
# CDN, which is what an `img` without the proxy points at.
DISCORD_CDN = "https://cdn.discordapp.com"

MAX_TAG_CHARS = 200  # a real tag is a word or two; file names take at most FILE_TAG_CHARS of it (convert)

# The most listing pages one walk reads unless crawl.max_pages says otherwise: 10,000 pages (360,000 emoji at
# discords.com's 36 a page) is past any one tag we know of and bounds a listing that never ends (one that puts
# new URLs on every page) to hours, not for ever; crawl.listing_deadline_s usually ends such a walk first.
MAX_PAGES_CEILING = 10_000


class CrawlConfig(StrictModel):
    """Where to crawl and how politely. Selectors default to the discords.com layout."""

    base_url: str = Field(
        "https://discords.com",
        description="site root: http:// or https://, a host, optionally a path; no query, fragment, blanks or "
        "control characters",
    )
    tag: str = Field(
        "Blobs",
        description=f"the listing's tag; URL-encoded into listing_path. 1 to {MAX_TAG_CHARS} characters, no "
        "control characters, no leading or trailing blanks",
    )
    listing_path: str = Field(
        "/emoji-list/tag/{tag}?page={page}",
        description="a listing page's path after base_url: {tag} is replaced by the URL-encoded tag, {page} "
        "(required) by the page number",
    )
    container_selector: str = Field(
        "div.FS5UE28h.container",
        description="CSS selector of the listing's container; only for the error message: when the first page "
        "shows no items, it says whether this matched",
    )
    item_selector: str = Field(
        "div.LQY5mtmC div.aLnnpRah.text-center",
        description="CSS selector of one listed emoji; a page counts as rendered when the number of matches "
        "stops changing",
    )
    image_selector: str = Field(
        "div.Mw1EAtrx img, img",
        description="CSS selector of the image inside an item (the first match); an item without one is skipped",
    )
    url_attribute: str = Field(
        "src", description="the image's attribute holding its URL (resolved against the page's address)"
    )
    title_attribute: str = Field(
        "title",
        description="the image's attribute holding the emoji's title (its alt text when this one is missing or "
        "empty); the title goes into metadata.csv and the captions",
    )
    start_page: int = Field(1, ge=1, description="number of the first listing page read ({page} in listing_path)")
    max_pages: int = Field(
        MAX_PAGES_CEILING, ge=1,
        description=f"the most listing pages one walk reads (default: the ceiling, {MAX_PAGES_CEILING:,}); a walk "
        "stopped by it keeps and downloads what it listed, and its summary says it was cut",
    )
    max_shrink: float = Field(
        0.5, ge=0, le=1,
        description="a full walk that lists fewer unique URLs than the last listing by more than this share "
        "(0.5: half) fails the crawl stage naming both counts, and the last listing is kept; 1 disables the check",
    )
    newest_first: bool = Field(
        True,
        description="the site lists newest first, so a refresh may stop early (known_pages_to_stop); false: "
        "every run walks the whole listing",
    )
    known_pages_to_stop: int = Field(
        2, ge=1,
        description="a refresh stops walking after this many pages in a row whose every URL the ledger already "
        "knows (only when newest_first; a full walk reads every page)",
    )
    full_walk_every: timedelta = Field(
        timedelta(days=7),
        description="a refresh walks the whole listing when the last full walk is older than this (seconds, or "
        "an ISO 8601 duration such as 'P7D'), so that items removed from older pages are seen",
    )
    page_timeout_s: float = Field(20.0, gt=0, description="longest wait for a page's items to render")
    empty_page_settle_s: float = Field(
        3.0, gt=0, description="a loaded page still without items after this long is the end of the listing"
    )
    page_delay_s: float = Field(0.0, ge=0, description="pause between listing pages (politeness)")
    listing_deadline_s: float = Field(
        1800.0, gt=0,
        description="the whole listing (browser start, every page, quitting) must finish within this; past it "
        "the browser and its driver are killed and the stage fails saying so",
    )
    command_timeout_s: float = Field(
        60.0, gt=0, description="longest wait for one answer from chromedriver; larger than page_timeout_s"
    )
    chromium_path: str = Field(
        "/usr/bin/chromium", description="the Chromium binary that renders the listing (checked before the run starts)"
    )
    chromedriver_path: str = Field(
        "/usr/bin/chromedriver",
        description="the chromedriver matching chromium_path (checked before the run starts; never downloaded)",
    )
    browser_args: tuple[str, ...] = Field(
        (),
        description="extra Chromium command-line switches, added after the built-in ones (headless, no sandbox, ...)",
    )
    user_agent: str | None = Field(
        None,
        description="User-Agent of the browser and of the image downloads; unset: Chromium's own for the listing "
        "and 'emoji-sd/0.1 (+https://github.com/emoji-sd/emoji-sd)' for downloads",
    )
    download_workers: int = Field(
        8, ge=1, le=64, description="image downloads in parallel (threads; also the connection pool's size)"
    )
    max_requests_per_second: float = Field(10.0, ge=0, description="per host; 0 disables the limit")
    retries: int = Field(3, ge=0, le=10, description="retries of 5xx, 429 and timeouts; 404 is never retried")
    backoff_s: float = Field(
        0.5, ge=0,
        description="back-off factor of the retries within a run (urllib3's Retry): the first retry at once, "
        "then after 2x, 4x, ... this many seconds",
    )
    timeout_s: float = Field(20.0, gt=0, description="longest wait to connect and for each read of a download")
    download_deadline_s: float = Field(
        60.0, gt=0,
        description="total time one image URL may take (retries, redirects and every read included); "
        "past it the URL is recorded as failed with reason 'deadline'",
    )
    max_image_bytes: int = Field(
        20_000_000, gt=0,
        description="largest image accepted, in bytes: a download announcing or reading more fails, and a larger "
        "file of a folder or dataset source is recorded as failed",
    )
    retry_gone: bool = Field(False, description="fetch again URLs that answered 404/410 in an earlier run")
    failed_backoff_s: float = Field(
        600.0, ge=0,
        description="a URL that failed (timeout, deadline, 5xx after retries, a broken body) is tried again "
        "on a later run only after this long, doubled after each further failure; 0 retries it on every run",
    )
    failed_backoff_max_s: float = Field(7 * 24 * 3600.0, ge=0, description="cap of that back-off")
    max_retry_after_s: float = Field(
        24 * 3600.0, ge=0,
        description="a 429/503 answer's Retry-After is honoured up to this many seconds: within the run when "
        "it fits in download_deadline_s, and as the URL's next try (never earlier than its back-off) when it "
        "does not; 0 ignores Retry-After",
    )
    allowed_hosts: tuple[str, ...] = Field(
        (DISCORD_CDN,),
        description="image origins allowed besides the listing's own: 'https://host[:port]' (exactly that "
        "origin) or a bare 'host' (any scheme and port on it). The default is discords.com's image CDN, "
        "cdn.discordapp.com; images on any other host are refused",
    )
    max_redirects: int = Field(5, ge=0, le=20, description="redirect hops followed per image, each one checked")

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        return check_base_url(v)

    @field_validator("tag")
    @classmethod
    def _tag(cls, v: str) -> str:
        return check_tag(v)

    @field_validator("listing_path")
    @classmethod
    def _listing_path(cls, v: str) -> str:
        if "{page}" not in v:
            raise ValueError("must contain {page}")
        return v

    @field_validator("allowed_hosts")
    @classmethod
    def _allowed_hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for entry in v:
            parse_host_rule(entry)  # raises ValueError naming the entry
        return v

    @field_validator("full_walk_every")
    @classmethod
    def _full_walk_every(cls, v: timedelta) -> timedelta:
        if v <= timedelta(0):
            raise ValueError("must be longer than 0")
        return v

    @model_validator(mode="after")
    def _command_timeout(self) -> "CrawlConfig":
        if self.command_timeout_s <= self.page_timeout_s:
            raise ValueError(
                f"command_timeout_s ({self.command_timeout_s}) must be larger than page_timeout_s "
                f"({self.page_timeout_s}): a page that does not load must be reported by the browser"
            )
        return self

    def listing_url(self, page: int) -> str:
        """The listing page's URL; the tag is percent-encoded (``/``, ``?``, ``#``, blanks included)."""
        return self.base_url + self.listing_path.format(tag=quote(self.tag, safe=""), page=page)



def _control_chars(text: str) -> list[str]:
    """Control and format characters (C0, DEL, C1, zero-width and direction marks) in ``text``, as ``U+XXXX``."""
    return sorted({f"U+{ord(c):04X}" for c in text if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")})


def check_base_url(v: str) -> str:
    """An http(s) site root with a host, optionally a path; no query, fragment, credentials, blanks or control
    characters. Returned without a trailing slash. A ValueError says what is wrong (pydantic adds the field)."""
    bad = _control_chars(v)
    if bad:
        raise ValueError(f"contains control characters ({', '.join(bad)}): {v!r}")
    if any(c.isspace() for c in v):
        raise ValueError(f"contains blanks: {v!r}")
    try:
        parts = urlsplit(v)
    except ValueError as e:  # e.g. an unclosed IPv6 bracket
        raise ValueError(f"is not a URL ({e}): {v!r}") from None
    if parts.scheme.lower() not in ("http", "https") or not v.lower().startswith(("http://", "https://")):
        raise ValueError(f"must start with http:// or https://: {v!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
    except ValueError:
        raise ValueError(f"has an invalid port: {v!r}") from None
    if not parts.hostname:
        raise ValueError(f"names no host: {v!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"must not carry a user name or password: {v!r}")
    if parts.query or parts.fragment or "?" in v or "#" in v:
        raise ValueError(f"must be a site root without '?' or '#' (the listing's query belongs in "
                         f"crawl.listing_path): {v!r}")
    return v.rstrip("/")


def check_tag(v: str) -> str:
    """A listing tag: 1..MAX_TAG_CHARS characters, no control characters, no leading or trailing blanks.
    Any other character is allowed: it is percent-encoded in the listing URL and made safe in file names."""
    if not v.strip():
        raise ValueError("must not be empty")
    bad = _control_chars(v)
    if bad:
        raise ValueError(f"contains control characters ({', '.join(bad)}): {v!r}")
    if v != v.strip():
        raise ValueError(f"has leading or trailing blanks: {v!r}")
    if len(v) > MAX_TAG_CHARS:
        raise ValueError(f"is {len(v)} characters long; at most {MAX_TAG_CHARS}")
    return v


def origin_of(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL, host lower-cased, the port made explicit."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    return scheme, parts.hostname.lower(), parts.port or (443 if scheme == "https" else 80)


def parse_host_rule(entry: str) -> tuple[str, str, int] | str:
    """An ``allowed_hosts`` entry: an origin ``(scheme, host, port)`` or a bare host name (any scheme/port)."""
    text = entry.strip()
    if "://" in text:
        try:
            origin = origin_of(text)
        except ValueError:
            raise ValueError(f"{entry!r}: an origin must look like https://host or http://host:port") from None
        rest = urlsplit(text)
        if rest.path not in ("", "/") or rest.query or rest.fragment or rest.username or rest.password:
            raise ValueError(f"{entry!r}: give an origin (scheme://host[:port]) without a path")
        return origin
    if not text or any(c in text for c in "/?#@: ") or text.startswith("."):
        raise ValueError(f"{entry!r}: give a bare host name (cdn.example.com) or an origin (https://host)")
    return text.lower()
