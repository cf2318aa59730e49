"""Downloading image bytes: one pooled HTTP session, bounded concurrency, retries with backoff
for 5xx/429/timeouts (never for 404), a per-host rate limit, a total deadline per URL, and a host policy.

Retries are urllib3's :class:`~urllib3.util.retry.Retry` (through requests' ``HTTPAdapter``): which errors and
statuses are retried, how many times (``crawl.retries``), the exponential back-off (``crawl.backoff_s`` is its
factor: urllib3 retries the first failure at once, then waits 2×, 4×, ... the factor) and Retry-After (seconds
or an HTTP date, capped by ``crawl.max_retry_after_s``). :class:`_Retries` changes only how it waits: in the
download's scope (below), so Ctrl-C and the deadline end a wait at once, each retry also waits for its
host's rate-limit slot, and a Retry-After that would pass the deadline ends the retries, the answer kept
(its Retry-After becomes the URL's next try in the ledger).

Deadline: ``timeout_s`` bounds each connect and each socket read, which does not bound a server
that sends one byte every few seconds. Every download therefore runs in a *scope* with a deadline
(``download_deadline_s``); a watchdog thread shuts down the sockets of a scope whose deadline passed
(or of every scope when the crawl is interrupted), so a blocked read returns at once.

Host policy: images are fetched only from the listing's origin(s) and ``allowed_hosts``; redirects are
followed by hand (at most ``max_redirects`` hops), each hop checked the same way; and a host is refused
when it resolves to a private, loopback or link-local address, unless the listing itself is on such an
address (a local or intranet site). The address actually connected to is checked again (DNS rebinding).

Why a connection class of our own: the deadline and the cancel need each download's sockets from the
moment they connect (a server may stall before its headers as well as in its body), and the rebinding
check needs the connected address before the request is sent. Neither requests nor urllib3 hands a
connection's socket to its caller before the response, so :class:`_GuardedHTTPConnection` (urllib3's
``HTTPConnection`` with its ``_new_conn``, the hook urllib3's own SOCKS connection overrides) does both.
It is installed through public hooks: requests' ``HTTPAdapter.get_connection_with_tls_context`` (exposed for
subclassing) sets urllib3's ``ConnectionCls`` on the pool it returns; no module or PoolManager state is
patched. tests/test_crawl_safety.py checks what needs it, and both tests fail with a plain connection class
(measured): a server silent for 8 s before its headers is cut at the 2 s deadline
(``test_a_server_silent_before_its_headers_is_cut_at_the_deadline``; without the hook the download took
8.0 s, as only ``timeout_s`` bounds that wait), and an address that changed between the policy's check and
the connection is refused before the request (``test_an_address_that_changes_after_the_check_is_refused_
before_the_request``; without the hook the image was downloaded).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Literal
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import InvalidHeader, MaxRetryError, ResponseError
from urllib3.util.retry import Retry

from sd_core.ingest.convert import not_an_image
from sd_core.ingest.settings import CrawlConfig, origin_of, parse_host_rule
from sd_core.store.files import md5_bytes

USER_AGENT = "emoji-sd/0.1 (+https://github.com/emoji-sd/emoji-sd)"
GONE_STATUSES = frozenset({404, 410})
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

Status = Literal["ok", "gone", "failed", "refused", "cancelled"]


@dataclass(frozen=True)
class FetchResult:
    """One URL's outcome. ``refused``: the host policy said no (nothing was stored); ``cancelled``: the
    crawl was interrupted before it finished (not recorded, so the next run fetches it). ``retry_after_s``:
    how long the server asked us to wait (Retry-After, capped by ``crawl.max_retry_after_s``) when it
    answered 429/503 last."""

    url: str
    status: Status
    attempts: int
    http_status: int | None = None
    body: bytes | None = None
    content_type: str | None = None
    error: str | None = None
    retry_after_s: float | None = None

    @property
    def md5(self) -> str | None:
        return md5_bytes(self.body) if self.body is not None else None


# -- host policy -------------------------------------------------------------------------------------


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (an IP literal is itself); [] when it does not resolve."""
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
    except (socket.gaierror, UnicodeError, OSError):
        return []


def _origin_text(origin: tuple[str, str, int]) -> str:
    scheme, host, port = origin
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + ("" if port == (443 if scheme == "https" else 80) else f":{port}")


