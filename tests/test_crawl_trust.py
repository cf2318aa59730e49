"""Issue 22, the download side: a crawl that cannot be fooled. Error pages answered with 200 are failures, not
images (and ledgers they poisoned heal); a damaged ledger is rebuilt without renaming a file; Retry-After is
honoured up to a cap; a run whose downloads all failed fails; network errors and bad tags are one line.
Real HTTP servers on 127.0.0.1 (the demo site), real Chromium where the listing is walked."""

from __future__ import annotations

import logging
import re
import socket
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from imagegen import emoji, encode
from polling import wait_for
from test_crawl_safety import crawl_cfg, item, listing_of, md5, raw_files, url_rows

from sd_core.demo.emoji_art import SiteItem
from sd_core.demo.site import DemoSite
from sd_core.ingest.convert import ConvertConfig, convert_dataset, file_name_for, not_an_image, stage_key
from sd_core.ingest.crawl import DownloadsFailed, download_new, list_site
from sd_core.ingest.ledger import ImageRecord, Ledger, LedgerDamaged
from sd_core.ingest.settings import CrawlConfig
from sd_core.store.catalog import Catalog
from sd_core.store.metadata import read_csv_table, read_metadata


def images_in(data_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((data_dir / "images").iterdir())}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- content before identity ------------------------------------------------------------------------------


