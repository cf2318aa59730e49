"""Wall time of a full pipeline run, a rerun with nothing changed, and a refresh after 5% new emoji,
on the demo site with the demo's settings (the embedded default).

    .venv/bin/python benchmarks/refresh.py [--items 240] [--grow 0.05] [--set KEY=VALUE ...]

``--set`` overrides the demo preset (e.g. ``--set train.steps=200`` for a quick look). The last line is
``rerun_fraction <rerun/full> refresh_fraction <refresh/full>``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import tasks  # noqa: F401  (Prefect defaults for offline use)
from flows.pipeline import pipeline
from sd_core.config import load_config, preset
from sd_core.demo_site import DemoSite, build_demo_items, build_growth_items


def timed(cfg, label: str) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    results = pipeline(cfg, progress=False)
    seconds = time.perf_counter() - start
    work = {r.stage: r.status for r in results}
    print(f"{label:8s} seconds={seconds:.1f} " + " ".join(f"{k}={v}" for k, v in work.items()), flush=True)
    return seconds


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
        full = timed(cfg, "full")
        rerun = timed(cfg, "rerun")
        site.prepend(build_growth_items(max(1, round(args.items * args.grow)), after=args.items))
        refresh = timed(cfg, "refresh")
    print(f"rerun_fraction {rerun / full:.3f} refresh_fraction {refresh / full:.3f}")


if __name__ == "__main__":
    main()
