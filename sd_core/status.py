"""What each stage has on disk: cached (its record matches the inputs and settings now),
stale (its settings or something upstream changed, it was interrupted, or its record is damaged), failed (its
last attempt raised: why, and what it had before), missing (never ran) or unused, and how many bytes its
artifacts take; which run is the champion and whether its record is intact; and what no current key refers to
any more (``emoji-sd gc``). Status only reads: a file it cannot read is named in the row of its stage."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Callable, Literal

from sd_core.caption import stage as caption_stage
from sd_core.config import STAGES, PipelineConfig
from sd_core.diffusion.champion import champion_status, find_champion
from sd_core.diffusion.export import ModelFolderError, export_complete, verify_export
from sd_core.encode import stage as encode_stage
from sd_core.eval import stage as eval_stage
from sd_core.ingest import convert
from sd_core.ingest.ledger import Ledger, LedgerError
from sd_core.runtime.running import running_state
from sd_core.sample import stage as sample_stage
from sd_core.store import gc
from sd_core.store.catalog import Catalog
from sd_core.store.files import DamagedFileError, sha256_text
from sd_core.store.metadata import read_metadata
from sd_core.store.records import load_failure, load_stage, stage_record_problem
from sd_core.training import plan as train_plan
from sd_core.training import stage as train_stage
from sd_core.vae import stage as vae_stage

State = Literal["cached", "stale", "running", "failed", "missing", "unused"]

# Key of each stage as it would be computed now; crawl has none (its input is the live site).
KEY_NOW: dict[str, Callable[[PipelineConfig, Catalog], str]] = {
    "convert": lambda cfg, cat: convert.stage_key(cfg.convert, cat),
    "caption": lambda cfg, cat: caption_stage.stage_key(cfg.caption, cat),
    "vae": lambda cfg, cat: vae_stage.stage_key(cfg.vae),
    "encode": lambda cfg, cat: encode_stage.stage_key(encode_stage.resolve(cfg.encode, cat), cat),
    "train": lambda cfg, cat: train_stage.stage_key(cfg.train, encode_stage.resolve(cfg.encode, cat), cat),
    "eval": lambda cfg, cat: eval_stage.stage_key(cfg.eval, cfg.caption, cat, val_fraction=cfg.train.val_fraction,
                                                  split_seed=cfg.train.split_seed),
    "sample": lambda cfg, cat: sample_stage.stage_key(cfg.sample, cat),
}


@dataclass(frozen=True)
class StageState:
    stage: str
    state: State
    detail: str
    bytes: int = 0  # size on disk of the stage's artifacts


def _verify(stage: str, cfg: PipelineConfig, catalog: Catalog) -> str | None:
    """What is wrong with a stage's outputs on disk although its key matches (None: they read back intact)."""
    if stage == "encode":
        return encode_stage.verify_caches(encode_stage.resolve(cfg.encode, catalog), catalog)
    if stage == "train":
        run = catalog.latest_run()
        if run is None:
            why = catalog.latest_problem() or "missing"
            return f"{catalog.latest_run_json} is damaged ({why}); the train stage's next run rewrites it"
        if run.with_name(run.name + ".forced").exists():
            return "a forced rerun of this run is unfinished"
        try:
            verify_export(run / "model")
        except ModelFolderError as e:
            return str(e)
    if stage == "sample" and not (catalog.samples_dir / "grid.png").exists():
        return f"{catalog.samples_dir / 'grid.png'} is missing"
    return None


def stage_status(cfg: PipelineConfig) -> list[StageState]:
    catalog = Catalog(cfg.data_dir)
    rows = _stage_states(cfg, catalog)
    return [StageState(r.stage, r.state, r.detail, gc.sizes(catalog.stage_paths(r.stage))) for r in rows]


def champion_line(cfg: PipelineConfig) -> tuple[str, str]:
    """``(state, line)``: the champion, and whether its record is intact (see
    :func:`~sd_core.diffusion.champion.champion_status`)."""
    try:
        return champion_status(Catalog(cfg.data_dir))
    except OSError as e:
        return "damaged", f"cannot read {e.filename or Catalog(cfg.data_dir).current_json}: {e.strerror or e}"


