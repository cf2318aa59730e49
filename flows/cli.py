"""`emoji-sd`: run the pipeline or the embedded demo, serve it on a schedule, show its state."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, NoReturn, Sequence

# Only torch-free modules here: `--help` and argument errors answer without loading the model code.
from sd_core.config import STAGES, ConfigError, PipelineConfig, config_to_toml, load_config, preset
from sd_core.diffusion.config import SAMPLERS
from sd_core.runtime.signals import signals_unwind, stop_reason
from sd_core.store.lock import DataDirBusy, check_data_dir, data_dir_lock
from sd_core.store.records import StageFailed

DEMO_DATA_DIR = Path("data/demo")
LAZY_DEMO_ITEMS = 1000


def _config_args(p: argparse.ArgumentParser, *, site: bool = True) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (see `emoji-sd config`)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set crawl.max_pages=3 (repeatable)")
    if site:
        p.add_argument("--data-dir", type=Path)
        p.add_argument("--base-url", help="site root, e.g. https://discords.com")
        p.add_argument("--tag", help="listing tag, e.g. Blobs")
        p.add_argument("--max-pages", type=int)


def _stage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--until", choices=STAGES, help="last stage to run (default: all)")
    p.add_argument("--from", dest="start", choices=STAGES, help="first stage to run; earlier ones are skipped")
    p.add_argument("--only", choices=STAGES, help="run this stage alone")
    p.add_argument("--force", choices=STAGES, action="append", default=[],
                   help="rerun this stage ignoring its caches (repeatable)")
    p.add_argument("--task-runner", choices=("sequential", "dask"), default="sequential",
                   help="where caption and encode batches run: one at a time here, or fanned out on Dask")
    p.add_argument("--dask-address", help="scheduler address of an existing Dask cluster (default: a local one)")
    p.add_argument("--dask-workers", type=int, default=2, help="workers of the local Dask cluster")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--wait-for-lock", action="store_true",
                   help="wait for another run on the same data dir instead of stopping")
    p.add_argument("--promote", action="store_true",
                   help="make the evaluated run the champion even if it scores worse than the current one")
    p.add_argument("--full-listing", action="store_true",
                   help="walk the whole listing, not only its pages up to known ones (see docs/refresh.md)")


class OneLineParser(argparse.ArgumentParser):
    """Argument errors in one line on stderr (the usage is what ``--help`` is for)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _sample_args(p: argparse.ArgumentParser) -> None:
    """``emoji-sd sample``'s flags: each setting is the ``[sample]`` field of the same name (dashes for
    underscores); what a flag does not give comes from the config."""
    p.add_argument("--preset", choices=("demo",), help="start from a shipped preset (demo: `emoji-sd demo`'s)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="draw from this data dir's champion; its held-out captions are the default prompts")
    p.add_argument("--model", type=Path, help="a model folder (an emoji-sd export or a diffusers SD folder)")
    p.add_argument("--prompt", "--prompts", dest="prompts", action="append",
                   help="text to draw (repeatable; default: [sample] prompts, else held-out captions of --data-dir)")
    p.add_argument("--prompts-file", type=Path, help="a text file of prompts, one a line (added to --prompt)")
    p.add_argument("--held-out-prompts", type=int, help="held-out captions drawn when no prompt is given")
    p.add_argument("--negative-prompt", help="what to steer away from (classifier-free guidance > 1)")
    p.add_argument("--guidance-scale", "--guidance", dest="guidance_scale", type=float,
                   help="classifier-free guidance scale: 0 without the text, 1 text without guidance")
    p.add_argument("--steps", type=int, help="sampler steps")
    p.add_argument("--scheduler", choices=SAMPLERS, help="sampler")
    p.add_argument("--seed", type=int, help="first seed; image j of a prompt draws from seed + j")
    p.add_argument("--images-per-prompt", "--n", dest="images_per_prompt", type=int, help="images per prompt")
    p.add_argument("--width", type=int, help="image width in pixels, a multiple of the VAE's factor (8 for SD)")
    p.add_argument("--height", type=int, help="image height in pixels, a multiple of the VAE's factor")
    p.add_argument("--guidance-sweep", "--sweep", dest="guidance_sweep", type=float, nargs="*",
                   help="also a grid over these guidance scales (default: none)")
    p.add_argument("--batch-size", type=int, help="images per pipeline call")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--cell-size", type=int, help="grid cell side in pixels")
    p.add_argument("--label-width", type=int, help="width of the grid's prompt column in pixels")
    p.add_argument("--out", type=Path, default=Path("grid.png"),
                   help="grid PNG; the images and samples.json go in a folder of the same name beside it")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="emoji-sd", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline on a site")
    _config_args(run)
    _stage_args(run)

    demo = sub.add_parser("demo", help="run the pipeline on the embedded demo site (offline)")
    _config_args(demo)
    demo.add_argument("--items", type=int, default=240, help="emoji listed on the demo site")
    demo.add_argument("--seed", type=int, default=0, help="which demo emoji")
    demo.add_argument("--port", type=int, default=8765,
                      help="port of the demo site on 127.0.0.1 (fixed, so a rerun sees the same image URLs)")
    _stage_args(demo)

    serve = sub.add_parser("serve", help="serve the pipeline as a scheduled Prefect deployment")
    _config_args(serve)
    serve.add_argument("--cron", required=True, help='schedule, e.g. "0 3 * * *"')
    serve.add_argument("--name", default="scheduled", help="deployment name")
    serve.add_argument("--until", choices=STAGES, default=STAGES[-1])

    sample = sub.add_parser("sample", help="draw emoji from a trained model (flags share the names of [sample])")
    _config_args(sample, site=False)
    _sample_args(sample)

    train = sub.add_parser("train", help="train from a data dir's cached pairs, without Prefect "
                                         "(also under `accelerate launch --multi_gpu --num_processes N -m flows.cli train`)")
    _config_args(train, site=False)
    train.add_argument("--data-dir", type=Path, help="data directory whose encode stage has run")
    train.add_argument("--preset", choices=("demo",), help="start from a shipped preset (demo: `emoji-sd demo`'s)")
    train.add_argument("--force", action="store_true", help="retrain even if this exact run is done")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--wait-for-lock", action="store_true",
                       help="wait for another run on the same data dir instead of stopping")

    status = sub.add_parser("status", help="show per stage what is cached, stale or missing")
    _config_args(status)
    status.add_argument("--preset", choices=("demo",), help="start from a shipped preset (demo: `emoji-sd demo`'s)")

    gc = sub.add_parser("gc", help="remove what no current key refers to in a data dir (dry run without --yes)")
    _config_args(gc)
    gc.add_argument("--preset", choices=("demo",), help="start from a shipped preset (demo: `emoji-sd demo`'s)")
    gc.add_argument("--keep-runs", type=int, default=None, metavar="N",
                    help="also keep the N newest training runs (default: train.keep_runs when set, else 0); "
                         "the run models/unet/latest.json names is always kept")
    gc.add_argument("--yes", action="store_true", help="delete; without it gc only lists what it would remove")

    push = sub.add_parser("push", help="upload the champion's export (and the dataset) to the Hugging Face Hub")
    push.add_argument("--data-dir", type=Path, required=True, help="the data directory whose champion to upload")
    push.add_argument("--repo-id", required=True, help="the model repository, USER/NAME (created when missing)")
    push.add_argument("--dataset-repo-id", help="also upload the dataset with its card to this dataset repository")
    push.add_argument("--private", action="store_true", help="create the repositories private")
    push.add_argument("--dry-run", action="store_true", help="stage and list what would be uploaded; upload nothing")

    app = sub.add_parser("app", help="a local web page that draws from the champion and shows the dataset")
    app.add_argument("--data-dir", type=Path, required=True, help="the data directory whose champion to serve")
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    app.add_argument("--port", type=int, default=7860, help="port to listen on (0: any free one)")
    app.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    app.add_argument("--max-steps", type=int, default=None, help="most sampler steps one request may ask for")
    app.add_argument("--max-images", type=int, default=None, help="most images one request may ask for")

    show = sub.add_parser("config", help="print the effective configuration as TOML")
    _config_args(show, site=False)
    for p in sub.choices.values():  # `emoji-sd run --debug` as well as `emoji-sd --debug run`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    return parser