class HostPolicy:
    """Which image URLs may be fetched; ``refusal(url)`` gives the reason for a no, or None."""

    def __init__(self, cfg: CrawlConfig, listing_origins: Iterable[str] = ()) -> None:
        own = [origin_of(cfg.base_url), *(origin_of(o) for o in listing_origins)]
        self.listing_origins = frozenset(own)
        rules = [parse_host_rule(e) for e in cfg.allowed_hosts]
        self.allowed_origins = frozenset(r for r in rules if isinstance(r, tuple))
        self.allowed_hosts = frozenset(r for r in rules if isinstance(r, str))
        self._cache: dict[tuple[str, int], list[str]] = {}
        self._lock = threading.Lock()
        self._allow_private: bool | None = None

    @property
    def allow_private(self) -> bool:
        """A listing on a private or loopback address (the demo site, an intranet mirror) may link images
        on such addresses; a listing on the public internet may not. Resolved on first use."""
        if self._allow_private is None:
            self._allow_private = any(
                not _public(a) for o in self.listing_origins for a in self._addresses(o[1], o[2])
            )
        return self._allow_private

    def _addresses(self, host: str, port: int) -> list[str]:
        with self._lock:
            cached = self._cache.get((host, port))
        if cached is None:
            cached = _resolve(host, port)
            with self._lock:
                self._cache[(host, port)] = cached
        return cached

    def origin_allowed(self, origin: tuple[str, str, int]) -> bool:
        return origin in self.listing_origins or origin in self.allowed_origins or origin[1] in self.allowed_hosts

    def refusal(self, url: str, *, redirected_from: str | None = None) -> str | None:
        try:
            origin = origin_of(url)
        except ValueError:
            return f"refused (not http): {url[:100]}"
        if not self.origin_allowed(origin):
            listing = ", ".join(sorted(_origin_text(o) for o in self.listing_origins))
            what = f"redirect from {redirected_from} to {_origin_text(origin)}" if redirected_from else (
                _origin_text(origin))
            kind = "redirect to other origin" if redirected_from else "other origin"
            return f"refused ({kind}): {what} is neither the listing's origin ({listing}) nor in crawl.allowed_hosts"
        return self.address_refusal(origin[1], self._addresses(origin[1], origin[2]))

    def address_refusal(self, host: str, addresses: Iterable[str], how: str = "resolves to") -> str | None:
        if self.allow_private:
            return None
        bad = [a for a in addresses if not _public(a)]
        if bad:
            return (f"refused (private address): {host} {how} {', '.join(bad)}, a private, loopback or "
                    "link-local address, and the listing is on a public one")
        return None


# -- deadlines: scopes and the watchdog that enforces them -------------------------------------------


class _Aborted(Exception):
    """The scope's deadline passed, or the crawl was cancelled."""


class _Refused(Exception):
    """The address a connection reached is refused by the host policy."""


def _shutdown(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:  # the plain socket's shutdown, also for a TLS socket: unblocks a read in another thread
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Scope:
    """One URL's download: its deadline, the sockets it uses, why it was stopped (if it was), and what its
    waits need (the crawl's cancel event, the per-host rate limiter, the URL of the hop in flight)."""

    def __init__(self, deadline: float, policy: HostPolicy, cancelled: threading.Event,
                 limiter: "HostRateLimiter") -> None:
        self.deadline = deadline
        self.policy = policy
        self.cancelled = cancelled
        self.limiter = limiter
        self.url = ""  # the hop in flight
        self.gave_up_s: float | None = None  # the pause a server asked for past the deadline (no more retries)
        self.stopped: Literal["deadline", "cancelled"] | None = None
        self.requests = 0
        self._finished = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def pause(self, seconds: float) -> None:
        """Wait ``seconds``, and for the host's next rate-limit slot; :class:`_Aborted` at once when the crawl
        is cancelled or the deadline passes first."""
        seconds = max(seconds, self.limiter.delay(self.url))
        if seconds > 0:
            self.cancelled.wait(min(seconds, max(self.remaining(), 0.0)))
        if self.cancelled.is_set():
            self.stop("cancelled")
        elif self.remaining() <= 0:
            self.stop("deadline")
        if self.stopped:
            raise _Aborted(self.stopped)

    def attach(self, sock: socket.socket | None) -> None:
        """Called from the connection code in the downloading thread for every socket it uses."""
        with self._lock:
            if self.stopped:
                _shutdown(sock)
                raise _Aborted(self.stopped)
            if sock is not None:
                self._sockets.append(sock)

    def stop(self, why: Literal["deadline", "cancelled"]) -> None:
        with self._lock:
            if self._finished or self.stopped:
                return
            self.stopped = why
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    def finish(self) -> None:
        with self._lock:
            self._finished = True
            self._sockets.clear()


class _Watchdog:
    """One thread that stops every scope whose deadline passed."""

    def __init__(self) -> None:
        self._scopes: set[_Scope] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="download-deadlines", daemon=True)
        self._thread.start()

    def add(self, scope: _Scope) -> None:
        with self._cond:
            self._scopes.add(scope)
            self._cond.notify()

    def remove(self, scope: _Scope) -> None:
        with self._cond:
            self._scopes.discard(scope)

    def stop_all(self) -> None:
        with self._cond:
            scopes = list(self._scopes)
        for scope in scopes:
            scope.stop("cancelled")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                due = [s for s in self._scopes if s.deadline <= now]
                for scope in due:
                    self._scopes.discard(scope)
                    scope.stop("deadline")
                nxt = min((s.deadline for s in self._scopes), default=None)
                self._cond.wait(None if nxt is None else max(nxt - time.monotonic(), 0.0))


