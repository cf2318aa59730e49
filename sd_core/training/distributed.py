"""Training in several processes with accelerate: which process this is, and launching N of them.

``accelerate launch --multi_gpu --num_processes N -m flows.cli train ...`` starts N copies of the train
command; each trains its share of every global batch, and only the main process writes (records,
checkpoints, exports). On a machine without CUDA the processes run on the CPU and synchronise gradients
over gloo (how the tests run it); with GPUs, each process takes one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Callable, Sequence

import torch

LOCK_HELD = "EMOJI_SD_LOCK_HELD"  # set by a parent that holds the data-dir lock for the processes it launches


def state() -> Any:
    """accelerate's process state (it joins the process group when launched by ``accelerate launch``)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def launched() -> bool:
    """Whether this process is one of several started by a launcher (torchrun / accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def launch_command(processes: int, args: Sequence[str]) -> list[str]:
    """The command that runs ``emoji-sd <args>`` in ``processes`` processes under ``accelerate launch``."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "flows.cli", *args]


def launch(processes: int, args: Sequence[str], *, watch: Callable[[], None] | None = None,
           every_s: float = 5.0) -> None:
    """Run ``emoji-sd <args>`` in ``processes`` processes and wait (calling ``watch`` every ``every_s`` seconds
    meanwhile); the caller holds the data-dir lock."""
    env = {**os.environ, LOCK_HELD: str(os.getpid())}
    proc = subprocess.Popen(launch_command(processes, args), env=env)
    try:
        while True:
            try:
                code = proc.wait(timeout=every_s)
                break
            except subprocess.TimeoutExpired:
                if watch is not None:
                    watch()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if watch is not None:
        watch()
    if code != 0:
        raise RuntimeError(f"the {processes}-process training run failed (exit code {code})")
