"""Crawl and convert end to end: real headless Chromium, a site served on 127.0.0.1, real Prefect flows."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from pathlib import Path

import pytest
from imagegen import animated, emoji, encode
from PIL import Image

from sd_core.config import load_config
from sd_core.demo.emoji_art import SiteItem
from sd_core.demo.site import DemoSite
from sd_core.store.catalog import Catalog

RED, BLUE, GREEN, YELLOW, PURPLE = (220, 30, 30), (30, 60, 220), (30, 180, 60), (240, 200, 20), (140, 40, 200)


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def make_items() -> dict[str, SiteItem]:
    """Every case the crawler must handle, newest first as the site lists them."""
    red = encode(emoji(RED), "WEBP", lossless=True)
    items = {
        "reupload": SiteItem("/emoji/0000006.webp", "Red Blob Copy", red, "image/webp"),
        "red": SiteItem("/emoji/0000001.webp", "Red Blob", red, "image/webp"),
        "blue": SiteItem("/emoji/0000002.png", "Blue Square", encode(emoji(BLUE, shape="square"), "PNG"), "image/png"),
        "gif": SiteItem("/emoji/0000003.gif", "Blob Dance", animated("GIF", [GREEN, YELLOW, GREEN]), "image/gif"),
        "awebp": SiteItem("/_next/image?url=%2Femoji%2F0000004.webp&w=128&q=75", "Blob Spin",
                          animated("WEBP", [PURPLE, RED]), "image/webp"),
        "jpeg": SiteItem("/emoji/0000005.jpg", "Yellow Blob", encode(emoji(YELLOW), "JPEG", quality=90), "image/jpeg"),
        "gone": SiteItem("/emoji/0000007.webp", "Deleted Blob", encode(emoji(GREEN, mark=9), "WEBP"), "image/webp",
                         fault="404"),
        "flaky": SiteItem("/emoji/0000008.webp", "Flaky Blob", encode(emoji(BLUE, mark=3), "WEBP"), "image/webp",
                          fault="500-once"),
        "truncated": SiteItem("/emoji/0000009.webp", "Broken Blob",
                              encode(emoji(PURPLE, size=128, mark=5), "WEBP", quality=95), "image/webp",
                              fault="truncated"),
        "truncated_anim": SiteItem("/emoji/0000010.gif", "Broken Dance",
                                   animated("GIF", [RED, GREEN, BLUE, YELLOW], size=96), "image/gif",
                                   fault="truncated"),
    }
    return items


GOOD = ("red", "blue", "gif", "awebp", "jpeg", "flaky")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def config(site: DemoSite, data_dir: Path, **crawl):
    return load_config(overrides={
        "data_dir": str(data_dir),
        "crawl.base_url": site.base_url,
        "crawl.max_requests_per_second": 0,
        "crawl.backoff_s": 0.05,
        "crawl.empty_page_settle_s": 1.0,
        **{f"crawl.{k}": v for k, v in crawl.items()},
    })


@pytest.fixture()
def site():
    items = make_items()
    with DemoSite(list(items.values()), per_page=4, render_delay_ms=300) as s:
        s.cases = items
        yield s


def test_crawl_and_convert_flow(site, tmp_path, prefect_harness):
    from flows.pipeline import pipeline

    cfg = config(site, tmp_path)
    crawl, convert = pipeline(cfg, until="convert", progress=False)[:2]
    cat = Catalog(tmp_path)
    cases = site.cases

    # Every listed URL was requested exactly once by us and never by the browser;
    # the flaky one twice (500, then a retry), the 404 once (never retried).
    expected_gets = {it.path: 1 for it in cases.values()}
    expected_gets[cases["flaky"].path] = 2
    assert dict(site.image_gets) == expected_gets
    assert not site.browser_image_gets
    assert crawl.summary["pages"] == 3
    assert crawl.summary["listed"] == 10
    assert crawl.summary["new_images"] == 8  # six good + two truncated, before convert looks at them
    assert crawl.summary["duplicates"] == 1
    assert crawl.summary["failed"] == {"HTTP 404": 1}

    rows = read_csv(cat.metadata_csv)
    assert {r["md5"] for r in rows} == {md5(cases[k].body) for k in GOOD}
    by_md5 = {r["md5"]: r for r in rows}
    for k in GOOD:
        row = by_md5[md5(cases[k].body)]
        assert row["image_url"] == site.base_url + cases[k].path
        assert row["image_title"] == cases[k].title
        assert row["tag"] == "Blobs"
        assert re.fullmatch(r"images/Blobs_\d{7}\.jpg", row["file_name"])  # relative to metadata.csv
        img = Image.open(cat.image_path(row["file_name"]))
        assert img.format == "JPEG" and img.mode == "RGB"
    assert by_md5[md5(cases["gif"].body)]["animated"] == "True"
    assert by_md5[md5(cases["awebp"].body)]["animated"] == "True"
    assert len({r["file_name"] for r in rows}) == len(rows)
    # Numbered oldest first (the listing is newest first), so a refresh appends.
    assert [r["image_title"] for r in rows] == [cases[k].title for k in reversed(GOOD)]

    # Transparency flattened on white: the corner of the red disc is white, its centre red.
    red = Image.open(cat.image_path(by_md5[md5(cases["red"].body)]["file_name"]))
    assert all(c > 245 for c in red.getpixel((1, 1)))
    r, g, b = red.getpixel((40, 40))
    assert r > 200 and g < 60 and b < 60

    # Truncated downloads are quarantined with their reason, an animation whose first frame survived too.
    quarantine = {q["image_title"]: q for q in read_csv(cat.quarantine_csv)}
    assert set(quarantine) == {"Broken Blob", "Broken Dance"}
    for key, fmt in (("truncated", "WEBP"), ("truncated_anim", "GIF")):
        q = quarantine[cases[key].title]
        assert q["md5"] == md5(cases[key].body[: len(cases[key].body) // 2])
        assert q["reason"].startswith(f"undecodable {fmt}")
        assert (cat.quarantine_dir / q["md5"]).exists()
    dups = read_csv(cat.duplicates_csv)
    assert [(d["image_title"], d["original_title"]) for d in dups] == [("Red Blob Copy", "Red Blob")]
    assert convert.summary["dataset_rows"] == 6 and convert.summary["quarantined"] == 2

    # A second run with nothing new fetches nothing and redoes nothing.
    before = {p: p.read_bytes() for p in cat.images_dir.iterdir()}
    site.reset_counts()
    crawl2, convert2 = pipeline(cfg, until="convert", progress=False)[:2]
    assert site.total_image_gets() == 0 and not site.browser_image_gets
    assert (crawl2.status, convert2.status) == ("reused", "reused")
    # newest first: the refresh stopped after two pages of known URLs, and says so
    assert (crawl2.summary["walk"], crawl2.summary["pages"], site.page_gets) == ("partial", 2, 2)
    assert crawl2.summary["listed"] == 10
    assert {p: p.read_bytes() for p in cat.images_dir.iterdir()} == before

    # New emoji appear at the top of the listing and push the rest to later pages:
    # the rerun fetches exactly them and leaves every earlier file as it was.
    new = [
        SiteItem(f"/emoji/00001{i:02d}.webp", f"New Blob {i}", encode(emoji(c, shape="square", mark=i), "WEBP"),
                 "image/webp")
        for i, c in enumerate([GREEN, YELLOW, RED, BLUE, PURPLE])
    ]
    site.prepend(new)
    crawl3, convert3 = pipeline(cfg, until="convert", progress=False)[:2]
    assert dict(site.image_gets) == {it.path: 1 for it in new}
    assert crawl3.summary["walk"] == "partial" and crawl3.summary["walk_ended"].startswith("page 4: 2 pages")
    assert crawl3.summary["pages"] == 4 and crawl3.summary["new_images"] == 5 and crawl3.summary["duplicates"] == 0
    assert convert3.summary["converted"] == 5
    rows3 = read_csv(cat.metadata_csv)
    assert {r["md5"] for r in rows3} == {md5(cases[k].body) for k in GOOD} | {md5(n.body) for n in new}
    assert all(p.read_bytes() == b for p, b in before.items())
    assert [r["image_title"] for r in rows3[6:]] == [n.title for n in reversed(new)]


def test_listing_waits_for_javascript_and_stops_past_the_end(site):
    from sd_core.ingest.crawl import list_site

    cfg = config(site, Path("unused")).crawl
    listing = list_site(cfg, progress=False)
    assert listing.pages == 3
    assert [t for _, t, _ in listing.items] == [it.title for it in site.cases.values()]
    assert [p for _, _, p in listing.items] == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert site.total_image_gets() == 0 and not site.browser_image_gets  # the browser never loads an image

    capped = list_site(cfg.model_copy(update={"max_pages": 2}), progress=False)
    assert capped.pages == 2 and len(capped.items) == 8
    assert [u for u, _, _ in listing.items] == [site.base_url + it.path for it in site.cases.values()]

    # selectors that match nothing: one line naming them and the page (not an empty listing)
    from sd_core.ingest.crawl import ListingError

    with pytest.raises(ListingError, match=r"listing page .*\?page=1 shows no items: check crawl\.container_selector "
                                           r"= 'div\.FS5UE28h\.container', crawl\.item_selector = "
                                           r"'div\.not-on-this-site', crawl\.image_selector = "):
        list_site(cfg.model_copy(update={"item_selector": "div.not-on-this-site"}), progress=False)


def test_convert_handles_formats_and_refuses_bad_bytes():
    from sd_core.ingest.convert import ConvertConfig, QuarantineError, to_rgb_jpeg

    cfg = ConvertConfig()
    palette = emoji(RED).convert("RGB").quantize(16)
    palette.info["transparency"] = palette.getpixel((0, 0))
    on_white = Image.new("RGB", (64, 64), "white")
    on_white.paste(emoji(RED), mask=emoji(RED))
    for data, fmt, animated_ in [
        (encode(emoji(RED), "WEBP"), "WEBP", False),
        (encode(emoji(RED), "PNG"), "PNG", False),
        (encode(palette, "GIF", transparency=palette.getpixel((0, 0))), "GIF", False),
        (animated("GIF", [RED, BLUE]), "GIF", True),
        (animated("WEBP", [RED, BLUE]), "WEBP", True),
        (encode(on_white, "JPEG"), "JPEG", False),
    ]:
        out = to_rgb_jpeg(data, cfg)
        img = Image.open(io.BytesIO(out.jpeg))
        assert (img.format, img.mode, out.source_format, out.animated) == ("JPEG", "RGB", fmt, animated_)
        assert all(c > 240 for c in img.getpixel((0, 0)))  # transparent corner flattened on white
        r, g, b = img.getpixel((32, 40))
        assert r > 180 and g < 80 and b < 80  # first frame's colour
    for bad, reason in [
        (b"", "empty file"),
        (b"<html>not an image</html>", "not an image"),
        (encode(emoji(RED), "PNG")[:200], "undecodable PNG"),
    ]:
        with pytest.raises(QuarantineError, match=reason):
            to_rgb_jpeg(bad, cfg)
    with pytest.raises(QuarantineError, match="decompression bomb"):
        to_rgb_jpeg(encode(Image.new("RGB", (300, 300)), "PNG"), ConvertConfig(max_image_pixels=50_000))
    black = to_rgb_jpeg(encode(emoji(RED), "PNG"), ConvertConfig(background=(0, 0, 0)))
    assert all(c < 15 for c in Image.open(io.BytesIO(black.jpeg)).getpixel((0, 0)))


KILL_SCRIPT = """
import sys
from sd_core.config import load_config
from sd_core.ingest.crawl import download_new, list_site
from sd_core.store.catalog import Catalog
cfg = load_config(overrides={"data_dir": sys.argv[2], "crawl.base_url": sys.argv[1],
                             "crawl.max_requests_per_second": 15, "crawl.download_workers": 2,
                             "crawl.empty_page_settle_s": 1.0})
