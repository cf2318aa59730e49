"""Defaults for running Prefect with no account and no network, set before Prefect is imported.

Each can be overridden from the environment (e.g. PREFECT_API_URL for a real server).
"""

import os

DEFAULTS = {
    # The temporary local server's first start (SQLite migrations) took over 30 s here.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # Its telemetry call fails without network.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    "PREFECT_LOGGING_LOG_PRINTS": "true",
    # The library's own warnings (a caption rejected, a run resumed with changed settings) reach the run's log.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "sd_core",
}

for _k, _v in DEFAULTS.items():
    os.environ.setdefault(_k, _v)
