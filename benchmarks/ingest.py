"""Ingest benchmark on the embedded demo site: listing pages/s, download images/s, GETs per image.

    .venv/bin/python benchmarks/ingest.py [--items 1224] [--per-page 36] [--grow 60]

Runs the crawl and convert stages (sd_core, no Prefect) three times on one data dir: a first
crawl, a rerun with nothing new, and a refresh after ``--grow`` new emoji appear at the top.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from sd_core.config import load_config
from sd_core.demo.emoji_art import build_demo_items, build_growth_items
from sd_core.demo.site import DemoSite
from sd_core.ingest.convert import convert_dataset
from sd_core.ingest.crawl import download_new, list_site
from sd_core.store.catalog import Catalog


def crawl_once(site: DemoSite, data_dir: Path, label: str) -> None:
    cfg = load_config(overrides={
        "data_dir": str(data_dir), "crawl.base_url": site.base_url, "crawl.max_requests_per_second": 0,
        "crawl.empty_page_settle_s": 1.0,
    })
    site.reset_counts()
    t0 = time.perf_counter()
    listing = list_site(cfg.crawl, progress=False)
    t1 = time.perf_counter()
    summary = download_new(cfg.crawl, Catalog(cfg.data_dir), listing, progress=False)
    t2 = time.perf_counter()
    conv = convert_dataset(cfg.convert, Catalog(cfg.data_dir), progress=False)
    t3 = time.perf_counter()
    gets = site.total_image_gets() + sum(site.browser_image_gets.values())
    listed = len(listing.unique_urls)
    print(
        f"{label:8s} pages={listing.pages} listed={listed} listing_s={t1 - t0:.1f} "
        f"pages_per_s={listing.pages / (t1 - t0):.2f} downloaded={summary.downloaded} "
        f"download_s={t2 - t1:.2f} images_per_s={summary.downloaded / max(t2 - t1, 1e-9):.0f} "
        f"convert_s={t3 - t2:.2f} converted={conv.converted} image_gets={gets} "
        f"browser_image_gets={sum(site.browser_image_gets.values())} "
        f"gets_per_listed_url={gets / max(listed, 1):.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1224)
    ap.add_argument("--per-page", type=int, default=36)
    ap.add_argument("--grow", type=int, default=60)
    args = ap.parse_args()
    items = build_demo_items(args.items)
    with tempfile.TemporaryDirectory() as tmp, DemoSite(items, per_page=args.per_page) as site:
        crawl_once(site, Path(tmp), "first")
        crawl_once(site, Path(tmp), "rerun")
        site.prepend(build_growth_items(args.grow, after=args.items))
        crawl_once(site, Path(tmp), "refresh")


if __name__ == "__main__":
    main()