_local = threading.local()


def _scope() -> _Scope | None:
    return getattr(_local, "scope", None)


class _GuardedMixin:
    """urllib3 connection hooks: every socket joins the current download's scope, and the address a new
    connection reached is checked against the host policy (unless it went through a proxy)."""

    proxy: object
    sock: socket.socket | None

    def _new_conn(self) -> socket.socket:
        scope = _scope()
        if scope is not None and self.timeout is not None:  # type: ignore[attr-defined]
            # a retry's connect, too, ends by the deadline (a connect in progress has no socket to shut yet)
            self.timeout = max(min(self.timeout, scope.remaining()), 0.001)  # type: ignore[attr-defined]
        sock = super()._new_conn()  # type: ignore[misc]
        if scope is not None:
            scope.attach(sock)
            if not self.proxy:
                try:
                    peer = sock.getpeername()[0]
                except OSError:
                    peer = None
                host = str(getattr(self, "host", ""))
                reason = scope.policy.address_refusal(host, [peer] if peer else [], how="connected to")
                if reason:
                    sock.close()
                    raise _Refused(reason)
        return sock

    def request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        scope = _scope()
        if scope is not None:
            scope.attach(self.sock)  # a kept-alive connection's socket (None before it connects)
        return super().request(*args, **kwargs)  # type: ignore[misc]


class _GuardedHTTPConnection(_GuardedMixin, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedMixin, HTTPSConnection):
    pass


_GUARDED = {HTTPConnection: _GuardedHTTPConnection, HTTPSConnection: _GuardedHTTPSConnection}


class _GuardedAdapter(HTTPAdapter):
    """requests' adapter whose pools make guarded connections (urllib3's ``ConnectionCls``, set on each pool
    before it connects; a SOCKS proxy's pools keep their own connection class)."""

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):  # type: ignore[no-untyped-def]
        pool = super().get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert)
        guarded = _GUARDED.get(pool.ConnectionCls)
        if guarded is not None:
            pool.ConnectionCls = guarded
        return pool


class _Retries(Retry):
    """urllib3's Retry, waiting through the download's scope (see the module docstring): a wait ends at once
    on Ctrl-C or at the deadline, also waits for the host's rate-limit slot, and a pause asked for past the
    deadline ends the retries with the server's answer."""

    RETRY_AFTER_STATUS_CODES = frozenset({429, 503})  # urllib3's also retries a 413 that has one

    def get_retry_after(self, response: Any) -> float | None:
        try:
            return super().get_retry_after(response)
        except InvalidHeader:  # neither seconds nor an HTTP date: as if none was sent
            return None

    def pause_s(self, response: Any = None) -> float:
        """What :meth:`sleep` waits before the next try: the server's Retry-After, else the back-off."""
        asked = self.get_retry_after(response) if response is not None and self.respect_retry_after_header else None
        return asked if asked else self.get_backoff_time()

    def increment(self, method=None, url=None, response=None, error=None, _pool=None,  # type: ignore[no-untyped-def]
                  _stacktrace=None):
        retry = super().increment(method, url, response, error, _pool, _stacktrace)  # MaxRetryError when exhausted
        scope = _scope()
        if scope is not None and response is not None and retry.pause_s(response) >= scope.remaining():
            scope.gave_up_s = retry.pause_s(response)  # urllib3 then returns this answer (raise_on_status=False)
            raise MaxRetryError(_pool, url, ResponseError(f"asked to retry after {scope.gave_up_s:.0f}s"))
        return retry

    def sleep(self, response: Any = None) -> None:
        scope = _scope()
        if scope is None:
            super().sleep(response)
            return
        scope.pause(self.pause_s(response))
        scope.requests += 1  # the next try starts now


