"""The crawl stage left running unattended: deadlines, interrupts, back-off, and the host policy.
Real Chromium and chromedriver, real HTTP servers on 127.0.0.1 (a second server is another origin)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from imagegen import emoji, encode
from polling import wait_for

from sd_core.demo.emoji_art import SiteItem
from sd_core.demo.site import DemoSite
from sd_core.ingest.crawl import Listing, download_new, list_site
from sd_core.ingest.ledger import Ledger
from sd_core.ingest.settings import CrawlConfig
from sd_core.store.catalog import Catalog

RED, BLUE, GREEN, YELLOW, PURPLE = (220, 30, 30), (30, 60, 220), (30, 180, 60), (240, 200, 20), (140, 40, 200)
COLOURS = (RED, BLUE, GREEN, YELLOW, PURPLE)


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def png(i: int) -> bytes:
    return encode(emoji(COLOURS[i % 5], mark=i % 30, shape="square" if i % 2 else "circle"), "PNG")


def item(i: int, fault: str = "none", **kw) -> SiteItem:
    return SiteItem(f"/emoji/{i:07d}.png", f"Blob {i}", png(i), "image/png", fault=fault, **kw)


def crawl_cfg(site: DemoSite, **kw) -> CrawlConfig:
    return CrawlConfig(base_url=site.base_url, max_requests_per_second=0, backoff_s=0.05, empty_page_settle_s=1.0,
                       **kw)


def listing_of(site: DemoSite) -> Listing:
    """What list_site gives for ``site``, without the browser (for tests about downloading only)."""
    items = []
    for n, it in enumerate(site.items):
        src = it.src or it.path
        items.append((src if src.startswith("http") else site.base_url + src, it.title, 1 + n // site.per_page))
    return Listing(site.tag, site.n_pages, tuple(items), origins=(site.base_url,))


def url_rows(data_dir: Path) -> dict[str, dict]:
    """The ledger's row of each URL, read with plain SQL."""
    import sqlite3

    if not Catalog(data_dir).ledger_db.exists():
        return {}
    db = sqlite3.connect(Catalog(data_dir).ledger_db)
    db.row_factory = sqlite3.Row
    try:
        return {r["url"]: dict(r) for r in db.execute("SELECT * FROM urls")}
    except sqlite3.OperationalError:  # not created yet
        return {}
    finally:
        db.close()


def raw_files(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "raw").rglob("*") if p.is_file()}


