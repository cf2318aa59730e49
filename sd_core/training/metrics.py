"""What a training run records: ``metrics.csv`` (one row per optimizer step), its loss curve, and the
same figures for accelerate's trackers (TensorBoard and others) and for progress callbacks.

The rows are written in groups, whenever the trainer reads the losses back from the device (every
``train.log_every`` steps, and where it evaluates, saves or samples); ``seconds`` (wall-clock seconds of the
run's training loop, evaluation and checkpoints included) is filled in on the last row of each group only,
the moment the device had finished it."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from sd_core.common.plots import plot_loss_curve

METRIC_FIELDS = ("step", "train_loss", "val_loss", "ema_val_loss", "lr", "seconds")


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as read back from the device."""

    step: int
    loss: float  # averaged over the processes
    grad_norm: float | None  # before clipping; None when gradients are not clipped
    lr: float


@dataclass(frozen=True)
class Progress:
    """What a progress callback is told every ``train.log_every`` steps (and where the run evaluates, saves or
    samples): ``loss`` is the mean over the steps since the last report, ``lr`` the last step's."""

    step: int
    total: int
    loss: float
    lr: float
    seconds: float
    val_loss: float | None = None
    ema_val_loss: float | None = None


def read_progress(path: Path) -> Progress | None:
    """What :meth:`MetricsLog.progress` wrote last, if anything."""
    try:
        return Progress(**json.loads(Path(path).read_text("utf-8")))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def read_metrics(path: Path) -> list[dict[str, str]]:
    """Rows of a ``metrics.csv`` as dicts of strings."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


class MetricsLog:
    """``metrics.csv`` of a run; on resume, the rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, *, keep_until: int | None) -> None:
        self.path = Path(path)
        rows = read_metrics(self.path) if keep_until is not None and self.path.exists() else []
        rows = [r for r in rows if keep_until is not None and int(r["step"]) <= keep_until]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in METRIC_FIELDS} for r in rows)

    def write(self, steps: Sequence[StepRecord], *, val: tuple[float | None, float | None] | None,
              seconds: float) -> None:
        """A row for each of ``steps``; the held-out losses ``val`` and ``seconds`` go on the last."""
        def fmt(x: Any) -> str:
            return "" if x is None else repr(float(x))

        last = len(steps) - 1
        rows = [{"step": r.step, "train_loss": fmt(r.loss), "val_loss": fmt(val[0] if val and i == last else None),
                 "ema_val_loss": fmt(val[1] if val and i == last else None), "lr": repr(r.lr),
                 "seconds": f"{seconds:.3f}" if i == last else ""} for i, r in enumerate(steps)]
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=METRIC_FIELDS).writerows(rows)

    @staticmethod
    def progress(report: Progress, path: Path) -> None:
        """The latest progress as JSON (replaced, not fsynced: a watcher in another process polls it)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(report)), "utf-8")
        os.replace(tmp, path)

    def plot(self, out_png: Path) -> Path:
        return plot_loss_curve(self.path, out_png)
