import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Prefect configures its log handlers when it is first imported, on whatever sys.stderr is then. Imported here,
# that is pytest's session-long capture; imported first inside a test using capsys, it would be that test's
# stream, closed when the test ends, and every later flow's log line would fail (RecursionError in rich).
import tasks  # noqa: E402,F401  (Prefect defaults for offline use, before Prefect is imported)
import prefect.main  # noqa: E402,F401


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server and database for every flow test in the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL saved like the hub checkpoint (see tiny_qwen.py)."""
    from tiny_qwen import build_tiny_qwen

    return build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen"))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny random Stable Diffusion folder (64 px images, 8×8 latents, see tiny_models.py)."""
    from tiny_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")
