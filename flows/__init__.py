"""Prefect flows and the emoji-sd command line: wiring only."""

from tasks import prefect_env as _prefect_env  # noqa: F401
