"""Downloading image bytes: one pooled HTTP session, bounded concurrency, retries with backoff
for 5xx/429/timeouts (never for 404), and a per-host rate limit."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from sd_core.ingest.settings import CrawlConfig
from sd_core.store.files import md5_bytes

USER_AGENT = "emoji-sd/0.1 (+https://github.com/emoji-sd/emoji-sd)"
GONE_STATUSES = frozenset({404, 410})
RETRY_STATUSES = (429, 500, 502, 503, 504)


@dataclass(frozen=True)
class FetchResult:
    url: str
    status: Literal["ok", "gone", "failed"]
    attempts: int
    http_status: int | None = None
    body: bytes | None = None
    content_type: str | None = None
    error: str | None = None

    @property
    def md5(self) -> str | None:
        return md5_bytes(self.body) if self.body is not None else None


class HostRateLimiter:
    """At most ``rate`` request starts per second per host, shared by all threads."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def wait(self, url: str) -> None:
        if not self._interval:
            return
        host = urlsplit(url).netloc
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next[host])
            self._next[host] = slot + self._interval
        if slot > now:
            time.sleep(slot - now)


class _CountingRetry(Retry):
    """urllib3's Retry, remembering how many attempts the last request took (per thread)."""

    local = threading.local()

    def increment(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        _CountingRetry.local.retries = getattr(_CountingRetry.local, "retries", 0) + 1
        return super().increment(*args, **kwargs)


class Fetcher:
    """Thread-safe image downloader."""

    def __init__(self, cfg: CrawlConfig) -> None:
        self.cfg = cfg
        self.limiter = HostRateLimiter(cfg.max_requests_per_second)
        retry = _CountingRetry(
            total=cfg.retries,
            connect=cfg.retries,
            read=cfg.retries,
            status=cfg.retries,
            backoff_factor=cfg.backoff_s,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=frozenset({"GET"}),
            respect_retry_after_header=True,
            raise_on_status=False,
        )
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=cfg.download_workers, max_retries=retry)
        self.session = requests.Session()
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = cfg.user_agent or USER_AGENT

    def close(self) -> None:
        self.session.close()

    def fetch(self, url: str) -> FetchResult:
        self.limiter.wait(url)
        _CountingRetry.local.retries = 0
        try:
            with self.session.get(url, timeout=self.cfg.timeout_s, stream=True) as resp:
                attempts = 1 + _CountingRetry.local.retries
                if resp.status_code in GONE_STATUSES:
                    return FetchResult(url, "gone", attempts, resp.status_code, error=f"HTTP {resp.status_code}")
                if resp.status_code != 200:
                    return FetchResult(url, "failed", attempts, resp.status_code, error=f"HTTP {resp.status_code}")
                body = self._read_capped(resp)
                if body is None:
                    return FetchResult(
                        url, "failed", attempts, 200, error=f"larger than {self.cfg.max_image_bytes} bytes"
                    )
                ctype = resp.headers.get("Content-Type", "").split(";")[0].strip() or None
                return FetchResult(url, "ok", attempts, 200, body=body, content_type=ctype)
        except requests.RequestException as e:
            attempts = 1 + _CountingRetry.local.retries
            reason = type(e).__name__
            return FetchResult(url, "failed", attempts, error=f"{reason}: {e}"[:300])

    def _read_capped(self, resp: requests.Response) -> bytes | None:
        chunks: list[bytes] = []
        total = 0
        for chunk in resp.iter_content(64 * 1024):
            total += len(chunk)
            if total > self.cfg.max_image_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)