def _unreadable(e: Exception, catalog: Catalog) -> str:
    """A one-line reason naming the file that could not be read (a read-only or damaged data directory)."""
    if isinstance(e, OSError) and e.filename:
        return f"cannot read {e.filename}: {e.strerror or e}"
    if isinstance(e, sqlite3.Error):
        return f"cannot read {catalog.ledger_db}: {e}"
    return str(e)


def _stage_states(cfg: PipelineConfig, catalog: Catalog) -> list[StageState]:
    rows: list[StageState] = []
    upstream_changed = False
    for stage in STAGES:
        if stage == "vae" and not encode_stage.uses_trained_vae(cfg.encode):
            rows.append(StageState(stage, "unused", f"pretrained VAE {cfg.encode.vae.model_id}"))
            continue
        record = load_stage(catalog, stage, warn=False)
        failure = load_failure(catalog, stage)
        if failure is not None and running_state(catalog, stage) != "running":
            before = f"last {record.status} {record.finished_at}" if record else "it never completed"
            rows.append(StageState(stage, "failed",
                                   f"failed {failure.finished_at}: {failure.summary.get('reason', '')}; {before}"))
            continue  # later stages are judged by their own keys: what this one left on disk is what they see
        if record is None:
            rows.append(_no_record(catalog, stage))
            upstream_changed = True
            continue
        when = f"last {record.status} {record.finished_at}"
        if stage == "crawl":
            try:
                with Ledger(catalog.ledger_db) as ledger:
                    c = ledger.counts()
            except (OSError, sqlite3.Error, LedgerError) as e:  # e.g. a read-only data dir: named, status goes on
                rows.append(StageState(stage, "stale", f"{_unreadable(e, catalog)}; {when}"))
                continue
            detail = f"{c['images']} unique images from {c['ok']} URLs ({c['gone']} gone, {c['failed']} failed); {when}"
            rows.append(StageState(stage, "cached", detail + "; the source itself is read on the next run"))
            continue
        try:
            fresh = not upstream_changed and KEY_NOW[stage](cfg, catalog) == record.key
        except DamagedFileError as e:  # a state file the key is read from: named
            rows.append(StageState(stage, "stale", f"{e}; {when}"))
            upstream_changed = True
            continue
        except (FileNotFoundError, RuntimeError):  # its inputs are not there (yet)
            fresh = False
        except (OSError, sqlite3.Error, LedgerError) as e:  # a file it cannot read or open: named
            rows.append(StageState(stage, "stale", f"{_unreadable(e, catalog)}; {when}"))
            upstream_changed = True
            continue
        detail = ", ".join(f"{k}={v}" for k, v in record.summary.items() if v not in ({}, None))
        running = running_state(catalog, stage)
        problem = _verify(stage, cfg, catalog) if fresh and running is None else None
        upstream_changed = upstream_changed or not fresh or problem is not None
        if running == "running":
            rows.append(StageState(stage, "running", f"running now; last {record.status} {record.finished_at}"))
        elif running == "interrupted":
            rows.append(StageState(stage, "stale", f"a run of this stage was interrupted; {detail}; {when}"))
        elif problem is not None:
            rows.append(StageState(stage, "stale", f"{problem}; {when}"))
        else:
            rows.append(StageState(stage, "cached" if fresh else "stale", f"{detail}; {when}"))
    return rows


def _no_record(catalog: Catalog, stage: str) -> StageState:
    """A stage without a record: its record damaged, running for the first time, killed before it ever
    finished, or never run."""
    if (damaged := stage_record_problem(catalog, stage)) is not None:
        path, why = damaged
        return StageState(stage, "stale", f"{path} is damaged ({why}); the stage's next run rewrites it")
    running = running_state(catalog, stage)
    if running == "running":
        return StageState(stage, "running", "running now, for the first time in this data dir")
    if running == "interrupted":
        return StageState(stage, "stale", "interrupted: its first run was killed before it finished")
    return StageState(stage, "missing", "never ran in this data dir")