def test_not_an_image_is_decided_from_the_header_by_the_converters_own_open():
    png = item(1).body
    assert not_an_image(png) is None
    assert not_an_image(png[: len(png) // 2]) is None  # a broken image is an image: convert quarantines it
    assert not_an_image(b"") == "empty file"
    for body in (b"<!DOCTYPE html><html><body>Something went wrong</body></html>", b'{"error": "rate limited"}',
                 b"Internal Server Error", b"\x89PN"):
        assert not_an_image(body) == "not an image (unidentified format)"


def test_html_error_pages_fail_are_never_images_and_are_fetched_after_the_site_recovers(tmp_path):
    items = [item(i) for i in range(1, 7)]
    cat = Catalog(tmp_path)
    with DemoSite(items) as site:
        site.image_fault = "html-200"  # every image URL answers 200 with the same HTML page
        cfg = crawl_cfg(site, failed_backoff_s=1.5)
        with pytest.raises(DownloadsFailed) as failed:
            download_new(cfg, cat, listing_of(site), progress=False)
        message = str(failed.value)
        assert "\n" not in message
        assert "every download failed (6 URLs tried; not an image (unidentified format): 6)" in message
        assert "text/html" in message and site.base_url in message
        assert failed.value.summary.failed == {"not an image (unidentified format)": 6}
        rows = url_rows(tmp_path)
        assert {r["status"] for r in rows.values()} == {"failed"}
        assert all(r["error"].startswith("not an image") and r["md5"] is None for r in rows.values())
        assert raw_files(tmp_path) == set()
        with Ledger(cat.ledger_db) as ledger:
            assert ledger.images() == [] and ledger.duplicates() == []
        next_try = max(datetime.fromisoformat(r["next_try"]) for r in rows.values())

        # The site recovers. Before the back-off has passed nothing is fetched, and with no image at all
        # the run still fails; after it, every URL is fetched again.
        site.image_fault = None
        site.reset_counts()
        with pytest.raises(DownloadsFailed, match="no image downloaded yet: the 6 listed URLs failed"):
            download_new(cfg, cat, listing_of(site), progress=False)
        assert site.total_image_gets() == 0
        wait_for(lambda: datetime.now(timezone.utc) > next_try, 10, "the back-off to pass", interval=0.1)
        summary = download_new(cfg, cat, listing_of(site), progress=False)
        assert (summary.downloaded, summary.new_images, summary.duplicates, summary.failed) == (6, 6, 0, {})
        assert site.total_image_gets() == 6
    convert = convert_dataset(ConvertConfig(), cat, progress=False)
    assert convert.dataset_rows == 6 and convert.quarantined == 0
    assert {r["md5"] for r in read_metadata(cat)} == {md5(it.body) for it in items}


def test_some_bad_bodies_among_good_ones_are_counted_and_the_run_passes(tmp_path):
    items = [item(1), item(2, "html-200"), item(3, "empty-200"), item(4), item(5, "404")]
    with DemoSite(items) as site:
        summary = download_new(crawl_cfg(site), Catalog(tmp_path), listing_of(site), progress=False)
    assert summary.downloaded == 2 and summary.new_images == 2
    assert summary.failed == {"not an image (unidentified format)": 1, "empty file": 1, "HTTP 404": 1}
    assert raw_files(tmp_path) == {md5(items[0].body), md5(items[3].body)}


def _poison_like_an_old_version(cat: Catalog, site: DemoSite, page: bytes) -> None:
    """What a version without the content check recorded when every image URL answered 200 with ``page``:
    the first URL's "image", and the others as its duplicates; a ledger of the old version (user_version 0)."""
    listing = listing_of(site)
    with Ledger(cat.ledger_db) as ledger:
        ledger.note_listed(list(listing.items), listing.tag)
        for url in reversed(listing.unique_urls):
            ledger.record_fetch(url, "ok", attempts=1, http_status=200, md5=md5(page), size=len(page),
                                content_type="text/html")
            ledger.promote(url)
    db = sqlite3.connect(cat.ledger_db)
    db.execute("PRAGMA user_version = 0")
    db.close()
    cat.raw_path(md5(page)).parent.mkdir(parents=True, exist_ok=True)
    cat.raw_path(md5(page)).write_bytes(page)


@pytest.mark.parametrize("converted", [True, False], ids=["after-convert", "before-convert"])
def test_a_ledger_poisoned_by_error_pages_heals_and_the_rerun_downloads_them(tmp_path, converted):
    items = [item(i) for i in range(1, 9)]
    cat = Catalog(tmp_path)
    page = b"<!DOCTYPE html>\n<html><head><title>Something went wrong</title></head><body></body></html>\n"
    with DemoSite(items) as site:
        _poison_like_an_old_version(cat, site, page)
        if converted:  # what the issue saw: 1 quarantined image and 7 "duplicates" of it
            assert convert_dataset(ConvertConfig(), cat, progress=False).quarantined == 1
            assert len(read_csv_table(cat.duplicates_csv)) == 7
        summary = download_new(crawl_cfg(site), cat, listing_of(site), progress=False)  # the site is back
        assert summary.retried_poisoned == 8 and summary.already_known == 0
        assert (summary.downloaded, summary.new_images, summary.duplicates, summary.failed) == (8, 8, 0, {})
        assert site.total_image_gets() == 8
        with Ledger(cat.ledger_db) as ledger:
            assert {r.md5 for r in ledger.images()} == {md5(it.body) for it in items}
            assert ledger.content_checked
        site.reset_counts()  # healed once: a rerun fetches nothing
        assert download_new(crawl_cfg(site), cat, listing_of(site), progress=False).retried_poisoned == 0
        assert site.total_image_gets() == 0
    convert = convert_dataset(ConvertConfig(), cat, progress=False)
    assert convert.dataset_rows == 8 and convert.quarantined == 0
    assert read_csv_table(cat.quarantine_csv) == [] and read_csv_table(cat.duplicates_csv) == []


def test_duplicates_of_a_quarantined_body_are_tried_again_never_counted_as_duplicates(tmp_path):
    # Two URLs give the same truncated image: one is the quarantined "image", the other its "duplicate".
    broken = item(1).body[: len(item(1).body) // 2]
    items = [SiteItem("/emoji/a.png", "A", broken, "image/png"), SiteItem("/emoji/b.png", "B", broken, "image/png"),
             item(3)]
    cat = Catalog(tmp_path)
    with DemoSite(items) as site:
        cfg = crawl_cfg(site, failed_backoff_s=3600)
        first = download_new(cfg, cat, listing_of(site), progress=False)
        assert (first.new_images, first.duplicates) == (2, 1)
        assert convert_dataset(ConvertConfig(), cat, progress=False).quarantined == 1
        site.reset_counts()
        again = download_new(cfg, cat, listing_of(site), progress=False)
        # The duplicate was tried again; the same broken bytes came back: a failure with its back-off now.
        assert again.retried_poisoned == 1 and dict(site.image_gets) == {"/emoji/a.png": 1}
        assert again.failed == {"same bytes as a quarantined image": 1}
        row = url_rows(tmp_path)[site.image_url(items[0])]
        assert row["status"] == "failed" and "undecodable PNG" in row["error"]
        assert site.image_url(items[1]) in row["error"]  # the URL the quarantined bytes were first fetched from
        assert datetime.fromisoformat(row["next_try"]) > datetime.now(timezone.utc) + timedelta(minutes=50)
        with Ledger(cat.ledger_db) as ledger:
            assert ledger.duplicates() == []
        site.reset_counts()
        assert download_new(cfg, cat, listing_of(site), progress=False).retried_poisoned == 0
        assert site.total_image_gets() == 0  # waits for its back-off like any failure


# -- a damaged ledger -------------------------------------------------------------------------------------


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:100] = b"\x00garbled" * 12 + b"\x00" * 4
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage, unreadable", [(_garble, True), (_truncate, True), (_empty, False),
                                                (Path.unlink, False)],
                         ids=["garbled", "truncated", "emptied", "deleted"])