download_new(cfg.crawl, Catalog(cfg.data_dir), list_site(cfg.crawl, progress=False), progress=False)
"""


def test_killed_download_resumes_without_refetching(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from sd_core.demo.emoji_art import build_demo_items
    from sd_core.ingest.crawl import download_new, list_site
    from sd_core.ingest.ledger import Ledger

    items = build_demo_items(60, seed=3)
    with DemoSite(items, per_page=36) as site:
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, site.base_url, str(tmp_path)])
        deadline = time.monotonic() + 60
        while site.total_image_gets() < 20 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert 20 <= site.total_image_gets() < 60, "the run was not killed mid-download"
        first = dict(site.image_gets)
        with Ledger(Catalog(tmp_path).ledger_db) as ledger:
            recorded = ledger.counts()["ok"]
        assert recorded >= 18

        site.reset_counts()
        cfg = config(site, tmp_path).crawl
        summary = download_new(cfg, Catalog(tmp_path), list_site(cfg, progress=False), progress=False)
        assert summary.already_known == recorded
        assert site.total_image_gets() == 60 - recorded  # only what the killed run had not recorded
        assert all(first.get(p, 0) + n <= 2 for p, n in site.image_gets.items())
        assert not site.browser_image_gets
    assert not list(tmp_path.rglob("*.tmp"))
    with Ledger(Catalog(tmp_path).ledger_db) as ledger:
        assert {r.md5 for r in ledger.images()} == {md5(it.body) for it in items}