def processes_with(token: str) -> list[int]:
    """Processes (a browser, its driver) whose environment carries ``token``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes()
                state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            if token.encode() in env and state != b"Z":
                found.append(int(entry))
    return found


# -- deadlines -------------------------------------------------------------------------------------------


def test_slow_drip_download_stops_at_its_deadline(tmp_path):
    items = [item(1), item(2, "drip"), item(3)]
    with DemoSite(items, per_page=4, render_delay_ms=100, drip_s=0.5) as site:
        assert len(items[1].body) * site.drip_s > 60  # without a deadline this one download takes minutes
        cfg = crawl_cfg(site, download_deadline_s=2.0, timeout_s=20.0)
        listing = list_site(cfg, progress=False)
        start = time.monotonic()
        summary = download_new(cfg, Catalog(tmp_path), listing, progress=False)
        took = time.monotonic() - start
        assert took < 2.0 + 2.0, f"the crawl took {took:.1f}s with a 2s deadline"
        assert summary.failed == {"deadline": 1} and summary.downloaded == 2
        rows = url_rows(tmp_path)
        drip = rows[site.image_url(items[1])]
        assert drip["status"] == "failed" and drip["error"].startswith("deadline")
        assert {rows[site.image_url(it)]["status"] for it in (items[0], items[2])} == {"ok"}
        assert raw_files(tmp_path) == {md5(items[0].body), md5(items[2].body)}
        wait_for(lambda: site.image_aborted[items[1].path] == 1, 5, "the server to see the hang-up")


def test_a_server_silent_before_its_headers_is_cut_at_the_deadline():
    from sd_core.ingest.fetch import Fetcher

    slow = item(1, "slow")  # the server waits slow_s before it answers anything
    with DemoSite([slow], slow_s=8.0) as site:
        fetcher = Fetcher(crawl_cfg(site, download_deadline_s=2.0, timeout_s=20.0))
        try:
            start = time.monotonic()
            res = fetcher.fetch(site.image_url(slow))
            took = time.monotonic() - start
        finally:
            fetcher.close()
    assert res.status == "failed" and res.error.startswith("deadline"), res
    assert took < 2.0 + 1.5, f"the download took {took:.1f}s with a 2s deadline (the server was silent for 8s)"


def test_failed_url_waits_for_its_backoff_and_old_ledgers_are_migrated(tmp_path):
    # A ledger written before the back-off columns existed, with one URL that failed back then.
    items = [item(1), item(2, "drip"), item(3)]
    with DemoSite(items, drip_s=0.5) as site:
        old = Catalog(tmp_path).ledger_db
        old.parent.mkdir(parents=True)
        import sqlite3

        db = sqlite3.connect(old)
        db.executescript(OLD_LEDGER_SCHEMA)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        db.execute("INSERT INTO urls (url, title, tag, page, status, error, attempts, first_seen, last_seen) "
                   "VALUES (?, 'Blob 2', 'Blobs', 1, 'failed', 'ReadTimeout: x', 1, ?, ?)",
                   (site.image_url(items[1]), now, now))
        db.commit()
        db.close()

        cfg = crawl_cfg(site, download_deadline_s=1.0, failed_backoff_s=2.0)
        first = download_new(cfg, Catalog(tmp_path), listing_of(site), progress=False)
        assert first.failed == {"deadline": 1} and first.downloaded == 2  # migrated, and the old failure retried
        drip = url_rows(tmp_path)[site.image_url(items[1])]
        assert (drip["status"], drip["failures"]) == ("failed", 1)  # the old ledger did not count failures
        next_try = datetime.fromisoformat(drip["next_try"])
        assert timedelta(0) < next_try - datetime.now(timezone.utc) <= timedelta(seconds=2)

        site.reset_counts()
        second = download_new(cfg, Catalog(tmp_path), listing_of(site), progress=False)
        assert site.total_image_gets() == 0 and second.deferred == 1 and second.already_known == 3

        wait_for(lambda: datetime.now(timezone.utc) > next_try, 6, "the back-off to pass")
        third = download_new(cfg, Catalog(tmp_path), listing_of(site), progress=False)
        assert dict(site.image_gets) == {items[1].path: 1} and third.failed == {"deadline": 1}
        drip = url_rows(tmp_path)[site.image_url(items[1])]
        assert drip["failures"] == 2  # and the back-off doubled
        assert timedelta(seconds=2) < datetime.fromisoformat(drip["next_try"]) - datetime.now(timezone.utc) <= \
            timedelta(seconds=4)


OLD_LEDGER_SCHEMA = """
CREATE TABLE urls (url TEXT PRIMARY KEY, title TEXT NOT NULL, tag TEXT NOT NULL, page INTEGER, status TEXT,
    md5 TEXT, http_status INTEGER, error TEXT, attempts INTEGER NOT NULL DEFAULT 0, first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL, fetched_at TEXT);
CREATE TABLE images (seq INTEGER PRIMARY KEY AUTOINCREMENT, md5 TEXT NOT NULL UNIQUE, url TEXT NOT NULL,
    title TEXT NOT NULL, tag TEXT NOT NULL, size INTEGER NOT NULL, content_type TEXT, fetched_at TEXT NOT NULL);