def _retries(cfg: CrawlConfig) -> Retry:
    """The crawl's retry policy: 5xx and 429 answers, failed connections and reads (never 404)."""
    honour = cfg.max_retry_after_s > 0
    return _Retries(total=cfg.retries, status_forcelist=RETRY_STATUSES, allowed_methods=frozenset({"GET"}),
                    backoff_factor=cfg.backoff_s, raise_on_status=False, redirect=False,
                    respect_retry_after_header=honour,
                    retry_after_max=cfg.max_retry_after_s if honour else Retry.DEFAULT_RETRY_AFTER_MAX)


# -- the downloader ------------------------------------------------------------------------------------


class HostRateLimiter:
    """At most ``rate`` request starts per second per host, shared by all threads."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def delay(self, url: str) -> float:
        """Reserve the next slot for ``url``'s host; seconds to wait for it."""
        if not self._interval:
            return 0.0
        host = urlsplit(url).netloc
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next[host])
            self._next[host] = slot + self._interval
        return slot - now

    def wait(self, url: str) -> None:
        time.sleep(self.delay(url))


def network_error(e: requests.RequestException) -> str:
    """A connection-level failure in a few words (``connection refused``, ``host not found``, ...): the
    cause, not requests' and urllib3's nested reprs."""
    text = str(e)
    if isinstance(e, requests.exceptions.SSLError):
        return "TLS error"
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return "timed out connecting"
    if isinstance(e, requests.Timeout) or "Read timed out" in text:  # the last of urllib3's retries timed out
        return "timed out reading"
    for needle, words in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "host not found"),
        ("nodename nor servname", "host not found"),
        ("Failed to resolve", "host not found"),
        ("Temporary failure in name resolution", "host not found"),
        ("No address associated", "host not found"),
        ("Network is unreachable", "network unreachable"),
        ("No route to host", "no route to host"),
        ("Connection reset", "connection reset"),
        ("Connection aborted", "connection closed by the server"),
        ("RemoteDisconnected", "connection closed by the server"),
    ):
        if needle in text:
            return words
    return type(e).__name__


