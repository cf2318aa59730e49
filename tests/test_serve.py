"""Scheduled runs: a real Prefect server on 127.0.0.1 and `emoji-sd serve` as a deployment; what each
stage did is readable from the server (the UI's artifacts)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from polling import wait_for

from sd_core.demo.emoji_art import build_demo_items
from sd_core.demo.site import DemoSite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(method: str, url: str, **kw):
    """One call to the Prefect API: a 5xx or a dropped connection (the server's SQLite is busy while its
    scheduler writes) is retried a few times; any other failure stops the test with the server's answer."""
    for attempt in range(5):
        try:
            r = requests.request(method, url, timeout=10, **kw)
        except requests.ConnectionError:
            if attempt == 4:
                raise
        else:
            if r.status_code < 500 or attempt == 4:
                assert r.ok, f"{method} {url} -> {r.status_code}: {r.text[:1000]}"
                return r.json()
        time.sleep(1 + attempt)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture()
def prefect_server(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        try:
            return requests.get(f"{base}/health", timeout=2).ok
        except requests.RequestException:
            return False

    try:
        wait_for(healthy, 180, "the Prefect server")
        yield base, env
    finally:
        stop(proc)
        log.close()


def test_serve_creates_scheduled_runs_and_a_triggered_run_completes(prefect_server, tmp_path):
    url, env = prefect_server
    data_dir = tmp_path / "data"
    with DemoSite(build_demo_items(20, seed=5), per_page=8) as site:
        serve_env = {**env, "PREFECT_API_URL": url, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
        log = open(tmp_path / "serve.log", "w")
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--cron", "*/5 * * * *", "--name", "nightly",
             "--until", "convert", "--data-dir", str(data_dir), "--base-url", site.base_url,
             "--set", "crawl.max_requests_per_second=0", "--set", "crawl.empty_page_settle_s=1.0"],
            env=serve_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            def deployment():
                r = api("POST", f"{url}/deployments/filter", json={})
                return next((d for d in r if d["name"] == "nightly"), None)

            dep = wait_for(deployment, 120, "the deployment")
            assert dep["schedules"][0]["schedule"]["cron"] == "*/5 * * * *"
            assert dep["concurrency_limit"] == 1 or (dep.get("global_concurrency_limit") or {}).get("limit") == 1

            def scheduled():
                return api("POST", f"{url}/flow_runs/filter", json={
                    "deployments": {"id": {"any_": [dep["id"]]}},
                    "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                })

            assert len(wait_for(scheduled, 90, "scheduled runs")) >= 1

            run = api("POST", f"{url}/deployments/{dep['id']}/create_flow_run", json={})

            def finished():
                state = api("GET", f"{url}/flow_runs/{run['id']}")["state"]
                return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

            state = wait_for(finished, 240, "the triggered run", interval=1)
            assert state["type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
            assert (data_dir / "metadata.csv").exists()
            assert site.total_image_gets() == 20

            # what each stage did is in the UI, as the run's artifact
            arts = api("POST", f"{url}/artifacts/filter",
                       json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}, "key": {"any_": ["emoji-sd-stages"]}}})
            assert len(arts) == 1 and arts[0]["type"] == "markdown"
            table = arts[0]["data"]
            assert "| crawl | **ran** |" in table and "| convert | **ran** |" in table
            assert "| caption | **skipped** |" in table and str(data_dir / "report.html") in table

            # the site changed its layout: the next scheduled run ends Failed (so Prefect can notify), saying why
            site.layout = "renamed"
            run = api("POST", f"{url}/deployments/{dep['id']}/create_flow_run", json={})
            state = wait_for(finished, 240, "the run on the changed site", interval=1)
            assert state["type"] == "FAILED", (tmp_path / "serve.log").read_text()[-3000:]
            assert "crawl failed: listing page" in state["message"] and "crawl.item_selector" in state["message"]
            arts = api("POST", f"{url}/artifacts/filter",
                       json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}, "key": {"any_": ["emoji-sd-stages"]}}})
            assert "| crawl | **failed** |" in arts[0]["data"] and "- **crawl failed: " in arts[0]["data"]
        finally:
            stop(serve)
            log.close()


def test_serve_without_a_server_explains_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-m", "flows.cli", "serve", "--cron", "0 3 * * *"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "prefect server start" in r.stderr and "PREFECT_API_URL" in r.stderr
