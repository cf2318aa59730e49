"""What a training run records: ``metrics.csv`` (one row per logged step), its loss curve, and the
same figures for accelerate's trackers (TensorBoard and others) and for progress callbacks."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sd_core.common.plots import plot_loss_curve

METRIC_FIELDS = ("step", "train_loss", "val_loss", "ema_val_loss", "lr", "seconds")


@dataclass(frozen=True)
class Progress:
    """What a progress callback is told after every optimizer step."""

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

    def write(self, step: int, *, train_loss: float | None, val: tuple[float | None, float | None] | None,
              lr: float, seconds: float) -> None:
        def fmt(x: Any) -> str:
            return "" if x is None else repr(float(x))

        row = {"step": step, "train_loss": fmt(train_loss), "val_loss": fmt(val[0] if val else None),
               "ema_val_loss": fmt(val[1] if val else None), "lr": repr(lr), "seconds": f"{seconds:.3f}"}
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=METRIC_FIELDS).writerow(row)

    @staticmethod
    def progress(report: Progress, path: Path) -> None:
        """The latest progress as JSON (replaced, not fsynced: a watcher in another process polls it)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(report)), "utf-8")
        os.replace(tmp, path)

    def plot(self, out_png: Path) -> Path:
        return plot_loss_curve(self.path, out_png)
