"""Waiting on mapped task runs with a progress bar, whatever task runner runs them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from prefect.futures import PrefectFuture, as_completed
from tqdm.auto import tqdm


@dataclass(frozen=True)
class FanOut:
    """The batches of work a stage fans out, and when the stage started (its clock)."""

    batches: list[Any]
    started: float = field(default_factory=time.time)

    @property
    def items(self) -> int:
        return sum(len(b) for b in self.batches)


def gather(futures: Sequence[PrefectFuture], *, desc: str, progress: bool) -> list[Any]:
    """Results of ``futures`` in submission order, with a bar that moves as each one finishes."""
    bar = tqdm(total=len(futures), desc=desc, unit="batch", disable=not progress or not futures)
    for _ in as_completed(list(futures)):
        bar.update(1)
    bar.close()
    return [f.result() for f in futures]