"""


def test_downloads_are_recorded_as_they_finish_and_numbered_in_listing_order(tmp_path):
    # The oldest item (listed last, fetched first) is slow; the five after it finish long before it.
    items = [item(i) for i in range(1, 6)] + [item(6, "slow")]
    with DemoSite(items, slow_s=3.0) as site:
        cfg = crawl_cfg(site, download_workers=3)
        thread = threading.Thread(target=download_new, args=(cfg, Catalog(tmp_path), listing_of(site)),
                                  kwargs={"progress": False})
        thread.start()
        try:
            wait_for(lambda: sum(site.image_done.values()) == 5, 10, "the five fast downloads", interval=0.02)
            wait_for(lambda: sum(r["status"] == "ok" for r in url_rows(tmp_path).values()) == 5, 2,
                     "the five fast downloads in the ledger", interval=0.02)
            assert site.image_done[items[-1].path] == 0  # ...while the slow one is still in flight
            assert url_rows(tmp_path)[site.image_url(items[-1])]["status"] is None
        finally:
            thread.join(timeout=30)
        with Ledger(Catalog(tmp_path).ledger_db) as ledger:
            titles = [r.title for r in ledger.images()]
        assert titles == [it.title for it in reversed(items)]  # oldest first, however they finished


KILLABLE = """
import sys
from sd_core.ingest.crawl import Listing, download_new
from sd_core.ingest.settings import CrawlConfig
from sd_core.store.catalog import Catalog
listing = Listing.load(sys.argv[2])
cfg = CrawlConfig(base_url=sys.argv[1], max_requests_per_second=0, download_workers=3)
download_new(cfg, Catalog(sys.argv[3]), listing, progress=False)
"""


def test_killed_run_resumes_to_the_same_dataset(tmp_path):
    from sd_core.ingest.convert import ConvertConfig, convert_dataset
    from sd_core.store.metadata import read_metadata

    items = [item(i) for i in range(1, 6)] + [item(6, "slow")]
    with DemoSite(items, slow_s=2.0) as site:
        listing_json = tmp_path / "listing.json"
        listing_of(site).save(listing_json)
        whole, killed = tmp_path / "whole", tmp_path / "killed"
        download_new(crawl_cfg(site), Catalog(whole), listing_of(site), progress=False)

        site.reset_counts()
        proc = subprocess.Popen([sys.executable, "-c", KILLABLE, site.base_url, str(listing_json), str(killed)],
                                start_new_session=True)
        try:
            wait_for(lambda: sum(r["status"] == "ok" for r in url_rows(killed).values()) == 5, 20,
                     "the fast downloads to be recorded", interval=0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, mid-download
            proc.wait()
        assert site.image_done[items[-1].path] == 0, "the run was not killed mid-download"
        site.reset_counts()
        download_new(crawl_cfg(site), Catalog(killed), listing_of(site), progress=False)
        assert dict(site.image_gets) == {items[-1].path: 1}  # only the one that was in flight

    for d in (whole, killed):
        convert_dataset(ConvertConfig(), Catalog(d), progress=False)
    assert read_metadata(Catalog(killed)) == read_metadata(Catalog(whole))
    assert {p.name: p.read_bytes() for p in (killed / "images").iterdir()} == {
        p.name: p.read_bytes() for p in (whole / "images").iterdir()}


INTERRUPTIBLE = """
import sys
from sd_core.ingest.crawl import download_new, list_site
from sd_core.ingest.settings import CrawlConfig
from sd_core.store.catalog import Catalog
cfg = CrawlConfig(base_url=sys.argv[1], max_requests_per_second=0, download_workers=4, empty_page_settle_s=1.0)
listing = list_site(cfg, progress=False)
print("listed", flush=True)
download_new(cfg, Catalog(sys.argv[2]), listing, progress=False)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_crawl_stops_at_once_and_keeps_what_finished(tmp_path, sig):
    # Two emoji drip for minutes; eight come at once. The signal arrives once the eight are in.
    fast = [item(i) for i in range(1, 9)]
    drips = [item(i, "drip") for i in (9, 10)]
    token = uuid.uuid4().hex
    with DemoSite(drips + fast, per_page=20, render_delay_ms=100, drip_s=0.5) as site:
        proc = subprocess.Popen([sys.executable, "-c", INTERRUPTIBLE, site.base_url, str(tmp_path)],
                                env={**os.environ, "EMOJI_SD_TEST_TOKEN": token})
        try:
            wait_for(lambda: sum(site.image_done.values()) == 8 and sum(site.image_gets[d.path] for d in drips) == 2,
                     30, "the fast downloads while the slow ones drip", interval=0.05)
            wait_for(lambda: sum(r["status"] == "ok" for r in url_rows(tmp_path).values()) == 8, 10,
                     "the fast downloads in the ledger", interval=0.05)
            sent = time.monotonic()
            proc.send_signal(sig)
            code = proc.wait(timeout=30)
            took = time.monotonic() - sent
        finally:
            proc.kill()
        assert took < 5.0, f"the crawl took {took:.1f}s to stop"
        assert code == (-signal.SIGINT if sig == signal.SIGINT else 128 + signal.SIGTERM)
        rows = url_rows(tmp_path)
        assert {rows[site.image_url(it)]["status"] for it in fast} == {"ok"}
        assert {rows[site.image_url(d)]["status"] for d in drips} == {None}  # cancelled: fetched next run
        assert raw_files(tmp_path) == {md5(it.body) for it in fast}
        with Ledger(Catalog(tmp_path).ledger_db) as ledger:
            assert [r.title for r in ledger.images()] == [it.title for it in reversed(fast)]
        wait_for(lambda: sum(site.image_aborted.values()) == 2, 5, "the server to see both hang-ups")
        assert processes_with(token) == []  # no browser, no driver left behind
    assert not list(tmp_path.rglob("*.tmp"))


