"""`emoji-sd serve`: the pipeline as a scheduled Prefect deployment (needs a real Prefect server)."""

from __future__ import annotations

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.settings import PREFECT_API_URL

from flows.pipeline import pipeline
from sd_core.config import PipelineConfig


class NoPrefectServer(RuntimeError):
    """Scheduling needs a Prefect server; the temporary one does not run schedules."""


def require_server() -> str:
    url = PREFECT_API_URL.value()
    if not url:
        raise NoPrefectServer(
            "scheduled runs need a Prefect server: start one with `prefect server start` "
            "and set PREFECT_API_URL (e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api); "
            "Prefect's temporary local server does not run schedules"
        )
    return url


def serve_pipeline(cfg: PipelineConfig, *, cron: str, name: str, until: str) -> None:
    """Serve the pipeline with a cron schedule; at most one run at a time (later ones wait)."""
    require_server()
    pipeline.serve(
        name=name,
        cron=cron,
        parameters={"config": cfg.model_dump(mode="json"), "until": until, "progress": False,
                    "wait_for_lock": True},
        global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        pause_on_shutdown=False,
    )
