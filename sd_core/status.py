"""What each stage has on disk: cached (its record matches the inputs and settings now),
stale (its settings or something upstream changed), failed (its last attempt raised: why, and what it had
before), missing (never ran) or unused, and how many bytes
its artifacts take; and what no current key refers to any more (``emoji-sd gc``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from sd_core.caption import stage as caption_stage
from sd_core.config import STAGES, PipelineConfig
from sd_core.diffusion.export import ModelFolderError, verify_export
from sd_core.encode import stage as encode_stage
from sd_core.eval import stage as eval_stage
from sd_core.ingest import convert
from sd_core.ingest.ledger import Ledger
from sd_core.sample import stage as sample_stage
from sd_core.store import gc
from sd_core.store.catalog import Catalog
from sd_core.store.files import sha256_text
from sd_core.store.metadata import read_metadata
from sd_core.store.records import load_failure, load_stage, running_state
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
            return "no trained run"
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


def _stage_states(cfg: PipelineConfig, catalog: Catalog) -> list[StageState]:
    rows: list[StageState] = []
    upstream_changed = False
    for stage in STAGES:
        if stage == "vae" and not encode_stage.uses_trained_vae(cfg.encode):
            rows.append(StageState(stage, "unused", f"pretrained VAE {cfg.encode.vae.model_id}"))
            continue
        record = load_stage(catalog, stage)
        failure = load_failure(catalog, stage)
        if failure is not None and running_state(catalog, stage) != "running":
            before = f"last {record.status} {record.finished_at}" if record else "it never completed"
            rows.append(StageState(stage, "failed",
                                   f"failed {failure.finished_at}: {failure.summary.get('reason', '')}; {before}"))
            continue  # later stages are judged by their own keys: what this one left on disk is what they see
        if record is None:
            rows.append(StageState(stage, "missing", "never ran in this data dir"))
            upstream_changed = True
            continue
        when = f"last {record.status} {record.finished_at}"
        if stage == "crawl":
            with Ledger(catalog.ledger_db) as ledger:
                c = ledger.counts()
            detail = f"{c['images']} unique images from {c['ok']} URLs ({c['gone']} gone, {c['failed']} failed); {when}"
            rows.append(StageState(stage, "cached", detail + "; the site itself is checked on the next run"))
            continue
        try:
            fresh = not upstream_changed and KEY_NOW[stage](cfg, catalog) == record.key
        except (FileNotFoundError, RuntimeError):  # its inputs are not there (yet)
            fresh = False
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


def gc_plan(cfg: PipelineConfig, *, keep_runs: int = 0) -> gc.GcPlan:
    """What in ``cfg.data_dir`` no current key refers to: tensor-cache entries of other encoder settings or
    of images and captions no longer in the dataset, caption logs of other caption settings, downloaded
    bytes of no ledger image, training runs other than the latest (and the current key's, and the
    ``keep_runs`` newest), and what killed writes left. A cache whose live keys cannot be worked out
    (no dataset yet, an encoder that does not load) is left alone, and the plan says so."""
    catalog = Catalog(cfg.data_dir)
    plan = gc.GcPlan(catalog.root)
    plan.removals += gc.leftovers(catalog.root)

    rows = read_metadata(catalog)
    enc, lbase = None, None  # the resolved encode settings and latent key, when they can be worked out
    if not rows:
        plan.kept.append("cache/: no dataset (metadata.csv) to tell live entries from dead ones")
    else:
        from sd_core.encode.encoders import EMPTY_PROMPT, latent_key_base, text_key_base

        try:
            enc = encode_stage.resolve(cfg.encode, catalog)
            lbase = latent_key_base(enc.vae)
        except (OSError, RuntimeError, ValueError) as e:
            plan.kept.append(f"{catalog.latent_store.relative_to(catalog.root)}: VAE does not load: {e}")
        else:
            _add(plan, gc.stale_shards(catalog.latent_store, [{**lbase, "md5": r["md5"]} for r in rows]))
        if enc is None:
            plan.kept.append(f"{catalog.text_store.relative_to(catalog.root)}: encode settings do not resolve")
        elif "prompt" not in rows[0]:
            plan.kept.append(f"{catalog.text_store.relative_to(catalog.root)}: the dataset has no captions yet")
        else:
            tbase = text_key_base(enc.text)
            captions = {*(r["prompt"] for r in rows), EMPTY_PROMPT}
            _add(plan, gc.stale_shards(catalog.text_store,
                                       [{**tbase, "caption_sha256": sha256_text(c)} for c in captions]))

    plan.removals += gc.stale_caption_logs(catalog.captions_dir, cfg.caption.cache_digest())

    if catalog.ledger_db.exists():
        with Ledger(catalog.ledger_db) as ledger:
            plan.removals += gc.stale_raw(catalog.raw_dir, ledger.fetched_md5s())
    elif catalog.raw_dir.exists():
        plan.kept.append(f"{catalog.raw_dir.relative_to(catalog.root)}: no ledger to check it against")

    current = set()  # the run the current settings train into
    if lbase is not None:
        try:
            current.add(f"run-{train_stage.stage_key(cfg.train, enc, catalog)}")
        except (OSError, RuntimeError, ValueError):
            pass
    removals, kept = gc.stale_runs(catalog, current, keep_runs)
    plan.removals += removals
    plan.kept += kept
    return plan


def _add(plan: gc.GcPlan, found: tuple[list[gc.Removal], list[gc.ShardRewrite]]) -> None:
    plan.removals += found[0]
    plan.rewrites += found[1]
