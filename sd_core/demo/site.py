"""A local, offline imitation of the discords.com emoji listing, for crawler tests.

Listing pages (``/emoji-list/tag/{tag}?page={n}``) come back with an empty grid;
an inline script fetches ``/api/emoji-list?tag=...&page=...`` after
``render_delay_ms`` and builds the item DOM, so a crawler has to wait for it.
Images are matched on the raw request target (path plus query string) exactly
as written in :attr:`SiteItem.path`.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import html
import io
import json
import math
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .emoji_art import Fault, SiteItem

__all__ = ["DemoSite", "LISTING_PREFIX", "API_PATH", "LOGO_PATH"]

LISTING_PREFIX = "/emoji-list/tag/"
API_PATH = "/api/emoji-list"
LOGO_PATH = "/static/logo.svg"

_LOGO_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="60" height="60" viewBox="0 0 60 60">'
    b'<rect width="60" height="60" rx="14" fill="#5865f2"/>'
    b'<text x="30" y="40" font-size="26" text-anchor="middle" fill="#fff" '
    b'font-family="sans-serif">E</text></svg>'
)

_PAGE_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title_html} Emojis | Emoji List</title>
<link rel="icon" href="data:,">
<style>
body {{ margin: 0; font-family: sans-serif; background: #2b2d31; color: #f2f3f5; }}
nav.topbar {{ padding: 10px 20px; background: #1e1f22; }}
nav.topbar img {{ vertical-align: middle; }}
.container {{ max-width: 960px; margin: 0 auto; padding: 16px; }}
.G020KZik {{ display: flex; align-items: center; gap: 12px; padding: 8px 0 16px; }}
.LQY5mtmC {{ display: flex; flex-wrap: wrap; gap: 12px; min-height: 80px; }}
.aLnnpRah {{ width: 84px; padding: 8px 0; background: #313338; border-radius: 8px; }}
.text-center {{ text-align: center; }}
.Mw1EAtrx img {{ object-fit: contain; }}
.pagination {{ list-style: none; display: flex; gap: 8px; padding: 0; }}
.pagination a {{ color: #00a8fc; }}
.no-results {{ color: #b5bac1; }}
</style>
</head>
<body>
<nav class="topbar"><a href="/"><img src="{logo}" alt="Emoji List" width="32" height="32"></a></nav>
<main>
<div class="FS5UE28h container">
<div class="G020KZik"><img class="site-logo" src="{logo}" title="Emoji List" alt="Emoji List" width="60" height="60"><h1>{title_html} Emojis</h1></div>
<div class="LQY5mtmC" data-state="loading"></div>
<ul class="pagination"></ul>
</div>
</main>
<script>
(function () {{
  var TAG = {tag_js}, PAGE = {page}, DELAY = {delay};
  var grid = document.querySelector("div.FS5UE28h div.LQY5mtmC");
  function link(page, text) {{
    var li = document.createElement("li"); li.className = "page-item";
    var a = document.createElement("a"); a.className = "page-link";
    a.href = "{prefix}" + encodeURIComponent(TAG) + "?page=" + page; a.textContent = text;
    li.appendChild(a); return li;
  }}
  setTimeout(function () {{
    fetch("{api}?tag=" + encodeURIComponent(TAG) + "&page=" + PAGE, {{cache: "no-store"}})
      .then(function (r) {{ return r.json(); }})
      .then(function (data) {{
        data.items.forEach(function (it) {{
          var item = document.createElement("div"); item.className = "aLnnpRah text-center";
          var box = document.createElement("div"); box.className = "Mw1EAtrx";
          var img = document.createElement("img");
          img.setAttribute("src", it.src); img.setAttribute("title", it.title);
          img.setAttribute("alt", it.title);
          img.setAttribute("width", "60"); img.setAttribute("height", "60");
          box.appendChild(img); item.appendChild(box); grid.appendChild(item);
        }});
        if (!data.items.length) {{
          var p = document.createElement("p"); p.className = "no-results";
          p.textContent = "No emojis found"; grid.parentNode.insertBefore(p, grid.nextSibling);
        }}
        var pager = document.querySelector("ul.pagination");
        if (PAGE > 1 && PAGE <= data.pages + 1) pager.appendChild(link(PAGE - 1, "Previous"));
        if (PAGE < data.pages) pager.appendChild(link(PAGE + 1, "Next"));
        grid.setAttribute("data-state", "loaded");
      }})
      .catch(function () {{ grid.setAttribute("data-state", "error"); }});
  }}, DELAY);
}})();
</script>
</body>
</html>
"""