def test_a_damaged_ledger_is_rebuilt_from_the_dataset_without_renaming_anything(tmp_path, caplog, damage,
                                                                                unreadable):
    red = encode(emoji((220, 30, 30)), "PNG")
    items = [item(i) for i in range(1, 30)] + [  # 29 distinct images
        SiteItem("/emoji/copy.png", "Copy", red, "image/png"), SiteItem("/emoji/red.png", "Red", red, "image/png"),
        SiteItem("/emoji/cut.png", "Cut", item(60).body, "image/png", fault="truncated"),
        item(61, "404"),
    ]
    cat = Catalog(tmp_path)
    with DemoSite(items, per_page=10) as site:
        listing = listing_of(site)
        listing.save(cat.listing_json)
        download_new(crawl_cfg(site), cat, listing, progress=False)
        convert_dataset(ConvertConfig(), cat, progress=False)
        before = (images_in(tmp_path), read_metadata(cat), read_csv_table(cat.duplicates_csv),
                  read_csv_table(cat.quarantine_csv), stage_key(ConvertConfig(), cat))
        damage(cat.ledger_db)
        damaged = cat.ledger_db.read_bytes() if cat.ledger_db.exists() else None
        if unreadable:
            with pytest.raises(LedgerDamaged, match=str(cat.ledger_db)) as refused:  # status, gc: one line
                Ledger(cat.ledger_db)
            assert "\n" not in str(refused.value) and "rebuilds it from metadata.csv" in str(refused.value)

        site.reset_counts()
        with caplog.at_level(logging.WARNING, logger="sd_core.ingest.recover"):
            summary = download_new(crawl_cfg(site), cat, listing, progress=False)
        warning = " ".join(r.getMessage() for r in caplog.records)
        assert str(cat.ledger_db) in warning
        assert ("kept as ledger.sqlite.damaged-" if damaged is not None else "no file to keep") in warning
        assert summary.ledger_rebuilt and "31 images" in summary.ledger_rebuilt
        # Only the URL whose outcome only the ledger knew (the 404) is asked again.
        assert dict(site.image_gets) == {items[-1].path: 1}
        aside = list(cat.state_dir.glob("ledger.sqlite.damaged-*"))
        assert [p.read_bytes() for p in aside] == ([damaged] if damaged is not None else [])  # kept as it was
    convert = convert_dataset(ConvertConfig(), cat, progress=False)
    assert convert.converted == 0  # every JPEG reused: same names, same bytes
    after = (images_in(tmp_path), read_metadata(cat), read_csv_table(cat.duplicates_csv),
             read_csv_table(cat.quarantine_csv), stage_key(ConvertConfig(), cat))
    assert after == before


