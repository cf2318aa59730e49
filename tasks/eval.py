"""The eval stage as a Prefect task: scores, promotion, and what was decided as a flow-run artifact."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from sd_core.caption.config import CaptionConfig
from sd_core.eval.config import EvalConfig
from sd_core.eval.stage import run_eval, stage_key
from sd_core.report.page import eval_markdown
from sd_core.store.catalog import Catalog
from sd_core.store.records import StageResult, Timer, record_stage


@task(name="eval", cache_policy=NO_CACHE)
def eval_task(cfg: EvalConfig, captioner: CaptionConfig, data_dir: Path, val_fraction: float, split_seed: int,
              force: bool = False, promote: bool = False) -> StageResult:
    """Score the latest run; promote it to champion only when it is no worse (or when forced)."""
    catalog = Catalog(data_dir)
    with Timer() as t:
        summary = run_eval(cfg, captioner, catalog, val_fraction=val_fraction, split_seed=split_seed, force=force,
                           promote=promote)
    status = summary.pop("status")
    key = stage_key(cfg, captioner, catalog, val_fraction=val_fraction, split_seed=split_seed)
    result = record_stage(catalog, "eval", key=key, summary=summary, seconds=t.seconds, ran=status == "ran")
    logger = get_run_logger()
    (logger.warning if summary["decision"] == "rejected" else logger.info)(result.line())
    create_markdown_artifact(eval_markdown(catalog), key="emoji-sd-eval",
                             description=f"scores of {summary['run']} and the promotion decision")
    return result
