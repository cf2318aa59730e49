"""A killed run leaves no process behind: not Prefect's temporary server, not chromedriver and Chromium,
not Dask workers; on SIGTERM the run unwinds and exits with one line; the next run stops what a run
killed together with its reaper left."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from polling import wait_for

REPO = Path(__file__).resolve().parents[1]


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie has ended: it only waits to be reaped)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def cmdline(p: psutil.Process) -> str:
    """The command line, or "" for a process that exited or is a zombie by the time it is read (a child of
    Prefect's or Chromium's start-up can end between listing the tree and reading it)."""
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def describe(procs: list[psutil.Process]) -> list[str]:
    return [f"{p.pid} {cmdline(p)[:120]}".rstrip() for p in procs]


def all_stop(procs: list[psutil.Process], names: list[str], timeout_s: float = 30) -> None:
    """Every process of ``procs`` ends within ``timeout_s``; else fails naming those left."""
    try:
        wait_for(lambda: not running(procs), timeout_s, "the processes to stop")
    except AssertionError:
        raise AssertionError(f"left behind: {describe(running(procs))} of {names}") from None


def kill_all(procs: list[psutil.Process]) -> None:
    for p in running(procs):
        try:
            p.kill()
        except psutil.Error:
            pass


# --- the reaper, on plain processes (a second or two each) -------------------------------------------

RECORDED = """
import json, time
from pathlib import Path
import psutil
def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
def wait_recorded(run_file, pids):  # until the reaper's run file names those still running (it polls twice a second)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            recorded = {c["pid"] for c in json.loads(Path(run_file).read_text())["children"]}
            if all(p in recorded or not alive(p) for p in pids):
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise SystemExit("the reaper never recorded " + str(pids))
"""

OWNER = RECORDED + """
import subprocess, sys, time
from pathlib import Path
from sd_core.runtime.process import child_popen_kw
from sd_core.runtime.reaper import guard_children
with guard_children(Path(sys.argv[1])):
    a = subprocess.Popen(["sleep", "300"])                                          # in our process group
    b = subprocess.Popen(["sh", "-c", "sleep 301 & sleep 302 & wait"], **child_popen_kw())  # a group of its own
    wait_recorded(sys.argv[1], [a.pid, b.pid])
    print("ready", flush=True)
    time.sleep(300)