def _delisted_files(catalog: Catalog) -> list[gc.Removal]:
    """The JPEGs and caption sidecars of images their source no longer lists (``delisted/``); a sidecar edited
    by hand is kept (the caption stage's record tells it from one it wrote)."""
    if not catalog.delisted_dir.is_dir():
        return []
    record = caption_stage.read_sidecar_record(catalog)
    out = []
    for path in sorted(catalog.delisted_dir.iterdir()):
        if path.suffix == ".txt" and not caption_stage.written_by_stage(catalog, path, record):
            continue
        out.append(gc.Removal(path, gc.size_of(path), "file of an image its source no longer lists"))
    return out


def find_garbage(cfg: PipelineConfig, *, keep_runs: int = 0) -> gc.Garbage:
    """What in ``cfg.data_dir`` no current key refers to: tensor-cache entries of other encoder settings or
    of images and captions no longer in the dataset, caption logs of other caption settings, downloaded
    bytes of no ledger image, training runs other than the latest (and the current key's, and the
    ``keep_runs`` newest), and what killed writes left. A cache whose live keys cannot be worked out
    (no dataset yet, an encoder that does not load) is left alone, and the list says so."""
    catalog = Catalog(cfg.data_dir)
    garbage = gc.Garbage(catalog.root)
    garbage.removals += gc.leftovers(catalog.root)

    rows = read_metadata(catalog)
    enc, lbase = None, None  # the resolved encode settings and latent key, when they can be worked out
    if not rows:
        garbage.kept.append("cache/: no dataset (metadata.csv) to tell live entries from dead ones")
    else:
        from sd_core.encode.encoders import EMPTY_PROMPT, latent_key_base, text_key_base

        try:
            enc = encode_stage.resolve(cfg.encode, catalog)
            lbase = latent_key_base(enc.vae)
        except (OSError, RuntimeError, ValueError) as e:
            garbage.kept.append(f"{catalog.latent_store.relative_to(catalog.root)}: VAE does not load: {e}")
        else:
            _add(garbage, gc.stale_shards(catalog.latent_store, encode_stage.latent_keys(lbase, rows)))
        if enc is None:
            garbage.kept.append(f"{catalog.text_store.relative_to(catalog.root)}: encode settings do not resolve")
        elif "prompt" not in rows[0]:
            garbage.kept.append(f"{catalog.text_store.relative_to(catalog.root)}: the dataset has no captions yet")
        else:
            tbase = text_key_base(enc.text)
            captions = {*(r["prompt"] for r in rows), EMPTY_PROMPT}
            _add(garbage, gc.stale_shards(catalog.text_store,
                                       [{**tbase, "caption_sha256": sha256_text(c)} for c in captions]))

    garbage.removals += gc.stale_caption_logs(catalog.captions_dir, cfg.caption.cache_digest())
    garbage.removals += _delisted_files(catalog)

    if catalog.ledger_db.exists():
        with Ledger(catalog.ledger_db) as ledger:
            garbage.removals += gc.stale_raw(catalog.raw_dir, ledger.fetched_md5s())
    elif catalog.raw_dir.exists():
        garbage.kept.append(f"{catalog.raw_dir.relative_to(catalog.root)}: no ledger to check it against")

    keep: dict[str, str] = {}  # run name -> why it stays
    if lbase is not None:
        try:
            keep[train_plan.plan_run(cfg.train, enc, catalog).run_dir.name] = "the current settings' run"
        except (OSError, RuntimeError, ValueError):
            pass
    try:  # the champion stays whatever its record says; while it cannot be told, every run does
        champ = find_champion(catalog, repair=False)
    except DamagedFileError as e:
        garbage.kept.append(f"{catalog.train_dir.relative_to(catalog.root)}: every run ({e})")
        return garbage
    if champ is not None:
        keep[champ.run.name] = "the champion"
    removals, kept = gc.stale_runs(catalog, keep, keep_runs, complete=lambda run: export_complete(run / "model"))
    garbage.removals += removals
    garbage.kept += kept
    return garbage


def _add(garbage: gc.Garbage, found: tuple[list[gc.Removal], list[gc.ShardRewrite]]) -> None:
    garbage.removals += found[0]
    garbage.rewrites += found[1]
