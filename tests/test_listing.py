"""The listing side of a refresh: incremental walks of a newest-first site, periodic and forced full walks,
listings that cannot be trusted (a changed layout, a listing that shrank), and walks cut by the page limit or
the deadline. Real Chromium against the demo site on 127.0.0.1; time is passed in, never slept."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest

from sd_core.demo.emoji_art import build_demo_items, build_growth_items
from sd_core.demo.site import DemoSite
from sd_core.ingest.crawl import Listing, ListingError, download_new, refresh_listing
from sd_core.ingest.settings import MAX_PAGES_CEILING, CrawlConfig
from sd_core.store.catalog import Catalog

T0 = datetime(2025, 1, 1, 3, 0, tzinfo=timezone.utc)


def crawl_cfg(site: DemoSite, **kw) -> CrawlConfig:
    return CrawlConfig(base_url=site.base_url, max_requests_per_second=0, backoff_s=0.05, empty_page_settle_s=1.0,
                       **kw)


def refresh(site: DemoSite, cat: Catalog, cfg: CrawlConfig, now: datetime, **kw) -> Listing:
    """One crawl stage as the pipeline runs it: the listing, then the downloads of what it lists."""
    site.reset_counts()
    listing = refresh_listing(cfg, cat, now=now, progress=False, **kw)
    download_new(cfg, cat, listing, progress=False)
    return listing


def urls(site: DemoSite, items) -> set[str]:
    return {site.base_url + it.path for it in items}


@pytest.mark.slow
def test_refresh_walks_only_the_new_pages_and_full_walks_see_removals(tmp_path):
    cat = Catalog(tmp_path)
    items = build_demo_items(42, seed=2)
    with DemoSite(items, per_page=6, render_delay_ms=50) as site:
        cfg = crawl_cfg(site)
        first = refresh(site, cat, cfg, T0)
        assert (first.walk.kind, first.walk.why) == ("full", "no previous listing")
        assert first.walk.pages == 7 and site.page_gets == 8  # every page, and the empty one after the last
        assert first.full_walk_at == T0.isoformat(timespec="seconds")

        # 3 new emoji on page 1: the refresh reads page 1 (new URLs), pages 2 and 3 (known) and stops
        new = build_growth_items(3, seed=2, after=42)
        site.prepend(new)
        grown = refresh(site, cat, cfg, T0 + timedelta(days=1))
        assert grown.walk.kind == "partial" and "last complete walk was 1.0 days ago" in grown.walk.why
        assert grown.walk.pages == 3 and site.page_gets == 3
        assert "page 3: 2 pages in a row held only URLs the ledger knows" in grown.walk.ended
        assert set(site.image_gets) == {it.path for it in new}  # only the new emoji are downloaded
        # the listing is the walked pages, then the rest of the last listing: nothing unwalked counts as removed
        assert set(grown.unique_urls) == urls(site, site.items) and len(grown.unique_urls) == 45
        assert grown.full_walk_at == first.full_walk_at
        saved = Listing.load(cat.listing_json)
        assert (saved.items, saved.walk, saved.full_walk_at) == (grown.items, grown.walk, grown.full_walk_at)
        assert json.loads(cat.listing_json.read_text())["walk"]["kind"] == "partial"

        # an emoji removed from an old page: a partial walk cannot see it ...
        removed = site.page_items(6)[2]
        site.remove([removed.path])
        partial = refresh(site, cat, cfg, T0 + timedelta(days=6))
        assert partial.walk.kind == "partial" and site.page_gets == 2  # nothing new: pages 1 and 2 only
        assert site.base_url + removed.path in partial.unique_urls

        # ... the periodic full walk does, once crawl.full_walk_every has passed since the last one
        periodic = refresh(site, cat, cfg, T0 + timedelta(days=7, hours=1))
        assert periodic.walk.kind == "full" and periodic.walk.pages == 8
        assert periodic.walk.why == "the last complete walk was 7.0 days ago (crawl.full_walk_every = 7.0 days)"
        assert set(periodic.unique_urls) == urls(site, site.items) and len(periodic.unique_urls) == 44
        assert periodic.full_walk_at == (T0 + timedelta(days=7, hours=1)).isoformat(timespec="seconds")

        # --full-listing forces one the next day; a site that is not newest first always gets one
        forced = refresh(site, cat, cfg, T0 + timedelta(days=8), full=True)
        assert (forced.walk.kind, forced.walk.why, site.page_gets) == ("full", "asked for (--full-listing)", 9)
        unordered = crawl_cfg(site, newest_first=False)
        listing = refresh(site, cat, unordered, T0 + timedelta(days=9))
        assert (listing.walk.kind, listing.walk.why, site.page_gets) == ("full", "crawl.newest_first = false", 9)
        # a shorter period makes the next refresh a full one
        hourly = crawl_cfg(site, full_walk_every=3600)
        assert refresh(site, cat, hourly, T0 + timedelta(days=9, hours=2)).walk.kind == "full"


def test_a_changed_layout_fails_naming_the_selectors_and_keeps_the_listing(tmp_path):
    cat = Catalog(tmp_path)
    with DemoSite(build_demo_items(12, seed=5), per_page=6, render_delay_ms=50) as site:
        cfg = crawl_cfg(site)
        refresh(site, cat, cfg, T0)
        before = cat.listing_json.read_bytes()
        site.layout = "renamed"
        with pytest.raises(ListingError) as err:
            refresh_listing(cfg, cat, now=T0 + timedelta(days=1), progress=False)
        message = str(err.value)
        assert "\n" not in message and site.listing_url(1) in message
        for field in ("container_selector", "item_selector", "image_selector"):
            assert f"crawl.{field} = {getattr(cfg, field)!r}" in message
        assert "no element matches crawl.container_selector" in message
        assert cat.listing_json.read_bytes() == before

        # selectors for the new layout list it again
        fixed = cfg.model_copy(update={"container_selector": "div.q7XbW2ka",
                                       "item_selector": "div.Tn4cR8vd div.Jm2uE6sy"})
        assert len(refresh(site, cat, fixed, T0 + timedelta(days=1)).items) == 12


@pytest.mark.slow
def test_a_listing_that_shrank_by_more_than_max_shrink_fails_and_keeps_the_last(tmp_path):
    cat = Catalog(tmp_path)
    items = build_demo_items(48, seed=6)
    with DemoSite(items, per_page=6, render_delay_ms=50) as site:
        cfg = crawl_cfg(site)
        refresh(site, cat, cfg, T0)
        site.remove([it.path for it in items[:20]])  # 48 -> 28: a 42 % shrink passes the default 50 %
        assert len(refresh(site, cat, cfg, T0 + timedelta(days=8)).unique_urls) == 28
        site.remove([it.path for it in items[20:36]])  # 28 -> 12 on two pages
        before = cat.listing_json.read_bytes()
        with pytest.raises(ListingError, match=r"shrank from 28 to 12 unique URLs, by more than "
                                               r"crawl\.max_shrink = 0\.5; the last listing is kept"):
            refresh_listing(cfg, cat, now=T0 + timedelta(days=9), full=True, progress=False)
        assert cat.listing_json.read_bytes() == before
        # a partial walk (two known pages) is merged with the last listing, so it never looks like a shrink ...
        partial = refresh_listing(cfg, cat, now=T0 + timedelta(days=9), progress=False)
        assert partial.walk.kind == "partial" and partial.walk.pages == 2 and len(partial.unique_urls) == 28
        # ... nor does it become what a full walk is compared with: still the last complete listing's 28
        with pytest.raises(ListingError, match="shrank from 28 to 12"):
            refresh_listing(cfg, cat, now=T0 + timedelta(days=9), full=True, progress=False)
        accepted = refresh_listing(crawl_cfg(site, max_shrink=1.0), cat, now=T0 + timedelta(days=9), full=True,
                                   progress=False)
        assert len(accepted.unique_urls) == 12 and Listing.load(cat.listing_json).items == accepted.items


def test_an_endless_listing_is_cut_and_what_was_listed_is_downloaded(tmp_path):
    """A listing with new URLs on every page (20,000 lazily drawn emoji, 4 a page) ends at crawl.max_pages or
    at the deadline; what the walk read is kept and downloaded."""
    assert CrawlConfig().max_pages == MAX_PAGES_CEILING == 10_000
    cat = Catalog(tmp_path)
    with DemoSite(build_demo_items(20_000, seed=1, lazy=True), per_page=4, render_delay_ms=50) as site:
        capped = refresh(site, cat, crawl_cfg(site, max_pages=3), T0)
        assert capped.walk.pages == 3 and capped.walk.cut == "the page limit crawl.max_pages = 3 was reached"
        assert capped.full_walk_at is None  # a cut walk is not a complete one: the next walk is full again
        assert len(capped.unique_urls) == 12 and set(site.image_gets) == {it.path for it in site.items[:12]}
        assert capped.walk_summary()["alert"].startswith("the listing walk was cut: the page limit")

        start = time.monotonic()
        timed = refresh(site, cat, crawl_cfg(site, listing_deadline_s=6.0), T0 + timedelta(hours=1))
        assert time.monotonic() - start < 6.0 + 30  # the listing stops at 6 s; the downloads follow
        assert timed.walk.kind == "full" and timed.walk.why == "no complete walk recorded"
        assert timed.walk.cut == f"crawl.listing_deadline_s = 6s passed after {timed.walk.pages} page(s)"
        assert 1 <= timed.walk.pages < 100
        walked = {site.base_url + it.path for it in site.items[: 4 * timed.walk.pages]}
        assert walked <= set(timed.unique_urls)  # merged with the capped listing: nothing lost
        assert {site.base_url + p for p in site.image_gets} == walked - set(capped.unique_urls)
        assert all(site.image_done[p] == 1 for p in site.image_gets)  # each answered in full


def test_lazy_demo_items_are_the_eager_ones_and_50000_build_in_seconds():
    eager = build_demo_items(60, seed=3)
    lazy = build_demo_items(60, seed=3, lazy=True)
    assert [(i.path, i.title, i.content_type) for i in lazy] == [(i.path, i.title, i.content_type) for i in eager]
    assert all(not i.body for i in lazy) and [i.image_bytes() for i in lazy] == [i.body for i in eager]
    assert [i.image_bytes() for i in build_growth_items(4, seed=3, after=60, lazy=True)] == \
        [i.body for i in build_growth_items(4, seed=3, after=60)]

    start = time.perf_counter()
    big = build_demo_items(50_000, seed=0, lazy=True)
    took = time.perf_counter() - start
    assert took < 30, f"50,000 lazy items took {took:.1f}s"
    assert len({i.path for i in big}) == 50_000 and big[-1].path.startswith(("/emoji/0000001.", "/_next/"))
    with DemoSite(big[:100] + big[-50:], per_page=36) as site:
        import requests

        got = requests.get(site.image_url(big[3]), timeout=30)
        assert got.status_code == 200 and got.content == big[3].image_bytes()
        assert got.headers["Content-Type"] == big[3].content_type


def pipeline_config(site: DemoSite, data_dir, *sets: str):
    from sd_core.config import load_config

    return load_config(sets=list(sets), overrides={
        "data_dir": str(data_dir), "crawl.base_url": site.base_url, "crawl.max_requests_per_second": 0,
        "crawl.empty_page_settle_s": 1.0})


def cli_error(err: str) -> str:
    """The CLI's own message: the one line of stderr that is not Prefect's log, and the last one."""
    ours = [line for line in err.splitlines() if line.startswith("emoji-sd:")]
    assert len(ours) == 1 and err.strip().splitlines()[-1] == ours[0], err[-3000:]
    return ours[0]


def cli_run(site: DemoSite, data_dir, *args: str) -> list[str]:
    return ["run", "--data-dir", str(data_dir), "--base-url", site.base_url, "--until", "convert", "--no-progress",
            "--set", "crawl.max_requests_per_second=0", "--set", "crawl.empty_page_settle_s=1", *args]


@pytest.mark.slow
def test_a_failed_stage_fails_the_run_and_shows_in_the_report_and_status(tmp_path, prefect_harness, capsys):
    """Any stage that raises: recorded as failed with its reason, later stages not run, the report written with
    the failure on top, `status` showing it, the flow Failed (so a scheduled run notifies) and the CLI exiting
    1 with one line. The stage's last good record stays and the next success clears the failure."""
    from flows.cli import main
    from flows.pipeline import pipeline
    from sd_core.status import stage_status
    from sd_core.store.records import StageFailed, load_failure, load_stage

    cat = Catalog(tmp_path)
    with DemoSite(build_demo_items(12, seed=8), per_page=6, render_delay_ms=50) as site:
        cfg = pipeline_config(site, tmp_path)
        first = pipeline(cfg, until="convert", progress=False)
        crawled, listing = load_stage(cat, "crawl"), cat.listing_json.read_bytes()
        assert first[0].summary["walk"] == "full" and first[0].summary["walk_why"] == "no previous listing"

        # the site changed its layout: the crawl fails naming the selectors, and nothing after it runs
        site.layout = "renamed"
        state = pipeline(cfg, until="convert", progress=False, return_state=True)
        assert state.is_failed()
        error = state.result(raise_on_failure=False)
        assert isinstance(error, StageFailed) and "\n" not in str(error)
        assert str(error).startswith(f"crawl failed: listing page {site.listing_url(1)} shows no items")
        assert f"crawl.item_selector = {cfg.crawl.item_selector!r}" in str(error)
        assert str(error).endswith(f"(report: {cat.report_html})")
        assert cat.listing_json.read_bytes() == listing and load_stage(cat, "crawl") == crawled
        failure = load_failure(cat, "crawl")
        assert failure.status == "failed" and failure.summary["error"] == "ListingError"
        report = cat.report_html.read_text()
        assert report.index("This run failed") < report.index("<h2>Stages</h2>")
        assert "crawl.container_selector" in report and "not run: crawl failed" in report
        rows = {r.stage: r for r in stage_status(cfg)}
        assert rows["crawl"].state == "failed" and "shows no items" in rows["crawl"].detail
        assert rows["convert"].state == "cached"

        # the CLI: exit 1 and one line; `status` shows the failed stage and why
        capsys.readouterr()
        assert main(cli_run(site, tmp_path)) == 1
        err = cli_error(capsys.readouterr().err)
        assert err.startswith(f"emoji-sd: crawl failed: listing page {site.listing_url(1)} shows no items")
        assert main(["status", "--data-dir", str(tmp_path)]) == 0
        crawl_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("crawl"))
        assert crawl_line.split()[1] == "failed" and "crawl.image_selector" in crawl_line

        # any exception from any stage is handled the same way: here convert's state file cannot be read
        site.layout = "discords"
        cat.convert_state.unlink()
        cat.convert_state.mkdir()
        assert main(cli_run(site, tmp_path)) == 1
        err = cli_error(capsys.readouterr().err)
        assert err.startswith("emoji-sd: convert failed: IsADirectoryError: ") and str(cat.convert_state) in err
        assert load_failure(cat, "crawl") is None and load_failure(cat, "convert").status == "failed"

        # fixed: the run succeeds, the failure is cleared; a page limit cuts the walk, and it says so
        cat.convert_state.rmdir()
        assert main(cli_run(site, tmp_path, "--full-listing", "--set", "crawl.max_pages=1")) == 0
        out = capsys.readouterr().out
        assert "walk=full, walk_why=asked for (--full-listing), pages=1" in out
        assert load_failure(cat, "convert") is None
        assert "the listing walk was cut: the page limit crawl.max_pages = 1 was reached" in load_stage(
            cat, "crawl").summary["alert"]
        report = cat.report_html.read_text()
        assert "This run failed" not in report and report.index("Alerts") < report.index("<h2>Stages</h2>")
        assert {r.stage: r.state for r in stage_status(cfg)}["convert"] == "cached"


