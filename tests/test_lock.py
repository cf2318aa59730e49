"""Two runs on one data directory: the second stops with a clear message, or waits; a killed run
leaves the directory free."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from polling import wait_for

from sd_core.store.lock import DataDirBusy, data_dir_lock

HOLDER = """
import sys
from sd_core.store.lock import data_dir_lock
with data_dir_lock(sys.argv[1]):
    print("holding", flush=True)
    sys.stdin.readline()  # hold until the test writes a line (or kills us)
"""


@pytest.fixture()
def holder(tmp_path: Path):
    """Another process holding the lock of ``tmp_path / "data"``."""
    data_dir = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(data_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    yield data_dir, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def release(proc: subprocess.Popen) -> None:
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(10)


def test_second_run_stops_naming_the_holder(holder) -> None:
    data_dir, proc = holder
    with pytest.raises(DataDirBusy) as err:
        with data_dir_lock(data_dir):
            pytest.fail("entered a data dir another process holds")
    assert f"pid {proc.pid}" in str(err.value) and "--wait-for-lock" in str(err.value)
    release(proc)
    with data_dir_lock(data_dir):  # free once the other run is done
        pass


def waiting_for_lock(path: Path, pid: int) -> bool:
    """Whether the kernel lists process ``pid`` as blocked waiting for a lock on ``path`` (``/proc/locks``
    marks a waiter with ``->``; its fields: type, mode, access, pid, major:minor:inode, range)."""
    inode = path.stat().st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields:
            waiter = fields[fields.index("->") + 1:]
            if int(waiter[3]) == pid and int(waiter[4].rsplit(":", 1)[1]) == inode:
                return True
    return False


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="the kernel's lock table, as Linux shows it")
def test_waiting_run_enters_when_the_first_finishes(holder) -> None:
    data_dir, proc = holder
    started, entered = threading.Event(), threading.Event()

    def second_run() -> None:
        started.set()
        with data_dir_lock(data_dir, wait=True):
            entered.set()

    t = threading.Thread(target=second_run, daemon=True)
    t.start()
    assert started.wait(10), "the waiting run never started"
    # the kernel shows it blocked on the data dir's lock, behind the other process
    wait_for(lambda: waiting_for_lock(data_dir / ".emoji-sd.lock", os.getpid()), 10, "the run to wait for the lock")
    assert not entered.is_set()
    release(proc)
    assert entered.wait(10)
    t.join(10)


def test_killed_run_leaves_the_data_dir_free(holder) -> None:
    data_dir, proc = holder
    proc.kill()
    proc.wait(10)
    with data_dir_lock(data_dir):
        assert (data_dir / ".emoji-sd.lock").read_text().strip().startswith("pid ")


def test_cli_run_on_a_busy_data_dir_exits_3_with_the_reason(holder, prefect_harness, capsys) -> None:
    from flows.cli import main

    data_dir, proc = holder
    code = main(["run", "--data-dir", str(data_dir), "--only", "convert", "--no-progress"])
    assert code == 3
    err = capsys.readouterr().err
    assert "in use by another emoji-sd run" in err and f"pid {proc.pid}" in err
    assert not (data_dir / "metadata.csv").exists()  # nothing was touched


def test_cli_refuses_a_busy_data_dir_before_starting_prefect(holder) -> None:
    """`emoji-sd run` and `emoji-sd demo` take the lock first: one line, exit 3, and Prefect never imported."""
    data_dir, proc = holder
    probe = ("import sys; from flows.cli import main; code = main(sys.argv[1:]); "
             "print('prefect imported' if 'prefect' in sys.modules else 'no prefect', flush=True); sys.exit(code)")
    for cmd in (["run", "--only", "convert"], ["demo", "--items", "3"]):
        r = subprocess.run([sys.executable, "-c", probe, *cmd, "--data-dir", str(data_dir), "--no-progress"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 3, r.stderr
        assert r.stderr.splitlines() == [
            f"emoji-sd: {data_dir} is in use by another emoji-sd run (pid {proc.pid}); "
            "wait for it to finish or pass --wait-for-lock"]
        assert r.stdout.splitlines()[-1] == "no prefect"


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    """The CLI holds the lock for the run; the flow's own check in the same process passes."""
    with data_dir_lock(tmp_path):
        with data_dir_lock(tmp_path):
            pass
        with data_dir_lock(tmp_path / "."):  # the same directory, spelled differently
            pass
    r = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path)], input="\n", capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "holding" in r.stdout  # released after the outer block
