"""Prefect tasks wrapping the sd_core stages."""

from tasks import prefect_env as _prefect_env  # noqa: F401  (sets Prefect defaults before Prefect loads)