# What a site's front end answers, with 200, for every image while its storage is down.
_ERROR_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Something went wrong</title></head><body>"
               b"<h1>Something went wrong</h1><p>We are working on it. Please try again later.</p></body></html>\n")
# The page's class names (the discords.com layout the crawler's default selectors match) and what the
# ``"renamed"`` layout calls them instead: a site that changed its layout.
_RENAMED_CLASSES = {"FS5UE28h": "q7XbW2ka", "LQY5mtmC": "Tn4cR8vd", "aLnnpRah": "Jm2uE6sy",
                    "Mw1EAtrx": "Hd9pK3zo", "G020KZik": "Vb5gL1ne"}
Layout = Literal["discords", "renamed"]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    site: DemoSite


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "DemoEmojiSite/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Stay quiet: no request lines on stderr."""

    def do_GET(self) -> None:  # noqa: N802
        self.server.site._handle(self, head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self.server.site._handle(self, head=True)

    def reply_head(self, status: int, content_type: str, length: int, extra: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()

    def reply(
        self,
        status: int,
        body: bytes,
        content_type: str,
        *,
        head: bool,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


class DemoSite:
    """Serve a demo emoji listing on 127.0.0.1 (free port) from a background thread.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.

    Counting: ``image_gets`` counts every GET of an item path except image loads
    made by a browser while rendering a listing (requests carrying
    ``Sec-Fetch-Dest: image``); those go to ``browser_image_gets`` instead and
    never advance a ``"500-once"`` fault. Downloads by ``requests``, ``urllib``,
    a JS ``fetch`` or a browser navigating to the image all count in
    ``image_gets``. ``image_done`` counts the image answers sent in full, and
    ``image_aborted`` those the client hung up on (e.g. a ``drip`` it gave up on).

    Faults (``SiteItem.fault``) are listed at :data:`~sd_core.demo.emoji_art.Fault`;
    ``slow_s``, ``drip_s``, ``bomb_bytes``, ``huge_bytes`` and ``retry_after`` (the 429's Retry-After
    header, None for none) tune them. Setting :attr:`image_fault` gives every item that fault (an outage;
    None again is the recovery). ``image_times`` holds the ``time.monotonic()`` of each counted image GET.

    ``layout``: ``"discords"`` (the class names the crawler's default selectors match) or ``"renamed"``
    (the same page with other class names: a site that changed its layout). It may be changed while
    the site runs. Lazy items (built with ``lazy=True``) are drawn when their image is first requested.
    """

    def __init__(
        self,
        items: Sequence[SiteItem],
        *,
        tag: str = "Blobs",
        per_page: int = 36,
        render_delay_ms: int = 200,
        port: int = 0,
        slow_s: float = 2.0,
        drip_s: float = 0.5,
        bomb_bytes: int = 200_000_000,
        huge_bytes: int = 200_000_000,
        retry_after: str | None = "1",
        layout: Layout = "discords",
    ) -> None:
        """``port`` 0 picks a free one; a fixed port keeps image URLs stable between runs (when it is
        taken, a free port is used instead)."""
        if per_page < 1:
            raise ValueError("per_page must be >= 1")
        self.tag = tag
        self.per_page = per_page
        self.render_delay_ms = render_delay_ms
        self.port = port
        self.slow_s = slow_s
        self.drip_s = drip_s
        self.bomb_bytes = bomb_bytes
        self.huge_bytes = huge_bytes
        self.retry_after = retry_after
        self.image_fault: Fault | None = None
        self.image_times: collections.defaultdict[str, list[float]] = collections.defaultdict(list)
        self.layout: Layout = layout
        self._bomb: bytes | None = None
        self._lock = threading.Lock()
        self._items: list[SiteItem] = []
        self._by_path: dict[str, SiteItem] = {}
        self._failed_once: set[str] = set()
        self.image_gets: collections.Counter[str] = collections.Counter()
        self.browser_image_gets: collections.Counter[str] = collections.Counter()
        self.image_done: collections.Counter[str] = collections.Counter()
        self.image_aborted: collections.Counter[str] = collections.Counter()
        self.page_gets = 0
        self.api_gets = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._add(items, front=False)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> DemoSite:
        """Bind the port (or a free one) and start serving; returns self."""
        if self._server is not None:
            raise RuntimeError("DemoSite already started")
        try:
            server = _Server(("127.0.0.1", self.port), _Handler)
        except OSError:
            server = _Server(("127.0.0.1", 0), _Handler)
        server.site = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name="demo-emoji-site", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> DemoSite:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- public API --------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash); only while started."""
        if self._server is None:
            raise RuntimeError("DemoSite is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def listing_url(self, page: int, tag: str | None = None) -> str:
        """Absolute URL of listing page ``page`` (1-based) for the site's tag."""
        return f"{self.base_url}{LISTING_PREFIX}{quote(tag or self.tag, safe='')}?page={page}"

    def image_url(self, item: SiteItem) -> str:
        """Absolute URL a browser resolves ``item``'s ``img@src`` to."""
        return self.base_url + item.path

    @property
    def items(self) -> list[SiteItem]:
        """A snapshot of the listed items, newest first."""
        with self._lock:
            return list(self._items)

    @property
    def n_pages(self) -> int:
        """Number of listing pages that have items."""
        with self._lock:
            return math.ceil(len(self._items) / self.per_page)

    def prepend(self, items: Sequence[SiteItem]) -> None:
        """Add ``items`` at the top (newest first), pushing older ones to later pages."""
        self._add(items, front=True)

    def remove(self, paths: Sequence[str]) -> None:
        """Take the items at ``paths`` off the listing (their pages close up); their images are no longer served."""
        gone = set(paths)
        with self._lock:
            unknown = gone - self._by_path.keys()
            if unknown:
                raise ValueError(f"not listed: {sorted(unknown)}")
            self._items = [it for it in self._items if it.path not in gone]
            for path in gone:
                del self._by_path[path]

    def page_items(self, page: int) -> list[SiteItem]:
        """Items listed on ``page`` right now (empty past the end)."""
        with self._lock:
            return self._page_slice(page)

    def total_image_gets(self) -> int:
        """Sum of :attr:`image_gets` over all paths."""
        with self._lock:
            return sum(self.image_gets.values())

    def reset_counts(self) -> None:
        """Zero every request counter (the one-shot 500 state is kept)."""
        with self._lock:
            self.image_gets.clear()
            self.browser_image_gets.clear()
            self.image_done.clear()
            self.image_aborted.clear()
            self.image_times.clear()
            self.page_gets = 0
            self.api_gets = 0

    # -- internals ---------------------------------------------------------

    def _add(self, items: Sequence[SiteItem], *, front: bool) -> None:
        new = list(items)
        with self._lock:
            paths = [it.path for it in new]
            if len(set(paths)) != len(paths):
                raise ValueError("duplicate item paths")
            for path in paths:
                if not path.startswith("/") or path.startswith("//"):
                    raise ValueError(f"item path must be site-relative: {path!r}")
                if path in self._by_path:
                    raise ValueError(f"item path already listed: {path!r}")
                if path.startswith((LISTING_PREFIX, API_PATH)) or path == LOGO_PATH:
                    raise ValueError(f"item path collides with a site route: {path!r}")
            self._items = new + self._items if front else self._items + new
            self._by_path.update((it.path, it) for it in new)

    def _page_slice(self, page: int) -> list[SiteItem]:
        if page < 1:
            return []
        start = (page - 1) * self.per_page
        return self._items[start : start + self.per_page]

    @staticmethod
    def _page_param(query: dict[str, list[str]]) -> int:
        try:
            return int(query.get("page", ["1"])[0])
        except ValueError:
            return 1

    def _handle(self, req: _Handler, *, head: bool) -> None:
        raw = req.path
        with self._lock:
            item = self._by_path.get(raw)
        if item is not None:
            self._serve_image(req, item.drawn(), head=head)
            return
        url = urlsplit(raw)
        query = parse_qs(url.query)
        if url.path.startswith(LISTING_PREFIX):
            tag = unquote(url.path[len(LISTING_PREFIX) :].rstrip("/"))
            if tag and "/" not in tag:
                self._serve_listing(req, tag, self._page_param(query), head=head)
                return
        elif url.path == API_PATH:
            self._serve_api(req, query.get("tag", [""])[0], self._page_param(query), head=head)
            return
        elif url.path == LOGO_PATH:
            req.reply(200, _LOGO_SVG, "image/svg+xml", head=head)
            return
        req.reply(404, b"Not Found", "text/plain; charset=utf-8", head=head)

    def _serve_listing(self, req: _Handler, tag: str, page: int, *, head: bool) -> None:
        if not head:
            with self._lock:
                self.page_gets += 1
        tag_js = json.dumps(tag).replace("</", "<\\/")
        page_html = _PAGE_TEMPLATE.format(
            title_html=html.escape(tag), tag_js=tag_js, page=page,
            delay=int(self.render_delay_ms), prefix=LISTING_PREFIX, api=API_PATH, logo=LOGO_PATH,
        )
        if self.layout == "renamed":
            for old, new in _RENAMED_CLASSES.items():
                page_html = page_html.replace(old, new)
        req.reply(200, page_html.encode("utf-8"), "text/html; charset=utf-8", head=head,
                  extra={"Cache-Control": "no-store"})

    def _serve_api(self, req: _Handler, tag: str, page: int, *, head: bool) -> None:
        with self._lock:
            if not head:
                self.api_gets += 1
            listed = self._page_slice(page) if tag == self.tag else []
            total = len(self._items) if tag == self.tag else 0
        payload = {
            "tag": tag,
            "page": page,
            "per_page": self.per_page,
            "total": total,
            "pages": math.ceil(total / self.per_page),
            "items": [{"src": it.src or it.path, "title": it.title} for it in listed],
        }
        req.reply(200, json.dumps(payload).encode("utf-8"), "application/json", head=head,
                  extra={"Cache-Control": "no-store"})

    def _gzip_bomb(self) -> bytes:
        with self._lock:
            if self._bomb is None:
                buf = io.BytesIO()
                with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9) as f:
                    block = bytes(1 << 20)
                    for _ in range(self.bomb_bytes // len(block)):
                        f.write(block)
                self._bomb = buf.getvalue()
            return self._bomb

    def _serve_image(self, req: _Handler, item: SiteItem, *, head: bool) -> None:
        render_load = req.headers.get("Sec-Fetch-Dest", "").lower() == "image"
        with self._lock:
            if not head:
                (self.browser_image_gets if render_load else self.image_gets)[item.path] += 1
                if not render_load:
                    self.image_times[item.path].append(time.monotonic())
            if self.image_fault is not None:  # an outage: every item misbehaves the same way
                item = dataclasses.replace(item, fault=self.image_fault)
            status, body, ctype = HTTPStatus.OK, item.body, item.content_type
            if item.fault == "429" or (item.fault == "429-once" and item.path not in self._failed_once):
                status, body = HTTPStatus.TOO_MANY_REQUESTS, b"Too Many Requests"
                if item.fault == "429-once" and not head and not render_load:
                    self._failed_once.add(item.path)
            elif item.fault == "html-200":
                body, ctype = _ERROR_PAGE, "text/html; charset=utf-8"
            elif item.fault == "empty-200":
                body = b""
            elif item.fault == "404":
                status, body = HTTPStatus.NOT_FOUND, b"Not Found"
            elif item.fault == "500" or (item.fault == "500-once" and item.path not in self._failed_once):
                status, body = HTTPStatus.INTERNAL_SERVER_ERROR, b"Internal Server Error"
                if item.fault == "500-once" and not head and not render_load:
                    self._failed_once.add(item.path)
            elif item.fault == "truncated":
                body = item.body[: len(item.body) // 2]
        ctype = ctype if status == HTTPStatus.OK else "text/plain; charset=utf-8"
        extra = {"Cache-Control": "no-store"}
        if status == HTTPStatus.TOO_MANY_REQUESTS and self.retry_after is not None:
            extra["Retry-After"] = self.retry_after
        try:
            if head or status != HTTPStatus.OK or item.fault in (
                "none", "500-once", "truncated", "html-200", "empty-200", "429-once"
            ):
                req.reply(status, body, ctype, head=head, extra=extra)
            elif item.fault == "slow":
                time.sleep(self.slow_s)
                req.reply(status, body, ctype, head=head, extra=extra)
            elif item.fault == "redirect":
                moved = {**extra, "Location": item.location or "/"}
                req.reply(HTTPStatus.FOUND, b"", "text/plain", head=head, extra=moved)
            elif item.fault == "gzip-bomb":
                req.reply(status, self._gzip_bomb(), ctype, head=head, extra={**extra, "Content-Encoding": "gzip"})
            elif item.fault == "short-body":
                req.reply_head(status, ctype, len(body) + 10_000, extra)
                req.wfile.write(body)
                req.close_connection = True
            elif item.fault == "drip":
                req.reply_head(status, ctype, len(body), extra)
                for i in range(len(body)):
                    req.wfile.write(body[i : i + 1])
                    req.wfile.flush()
                    time.sleep(self.drip_s)
            elif item.fault == "huge":
                req.reply_head(status, ctype, self.huge_bytes, extra)
                block, left = bytes(1 << 16), self.huge_bytes
                while left > 0:
                    req.wfile.write(block[: min(left, len(block))])
                    left -= len(block)
        except OSError:  # the client hung up
            with self._lock:
                self.image_aborted[item.path] += 1
            req.close_connection = True
            return
        if not head and not render_load:
            with self._lock:
                self.image_done[item.path] += 1