LISTING_ONLY = """
import sys
from sd_core.ingest.crawl import list_site
from sd_core.ingest.settings import CrawlConfig
list_site(CrawlConfig(base_url=sys.argv[1], page_timeout_s=30, empty_page_settle_s=1.0), progress=False)
"""


def test_sigterm_during_listing_quits_the_browser(tmp_path):
    token = uuid.uuid4().hex
    with DemoSite([item(i) for i in range(1, 5)], per_page=1, render_delay_ms=20_000) as site:
        proc = subprocess.Popen([sys.executable, "-c", LISTING_ONLY, site.base_url],
                                env={**os.environ, "EMOJI_SD_TEST_TOKEN": token})
        try:
            wait_for(lambda: site.page_gets >= 1, 30, "the browser to open the first page")
            wait_for(lambda: len(processes_with(token)) >= 3, 10, "the browser processes")
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
            took = time.monotonic() - sent
        finally:
            proc.kill()
        assert code == 128 + signal.SIGTERM and took < 10.0
        wait_for(lambda: processes_with(token) == [], 5, "chromedriver and Chromium to be gone")


def test_listing_deadline_stops_a_long_listing_and_the_browser():
    from sd_core.ingest.browser import ListingDeadlineError

    token = uuid.uuid4().hex
    os.environ["EMOJI_SD_TEST_TOKEN"] = token  # inherited by chromedriver and Chromium
    try:
        with DemoSite([item(i) for i in range(1, 21)], per_page=1, render_delay_ms=700) as site:
            cfg = crawl_cfg(site, listing_deadline_s=6.0)
            start = time.monotonic()
            listing = list_site(cfg, progress=False)  # what was read before the deadline is kept
            assert time.monotonic() - start < 6.0 + 5.0
            assert listing.walk.cut == f"crawl.listing_deadline_s = 6s passed after {listing.pages} page(s)"
            assert 1 <= listing.pages <= site.page_gets < 20
            assert [t for _, t, _ in listing.items] == [f"Blob {i}" for i in range(1, listing.pages + 1)]
            # with no page read, the deadline is an error
            with pytest.raises(ListingDeadlineError, match=r"crawl\.listing_deadline_s = 0\.5s"):
                list_site(crawl_cfg(site, listing_deadline_s=0.5), progress=False)
        wait_for(lambda: processes_with(token) == [], 5, "chromedriver and Chromium to be gone")
    finally:
        del os.environ["EMOJI_SD_TEST_TOKEN"]


