"""`emoji-sd`: run the pipeline, the embedded demo, or show the effective configuration."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from sd_core.config import STAGES, ConfigError, PipelineConfig, config_to_toml, load_config
from sd_core.fsio import DataDirBusy

DEMO_DATA_DIR = Path("data/demo")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (see `emoji-sd config`)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set crawl.max_pages=3 (repeatable)")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--until", choices=STAGES, default=STAGES[-1], help="last stage to run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--wait-for-lock", action="store_true",
                   help="wait for another run on the same data dir instead of stopping")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emoji-sd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline on a site")
    _config_args(run)
    run.add_argument("--data-dir", type=Path)
    run.add_argument("--base-url", help="site root, e.g. https://discords.com")
    run.add_argument("--tag", help="listing tag, e.g. Blobs")
    run.add_argument("--max-pages", type=int)
    _run_args(run)

    demo = sub.add_parser("demo", help="run the pipeline on the embedded demo site (offline)")
    _config_args(demo)
    demo.add_argument("--data-dir", type=Path, default=DEMO_DATA_DIR)
    demo.add_argument("--items", type=int, default=240, help="emoji listed on the demo site")
    demo.add_argument("--seed", type=int, default=0)
    _run_args(demo)

    show = sub.add_parser("config", help="print the effective configuration as TOML")
    _config_args(show)
    return parser


def _load(args: argparse.Namespace, overrides: dict[str, Any]) -> PipelineConfig:
    return load_config(args.config, overrides=overrides, sets=args.sets)


def _run_pipeline(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from sd_core.crawl.browser import check_browser

    check_browser(cfg.crawl)  # before Prefect's server start-up, so a bad path fails in a second
    from flows.pipeline import pipeline

    results = pipeline(cfg, until=args.until, progress=not args.no_progress, wait_for_lock=args.wait_for_lock)
    print("\n".join(r.line() for r in results))
    print(f"dataset: {cfg.data_dir.resolve() / 'metadata.csv'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sd_core.demo_site import DemoSite, build_demo_items

    print(f"building the demo site ({args.items} emoji)...", flush=True)
    items = build_demo_items(args.items, seed=args.seed)
    with DemoSite(items) as site:
        cfg = _load(args, {
            "data_dir": str(args.data_dir),
            "crawl.base_url": site.base_url,
            "crawl.tag": site.tag,
            "crawl.max_requests_per_second": 0,
            "crawl.empty_page_settle_s": 1.0,
            "caption.captioner": "offline",
        })
        print(f"demo site serving at {site.listing_url(1)}", flush=True)
        return _run_pipeline(cfg, args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            print(config_to_toml(_load(args, {})), end="")
            return 0
        if args.command == "demo":
            return _demo(args)
        cfg = _load(args, {
            "data_dir": str(args.data_dir) if args.data_dir else None,
            "crawl.base_url": args.base_url,
            "crawl.tag": args.tag,
            "crawl.max_pages": args.max_pages,
        })
        return _run_pipeline(cfg, args)
    except ConfigError as e:
        print(f"emoji-sd: {e}", file=sys.stderr)
        return 2
    except DataDirBusy as e:
        print(f"emoji-sd: {e}", file=sys.stderr)
        return 3
    except (FileNotFoundError, RuntimeError) as e:
        print(f"emoji-sd: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
