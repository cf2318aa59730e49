"""What each stage has on disk: cached (its record matches the inputs and settings now),
stale (its settings or something upstream changed), missing (never ran) or unused."""

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
from sd_core.store.catalog import Catalog
from sd_core.store.records import load_stage, running_state
from sd_core.training import stage as train_stage
from sd_core.vae import stage as vae_stage

State = Literal["cached", "stale", "running", "missing", "unused"]

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
    rows: list[StageState] = []
    upstream_changed = False
    for stage in STAGES:
        if stage == "vae" and not encode_stage.uses_trained_vae(cfg.encode):
            rows.append(StageState(stage, "unused", f"pretrained VAE {cfg.encode.vae.model_id}"))
            continue
        record = load_stage(catalog, stage)
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
