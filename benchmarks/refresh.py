"""Wall time of a full pipeline run, a rerun with nothing changed, a rerun from caption after a new
caption prompt version, and a refresh after 5% new emoji, on the demo site with the demo's settings
(the embedded default).

    .venv/bin/python benchmarks/refresh.py [--items 240] [--grow 0.05] [--set KEY=VALUE ...]

``--set`` overrides the demo preset (e.g. ``--set train.steps=200`` for a quick look). Each run prints
its stages' status and the image GETs the site served; the prompt rerun also says whether the raw
bytes, images and latents on disk stayed byte-identical. The last line is
``rerun_fraction <rerun/full> refresh_fraction <refresh/full>``.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import tasks  # noqa: F401  (Prefect defaults for offline use)
from flows.pipeline import pipeline
from sd_core.config import load_config, preset
from sd_core.demo.emoji_art import build_demo_items, build_growth_items
from sd_core.demo.site import DemoSite
from sd_core.store.catalog import Catalog


def timed(cfg, label: str, site: DemoSite, **selection: str) -> float:  # type: ignore[no-untyped-def]
    site.reset_counts()
    start = time.perf_counter()
    results = pipeline(cfg, progress=False, **selection)
    seconds = time.perf_counter() - start
    work = {r.stage: r.status for r in results}
    print(f"{label:8s} seconds={seconds:.1f} image_gets={site.total_image_gets()} "
          + " ".join(f"{k}={v}" for k, v in work.items()), flush=True)
    return seconds


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=240)
    ap.add_argument("--grow", type=float, default=0.05)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, DemoSite(build_demo_items(args.items)) as site:
        cfg = load_config(base=preset("demo"), sets=args.sets,
                          overrides={"data_dir": str(Path(tmp) / "data"), "crawl.base_url": site.base_url})
        warm = cfg.model_copy(update={"data_dir": Path(tmp) / "warm-up"})
        pipeline(warm, only="crawl", progress=False)  # Prefect's server start-up: not timed
        full = timed(cfg, "full", site)
        rerun = timed(cfg, "rerun", site)
        cat = Catalog(cfg.data_dir)
        upstream = {"raw": cat.raw_dir, "images": cat.images_dir, "latents": cat.latent_store}
        before = {name: digests(d) for name, d in upstream.items()}
        prompt = cfg.model_copy(update={"caption": cfg.caption.model_copy(update={"prompt_version": "bench-v2"})})
        timed(prompt, "prompt", site, start="caption")
        print("prompt   byte_identical " + " ".join(f"{name}={digests(d) == before[name]}"
                                                    for name, d in upstream.items()), flush=True)
        site.prepend(build_growth_items(max(1, round(args.items * args.grow)), after=args.items))
        refresh = timed(prompt, "refresh", site)
    print(f"rerun_fraction {rerun / full:.3f} refresh_fraction {refresh / full:.3f}")


if __name__ == "__main__":
    main()
