"""report.html at scale: its size and render time, and what headless Chromium shows of it.

Copies a data directory the pipeline made (its models, samples, stage records and images; not raw/, cache/ or
checkpoints), grows its metadata.csv to ``--items`` rows by repeating its real rows under new md5s (each new
row's image a hard link to the real one, so every picture on the page exists), writes report.html from the
copy's stage records as the report task does, and prints its size and seconds. With ``--screenshot PREFIX`` it
also saves ``PREFIX-top.png`` (the first screen at 1280×900) and ``PREFIX-full.png`` (the whole page) from
headless Chromium, with the page's load time.

    .venv/bin/python benchmarks/report_page.py --from DATA_DIR --items 10000 --out /tmp/report-10k \
        [--screenshot /tmp/report-10k]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import time
from pathlib import Path

from sd_core.config import STAGES
from sd_core.report.page import write_report
from sd_core.store.catalog import Catalog
from sd_core.store.metadata import read_metadata, update_metadata, write_metadata
from sd_core.store.records import load_failure, load_stage

SKIP = {"raw", "cache", "checkpoints", ".emoji-sd.lock"}


def copy_data_dir(src: Path, dst: Path) -> Catalog:
    """The data dir without its raw downloads, caches and checkpoints; files hard-linked where possible."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, ignore=lambda _, names: [n for n in names if n in SKIP], copy_function=link)
    return Catalog(dst)


def grow(catalog: Catalog, items: int) -> None:
    """metadata.csv grown to ``items`` rows: the real rows, then copies of them under new md5s and file names."""
    real = read_metadata(catalog)
    if not real or items <= len(real):
        return
    base = [{k: v for k, v in r.items() if k not in ("prompt", "captioner", "caption_flagged")} for r in real]
    rows, extra = list(base), {}
    for i in range(len(real), items):
        src = real[i % len(real)]
        name = f"Synthetic_{i:07d}.jpg"
        target = catalog.images_dir / name
        if not target.exists():
            os.link(catalog.image_path(src["file_name"]), target)
        md5 = hashlib.md5(f"synthetic {i}".encode()).hexdigest()
        rows.append({**base[i % len(real)], "file_name": catalog.image_file_name(name), "md5": md5,
                     "image_title": f"{src['image_title']} {i}"})
        extra[md5] = {c: src.get(c, "") for c in ("prompt", "captioner", "caption_flagged")}
    write_metadata(catalog, rows)
    update_metadata(catalog, extra)


def screenshot(page: Path, prefix: str, width: int = 1280, height: int = 900) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from sd_core.ingest.browser import BASE_ARGS

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in BASE_ARGS:
        if "imagesEnabled" not in arg and "window-size" not in arg:
            opts.add_argument(arg)
    opts.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(page.as_uri())
        load_ms = driver.execute_script(
            "const t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd - t.startTime")
        driver.save_screenshot(f"{prefix}-top.png")
        full = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": min(full, 16000), "deviceScaleFactor": 1, "mobile": False})
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        Path(f"{prefix}-full.png").write_bytes(base64.b64decode(shot["data"]))
        print(f"chromium: loaded in {load_ms:.0f} ms, page {full} px tall; {prefix}-top.png, {prefix}-full.png")
    finally:
        driver.quit()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="src", type=Path, required=True, help="a data directory the pipeline made")
    p.add_argument("--items", type=int, default=10_000, help="rows of metadata.csv in the copy")
    p.add_argument("--out", type=Path, required=True, help="where the copy goes (must not exist)")
    p.add_argument("--screenshot", help="save PREFIX-top.png and PREFIX-full.png from headless Chromium")
    args = p.parse_args()
    catalog = copy_data_dir(args.src, args.out)
    grow(catalog, args.items)
    results = [r for s in STAGES if (r := load_failure(catalog, s) or load_stage(catalog, s)) is not None]
    start = time.perf_counter()
    path = write_report(catalog, results)
    seconds = time.perf_counter() - start
    print(f"report.html: {len(read_metadata(catalog)):,} images, {path.stat().st_size:,} bytes, written in "
          f"{seconds:.2f} s ({path})")
    if args.screenshot:
        screenshot(path, args.screenshot)


if __name__ == "__main__":
    main()
