"""Running untrusted decoding in a worker process, with a time limit per call.

A thread cannot be stopped, a process can: :class:`Worker` starts a fresh Python process that runs
one handler per request; a request that takes longer than its limit kills the process (the next
request starts a new one), and a process that dies (a crashing codec, the kernel's OOM killer) is
reported instead of taking the stage down with it.

Requests and answers travel as length-prefixed bytes over the process's stdin and stdout: an answer is
a JSON header, then optionally one blob. Nothing is pickled in either direction.
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

import sd_core

_LEN = struct.Struct(">Q")
START_TIMEOUT_S = 120.0  # importing the handler's module (it may import torch) on a busy machine


class WorkerTimeout(Exception):
    """The request took longer than its limit; the worker was killed."""


class WorkerCrashed(Exception):
    """The worker process died while handling the request."""


# -- parent side ---------------------------------------------------------------------------------------


def _read_exact(fd: int, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise WorkerTimeout
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise WorkerCrashed
        buf += chunk
    return bytes(buf)


class Worker:
    """A worker process running ``target(setup)``'s handler; ``call`` sends one request.

    ``target`` names a function ``"package.module:function"`` that takes the ``setup`` bytes and returns
    the handler: ``handler(request: bytes) -> (header: dict, blob: bytes | None)``.
    """

    def __init__(self, target: str, setup: bytes) -> None:
        self.target = target
        self.setup = setup
        self._proc: subprocess.Popen[bytes] | None = None
        self.started = 0

    def _start(self) -> subprocess.Popen[bytes]:
        module, func = self.target.split(":")
        code = f"from sd_core.ingest.isolate import serve; from {module} import {func}; serve({func})"
        root = str(Path(sd_core.__file__).resolve().parent.parent)  # the sd_core this process uses
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                env=env, close_fds=True)
        self._proc = proc
        self.started += 1
        try:
            self._send(self.setup)
            self._receive(time.monotonic() + START_TIMEOUT_S)
        except (WorkerTimeout, WorkerCrashed, OSError):
            code_ = self.kill()
            raise RuntimeError(f"the worker process {self.target} did not start (exit code {code_})") from None
        return proc

    def _send(self, payload: bytes) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(_LEN.pack(len(payload)) + payload)
        self._proc.stdin.flush()

    def _receive(self, deadline: float) -> tuple[dict[str, Any], bytes | None]:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        head = json.loads(_read_exact(fd, _read_len(fd, deadline), deadline))
        blob = _read_exact(fd, _read_len(fd, deadline), deadline) if head.pop("_blob", False) else None
        return head, blob

    def call(self, request: bytes, timeout: float) -> tuple[dict[str, Any], bytes | None]:
        """Run the handler on ``request``; raises WorkerTimeout or WorkerCrashed (the worker is then gone)."""
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        deadline = time.monotonic() + timeout
        try:
            self._send(request)
            return self._receive(deadline)
        except WorkerTimeout:
            self.kill()
            raise
        except (WorkerCrashed, OSError, ValueError):
            code = self.kill()
            raise WorkerCrashed(f"exit code {code}") from None

    def kill(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        code = proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except OSError:
                pass
        return code

    def close(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()  # type: ignore[union-attr]  # EOF: the worker exits on its own
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_len(fd: int, deadline: float) -> int:
    return _LEN.unpack(_read_exact(fd, _LEN.size, deadline))[0]


# -- worker side ---------------------------------------------------------------------------------------


def _read_frame(stream: BinaryIO) -> bytes | None:
    head = stream.read(_LEN.size)
    if len(head) < _LEN.size:
        return None
    (n,) = _LEN.unpack(head)
    data = stream.read(n)
    return data if len(data) == n else None


def serve(make_handler: Callable[[bytes], Callable[[bytes], tuple[dict[str, Any], bytes | None]]]) -> None:
    """The worker's loop: setup, then one answer per request, until stdin closes."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, not into the answers
    stdin = sys.stdin.buffer

    def answer(head: dict[str, Any], blob: bytes | None) -> None:
        raw = json.dumps({**head, "_blob": blob is not None}).encode()
        out.write(_LEN.pack(len(raw)) + raw)
        if blob is not None:
            out.write(_LEN.pack(len(blob)) + blob)
        out.flush()

    setup = _read_frame(stdin)
    if setup is None:
        return
    handler = make_handler(setup)
    answer({"ready": True}, None)
    while (request := _read_frame(stdin)) is not None:
        answer(*handler(request))