HUNG_DRIVER = """#!{python}
# A chromedriver that answers its status check and then never answers anything else.
import http.server, json, sys, time
port = int(next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--port=")))
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        if not self.path.startswith("/status"):
            time.sleep(3600)
        body = json.dumps({{"value": {{"ready": True, "message": "ready"}}}}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_POST(self):
        time.sleep(3600)
    do_DELETE = do_POST
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_hung_driver_cannot_block_the_listing(tmp_path):
    from sd_core.ingest.browser import ListingDeadlineError

    driver = tmp_path / "chromedriver"
    driver.write_text(HUNG_DRIVER.format(python=sys.executable))
    driver.chmod(0o755)
    token = uuid.uuid4().hex
    os.environ["EMOJI_SD_TEST_TOKEN"] = token
    try:
        cfg = CrawlConfig(base_url="http://127.0.0.1:9", chromedriver_path=str(driver), listing_deadline_s=3.0)
        start = time.monotonic()
        with pytest.raises(ListingDeadlineError, match="starting the browser"):
            list_site(cfg, progress=False)
        assert time.monotonic() - start < 3.0 + 5.0  # Selenium alone would wait 120s for the new session
        wait_for(lambda: processes_with(token) == [], 5, "the hung driver to be gone")
    finally:
        del os.environ["EMOJI_SD_TEST_TOKEN"]


HANGS_AT_SESSION = """#!{python}
# A chromedriver that answers its status check, notes the new-session request in a file, and never answers it.
import http.server, json, pathlib, sys, time
port = int(next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--port=")))
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        body = json.dumps({{"value": {{"ready": True, "message": "ready"}}}}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_POST(self):
        pathlib.Path({marker!r}).touch()
        time.sleep(3600)
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_a_signal_while_the_browser_starts_is_raised_as_it_is(tmp_path):
    """SIGTERM during the browser's start-up (Prefect raises it as its TerminationSignal, a BaseException)
    propagates as it is: it is no listing deadline, also when the clean-up has to kill the driver."""
    from sd_core.ingest.browser import Browser

    class Terminated(BaseException):  # like prefect.exceptions.TerminationSignal
        pass

    def raise_terminated(signum, frame):
        raise Terminated()

    marker = tmp_path / "session-requested"
    driver = tmp_path / "chromedriver"
    driver.write_text(HANGS_AT_SESSION.format(python=sys.executable, marker=str(marker)))
    driver.chmod(0o755)
    token = uuid.uuid4().hex
    os.environ["EMOJI_SD_TEST_TOKEN"] = token
    previous = signal.signal(signal.SIGUSR1, raise_terminated)
    try:
        def signal_at_the_session_start() -> None:
            wait_for(marker.exists, 30, "the new-session request", interval=0.05)
            os.kill(os.getpid(), signal.SIGUSR1)  # handled in the main thread, blocked on the driver's answer

        threading.Thread(target=signal_at_the_session_start, daemon=True).start()
        cfg = CrawlConfig(base_url="http://127.0.0.1:9", chromedriver_path=str(driver), listing_deadline_s=600)
        with pytest.raises(Terminated):
            with Browser(cfg, time.monotonic() + 600):
                pytest.fail("the hung driver started a session")
        wait_for(lambda: processes_with(token) == [], 5, "the driver to be gone")
    finally:
        signal.signal(signal.SIGUSR1, previous)
        del os.environ["EMOJI_SD_TEST_TOKEN"]


# -- host policy -----------------------------------------------------------------------------------------


def test_images_from_other_origins_are_refused_unless_allowed(tmp_path):
    theirs = item(50)
    with DemoSite([theirs]) as other:  # another port of 127.0.0.1 is another origin
        items = [
            item(1),
            SiteItem("/emoji/elsewhere.png", "Hotlinked", b"", "image/png", src=other.image_url(theirs)),
            item(2, "redirect", location=other.image_url(theirs)),
            item(3, "redirect", location="/emoji/0000001.png"),  # a redirect on the site itself is followed
        ]
        with DemoSite(items, per_page=10, render_delay_ms=100) as site:
            cfg = crawl_cfg(site)
            listing = list_site(cfg, progress=False)
            assert other.image_url(theirs) in listing.unique_urls
            summary = download_new(cfg, Catalog(tmp_path), listing, progress=False)

            assert other.total_image_gets() == 0  # never contacted
            assert summary.failed == {"refused (other origin)": 1, "refused (redirect to other origin)": 1}
            rows = url_rows(tmp_path)
            hotlink, redirect = rows[other.image_url(theirs)], rows[site.image_url(items[2])]
            assert hotlink["status"] == redirect["status"] == "refused"
            assert other.base_url in hotlink["error"] and "crawl.allowed_hosts" in hotlink["error"]
            assert f"to {other.base_url}" in redirect["error"]
            assert rows[site.image_url(items[3])]["status"] == "ok"
            assert raw_files(tmp_path) == {md5(items[0].body)}
            assert not (tmp_path / "quarantine").exists()

            # Allowed: the next run checks the refused URLs again and fetches them.
            allowed = cfg.model_copy(update={"allowed_hosts": (other.base_url,)})
            again = download_new(allowed, Catalog(tmp_path), listing, progress=False)
            assert again.failed == {} and other.image_gets[theirs.path] == 2
            rows = url_rows(tmp_path)
            assert rows[other.image_url(theirs)]["status"] == rows[site.image_url(items[2])]["status"] == "ok"
            assert raw_files(tmp_path) == {md5(items[0].body), md5(theirs.body)}


def test_private_addresses_are_refused_for_a_public_listing():
    from sd_core.ingest.fetch import Fetcher

    with DemoSite([item(1)]) as site:
        url = site.image_url(site.items[0])
        port = url.rsplit(":", 1)[1].split("/")[0]
        # A listing on a public address (never contacted here) that names loopback hosts as allowed.
        public = CrawlConfig(base_url="http://93.184.216.34", allowed_hosts=(site.base_url, "localhost"))
        fetcher = Fetcher(public)
        for target in (url, f"http://localhost:{port}/emoji/0000001.png"):
            res = fetcher.fetch(target)
            assert res.status == "refused" and res.error.startswith("refused (private address)")
            assert "127.0.0.1" in res.error
        fetcher.close()
        assert site.total_image_gets() == 0
        # The same host is fine when the listing itself is on a loopback address.
        local = Fetcher(CrawlConfig(base_url=site.base_url, allowed_hosts=("localhost",)))
        assert local.fetch(f"http://localhost:{port}/emoji/0000001.png").status == "ok"
        local.close()


def test_an_address_that_changes_after_the_check_is_refused_before_the_request(monkeypatch):
    """DNS rebinding: the host resolved to a public address when the policy checked it, and the connection
    reached a loopback one. The connected address is checked before the request is sent."""
    from sd_core.ingest import fetch

    with DemoSite([item(1)]) as site:
        port = site.base_url.rsplit(":", 1)[1]
        # a listing on a public address (never contacted), whose images are allowed on "localhost"
        cfg = CrawlConfig(base_url="http://93.184.216.34", allowed_hosts=("localhost",), retries=0)
        monkeypatch.setattr(fetch, "_resolve", lambda host, port: ["93.184.216.34"])  # what the check saw
        fetcher = fetch.Fetcher(cfg)
        try:
            res = fetcher.fetch(f"http://localhost:{port}/emoji/0000001.png")
        finally:
            fetcher.close()
        assert res.status == "refused", res
        assert res.error.startswith("refused (private address): localhost connected to 127.0.0.1")
        assert site.total_image_gets() == 0  # no request reached the server


def test_hostile_servers_fail_with_a_reason_and_store_nothing(tmp_path):
    items = [item(1), item(2, "gzip-bomb"), item(3, "huge"), item(4, "short-body"), item(5, "500"),
             item(6, "404"), item(7, "redirect", location="/emoji/0000007.png")]  # a redirect loop
    with DemoSite(items, bomb_bytes=64_000_000) as site:
        cfg = crawl_cfg(site, max_image_bytes=5_000_000, retries=2, max_redirects=3)
        start = time.monotonic()
        summary = download_new(cfg, Catalog(tmp_path), listing_of(site), progress=False)
        assert time.monotonic() - start < 10
        rows = {it.path: url_rows(tmp_path)[site.image_url(it)] for it in items}
        assert rows[items[1].path]["error"] == "larger than 5000000 bytes"  # counted after gzip decoding
        assert rows[items[2].path]["error"] == "larger than 5000000 bytes (Content-Length 200000000)"
        assert "IncompleteRead" in rows[items[3].path]["error"]  # a Content-Length larger than the body
        assert rows[items[4].path]["error"] == "HTTP 500" and site.image_gets[items[4].path] == 3
        assert rows[items[5].path]["status"] == "gone"
        assert rows[items[6].path]["error"].startswith("too many redirects")
        assert summary.downloaded == 1 and raw_files(tmp_path) == {md5(items[0].body)}


@pytest.mark.parametrize(
    "sets, field",
    [
        (["crawl.download_deadline_s=0"], "crawl.download_deadline_s"),
        (["crawl.listing_deadline_s=-1"], "crawl.listing_deadline_s"),
        (['crawl.allowed_hosts=["https://cdn.example.com/emojis"]'], "crawl.allowed_hosts"),
        (['crawl.allowed_hosts=["ftp://cdn.example.com"]'], "crawl.allowed_hosts"),
        (["crawl.command_timeout_s=10"], "command_timeout_s"),
        (["crawl.max_redirects=-1"], "crawl.max_redirects"),
        (["convert.max_seconds_per_image=0"], "convert.max_seconds_per_image"),
        (["convert.max_frames=0"], "convert.max_frames"),
    ],
)
def test_bad_safety_settings_are_refused_with_the_field_named(sets, field):
    from sd_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as refused:
        load_config(sets=sets)
    assert "unknown field" not in str(refused.value)  # a known field, refused for its value


def test_defaults_allow_the_real_sites_image_cdn():
    from sd_core.ingest.fetch import HostPolicy

    cfg = CrawlConfig()
    assert cfg.allowed_hosts == ("https://cdn.discordapp.com",)
    policy = HostPolicy(cfg)
    assert policy.origin_allowed(("https", "cdn.discordapp.com", 443))
    assert policy.origin_allowed(("https", "discords.com", 443))
    assert not policy.origin_allowed(("http", "cdn.discordapp.com", 80))
    assert not policy.origin_allowed(("https", "evil.example", 443))