def _load(args: argparse.Namespace, overrides: dict[str, Any]) -> PipelineConfig:
    site = {}
    if hasattr(args, "base_url"):
        site = {
            "data_dir": str(args.data_dir.resolve()) if args.data_dir else None,
            "crawl.base_url": args.base_url,
            "crawl.tag": args.tag,
            "crawl.max_pages": args.max_pages,
        }
    return load_config(args.config, overrides={**overrides, **site}, sets=args.sets)


@contextmanager
def _run_guard(data_dir: Path, args: argparse.Namespace) -> Iterator[None]:
    """Hold the data dir for the run, before Prefect starts (a busy dir is refused in a second); stop what
    a killed earlier run left; and have every process this run starts stopped when it ends, however."""
    from sd_core.store.catalog import Catalog
    from sd_core.runtime.reaper import guard_children, reap_dead_run

    catalog = Catalog(data_dir)
    with data_dir_lock(data_dir, wait=args.wait_for_lock):
        reap_dead_run(catalog.run_file)
        with guard_children(catalog.run_file):
            yield


def _run_pipeline(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from sd_core.encode.stage import check_packaged_models
    from sd_core.ingest.browser import check_browser

    if args.only in (None, "crawl") and args.start in (None, "crawl"):
        if cfg.source.kind == "site":
            check_browser(cfg.crawl)  # before Prefect's server start-up, so a bad path fails in a second
        else:
            from sd_core.ingest.source import check_source

            check_source(cfg.source)  # a missing folder or a list without a URL column: one line, exit 2
    check_packaged_models(cfg.encode)
    from flows.pipeline import pipeline

    if args.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise RuntimeError("--task-runner dask needs prefect-dask: pip install 'emoji-sd[dask]'") from None

        runner = (DaskTaskRunner(address=args.dask_address) if args.dask_address else
                  DaskTaskRunner(cluster_kwargs={"n_workers": args.dask_workers, "threads_per_worker": 1}))
        pipeline = pipeline.with_options(task_runner=runner)
    results = pipeline(
        cfg, until=args.until, start=args.start, only=args.only, force=args.force,
        progress=not args.no_progress, wait_for_lock=args.wait_for_lock, promote=args.promote,
        full_listing=args.full_listing,
    )
    print("\n".join(r.line() for r in results))
    print(f"dataset: {cfg.data_dir / 'metadata.csv'}")
    print(f"report:  {cfg.data_dir / 'report.html'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sd_core.demo.emoji_art import build_demo_items
    from sd_core.demo.site import DemoSite

    overrides = {"data_dir": str((args.data_dir or DEMO_DATA_DIR).resolve()), "crawl.tag": args.tag,
                 "crawl.max_pages": args.max_pages}
    cfg = load_config(args.config, base=preset("demo"), sets=args.sets, overrides=overrides)  # errors first
    with _run_guard(cfg.data_dir, args):
        print(f"building the demo site ({args.items} emoji)...", flush=True)
        # above LAZY_DEMO_ITEMS the images are drawn when first requested (the same bytes, built in seconds)
        items = build_demo_items(args.items, seed=args.seed, lazy=args.items > LAZY_DEMO_ITEMS)
        with DemoSite(items, port=args.port) as site:
            cfg = load_config(args.config, base=preset("demo"), sets=args.sets, overrides={
                **overrides, "crawl.base_url": site.base_url, "crawl.tag": args.tag or site.tag})
            print(f"demo site serving at {site.listing_url(1)}", flush=True)
            return _run_pipeline(cfg, args)


def _status(cfg: PipelineConfig) -> int:
    from sd_core.status import champion_line, stage_status
    from sd_core.store.gc import human

    for row in stage_status(cfg):
        print(f"{row.stage:8s} {row.state:8s} {human(row.bytes):>9s}  {row.detail}")
    state, line = champion_line(cfg)
    print(f"champion {state:8s} {'':>9s}  {line}")
    return 0


def _gc(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from sd_core.status import find_garbage
    from sd_core.store.gc import remove_garbage, human

    keep = args.keep_runs if args.keep_runs is not None else getattr(cfg.train, "keep_runs", None) or 0
    with data_dir_lock(cfg.data_dir):
        garbage = find_garbage(cfg, keep_runs=keep)
        print("\n".join(garbage.lines()) or "nothing to remove")
        if not args.yes:
            print(f"would free {human(garbage.bytes)} in {cfg.data_dir}; pass --yes to delete")
            return 0
        print(f"freed {human(remove_garbage(garbage))} in {cfg.data_dir}")
    return 0


SAMPLE_FIELDS = ("prompts", "held_out_prompts", "negative_prompt", "guidance_scale", "steps", "scheduler", "seed",
                 "images_per_prompt", "width", "height", "guidance_sweep", "batch_size", "device", "cell_size",
                 "label_width")


def _sample(args: argparse.Namespace) -> int:
    import shutil

    from sd_core.diffusion.champion import served_model
    from sd_core.sample.stage import prompts_from_file, sample_to_folder
    from sd_core.store.catalog import Catalog

    prompts = tuple(args.prompts or ())
    if args.prompts_file is not None:
        prompts += prompts_from_file(args.prompts_file)
    given = {f"sample.{f}": getattr(args, f) for f in SAMPLE_FIELDS}
    given["sample.prompts"] = list(prompts) or None
    # the command draws a guidance sweep only when asked (the sample stage draws [sample] guidance_sweep)
    given["sample.guidance_sweep"] = list(args.guidance_sweep or ())
    base = preset(args.preset) if args.preset else None
    cfg = load_config(args.config, base=base, sets=args.sets, overrides=given)
    model, catalog = args.model, None
    if args.data_dir is not None or model is None:
        data_dir = check_data_dir(args.data_dir or cfg.data_dir)
        catalog = Catalog(data_dir)
        if model is None:  # the data dir's champion, verified; never another run's export
            model = served_model(catalog)
    out_dir = args.out.with_suffix("")
    result = sample_to_folder(model, cfg.sample, out_dir, catalog=catalog)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.grid, args.out)
    print(f"grid: {args.out}\nimages: {out_dir / 'images'}\nsettings: {out_dir / 'samples.json'}"
          + (f"\nsweep: {result.guidance_sweep}" if result.guidance_sweep else ""))
    return 0


def _push(args: argparse.Namespace) -> int:
    from sd_core.publish import served_model
    from sd_core.publish.hub import hub_token, push
    from sd_core.store.catalog import Catalog

    token = None if args.dry_run else hub_token()  # first: no token, one line, before anything is looked up
    catalog = Catalog(check_data_dir(args.data_dir))
    lines = push(catalog, served_model(catalog), repo_id=args.repo_id, dataset_repo_id=args.dataset_repo_id,
                 private=args.private, dry_run=args.dry_run, token=token)
    print("\n".join(lines))
    return 0


def _app(args: argparse.Namespace) -> int:
    from sd_core.app.server import Limits, serve_forever
    from sd_core.store.catalog import Catalog

    catalog = Catalog(check_data_dir(args.data_dir))
    caps = {k: v for k, v in (("max_steps", args.max_steps), ("max_images", args.max_images)) if v is not None}
    serve_forever(catalog, host=args.host, port=args.port, device=args.device, limits=Limits(**caps))
    return 0


def _train(args: argparse.Namespace) -> int:
    """The train stage alone, recorded as the pipeline records it. Under a launcher (several processes) only the
    main process takes the data-dir lock and writes; the others train their share and wait for it."""
    from sd_core.store.catalog import Catalog
    from sd_core.runtime.running import mark_running
    from sd_core.training import distributed
    from sd_core.training.stage import train_stage

    base = preset(args.preset) if args.preset else None
    cfg = load_config(args.config, base=base, sets=args.sets,
                      overrides={"data_dir": str(args.data_dir.resolve()) if args.data_dir else None})
    owns_lock = distributed.is_main_process() and not os.environ.get(distributed.LOCK_HELD)
    catalog = Catalog(cfg.data_dir)
    guarded = _run_guard(cfg.data_dir, args) if owns_lock else nullcontext()
    with guarded, mark_running(catalog, "train") if owns_lock else nullcontext():
        result = train_stage(cfg.train, cfg.encode, catalog, force=args.force, progress=not args.no_progress)
    if result is not None:
        print(result.line())
    return 0


def one_line(text: str) -> str:
    """A message on one line: ``head:\n  a\n  b`` becomes ``head: a; b``."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {'; '.join(lines[1:])}"
    return "; ".join(lines)


def _error(e: BaseException) -> tuple[int, str]:
    """Exit code and one-line message of an error."""
    if not isinstance(e, Exception):  # Interrupted, a plain KeyboardInterrupt, Prefect's TerminationSignal
        code, why = stop_reason(e)
        return code, f"{why}; the run's processes were stopped"
    if isinstance(e, DataDirBusy):
        return 3, str(e)
    if isinstance(e, StageFailed):  # the stage's reason; the report and `emoji-sd status` show it too
        return 1, str(e)
    if isinstance(e, (ConfigError, ValueError)):
        return 2, str(e)
    if isinstance(e, (OSError, RuntimeError)):
        return 1, f"{type(e).__name__}: {e}"
    return 1, f"{type(e).__name__}: {e} (--debug shows the traceback)"


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        print(config_to_toml(_load(args, {})), end="")
        return 0
    if args.command == "demo":
        return _demo(args)
    if args.command == "sample":
        return _sample(args)
    if args.command == "train":
        return _train(args)
    if args.command == "push":
        return _push(args)
    if args.command == "app":
        return _app(args)
    if args.command in ("status", "gc"):
        base = preset(args.preset) if args.preset else None
        cfg = load_config(args.config, base=base, sets=args.sets, overrides={
            "data_dir": str(args.data_dir.resolve()) if args.data_dir else None})
        check_data_dir(cfg.data_dir)
        return _status(cfg) if args.command == "status" else _gc(cfg, args)
    cfg = _load(args, {})
    if args.command == "serve":
        from flows.serve import serve_pipeline

        serve_pipeline(cfg, cron=args.cron, name=args.name, until=args.until)
        return 0
    with _run_guard(cfg.data_dir, args):
        return _run_pipeline(cfg, args)


def main(argv: Sequence[str] | None = None) -> int:
    """Every error ends in one line on stderr and a non-zero exit code; ``--debug`` adds the traceback."""
    args = build_parser().parse_args(argv)
    if getattr(args, "no_progress", False):  # the libraries' bars too (model loading), here and in train's workers
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    # `serve` keeps Prefect's own signal handling: its runner stops the served runs
    try:
        with signals_unwind() if args.command != "serve" else nullcontext():
            return _dispatch(args)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001  (Prefect's TerminationSignal is a BaseException too)
        if args.debug:
            traceback.print_exc()
        code, message = _error(e)
        print(f"emoji-sd: {one_line(message)}", file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":
    sys.exit(main())