class Fetcher:
    """Thread-safe image downloader. ``cancel()`` (from any thread) stops every download in flight."""

    def __init__(self, cfg: CrawlConfig, listing_origins: Iterable[str] = ()) -> None:
        self.cfg = cfg
        self.policy = HostPolicy(cfg, listing_origins)
        self.limiter = HostRateLimiter(cfg.max_requests_per_second)
        self.retries = _retries(cfg)
        adapter = _GuardedAdapter(pool_connections=4, pool_maxsize=cfg.download_workers, max_retries=self.retries)
        self.session = requests.Session()
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = cfg.user_agent or USER_AGENT
        self._stop = threading.Event()
        self._watchdog = _Watchdog()

    def cancel(self) -> None:
        self._stop.set()
        self._watchdog.stop_all()

    def close(self) -> None:
        self._watchdog.close()
        self.session.close()

    def fetch(self, url: str) -> FetchResult:
        if self._stop.is_set():
            return FetchResult(url, "cancelled", 0)
        scope = _Scope(time.monotonic() + self.cfg.download_deadline_s, self.policy, self._stop, self.limiter)
        self._watchdog.add(scope)
        _local.scope = scope
        result: FetchResult | None = None
        try:
            result = self._fetch(url, scope)
        except _Aborted:
            pass
        except _Refused as e:
            result = FetchResult(url, "refused", scope.requests, error=str(e))
        finally:
            _local.scope = None
            scope.finish()
            self._watchdog.remove(scope)
        if scope.stopped == "cancelled" or (result is None and self._stop.is_set()):
            return FetchResult(url, "cancelled", scope.requests)
        if scope.stopped == "deadline" or result is None:
            return FetchResult(
                url, "failed", scope.requests,
                error=f"deadline: no complete answer within {self.cfg.download_deadline_s:g}s "
                "(crawl.download_deadline_s)",
            )
        return result

    # Each helper raises _Aborted when the scope was stopped; fetch() turns that into the result.

    def _fetch(self, url: str, scope: _Scope) -> FetchResult:
        current = url
        for _hop in range(self.cfg.max_redirects + 1):
            refusal = self.policy.refusal(current, redirected_from=url if current != url else None)
            if refusal:
                return FetchResult(url, "refused", scope.requests, error=refusal)
            got = self._get(url, current, scope)
            if isinstance(got, FetchResult):
                return got
            with got as resp:
                if resp.status_code in REDIRECT_STATUSES and resp.headers.get("Location"):
                    current = urljoin(current, resp.headers["Location"])
                    continue
                return self._answer(url, resp, scope)
        return FetchResult(url, "failed", scope.requests,
                           error=f"too many redirects: more than {self.cfg.max_redirects} (crawl.max_redirects)")

    def _get(self, url: str, current: str, scope: _Scope) -> requests.Response | FetchResult:
        """GET ``current`` (one hop; urllib3 retries it, see :class:`_Retries`): a response or a final failure."""
        scope.url, scope.gave_up_s = current, None
        scope.pause(0.0)  # the host's rate-limit slot
        scope.requests += 1
        connect = max(min(self.cfg.timeout_s, scope.remaining()), 0.001)
        try:
            return self.session.get(current, timeout=(connect, self.cfg.timeout_s), stream=True,
                                    allow_redirects=False)
        except (requests.ConnectionError, requests.Timeout) as e:
            if scope.stopped:
                raise _Aborted(scope.stopped) from None
            return FetchResult(url, "failed", scope.requests, error=f"{network_error(e)}: {current}"[:300])
        except requests.RequestException as e:
            if scope.stopped:
                raise _Aborted(scope.stopped) from None
            return FetchResult(url, "failed", scope.requests, error=f"{type(e).__name__}: {e}"[:300])

    def _answer(self, url: str, resp: requests.Response, scope: _Scope) -> FetchResult:
        status = resp.status_code
        if status in GONE_STATUSES:
            return FetchResult(url, "gone", scope.requests, status, error=f"HTTP {status}")
        if status != 200:
            asked = self._retry_after(resp) if status in RETRY_STATUSES else None
            why = f" (asked to retry after {scope.gave_up_s:.0f}s)" if scope.gave_up_s is not None else ""
            return FetchResult(url, "failed", scope.requests, status, error=f"HTTP {status}{why}",
                               retry_after_s=asked)
        too_big = f"larger than {self.cfg.max_image_bytes} bytes"
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.cfg.max_image_bytes:
            return FetchResult(url, "failed", scope.requests, 200, error=f"{too_big} (Content-Length {declared})")
        try:
            body = self._read_capped(resp)
        except requests.RequestException as e:
            if scope.stopped:
                raise _Aborted(scope.stopped) from None
            return FetchResult(url, "failed", scope.requests, 200, error=f"{type(e).__name__}: {e}"[:300])
        if scope.stopped:  # a read cut short by the watchdog can look like a clean end of the body
            raise _Aborted(scope.stopped)
        if body is None:
            return FetchResult(url, "failed", scope.requests, 200, error=too_big)
        ctype = resp.headers.get("Content-Type", "").split(";")[0].strip() or None
        why = not_an_image(body)  # content before identity: an error page must never become an image
        if why is not None:
            return FetchResult(url, "failed", scope.requests, 200, content_type=ctype,
                               error=f"{why}: HTTP 200, {ctype or 'no Content-Type'}, {len(body)} bytes")
        return FetchResult(url, "ok", scope.requests, 200, body=body, content_type=ctype)

    def _retry_after(self, resp: requests.Response) -> float | None:
        """The answer's Retry-After in seconds, at most ``crawl.max_retry_after_s``; None without one."""
        if not self.retries.respect_retry_after_header:
            return None
        return self.retries.get_retry_after(resp.raw)

    def _read_capped(self, resp: requests.Response) -> bytes | None:
        chunks: list[bytes] = []
        total = 0
        for chunk in resp.iter_content(64 * 1024):  # decoded (gzip, deflate): the cap counts decoded bytes
            total += len(chunk)
            if total > self.cfg.max_image_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)