# -- Retry-After, 429, and runs whose downloads all failed -------------------------------------------------


@pytest.mark.parametrize("cap, expect_s", [(7200.0, 3600), (1000.0, 1000)])
def test_retry_after_past_the_deadline_is_the_next_try_up_to_the_cap(tmp_path, cap, expect_s):
    items = [item(i, "429") for i in range(1, 5)]
    with DemoSite(items, retry_after="3600") as site:
        cfg = crawl_cfg(site, max_retry_after_s=cap, download_deadline_s=5.0, failed_backoff_s=600)
        start = datetime.now(timezone.utc)
        with pytest.raises(DownloadsFailed) as failed:
            download_new(cfg, Catalog(tmp_path), listing_of(site), progress=False)
        end = datetime.now(timezone.utc)
        assert site.total_image_gets() == 4  # one request each: the pause asked for is past the deadline
    message = str(failed.value)
    assert "429 Too Many Requests to every image (4 URLs tried)" in message
    assert f"crawl.max_retry_after_s = {cap:g}s" in message and "\n" not in message
    for row in url_rows(tmp_path).values():
        assert row["status"] == "failed" and row["http_status"] == 429
        when = datetime.fromisoformat(row["next_try"])
        assert start + timedelta(seconds=expect_s - 2) <= when <= end + timedelta(seconds=expect_s + 1)


def test_a_short_retry_after_is_waited_for_within_the_run(tmp_path):
    items = [item(1, "429-once"), item(2, "429-once")]
    with DemoSite(items, retry_after="1") as site:
        summary = download_new(crawl_cfg(site), Catalog(tmp_path), listing_of(site), progress=False)
        assert summary.downloaded == 2 and summary.failed == {}
        for it in items:
            first, second = site.image_times[it.path]
            assert second - first >= 0.95, f"retried {second - first:.2f}s after a Retry-After of 1s"


def test_the_per_host_rate_limit_spaces_requests(tmp_path):
    items = [item(i) for i in range(1, 9)]
    with DemoSite(items) as site:
        cfg = crawl_cfg(site).model_copy(update={"max_requests_per_second": 5.0, "download_workers": 4})
        summary = download_new(cfg, Catalog(tmp_path), listing_of(site), progress=False)
        assert summary.downloaded == 8
        times = sorted(t for ts in site.image_times.values() for t in ts)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[-1] - times[0] >= 7 * 0.2 * 0.95, f"8 requests in {times[-1] - times[0]:.2f}s at 5/s"
    assert min(gaps) >= 0.2 * 0.75, f"two requests {min(gaps):.3f}s apart at 5/s"


def test_a_rerun_with_only_known_failures_or_nothing_to_fetch_passes(tmp_path):
    items = [item(1), item(2, "500")]
    cat = Catalog(tmp_path)
    with DemoSite(items) as site:
        cfg = crawl_cfg(site, failed_backoff_s=0, retries=0)
        first = download_new(cfg, cat, listing_of(site), progress=False)  # some successes: passes, counted
        assert first.downloaded == 1 and first.failed == {"HTTP 500": 1}
        again = download_new(cfg, cat, listing_of(site), progress=False)  # only the known failure, again
        assert again.downloaded == 0 and again.failed == {"HTTP 500": 1}
        site.prepend([item(3, "500")])  # a new URL, and it fails: every download of this run failed
        with pytest.raises(DownloadsFailed, match=r"every download failed \(2 URLs tried; HTTP 500: 2\)"):
            download_new(cfg, cat, listing_of(site), progress=False)


