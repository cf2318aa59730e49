"""The demo site at scale: how long the lazily drawn site takes to build and start, its memory, the first
request of an image (drawn then), and the listing walk's seconds per page in Chromium.

    .venv/bin/python benchmarks/demo_site.py [--items 1000 10000 50000] [--pages 20] [--images 50]

Each size runs in its own process (its peak RSS is its own). For each: ``build_s`` (build_demo_items(lazy=True),
the font's glyph table included), ``start_s`` (DemoSite up), ``rss_mib`` (peak RSS after the images below were
served), ``image_ms`` (mean of ``--images`` first requests: each drawn, encoded and sent), and the walk of
``--pages`` pages from page 1 and from the middle of the listing (``walk_s_per_page``, browser start
excluded: one page's walk is timed apart and subtracted). :func:`lazy_demo_site` is the site used, for
other benchmarks (``benchmarks/scale.py``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from _common import in_child, peak_rss_mib


def lazy_demo_site(n: int, *, seed: int = 0, **site_kw: Any):  # type: ignore[no-untyped-def]
    """A :class:`DemoSite` (not started) listing ``n`` demo emoji drawn when first requested, and the seconds
    it took to build. The same paths, titles and bytes as ``build_demo_items(n, seed=seed)``."""
    from sd_core.demo.emoji_art import build_demo_items
    from sd_core.demo.site import DemoSite

    start = time.perf_counter()
    items = build_demo_items(n, seed=seed, lazy=True)
    site = DemoSite(items, **site_kw)
    return site, time.perf_counter() - start


def _walk_seconds(site, pages: int, start_page: int) -> float:  # type: ignore[no-untyped-def]
    from sd_core.ingest.crawl import list_site
    from sd_core.ingest.settings import CrawlConfig

    cfg = CrawlConfig(base_url=site.base_url, max_requests_per_second=0, empty_page_settle_s=1.0,
                      start_page=start_page, max_pages=pages)
    listing = list_site(cfg, progress=False)
    assert listing.pages == pages, listing.walk
    return listing.seconds


def measure(n: int, pages: int, images: int) -> dict[str, float]:
    import requests

    site, build_s = lazy_demo_site(n)
    start = time.perf_counter()
    site.start()
    start_s = time.perf_counter() - start
    try:
        step = max(len(site.items) // images, 1)
        picked = site.items[::step][:images]
        start = time.perf_counter()
        for item in picked:
            r = requests.get(site.image_url(item), timeout=60)
            assert r.status_code == 200 and len(r.content) > 0
        image_ms = 1000 * (time.perf_counter() - start) / len(picked)
        one = _walk_seconds(site, 1, 1)
        top = (_walk_seconds(site, pages, 1) - one) / (pages - 1)
        middle_page = max(min(site.n_pages // 2, site.n_pages - pages + 1), 1)
        middle = (_walk_seconds(site, pages, middle_page) - one) / (pages - 1)
    finally:
        site.stop()
    return {"items": n, "pages_listed": site.n_pages, "build_s": build_s, "start_s": start_s,
            "rss_mib": peak_rss_mib(), "image_ms": image_ms, "walk_one_page_s": one,
            "walk_s_per_page_top": top, "walk_s_per_page_middle": middle}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, nargs="+", default=[1000, 10_000, 50_000])
    ap.add_argument("--pages", type=int, default=20)
    ap.add_argument("--images", type=int, default=50)
    args = ap.parse_args()
    for n in args.items:
        r = in_child(measure, n, args.pages, args.images)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