def test_old_damaged_and_foreign_listings_lead_to_a_full_walk(tmp_path):
    from sd_core.ingest.crawl import choose_walk

    cat = Catalog(tmp_path)
    cfg = CrawlConfig(base_url="http://127.0.0.1:9")
    cat.listing_json.parent.mkdir(parents=True)
    # written before walks were recorded: read as a walk of unknown age
    cat.listing_json.write_text(json.dumps({"tag": "Blobs", "pages": 1, "seconds": 1.0, "origins": [],
                                            "items": [["http://127.0.0.1:9/a.png", "A", 1]]}))
    old = Listing.load(cat.listing_json)
    assert old.full_walk_at is None and old.same_listing(cfg)
    assert choose_walk(cfg, old, full=False, now=T0) == ("full", "no complete walk recorded")
    recent = Listing("Blobs", 1, old.items, base_url=cfg.base_url, full_walk_at=T0.isoformat())
    assert choose_walk(cfg, recent, full=False, now=T0 + timedelta(hours=3))[0] == "partial"
    other = cfg.model_copy(update={"tag": "Cats"})
    assert choose_walk(other, recent, full=False, now=T0)[1].startswith("the previous listing is of another tag")
    cat.listing_json.write_text('{"tag": "Blobs", "pages": 1, "items": [["trunc')
    with pytest.raises(ValueError, match=f"{cat.listing_json} is damaged"):
        Listing.load(cat.listing_json)


def test_a_raising_stage_is_recorded_apart_from_its_last_good_record(tmp_path):
    from sd_core.runtime.running import run_stage
    from sd_core.store.records import load_failure, load_stage, record_stage

    cat = Catalog(tmp_path)
    good = run_stage(cat, "convert", lambda: record_stage(cat, "convert", key="k1", summary={"n": 1}, seconds=1.0,
                                                          ran=True))

    def broken():
        raise KeyError("metadata")

    def interrupted():
        raise KeyboardInterrupt

    failed = run_stage(cat, "convert", broken)
    assert failed.status == "failed" and failed.key == "k1"
    assert failed.summary == {"reason": "KeyError: 'metadata'", "error": "KeyError"}
    assert failed.line().startswith("convert: failed after ") and failed.line().endswith(": KeyError: 'metadata'")
    assert failed.alerts() == ["convert failed: KeyError: 'metadata'"]
    assert load_stage(cat, "convert") == good and load_failure(cat, "convert") == failed
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C is not a failure of the stage: it stops the run
        run_stage(cat, "convert", interrupted)
    run_stage(cat, "convert", lambda: load_stage(cat, "convert"))  # a reuse without a new record clears it too
    assert load_failure(cat, "convert") is None