def test_unreachable_images_fail_the_run_in_one_line_naming_the_url(tmp_path):
    port = closed_port()
    gone = f"http://127.0.0.1:{port}/emoji/1.png"
    with DemoSite([SiteItem("/emoji/x.png", "X", b"", "image/png", src=gone)]) as site:
        cfg = crawl_cfg(site, allowed_hosts=(f"http://127.0.0.1:{port}",), retries=1)
        with pytest.raises(DownloadsFailed) as failed:
            download_new(cfg, Catalog(tmp_path), listing_of(site), progress=False)
    message = str(failed.value)
    assert "every download failed (1 URL tried; connection refused: 1)" in message
    assert f"e.g. connection refused: {gone}" in message and "\n" not in message and len(message) < 400
    assert url_rows(tmp_path)[gone]["error"] == f"connection refused: {gone}"


# -- network errors of the listing, tags and base URLs ----------------------------------------------------


@pytest.mark.parametrize("base, words", [
    (f"http://127.0.0.1:{closed_port()}", "connection refused (net::ERR_CONNECTION_REFUSED)"),
    ("http://no-such-host.invalid", "host not found (net::ERR_NAME_NOT_RESOLVED)"),
    ("http://127.0.0.1:9", "net::ERR_UNSAFE_PORT"),  # Chromium shows an error page instead of raising
])
def test_an_unreachable_site_is_one_line_naming_the_url_and_the_field(base, words):
    from sd_core.ingest.browser import SiteUnreachable

    with pytest.raises(SiteUnreachable) as failed:
        list_site(CrawlConfig(base_url=base, empty_page_settle_s=1.0), progress=False)
    message = str(failed.value)
    assert message == (f"listing page {base}/emoji-list/tag/Blobs?page=1 could not be loaded: "
                       f"{message.split('could not be loaded: ')[1].split(';')[0]}; check crawl.base_url = {base}")
    assert words in message and "\n" not in message and "Stacktrace" not in message


def test_a_tag_with_url_syntax_is_encoded_and_reaches_its_listing():
    tag = "Cats & Dogs?#1 100%"
    with DemoSite([item(1), item(2)], tag=tag, render_delay_ms=50) as site:
        cfg = crawl_cfg(site, tag=tag)
        assert cfg.listing_url(2) == site.listing_url(2)  # .../tag/Cats%20%26%20Dogs%3F%231%20100%25?page=2
        listing = list_site(cfg, progress=False)
        assert [t for _, t, _ in listing.items] == ["Blob 1", "Blob 2"]