"""


def start_owner(tmp_path: Path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path / "run.json")], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "ready"
    kids = psutil.Process(owner.pid).children(recursive=True)
    assert len(kids) >= 5, describe(kids)  # the reaper, sleep, sh and its two sleeps
    return owner, kids


def orphan_children(tmp_path: Path) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """An owner and its reaper both killed: (the owner's process tree, those of it left running).

    `sh`, started with ``child_popen_kw``, ends by its parent-death signal once the owner is gone, but a
    moment later (when it is next scheduled): it is waited for, so it is not counted among those left (a
    fresh-clone CI run counted it as left, and then it was gone before the reaping: 3 stopped of 4)."""
    owner, kids = start_owner(tmp_path)
    try:
        reaper = next(p for p in kids if "sd_core.runtime.reaper import main" in cmdline(p))
        sh = next(p for p in kids if cmdline(p).startswith("sh -c sleep 301"))
        reaper.kill()
        owner.kill()
        owner.wait(10)
        wait_for(lambda: not running([sh]), 10, "sh to end by its parent-death signal")
        left = running([p for p in kids if p.pid not in (reaper.pid, sh.pid)])
        assert len(left) == 3, describe(left)  # sleep 300 in the owner's group; sh's sleep 301 and 302
    except BaseException:
        owner.kill()
        kill_all(kids)
        raise
    return kids, left


def test_children_of_a_killed_process_are_stopped(tmp_path):
    owner, kids = start_owner(tmp_path)
    try:
        owner.kill()
        owner.wait(10)
        wait_for(lambda: not running(kids), 15, "the children to stop")
    finally:
        kill_all(kids)


def test_next_run_stops_what_a_run_killed_with_its_reaper_left(tmp_path):
    from sd_core.runtime.reaper import reap_dead_run

    bystander = subprocess.Popen(["sleep", "303"])  # started after the owner's record, not by it
    kids, left = orphan_children(tmp_path)
    try:
        assert reap_dead_run(tmp_path / "run.json", grace_s=2) == len(left)
        assert not running(kids)
        assert bystander.poll() is None  # never signalled
    finally:
        kill_all(kids)
        bystander.kill()
        bystander.wait()


DASK_OWNER = RECORDED + """
import sys, time
from pathlib import Path
from distributed import LocalCluster
from sd_core.runtime.reaper import guard_children
with guard_children(Path(sys.argv[1])) as reaper:
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
    kids = psutil.Process().children(recursive=True)
    wait_recorded(sys.argv[1], [k.pid for k in kids if k.pid != reaper.pid])
    print("ready", flush=True)
    time.sleep(300)
"""


def test_dask_workers_of_a_killed_process_are_stopped(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", DASK_OWNER, str(tmp_path / "run.json")], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    kids: list[psutil.Process] = []
    try:
        assert owner.stdout.readline().strip() == "ready"
        kids = psutil.Process(owner.pid).children(recursive=True)
        assert any("spawn_main" in cmdline(k) for k in kids), describe(kids)  # the worker
        owner.kill()
        owner.wait(10)
        wait_for(lambda: not running(kids), 15, "the Dask worker to stop")
    finally:
        if owner.poll() is None:
            owner.kill()
        kill_all(kids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's boot time, as Linux reports it")
@pytest.mark.parametrize("step_s", [1.0, -1.0])
def test_a_clock_step_after_the_record_hides_no_process(tmp_path, monkeypatch, step_s):
    """The kernel derives the boot time, which psutil adds to every start time, from the wall clock: when
    NTP or a VM's clock sync moves it across a second, every start time psutil reports moves with it, and a
    recorded process no longer matches its record. Reaping must not depend on it."""
    import psutil._pslinux as pslinux

    from sd_core.runtime.reaper import reap_dead_run

    kids, left = orphan_children(tmp_path)
    try:
        monkeypatch.setattr(pslinux, "boot_time", lambda b=pslinux.boot_time() + step_s: b)
        assert psutil.Process(left[0].pid).create_time() != left[0].create_time()  # the step is seen
        assert reap_dead_run(tmp_path / "run.json", grace_s=2) == len(left)
        assert not running(kids)
    finally:
        kill_all(kids)


def test_a_live_run_is_left_alone(tmp_path):
    from sd_core.runtime.reaper import reap_dead_run

    owner, kids = start_owner(tmp_path)
    try:
        assert reap_dead_run(tmp_path / "run.json") == 0
        assert len(running(kids)) == len(kids)
    finally:
        owner.kill()
        owner.wait(10)
        wait_for(lambda: not running(kids), 15, "the children to stop")
        kill_all(kids)


# --- the CLI with the temporary Prefect server, Chromium and Dask workers -----------------------------


def recorded(run_file: Path, procs: list[psutil.Process], owner: int) -> bool:
    """Whether the reaper's run file names each of ``procs`` that still runs under ``owner`` (the reaper by its
    own key). The reaper records the owner's descendants; a process that left the tree (its parent exited and
    it was re-parented, as Chromium's short-lived helpers do) is not one, and whether anything is left behind
    is what the tests after this check."""
    try:
        record = json.loads(run_file.read_text())
        under = {k.pid for k in psutil.Process(owner).children(recursive=True)}
    except (OSError, ValueError, psutil.NoSuchProcess):
        return False
    named = {c.get("pid") for c in record.get("children", [])} | {record.get("reaper")}
    return all(p.pid in named for p in running(procs) if p.pid in under)


@pytest.fixture()
def slow_crawl(tmp_path):
    """`emoji-sd run` on a demo site, pausing 120 s between listing pages with Chromium open; yields
    (process, its process tree, its stderr file) once Prefect's temporary server and Chromium run."""
    from sd_core.demo.emoji_art import build_demo_items
    from sd_core.demo.site import DemoSite

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with DemoSite(build_demo_items(12, seed=3), per_page=4) as site:
        err = tmp_path / "stderr.txt"
        with open(tmp_path / "stdout.txt", "w") as out, open(err, "w") as errf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "run", "--data-dir", str(tmp_path / "data"),
                 "--base-url", site.base_url, "--tag", site.tag, "--until", "crawl", "--no-progress",
                 "--set", "crawl.page_delay_s=120", "--set", "crawl.max_requests_per_second=0"],
                cwd=REPO, env=env, stdout=out, stderr=errf, start_new_session=True,
            )
        tree: list[psutil.Process] = []
        try:
            def ready():
                if proc.poll() is not None:
                    raise AssertionError(f"the run ended early:\n{err.read_text()[-3000:]}")
                kids = psutil.Process(proc.pid).children(recursive=True)
                lines = [cmdline(k) for k in kids]
                if any("uvicorn" in c for c in lines) and any("chromium" in c for c in lines):
                    return kids
                return None

            tree = wait_for(ready, 240, "Prefect's server and Chromium", interval=1.0)
            run_file = tmp_path / "data" / "state" / "run.json"
            wait_for(lambda: recorded(run_file, tree, proc.pid), 30, "the reaper to record the run's processes",
                     interval=0.2)
            yield proc, tree, err
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            kill_all(tree)


@pytest.mark.slow
def test_sigkill_of_a_run_leaves_no_process(slow_crawl):
    proc, tree, _ = slow_crawl
    names = describe(tree)
    assert len(tree) >= 5, names
    proc.kill()
    proc.wait(10)
    all_stop(tree, names)  # the reaper's SIGTERM, then SIGKILL after its 3 s grace period


@pytest.mark.slow
def test_sigterm_stops_the_run_and_its_processes_with_one_line(slow_crawl):
    proc, tree, err = slow_crawl
    names = describe(tree)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    all_stop(tree, names)
    # one line of ours; Prefect's own log lines (time-stamped) around it, e.g. its server stopping at exit
    ours = [line for line in err.read_text().splitlines() if not re.match(r"\d\d:\d\d:\d\d\.\d+ \| ", line)
            and "docs.prefect.io" not in line]
    assert ours == ["emoji-sd: stopped by SIGTERM; the run's processes were stopped"]


def test_a_stage_marker_whose_pid_now_names_another_process_reads_interrupted(tmp_path):
    """After a reboot (or a long time) the pid in a killed stage's marker can name an unrelated process:
    status must still call the stage interrupted, not running."""
    from sd_core.store.catalog import Catalog
    from sd_core.store.files import atomic_write_json, read_json
    from sd_core.runtime.running import mark_running, running_marker, running_state

    cat = Catalog(tmp_path / "data")
    assert running_state(cat, "train") is None
    with mark_running(cat, "train"):
        assert running_state(cat, "train") == "running"
        marker = read_json(running_marker(cat, "train"))
    other = subprocess.Popen(["sleep", "30"])  # alive, but not the process that marked the stage
    try:
        atomic_write_json(running_marker(cat, "train"), {**marker, "pid": other.pid})
        assert running_state(cat, "train") == "interrupted"
    finally:
        other.kill()
        other.wait()
    atomic_write_json(running_marker(cat, "train"), {**marker, "pid": other.pid})  # and now gone
    assert running_state(cat, "train") == "interrupted"