@pytest.mark.parametrize("sets, field, says", [
    (["crawl.base_url=http://"], "crawl.base_url", "names no host"),
    (["crawl.base_url=http://exa mple.com"], "crawl.base_url", "contains blanks"),
    (['crawl.base_url="http://example.com\\u0007"'], "crawl.base_url", "control characters (U+0007)"),
    (["crawl.base_url=http://example.com/?tag=x"], "crawl.base_url", "without '?' or '#'"),
    (["crawl.base_url=http://example.com#top"], "crawl.base_url", "without '?' or '#'"),
    (["crawl.base_url=http://user:pw@example.com"], "crawl.base_url", "user name or password"),
    (["crawl.base_url=http://example.com:99999"], "crawl.base_url", "invalid port"),
    (["crawl.base_url=javascript:alert(1)"], "crawl.base_url", "must start with http:// or https://"),
    (['crawl.tag=""'], "crawl.tag", "must not be empty"),
    (['crawl.tag=" Blobs"'], "crawl.tag", "leading or trailing blanks"),
    (['crawl.tag="Blobs\\n"'], "crawl.tag", "control characters (U+000A)"),
    (['crawl.tag="Blo\\u202ebs"'], "crawl.tag", "control characters (U+202E)"),
    ([f"crawl.tag={'x' * 300}"], "crawl.tag", "300 characters long; at most 200"),
])
def test_bad_tags_and_base_urls_exit_2_naming_the_field(sets, field, says, capsys):
    from flows.cli import main

    assert main(["config", *(a for s in sets for a in ("--set", s))]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"{field}: " in err and says in err, err


def test_file_names_from_a_tag_are_bounded_safe_and_unchanged_for_normal_tags():
    def name(tag: str, seq: int = 7) -> str:
        return file_name_for(ImageRecord(seq, "0" * 32, "u", "t", tag, 1, None))

    assert name("Blobs") == "Blobs_0000007.jpg"  # existing datasets keep their names
    assert name("Pepe Frog") == "Pepe_Frog_0000007.jpg" and name("_x_") == "x_0000007.jpg"
    assert name("-rf /") == "rf_0000007.jpg" and name("../..") == "emoji_0000007.jpg"
    assert name("絵文字") == "emoji_0000007.jpg"
    long = name("x" * 300, seq=12345678)
    assert long == "x" * 64 + "_12345678.jpg" and len(long.encode()) <= 80


def test_a_long_tag_from_an_earlier_run_no_longer_sticks_the_directory(tmp_path):
    # A ledger whose images carry a 300-character tag (written before tags were bounded).
    items = [item(1), item(2)]
    cat = Catalog(tmp_path)
    with DemoSite(items) as site:
        listing = listing_of(site)
        download_new(crawl_cfg(site), cat, listing.__class__("x" * 300, listing.pages, listing.items,
                                                             origins=listing.origins), progress=False)
    summary = convert_dataset(ConvertConfig(), cat, progress=False)
    assert summary.dataset_rows == 2
    assert sorted(images_in(tmp_path)) == ["x" * 64 + "_0000001.jpg", "x" * 64 + "_0000002.jpg"]


# -- what the command line shows -------------------------------------------------------------------------

TWO_RUNS = """
import sys
from flows.cli import main
common = ["run", "--until", "crawl", "--no-progress", "--set", "crawl.max_requests_per_second=0",
          "--set", "crawl.empty_page_settle_s=1.0"]
first = main([*common, "--data-dir", sys.argv[1], "--base-url", sys.argv[2]])
print("=" * 20, file=sys.stderr, flush=True)
second = main([*common, "--data-dir", sys.argv[3], "--base-url", sys.argv[4], "--debug"])
print(first, second)
"""


def _without_trailing_log(stderr: str) -> list[str]:
    """stderr's lines without Prefect's log lines after the command's last (the temporary server stopping)."""
    lines = stderr.strip().splitlines()
    while lines and re.match(r"\d\d:\d\d:\d\d\.\d+ \| ", lines[-1]):
        lines.pop()
    return lines


@pytest.mark.slow
def test_cli_a_rate_limited_run_and_an_unreachable_site_exit_non_zero_in_one_line(tmp_path):
    # Run 1: every image answers 429 (Retry-After 3600). Run 2 (with --debug): the site's port is closed.
    # One process (one temporary Prefect server) for both; each ends with one line on stderr.
    closed = f"http://127.0.0.1:{closed_port()}"
    with DemoSite([item(i, "429") for i in range(1, 4)], retry_after="3600") as site:
        r = subprocess.run([sys.executable, "-c", TWO_RUNS, str(tmp_path / "a"), site.base_url, str(tmp_path / "b"),
                            closed], capture_output=True, text=True, timeout=400)
    assert r.stdout.split()[-2:] == ["1", "1"], r.stderr[-3000:]
    limited, unreachable = (_without_trailing_log(part) for part in r.stderr.split("=" * 20))
    assert limited[-1].startswith("emoji-sd: crawl failed: the site answered 429 Too Many Requests to "
                                  "every image (3 URLs tried)") and "crawl.max_retry_after_s" in limited[-1]
    reason = (f"listing page {closed}/emoji-list/tag/Blobs?page=1 could not be loaded: connection refused "
              f"(net::ERR_CONNECTION_REFUSED); check crawl.base_url = {closed}")
    # the same line as without --debug, which adds the traceback of the stage's error:
    assert unreachable[-1].startswith(f"emoji-sd: crawl failed: {reason} (report: ")
    assert f"sd_core.ingest.browser.SiteUnreachable: {reason}" in unreachable
    cli = unreachable[max(i for i, line in enumerate(unreachable) if "Finished in state Failed" in line) + 1:]
    assert cli[0].startswith("Traceback") and any("WebDriverException" in line for line in cli)  # chained
    assert not limited[-2].startswith("sd_core.ingest")  # no traceback without --debug
